"""The pre-trained and the fine-tuned block of a layer in one forward, on the same input stacked twice.

FTC_α steering and decomposing every position need, at every block, f_PT(x) and f_FT(x) for the same x.
Instead of running the block a second time with its adapters off, a paired block runs once on [x; x]:
every module PEFT can switch computes the first half with its adapters off and the second half with them
on; everything else in the block (norms, attention, rotary embeddings) is batch-wise anyway. The LoRA
linears go through the backend, which reads each base weight once for both halves: on the torch backend,
one call of the base layer on both halves' rows; on the Triton backend, one fused kernel that reads (and
dequantizes) each weight tile once. The q/k/v projections, whose two halves are the same normed x, need
only the fine-tuned forward with its base output (``dual``).

A cache passed to the block is seen through ``paired_slots``: the fine-tuned half's keys/values go to the
block's own slot, the pre-trained half's to the slot the caller keeps for the pre-trained block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PretrainedConfig

from ..families import attention_implementation, spec_for
from ..lora.adapters import adapters_disabled
from ..lora.backend import LoraLinearBackend, TorchBackend
from ..lora.kinds import AdapterKind, adapter_kind
from ..model.block_args import find_cache, hidden_states, replace_output, with_cache
from ..model.interception import CacheView, any_forward_replaced, module_hooked, replaced_forwards, submodules
from ..model.inventory import outermost_switchable
from ..model.parts import ModelParts
from .pretrained_path import SharedProjectionBlock, block_output, has_parts

# (block input x [b, ...], pre-trained output, fine-tuned output) → the output the model continues with.
PairedOutputs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_BATCHWISE_ATTENTION = ("eager", "sdpa")


def _stacked(value: Any, batch: int) -> Any:
    """``value`` for the stacked batch: per-example tensors ([batch, ...], 2-D or more: hidden states, masks,
    position ids and embeddings) repeated, the rest kept (1-D cache positions, caches, flags)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim >= 2 and value.shape[0] == batch else value
    if type(value) in (tuple, list):
        return type(value)(_stacked(item, batch) for item in value)
    return value


class StackedArguments:
    """Stacked copies of the arguments a decoder passes alike to every block (position embeddings, masks,
    position ids), made by the first paired block of a forward and reused by the others, which are handed the
    very same objects. One per ``ftc_scale`` or ``decompose`` call; it keeps one forward's arguments."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[Any, Any]] = {}  # keyword → (the value seen last, its stacked copy)

    def stacked(self, name: str, value: Any, batch: int) -> Any:
        if name == "hidden_states":  # each block's own
            return _stacked(value, batch)
        made = self._made.get(name)
        if made is None or made[0] is not value:
            made = self._made[name] = (value, _stacked(value, batch))
        return made[1]


def paired_slots(cache: Any, pretrained_slot: int) -> CacheView:
    """The cache as the paired block sees it: halves of each key/value update go to their own slots.

    The fine-tuned half is written first: a lean fine-tuned slot rebuilds its past from the pre-trained
    slot, which must not yet hold the new tokens.
    """

    def write(
        key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = key_states.shape[0] // 2
        keys_ft, values_ft = cache.update(key_states[half:], value_states[half:], layer_idx, *args, **kwargs)
        keys_pt, values_pt = cache.update(key_states[:half], value_states[:half], pretrained_slot, *args, **kwargs)
        return torch.cat([keys_pt, keys_ft]), torch.cat([values_pt, values_ft])

    return CacheView(cache, write)


class PairedBlock:
    """One adapter fine-tuned decoder block run as its pre-trained and fine-tuned self at once.

    What the block's structure decides is found once (``paired_block`` keeps it with the model's survey);
    each call attaches it with that call's backend and stacked arguments."""

    def __init__(self, layer: nn.Module, config: PretrainedConfig):
        self.layer = layer
        self._torch_backend = TorchBackend()
        spec = spec_for(layer, config)
        assert spec is not None, "a block is paired only where PairedBlock.supports it"
        attention = getattr(layer, spec.attention)
        shared = SharedProjectionBlock.supports(layer, spec)
        shared_input = [getattr(attention, name) for name in spec.projections] if shared else []
        self.switchable = [
            _Switchable(module, submodules(module), any(module is m for m in shared_input), adapter_kind(module))
            for module in outermost_switchable(layer)
        ]

    @staticmethod
    def supports(layer: nn.Module, config: PretrainedConfig) -> bool:
        """A family whose spec allows pairing, batch-wise attention, and no forward already replaced on an
        instance (accelerate's device hooks), which the stacked call would bypass."""
        spec = spec_for(layer, config)
        return (
            spec is not None
            and spec.pairable
            and has_parts(layer, spec)
            and attention_implementation(config) in _BATCHWISE_ATTENTION
            and not any_forward_replaced(layer)
        )

    @contextmanager
    def attached(
        self,
        backend: LoraLinearBackend,
        arguments: StackedArguments,
        on_outputs: PairedOutputs,
        pretrained_slot: int | None = None,
    ) -> Iterator[None]:
        """While active, every forward of the block computes both outputs and continues with ``on_outputs``.

        ``arguments``: shared by the paired blocks of one forward. ``pretrained_slot``: the cache slot for the
        pre-trained block's keys/values (when called with a cache). The stacking happens inside the block's
        forward, so hooks on the block itself (transformers' output recorders, users') see one stream, as
        without pairing; hooks inside the block see both halves.
        """
        replacements = [(self.layer, self._stacked_forward(arguments, on_outputs, pretrained_slot))]
        for switchable in self.switchable:
            # A fused kernel never calls the inner layers, so one that something observes (the lean KV
            # cache records lora_A's output) keeps the torch path (which checks the layers it skips itself).
            observed = backend.fuses(switchable.module) and any(module_hooked(m) for m in switchable.inner)
            forward = _paired_forward(switchable, self._torch_backend if observed else backend, self._torch_backend)
            replacements.append((switchable.module, forward))
        with replaced_forwards(replacements):
            yield

    def _stacked_forward(
        self, arguments: StackedArguments, on_outputs: PairedOutputs, pretrained_slot: int | None
    ) -> Callable[..., Any]:
        layer = self.layer

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = hidden_states(args, kwargs)
            found = find_cache(args, kwargs)
            batch = x.shape[0]
            args, kwargs = _stacked(args, batch), {k: arguments.stacked(k, v, batch) for k, v in kwargs.items()}
            if found is not None:
                if pretrained_slot is None:
                    raise RuntimeError("a paired block got a cache but has no slot for its pre-trained half.")
                site, cache = found
                args, kwargs = with_cache(args, kwargs, site, paired_slots(cache, pretrained_slot))
            output = type(layer).forward(layer, *args, **kwargs)
            pretrained, finetuned = block_output(output).split(x.shape[0])
            return replace_output(output, on_outputs(x, pretrained, finetuned))

        return forward


class _Switchable(NamedTuple):
    """A module of a paired block whose adapters switch, with what its structure decides."""

    module: nn.Module
    inner: list[nn.Module]  # the modules inside it, whose hooks are looked at on every call
    shared_input: bool  # a q/k/v projection: both halves of its input are the same normed x
    kind: AdapterKind | None  # its kind, where it is a tuner layer of a registered kind (``lora.kinds``)


def _paired_forward(
    switchable: _Switchable, backend: LoraLinearBackend, torch_backend: TorchBackend
) -> Callable[..., torch.Tensor]:
    """The module's forward on the stacked batch, its LoRA linears computed by ``backend``: a q/k/v projection
    whose forward computes its base output first gives both halves from one call of that forward."""
    module, kind = switchable.module, switchable.kind

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        half = x.shape[0] // 2
        if kind is not None and not args and not kwargs:
            if kind.low_rank:
                if switchable.shared_input:
                    return torch.cat(backend.dual(x[half:], module))
                return backend.stacked(x, module)
            if switchable.shared_input and kind.captured:  # the fused kernels compute plain LoRA only
                return torch.cat(torch_backend.dual(x[half:], module))
        with adapters_disabled(module.modules()):  # with the tuner layers nested in it (mixed models)
            pretrained = type(module).forward(module, x[:half], *args, **kwargs)
        return torch.cat([pretrained, type(module).forward(module, x[half:], *args, **kwargs)])

    return forward


def paired_block(
    parts: ModelParts, index: int, backend: LoraLinearBackend, separate_model: bool, *, prefill: bool = False
) -> PairedBlock | None:
    """Block ``index`` run paired where that saves weight reads, else None (the caller runs both blocks).

    Every backend reads each base weight once for both halves of a paired block (where nothing hooks the base
    layer, whose observers must see each half on its own). Pairing applies only to an
    adapter fine-tune (a ``separate_model`` has pre-trained blocks of its own) whose blocks share no keys/values
    (``model.shared_keys_values``) and whose block
    ``PairedBlock.supports`` (known family, batch-wise attention, no accelerate-offloaded forwards). A
    ``prefill`` (decompose at every position) pairs only on a backend that ``pairs_prefill``: stacking
    doubles the block's activations, which a compute-bound matmul does not repay. What the block supports is
    kept with the model's survey (``ModelParts.derived``), so a call costs no walk of the block.
    """
    if separate_model or parts.shares_keys_values or (prefill and not backend.pairs_prefill):
        return None
    layer = parts.layers[index]
    return parts.derived(
        ("paired block", index),
        lambda: PairedBlock(layer, parts.config) if PairedBlock.supports(layer, parts.config) else None,
    )
