"""FTC_α steering (Nuti et al., ICML 2025, Def. 5.1): x_{l+1} = x_l + PTC_l + α_l·FTC_l at every block and position.

The scheme is exact rather than approximate. A forward hook on each decoder block takes the block's own
(fine-tuned) output ``out_FT = x + PTC + FTC``, runs the same block again with its adapters off on the same
input (``out_PT = x + PTC``) and returns ``lerp(out_PT, out_FT, α) = x + PTC + α·FTC``. ``torch.lerp`` is
exact at both ends, so α = 1 gives the fine-tuned block bit for bit and α = 0 the pre-trained block.

KV cache. Inside the α-stream the pre-trained block attends to keys/values computed by the pre-trained
block from the *steered* states, which differ from the fine-tuned block's own keys/values. They are kept in
the model's cache object itself, in extra layer slots ``n_layers + l``: whatever transformers does to the
cache during ``generate`` (reset for a new generation, beam reorder, batch expansion, cropping) applies to
those slots too, so beam search and sampling need no special handling. A hybrid decoder's convolution and
recurrent states are kept the same way: every cache call of the pre-trained block that names a layer goes to
its slot (``SlotView``). Blocks that reuse earlier blocks' keys/values (Gemma 4) cache nothing; their
pre-trained selves read what the pre-trained storing blocks computed on the steered stream, from a store of their
own (``model.shared_keys_values``), so that once any block is steered, every block runs its pre-trained path.
Where a block allows it (see
``steering.lean_cache``), the fine-tuned slot then shrinks to the rank-r LoRA inputs, since both blocks see the same
state and their keys/values differ only by the low-rank delta (under a k-norm, before it: the pre-trained
slot then stores pre-norm keys); static slots keep full keys/values in both (2× plain memory). Every block
whose α ≠ 1 runs twice per forward; an adapter block of a pairable family runs once on its input stacked
twice instead (``paired``), its first half with adapters off, so every weight is read once for both blocks.

Full fine-tunes (``base_model=``). The pre-trained block of layer l is then block l of the base model,
loaded or streamed from its safetensors checkpoint (``io.block_sources.pretrained_blocks``), run on the same
steered state with its own keys/values in slot ``n_layers + l``. The fine-tuned slot holds the fine-tuned
block's full keys/values (the two differ by a full-rank delta), so the cache is 2× plain. Embedding, final
norm and head stay the fine-tuned model's: α = 0 is "fine-tuned embeddings and head around the base
blocks", which is the base model only where the two share those weights. A streamed base reads every
steered block from disk at every forward: memory of one model plus one block, at the price of that I/O.
"""

from __future__ import annotations

import copy
import math
import numbers
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import cache_utils
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from ..core.paired import PairedBlock, StackedArguments, paired_block
from ..core.pretrained_path import block_output
from ..errors import InputError, UnsupportedModelError
from ..io.block_sources import PretrainedBlocks, analysis_states, checked_pretrained_blocks
from ..lora.backend import Backend, LoraLinearBackend, make_backend, resolve_backend
from ..model.block_args import find_cache, hidden_states, replace_output, with_cache
from ..model.interception import SlotView, hooked
from ..model.parts import ModelParts, model_parts
from ..model.shared_keys_values import PretrainedStore
from .lean_cache import LowRankDelta, PastRotary, use_lean_slots

Alpha = float | Sequence[float] | torch.Tensor

# Called after every steered block with (layer index, block input, pre-trained output, fine-tuned output).
BlockObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

# A hybrid decoder's cache layer of convolution and recurrent states, and the placeholder of a block that caches
# nothing, where this transformers has them. Recurrent layers count their tokens from transformers 5.25 on. Before,
# a slot's progress is whether it holds a state, and the decoders ask the last recurrent layer of the cache (a
# pre-trained slot) whether a past is cached: every recurrent block then runs its pre-trained path, so that each
# pre-trained slot holds a state where its fine-tuned twin does.
_RECURRENT_LAYER: Any = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
_EMPTY_LAYER: Any = getattr(cache_utils, "DummyLayer", None)
_RECURRENT_LAYERS_COUNT = hasattr(_RECURRENT_LAYER, "get_seq_length") and _EMPTY_LAYER is not None

_steered_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def layer_alphas(alpha: Alpha, n_layers: int) -> tuple[float, ...]:
    """One finite, non-negative α per block, from a scalar or a per-layer sequence."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.tolist()
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, Sequence)) or isinstance(alpha, str):
        raise InputError(f"alpha must be a number or one number per layer, got {type(alpha).__name__}.")
    values = [alpha] * n_layers if isinstance(alpha, numbers.Real) else list(alpha)
    if len(values) != n_layers:
        raise InputError(
            f"alpha has {len(values)} values but the model has {n_layers} decoder blocks; pass one value per "
            "block or a single float."
        )
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError(f"alpha[{index}] must be a number, got {type(value).__name__}.")
        if not math.isfinite(value) or value < 0:
            raise InputError(
                f"alpha[{index}] = {value}: α scales the fine-tuning component and must be finite and ≥ 0 "
                "(0 = pre-trained blocks, 1 = fine-tuned model, > 1 amplifies the fine-tune)."
            )
    return tuple(float(v) for v in values)


class _PretrainedSlots:
    """The pre-trained blocks' layers in the model's cache during one ``ftc_scale``: slot ``n_layers + l`` for
    block l, added to a fresh cache before its first forward and checked after every forward.

    A hybrid decoder's convolution and recurrent states are slots like keys/values: a steered block's
    pre-trained self keeps its own in its slot (``SlotView``).
    """

    def __init__(self, n_layers: int, steered: list[int], deltas: dict[int, LowRankDelta], shares_keys_values: bool):
        self.n_layers = n_layers
        self.steered = steered
        self.deltas = deltas
        self.shares_keys_values = shares_keys_values

    def prepare(self, cache: Any) -> None:
        """Give a fresh cache its pre-trained slots (and lean fine-tuned twins where ``deltas`` allow); refuse a
        cache filled without them (outside ``ftc_scale``)."""
        if not hasattr(cache, "layers") or not hasattr(cache, "layer_class_to_replicate"):
            raise UnsupportedModelError(
                f"FTC_α steering keeps the pre-trained blocks' cache in extra layers of a transformers Cache; "
                f"{type(cache).__name__} is not one. Use the default DynamicCache (or StaticCache), or generate "
                "with use_cache=False."
            )
        unknown = next((layer for layer in cache.layers if not _duplicable(layer)), None)
        if unknown is not None:
            raise UnsupportedModelError(
                "FTC_α steering keeps the pre-trained blocks' cache in extra layers of the model's cache, but this "
                f"cache holds a layer of a kind it does not know ({type(unknown).__name__}). Generate with "
                "use_cache=False (exact; each step recomputes the prefix)."
            )
        n_layers, layers = self.n_layers, cache.layers
        fixed_layout = cache.layer_class_to_replicate is None
        if cache.get_seq_length() == 0:
            if fixed_layout and self.shares_keys_values and len(layers) < n_layers:
                # Before transformers 5.24, a cache has no layer for the last blocks, which reuse earlier blocks'
                # keys/values and cache nothing: an empty one each, so that slot n_layers + l is block l's.
                layers.extend(DynamicLayer() for _ in range(n_layers - len(layers)))
            if fixed_layout and len(layers) == n_layers:
                layers.extend([copy.deepcopy(layer) for layer in layers])
            elif cache.layer_class_to_replicate is DynamicLayer and not layers:
                layers.extend(DynamicLayer() for _ in range(2 * n_layers))
            if len(layers) == 2 * n_layers:
                self._fit_recurrent_slots(layers)
                use_lean_slots(layers, n_layers, self.deltas)
        if fixed_layout and len(layers) != 2 * n_layers:
            raise UnsupportedModelError(
                f"the cache has {len(layers)} layers, expected {n_layers} (or {2 * n_layers} with the "
                "pre-trained slots); pass a cache built for this model."
            )
        if not self._holds_the_same_past(cache):
            raise InputError(
                "past_key_values holds tokens processed outside ftc_scale (or at another α), so the pre-trained "
                "blocks have no cache for them; start from an empty cache inside the same ftc_scale block."
            )
        for delta in self.deltas.values():
            delta.past_rotary.clear()  # this forward caches other positions than the last one

    def check(self, cache: Cache) -> None:
        """After a steered forward: the cache of every steered block reached both its slots, as many tokens in each.

        A length per slot, so cheap enough for every step, and independent of how transformers hands blocks the
        cache: had the pre-trained blocks written into the fine-tuned slots (as when a release renamed the cache
        argument), the lengths would differ, and the forward's output is refused rather than decoded from.
        """
        lengths = self._cached_tokens(cache, self._caching(cache))
        slots = len(cache.layers)
        if slots == 2 * self.n_layers and all(ft == pt for ft, pt in lengths):
            return
        raise UnsupportedModelError(
            f"FTC_α steering lost track of the cache under transformers {transformers.__version__}: the steered "
            f"blocks' pre-trained states did not reach their own cache slots ({slots} cache layers for "
            f"{self.n_layers} blocks; cached tokens per steered block, fine-tuned and pre-trained, or 1 where a "
            f"recurrent layer that counts none holds a state: "
            f"{[(int(ft), int(pt)) for ft, pt in lengths]}). The output was discarded. Generate with use_cache=False "
            "meanwhile, and report this with your transformers version."
        )

    def _fit_recurrent_slots(self, layers: list[Any]) -> None:
        """The empty pre-trained slots beside a fresh cache's recurrent layers, redone for every generation, whose
        steered blocks may differ: a copy for a steered block, a placeholder for another. A recurrent layer never
        filled would fail a rollback (assisted generation crops every layer); an empty key/value layer crops to
        nothing."""
        for index in range(self.n_layers):
            if _is_recurrent(layers[index]):
                twin = copy.deepcopy(layers[index]) if index in self.steered else _EMPTY_LAYER()
                layers[self.n_layers + index] = twin

    def _holds_the_same_past(self, cache: Cache) -> bool:
        """Before a forward: every steered block that caches anything has a pre-trained slot of its own (not a
        placeholder left by a generation that did not steer it), and the first holds as many tokens in both
        slots. One length compared, not one per block: each is a device sync on a static cache, and the check
        after every forward compares them all."""
        caching = self._caching(cache)
        slots = cache.layers[self.n_layers :]
        if any(i < len(slots) and _is_empty(slots[i]) for i in caching):
            return False
        return all(ft == pt for ft, pt in self._cached_tokens(cache, caching[:1]))

    def _caching(self, cache: Cache) -> list[int]:
        """The steered blocks that cache anything (a block without attention or recurrence does not)."""
        layers = cache.layers
        return [i for i in self.steered if not (i < len(layers) and _is_empty(layers[i]))]

    def _cached_tokens(self, cache: Cache, blocks: list[int]) -> list[tuple[Any, Any]]:
        """(fine-tuned, pre-trained) tokens cached by each of ``blocks`` (before transformers 5.25, whether a
        recurrent layer holds a state)."""
        return [(_progress(cache, i), _progress(cache, self.n_layers + i)) for i in blocks]


def _progress(cache: Cache, index: int) -> Any:
    """Tokens cached in layer ``index``, or, for a recurrent layer that counts none, 1 where it holds a state
    (transformers 5.5 says so with one flag, later releases with one per state)."""
    layer: Any = cache.layers[index] if index < len(cache.layers) else None
    if _is_recurrent(layer) and not isinstance(layer, CacheLayerMixin) and not _RECURRENT_LAYERS_COUNT:
        state = layer.has_previous_state
        return int(all(state.values()) if isinstance(state, dict) else state)
    return cache.get_seq_length(index)


def _duplicable(layer: Any) -> bool:
    """A cache layer the pre-trained slots can copy and check: keys/values; convolution or recurrent states; the
    placeholder of a block without attention or recurrence, or of one that reuses another block's keys/values
    (``model.shared_keys_values``)."""
    return _is_recurrent(layer) or _is_empty(layer) or isinstance(layer, CacheLayerMixin)


def _is_recurrent(layer: Any) -> bool:
    return _RECURRENT_LAYER is not None and isinstance(layer, _RECURRENT_LAYER)


def _is_empty(layer: Any) -> bool:
    return _EMPTY_LAYER is not None and isinstance(layer, _EMPTY_LAYER)


def _output_cache(output: Any) -> Cache | None:
    """The cache a decoder returns (in a ModelOutput, or a tuple with ``return_dict=False``), whatever its name."""
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple) else ()
    return next((value for value in values if isinstance(value, Cache)), None)


class _SteeredBlock:
    """One steered block: its fine-tuned output mixed with its pre-trained block's output on the same input.

    Either a forward hook runs the pre-trained block (the block itself with adapters off, or the base
    model's block) after the fine-tuned one, or, for an adapter block of a pairable family, the block runs
    paired (``core.paired.PairedBlock``): both outputs from one forward, each weight read once for both.
    """

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        source: PretrainedBlocks,
        alpha: float,
        n_layers: int,
        observer: BlockObserver | None,
        paired: PairedBlock | None,
        backend: LoraLinearBackend,
        arguments: StackedArguments,
        store: PretrainedStore | None,
    ):
        self.index = index
        self.layer = layer
        self.source = source
        self.alpha = alpha
        self.observer = observer
        self.paired = paired
        self.backend = backend
        self.arguments = arguments
        self.store = store
        self.pretrained_slot = n_layers + index

    @contextmanager
    def attached(self) -> Iterator[None]:
        if self.paired is not None:
            with self.paired.attached(self.backend, self.arguments, self.mix, self.pretrained_slot):
                yield
            return
        # First among the block's forward hooks, so that the others (output capture, users') see the steered output.
        with hooked(self.layer, after=self._run_pretrained, with_kwargs=True, first=True):
            yield

    def mix(self, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        """x + PTC + α·FTC from the two blocks' outputs; lerp is exact at α = 0 and α = 1."""
        if self.observer is not None:
            self.observer(self.index, x, pretrained, finetuned)
        if self.alpha == 1.0:
            return finetuned
        return torch.lerp(pretrained.float(), finetuned.float(), self.alpha).to(finetuned.dtype)

    def _run_pretrained(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        x = hidden_states(args, kwargs)
        found = find_cache(args, kwargs)
        if found is not None:
            site, cache = found
            args, kwargs = with_cache(args, kwargs, site, SlotView(cache, self.pretrained_slot))
        if self.store is not None:
            kwargs = self.store.call_arguments(kwargs)
        # ``forward``, not the module call: for an adapter fine-tune the block is the hooked block itself.
        with self.source.block(self.index) as block:
            pretrained = block_output(block.forward(*args, **kwargs))
        return replace_output(output, self.mix(x, pretrained, block_output(output)))


def _has_recurrent_layers(parts: ModelParts) -> bool:
    """Whether the model's cache holds convolution or recurrent states (a hybrid decoder), as it builds it."""
    return _RECURRENT_LAYER is not None and any(map(_is_recurrent, DynamicCache(config=parts.causal_lm.config).layers))


def _lean_deltas(parts: ModelParts, steered: list[int], stack: ExitStack) -> dict[int, LowRankDelta]:
    """Low-rank k/v deltas of the steered blocks that allow a lean cache slot, recording while ``stack`` lives."""
    past_rotary = PastRotary()  # one for all: the lean slots of a forward hold the same positions
    deltas = {}
    for index in steered:
        delta = LowRankDelta.for_block(parts.layers[index], parts.decoder, parts.config, past_rotary)
        if delta is not None:
            deltas[index] = delta
            stack.enter_context(delta.recording(parts.layers[index]))
    return deltas


@contextmanager
def steered_forward(
    model: nn.Module,
    alpha: Alpha,
    observer: BlockObserver | None = None,
    *,
    base_model: nn.Module | str | Path | None = None,
    backend: Backend | None = None,
) -> Iterator[ModelParts]:
    """``ftc_scale`` with an optional observer of every block's pre-trained and fine-tuned outputs.

    With an observer, every block runs its pre-trained path (also where α = 1), so the observer sees
    PTC and FTC of each block on the steered stream.
    """
    parts = model_parts(model)
    alphas = layer_alphas(alpha, parts.n_layers)
    source = checked_pretrained_blocks(parts, base_model)
    lora_backend = make_backend(resolve_backend(backend, parts.input_device))
    if parts.causal_lm in _steered_models:
        raise InputError(
            "this model is already inside ftc_scale (or tuco_peft.generate); nesting is not supported. Leave the "
            "outer block first, or pass per-layer α values to a single ftc_scale."
        )
    steered = [i for i, a in enumerate(alphas) if a != 1.0 or observer is not None]
    if steered and (parts.shares_keys_values or (not _RECURRENT_LAYERS_COUNT and _has_recurrent_layers(parts))):
        # A steered block that reuses keys/values needs those of the pre-trained block that stores them, computed
        # on its way; before transformers 5.25, every recurrent block's pre-trained slot must hold a state where
        # its fine-tuned one does. Every pre-trained block runs (at α = 1 its output is the fine-tuned one).
        steered = list(range(parts.n_layers))
    with ExitStack() as stack:
        stack.enter_context(analysis_states(parts, source))
        _steered_models.add(parts.causal_lm)
        stack.callback(_steered_models.discard, parts.causal_lm)
        if steered:
            deltas = {} if source.separate_model else _lean_deltas(parts, steered, stack)
            slots = _PretrainedSlots(parts.n_layers, steered, deltas, parts.shares_keys_values)

            def prepare(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                found = find_cache(args, kwargs)
                if found is not None:
                    slots.prepare(found[1])

            def check(module: nn.Module, args: tuple, output: Any) -> None:
                cache = _output_cache(output)
                if cache is not None:
                    slots.check(cache)

            stack.enter_context(hooked(parts.layers[0], before=prepare, with_kwargs=True))
            stack.enter_context(hooked(parts.decoder, after=check))
        arguments, store = StackedArguments(), PretrainedStore() if parts.shares_keys_values else None
        for index in steered:
            layer = parts.layers[index]
            paired = paired_block(parts, index, lora_backend, source.separate_model)
            block = _SteeredBlock(
                index, layer, source, alphas[index], parts.n_layers, observer, paired, lora_backend, arguments, store
            )
            stack.enter_context(block.attached())
        yield parts


@contextmanager
def ftc_scale(
    model: nn.Module,
    alpha: Alpha,
    *,
    base_model: nn.Module | str | Path | None = None,
    backend: Backend | None = None,
) -> Iterator[nn.Module]:
    """Inside the block, every forward of ``model`` follows x_{l+1} = x_l + PTC_l + α_l·FTC_l.

    ``alpha`` is one float for every block or one value per block (≥ 0; 1 = the fine-tuned model, 0 = the
    pre-trained blocks, which is the base model when embeddings and head carry no adapter). ``model(...)``
    and ``model.generate(...)`` (greedy, sampling, beam search) work inside; a generation must start from an
    empty cache inside the block. Hooks and flags are removed on exit, also after an exception; nesting is
    refused. See the module docstring for the exact scheme and its cost.

    ``base_model``: for a full fine-tune (no adapters needed), the pre-trained model, loaded (same
    architecture and size) or the path of its safetensors checkpoint, streamed one block at a time. Its
    block l is the pre-trained block of layer l; embedding, final norm and head remain ``model``'s, so α = 0
    gives the base blocks under the fine-tuned embeddings and head (the base model only where those agree).

    ``backend``: as in ``decompose``. On either backend, the steered blocks of an adapter fine-tune run
    paired: both blocks in one forward, each weight (and 4-bit tile) read once for both (``paired``).

    Example::

        with ftc_scale(model, 1.1):
            out = model.generate(input_ids, max_new_tokens=20)
        with ftc_scale(chat_model, 1.1, base_model="path/to/base"):
            out = chat_model.generate(input_ids, max_new_tokens=20)
    """
    with steered_forward(model, alpha, base_model=base_model, backend=backend):
        yield model
