"""Check that a model's adapters can be decomposed exactly, and switch them off without side effects.

The pre-trained block of an adapter fine-tune is the same block with its adapters off, which PEFT defines
for every tuner (LoRA and its variants such as DoRA, IA3, LoHa, LoKr, VeRA, OFT, BOFT, ...), so every tuner
is decomposed exactly. The one-pass shortcuts need more than "off", which each tuner layer's kind says
(``tuco_peft.lora.kinds``): where its pre-trained projection is found in the fine-tuned forward
(``has_pretrained_projection``), and whether its delta is a plain low-rank term (``is_additive_lora``: the
lean KV cache and the fused kernels). A block with an unregistered tuner on its q/k/v projections is
replayed with its adapters off instead.

PEFT's ``disable_adapter()`` is avoided on purpose: it flips ``requires_grad`` (peft#3447) and unmerges
merged weights in place. Here only the per-module ``_disable_adapters`` flag is toggled, and it is put
back exactly as it was found.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import InputError, UnsupportedModelError
from ..model.interception import forward_replaced, hooked, replaced_forwards
from ..model.inventory import ModuleInventory, is_switchable
from .kinds import ADALORA, adapter_kind, holds_tuner_layer, stacked_kinds

if TYPE_CHECKING:
    from ..model.inventory import LoraModule, TunerModule


def has_pretrained_projection(module: nn.Module) -> TypeGuard[TunerModule]:
    """A tuner layer of a registered kind, whose pre-trained projection the fine-tuned forward computes or
    one more call of the layer gives (``kinds.BaseOutput``); not one with another tuner layer beneath it."""
    return adapter_kind(module) is not None


def is_additive_lora(module: nn.Module) -> TypeGuard[LoraModule]:
    """A PEFT LoRA linear whose active adapters all add a plain low-rank term to the pre-trained projection: no
    DoRA or other LoRA variant (they rescale or reshape it), no other tuner layer beneath it (a mixed model's)."""
    kind = adapter_kind(module)
    return kind is not None and kind.low_rank


def pretrained_projection(module: nn.Module) -> nn.Module:
    """A tuner layer's base layer, or the layer itself where it is none of a registered kind. The base layer's
    output is the pre-trained projection where the kind's is captured; a recomputed one is reported under the
    base layer too (``LoraLinearBackend.report_base_outputs``), though the forward calls it on another input."""
    return module.get_base_layer() if has_pretrained_projection(module) else module


def check_adapters(modules: ModuleInventory) -> None:
    """Refuse a model without adapters, or with adapters merged into the base weights (the pre-trained block
    is then gone); warn once per kind of tuner layer that has no one-pass rule.

    Tuner layers outside the decoder blocks (e.g. the trainable tokens of ``LoraConfig(trainable_token_indices=
    ...)``) belong to no component: the embeddings and the head are not decomposed.
    """
    tuner_layers = modules.lora_layers + modules.other_adapters
    if not tuner_layers:
        raise UnsupportedModelError(
            "the model has no LoRA adapters (nor any other PEFT adapter), so there is no fine-tuned component to "
            "measure; wrap the base "
            "model with peft.get_peft_model(...) or PeftModel.from_pretrained(base, adapter_path); for a full "
            "fine-tune pass base_model=<the pre-trained model or its checkpoint path>."
        )
    merged = [name for name, module in tuner_layers if getattr(module, "merged", False)]
    if merged:
        raise UnsupportedModelError(
            f"{len(merged)} adapter layers are merged into their base weights (e.g. {merged[0]}), so the "
            "pre-trained block is no longer in the model; call model.unmerge_adapter() first."
        )
    _warn_of_generic_layers(modules)


def _warn_of_generic_layers(modules: ModuleInventory) -> None:
    """One warning per class of tuner layer in a block that has no registered kind (``kinds``)."""
    in_blocks = {id(module) for block in modules.switchable for module in block}
    kinds: dict[str, str] = {}
    for name, module in modules.lora_layers + modules.other_adapters:
        if id(module) in in_blocks and adapter_kind(module) is None:
            over = " layers over another tuner layer" if holds_tuner_layer(module) else " layers"
            kinds.setdefault(f"{type(module).__module__}.{type(module).__name__}{over}", name)
    for kind, name in kinds.items():
        warnings.warn(
            f"{kind} (e.g. {name}) have no one-pass rule (tuco_peft.lora.kinds): they are decomposed exactly by "
            "switching them off; a block with one on a q/k/v projection runs its pre-trained path as a second "
            "pass through the block (the generic path), and its KV cache slots under ftc_scale stay full.",
            stacklevel=3,
        )


@contextmanager
def adapters_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the pre-trained path of ``modules``: their adapters off, restored exactly afterwards.

    A tuner layer whose forward, adapters off, is exactly its base layer's call (``AdapterKind.off_is_base_call``)
    meanwhile calls exactly that: its instance forward is its innermost base layer's call (hooks on the layer and
    on that base layer still run; a mixed model's intermediate tuner layers are skipped), without PEFT's
    per-call Python, which costs several times a small projection. Not where something else replaced its
    forward already.
    """
    switched = [m for m in modules if is_switchable(m)]
    base_calls = [(m, m.get_base_layer().__call__) for m in switched if _off_is_base_call(m) and not forward_replaced(m)]
    wrappers = [m for m in switched if isinstance(m, ParamWrapper)] if torch.is_grad_enabled() else []
    with (
        _instance_values(switched, "_disable_adapters", True),  # flags undone last
        replaced_forwards(base_calls),
        _own_version_counters(wrappers),
    ):
        yield


@contextmanager
def _own_version_counters(wrappers: Sequence[ParamWrapper]) -> Iterator[None]:
    """The parameters that LoRA on parameters (``target_parameters``) wraps, each replaced by an alias with a
    version counter of its own while the adapters are off (with grad mode on: without it nothing is saved).

    Every adapters-on call of such a layer registers its parametrization again, which ``set_``s the parameter and
    so bumps its version. A call with the adapters off that saved the parameter for backward would otherwise
    fail backward once the layer ran with them on again in the same graph: the paired half after it, the next
    adapter of ``decompose_adapters``, a loss computed after TuCo. A parameter of a subclass (a quantized one) is
    left as it is: the alias would lose what the subclass holds.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for wrapper in wrappers:
            base, name = wrapper.get_base_layer(), wrapper.parameter_name
            parameter = base._parameters.get(name)
            if type(parameter) is nn.Parameter:
                base._parameters[name] = _Alias.apply(parameter)
                swapped.append((base, name, parameter))
        yield
    finally:
        for base, name, parameter in reversed(swapped):
            base._parameters[name] = parameter


class _Alias(torch.autograd.Function):
    """The identity, as a tensor that shares its input's storage but not its version counter; the gradient passes
    through to the input where it requires one."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.data

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _off_is_base_call(module: nn.Module) -> TypeGuard[TunerModule]:
    kind = adapter_kind(module)
    return kind is not None and kind.off_is_base_call


@contextmanager
def _instance_values(modules: Sequence[nn.Module], name: str, value: object) -> Iterator[None]:
    """Instance attribute ``name`` of every module set to ``value`` for the block, then put back exactly as found
    (deleted where the class default showed through). Written straight into ``__dict__``, where
    ``nn.Module.__setattr__`` would put a plain value, after checks that cost more than the switch; entered
    once per block and call."""
    saved = [m.__dict__.get(name, _MISSING) for m in modules]
    try:
        for module in modules:
            module.__dict__[name] = value
        yield
    finally:
        for module, previous in zip(modules, saved):
            if previous is _MISSING:
                del module.__dict__[name]
            else:
                module.__dict__[name] = previous


def held_adapters(modules: ModuleInventory) -> list[str]:
    """The adapters the model's tuner layers hold, in the order they first appear."""
    names: dict[str, None] = {}
    for _, layer in modules.adapter_holders:
        if isinstance(layer, BaseTunerLayer):  # the wrappers around some hold the same names
            for attribute in layer.adapter_layer_names:
                names.update(dict.fromkeys(getattr(layer, attribute).keys()))
    return list(names)


BASE = "__base__"  # PEFT's name, in ``adapter_names``, for a row without an adapter
_MIXABLE_WRAPPED = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # PEFT's modules_to_save that mix


def check_adapters_per_row(modules: ModuleInventory, names: Sequence[str]) -> None:
    """Refuse ``adapter_names`` that name no adapter of the model, or that PEFT cannot mix in one batch."""
    held = held_adapters(modules)
    unknown = sorted({name for name in names if name not in held and name != BASE})
    if unknown:
        raise InputError(
            f"adapter_names names {', '.join(map(repr, unknown))}, which the model does not hold; it holds "
            f"{', '.join(map(repr, held))} (and {BASE!r} for a row without an adapter)."
        )
    reason = why_not_mixable(modules, names)
    if reason is not None:
        raise UnsupportedModelError(
            f"adapter_names mixes adapters in one batch, but {reason}; decompose one adapter at a time "
            "(decompose_adapters(..., mixed_batches=False))."
        )


def why_not_mixable(modules: ModuleInventory, names: Iterable[str]) -> str | None:
    """Why PEFT cannot run the adapters ``names`` side by side in one batch, or None where it can."""
    if modules.other_adapters:
        name, module = modules.other_adapters[0]
        return f"PEFT mixes LoRA adapters only, and {name} is a {type(module).__name__}"
    wanted = set(names)
    for name, module in modules.lora_layers:
        if any(isinstance(layer, ParamWrapper) for layer in module.modules()):  # also where a stack holds one
            return f"PEFT does not mix adapters on target_parameters, as on {name}"
        if ADALORA in (stacked_kinds(module) or ()):
            return f"PEFT does not mix AdaLoRA adapters, as on {name}"
        dora = sorted(adapter for adapter in wanted if module.use_dora.get(adapter, False))
        if dora:
            return f"PEFT does not mix DoRA adapters, and {dora[0]!r} is DoRA on {name}"
    for name, holder in modules.adapter_holders:
        if isinstance(holder, AuxiliaryTrainingWrapper) and not _mixes(holder):
            return f"PEFT mixes modules_to_save of linear, embedding and convolution layers only, not {name}"
    return None


def _mixes(wrapper: nn.Module) -> bool:
    original = getattr(wrapper, "original_module", None)
    return original is None or isinstance(original, _MIXABLE_WRAPPED)


@contextmanager
def adapters_per_row(modules: ModuleInventory, names: list[str]) -> Iterator[None]:
    """Each row of a batch through its own adapter, ``names[i]`` for row i (PEFT's mixed batches: its LoRA
    layers and auxiliary wrappers take ``adapter_names``) while the adapters are on, that is in the fine-tuned
    forward; the pre-trained path, adapters off, is the same for every row."""

    def each_row_its_adapter(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        if getattr(module, "disable_adapters", False):  # PEFT's flag, as ``adapters_disabled`` sets it
            return None
        return args, {**kwargs, "adapter_names": names}

    takers = [m for _, m in modules.adapter_holders if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
    with ExitStack() as stack:
        for module in takers:
            stack.enter_context(hooked(module, before=each_row_its_adapter, with_kwargs=True))
        yield


@contextmanager
def adapter_active(modules: ModuleInventory, name: str) -> Iterator[None]:
    """``name`` the one active adapter of the model, restored exactly afterwards.

    What PEFT's ``set_adapter`` does to the forwards of the tuner layers and auxiliary wrappers
    (modules_to_save, trainable tokens), without what it does besides: it also makes the adapter's weights
    trainable and freezes the others'. A module that does not hold ``name`` computes its base output alone,
    as it would under ``set_adapter``.
    """
    with _instance_values([module for _, module in modules.adapter_holders], "_active_adapter", [name]):
        yield


_MISSING = object()
