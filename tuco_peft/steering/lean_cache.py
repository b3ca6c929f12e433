"""The lean dual KV cache of FTC_α steering: fine-tuned keys/values stored as a low-rank delta.

Under steering, the fine-tuned and the pre-trained block l see the same state x_l, so their keys and
values share the base projection: k_FT = RoPE(W_k·n(x) + s·B_k·u) = k_PT + RoPE(s·B_k·u) with u = A·n(x)
(RoPE is linear; GPT-2 has none), and v_FT = v_PT + s·B_v·u. B_k and B_v are the key and value rows of the
LoRA B of the projection that holds them: k_proj and v_proj, each with its own u, or one fused q/k/v
projection (Phi-3, GPT-2, GPT-NeoX; rows as the family's ``qkv_layout`` says), whose single u serves both.
The pre-trained slot keeps full keys/values; the fine-tuned slot keeps only each token's position id and
u, and rebuilds its past keys/values from them at every step. Per token and block, plain generation
stores 2·kv_width elements (kv_width = kv heads · head dim); the lean pair stores 2·kv_width + R elements
of the model dtype (R = 2r, or r for a fused projection) and one int64 position: 1 + (R + 8/e)/(2·kv_width)
of plain for e-byte elements, instead of 2× (r = 64, kv width 1024, bf16: 1.06×).

k-norm families (Qwen3 per head, OLMo-2 over the full width) normalise the keys before RoPE:
k_FT = RoPE(k_norm(K0 + s·B_k·u)) with K0 = W_k·n(x) is not k_PT plus a low-rank term. Their pre-trained
slot stores K0 instead of the keys (the same size, so the same memory), recorded at the base key projection
(the attention hands the cache normed, rotated keys); both slots recompute the keys of the past with the
attention's own k_norm and the model's RoPE: RoPE(k_norm(K0)), the keys the attention produced (the same
modules on the same inputs; bit for bit in the CPU tests), and RoPE(k_norm(K0 + s·B_k·u)). Each step pays
two norms and two RoPEs over the past per block on top of the low-rank rebuild.

A sliding-window slot gets a lean twin that keeps the same window (``LowRankSlidingWindowSlot``: the
inherited cropping acts on the stored u as on keys). Applies to the families whose spec allows it
(``FamilySpec.lean_cache``), when no adapter sits on the attention norm or the q/k norms (the two blocks
would project or normalise differently). Static slots (``StaticCache``) keep two full slots: they exist for
fixed shapes and buffer addresses (torch.compile, CUDA graphs); a lean slot returns freshly rebuilt keys at
every step, over the whole preallocated length.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..core.pretrained_path import SharedProjectionBlock
from ..errors import TuCoError
from ..families import OutputRows, QKNorm, attention_heads, spec_for
from ..lora.adapters import is_additive_lora, pretrained_projection
from ..model.attention import apply_rope
from ..model.interception import hooked
from ..model.inventory import is_switchable

if TYPE_CHECKING:
    from ..model.inventory import LoraModule

RotaryTable = tuple[torch.Tensor, torch.Tensor]
KeysValues = tuple[torch.Tensor, torch.Tensor]


class PastRotary:
    """cos/sin of the cached positions, shared by the lean slots of one forward and computed once for them.

    Every slot holds a suffix of the same tokens (a sliding window keeps fewer), so slots holding as many
    tokens hold the same positions. ``clear`` at every forward: the next one caches other positions.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[Any, ...], RotaryTable] = {}

    def clear(self) -> None:
        self._tables.clear()

    def __call__(
        self, rotary_emb: nn.Module, like: torch.Tensor, positions: torch.Tensor, layer_type: str | None = None
    ) -> RotaryTable:
        """``rotary_emb(like, positions)``, from the memo when a slot of this forward already asked for it;
        ``layer_type``: the rotary table of that type of layer, where bases differ by type (Gemma 3)."""
        key = (id(rotary_emb), layer_type, tuple(positions.shape), like.dtype, like.device)
        if key not in self._tables:
            arguments = () if layer_type is None else (layer_type,)
            self._tables[key] = rotary_emb(like, positions, *arguments)
        return self._tables[key]


class NormedKeys:
    """The keys of a k-norm block: records the pre-norm base keys K0 = W_k·n(x) of each forward and applies
    the attention's ``k_norm`` to stored ones as the attention does (per head, or over the full width)."""

    def __init__(self, base_projection: nn.Module, norm: nn.Module, full_width: bool, head_dim: int):
        self.base_projection = base_projection
        self.norm = norm
        self.full_width = full_width
        self.head_dim = head_dim
        self._base_keys: torch.Tensor | None = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While active, keep the output of the base key projection's latest call."""
        with hooked(self.base_projection, after=self._record):
            yield

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._base_keys = output  # an unpaired block calls it twice per forward (adapters on, then off): alike

    def take(self, batch: int) -> torch.Tensor:
        """K0 of this forward's tokens as [batch, kv_heads, seq, head_dim]: the first ``batch`` rows, which are
        the pre-trained half where a paired block calls a projection without adapters on both halves. (The
        fine-tuned slot, written first, refuses a forward outside the ``ftc_scale`` that records them.)"""
        assert self._base_keys is not None  # recorded in this forward, as the fine-tuned slot made sure
        base_keys, self._base_keys = self._base_keys[:batch], None
        return base_keys.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def normed(self, base_keys: torch.Tensor) -> torch.Tensor:
        """``k_norm`` of pre-norm keys [batch, kv_heads, seq, head_dim], in that layout."""
        if not self.full_width:
            return self.norm(base_keys)
        batch, heads, seq, head_dim = base_keys.shape
        flat = base_keys.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        return self.norm(flat).view(batch, seq, heads, head_dim).transpose(1, 2)


class LowRankDelta:
    """The LoRA part of one block's keys and values: records u = A·x in the forward, rebuilds s·B·u later.

    ``projections``: the distinct modules holding the keys and values (k_proj and v_proj, or one fused
    q/k/v projection); ``parts``: for the keys, then the values, (index into ``projections``, output rows);
    ``normed_keys``: for a k-norm block, whose pre-trained slot then stores pre-norm keys (``PreNormKeySlot``).
    """

    def __init__(
        self,
        projections: list[nn.Module],
        parts: tuple[tuple[int, OutputRows], tuple[int, OutputRows]],
        rotary_emb: nn.Module | None,
        shape: tuple[int, int],
        past_rotary: PastRotary,
        normed_keys: NormedKeys | None = None,
        layer_type: str | None = None,
    ):
        self.projections = projections
        self.parts = parts
        self.rotary_emb = rotary_emb
        self.layer_type = layer_type
        self.past_rotary = past_rotary
        self.n_kv_heads, self.head_dim = shape
        self._recorded: list[list[str]] = [[] for _ in projections]  # per projection, the adapters whose u is recorded
        self._inputs: list[list[torch.Tensor]] = [[] for _ in projections]
        self._positions: torch.Tensor | None = None
        self.normed_keys = normed_keys
        self._past_positions: torch.Tensor | None = None  # of the past the fine-tuned slot rebuilt this forward

    @staticmethod
    def for_block(
        layer: nn.Module, decoder: nn.Module, config: PretrainedConfig, past_rotary: PastRotary
    ) -> LowRankDelta | None:
        """A delta for ``layer`` when its keys/values are base + low-rank linear in the block input, else None."""
        spec = spec_for(layer, config)
        if spec is None or not spec.lean_cache:
            return None
        if spec.rotary_module is not None and not hasattr(decoder, spec.rotary_module):
            return None
        if not SharedProjectionBlock.supports(layer, spec):  # e.g. a trained attention norm: k_FT ≠ k_PT + B·A·n(x)
            return None
        attention = getattr(layer, spec.attention)
        names = spec.key_value_projections
        if not all(is_additive_lora(p) or not is_switchable(p) for p in (getattr(attention, n) for n in names)):
            return None  # DoRA rescales the base keys: k_FT is not k_PT plus a low-rank term
        n_heads, n_kv_heads = attention_heads(config)
        head_dim = getattr(attention, spec.head_dim)
        distinct = list(dict.fromkeys(names))
        rows = spec.key_value_rows(n_heads, n_kv_heads, head_dim)
        parts = ((distinct.index(names[0]), rows[0]), (distinct.index(names[1]), rows[1]))
        rotary_emb = None if spec.rotary_module is None else getattr(decoder, spec.rotary_module)
        projections = [getattr(attention, name) for name in distinct]
        normed_keys = None
        if spec.qk_norm is not QKNorm.NONE:
            base_keys = pretrained_projection(getattr(attention, names[0]))
            normed_keys = NormedKeys(base_keys, attention.k_norm, spec.qk_norm is QKNorm.FULL_WIDTH, head_dim)
        layer_type = None
        if _tables_per_layer_type(rotary_emb):
            layer_type = getattr(attention, "layer_type", None)
            if not isinstance(layer_type, str):
                return None  # the past's rotary tables would be of another type's base
        shape = (n_kv_heads, head_dim)
        return LowRankDelta(projections, parts, rotary_emb, shape, past_rotary, normed_keys, layer_type)

    @staticmethod
    def _adapters(projection: nn.Module) -> list[str]:
        if not is_additive_lora(projection) or projection.disable_adapters:
            return []
        return [a for a in projection.active_adapters if a in projection.lora_A]

    @contextmanager
    def recording(self, layer: nn.Module) -> Iterator[None]:
        """While active, record u = A·dropout(x) of every active adapter, the position ids of the block's
        input, and the pre-norm base keys of a k-norm block."""
        self._recorded = [self._adapters(projection) for projection in self.projections]
        with ExitStack() as stack:
            stack.enter_context(hooked(layer, before=self._record_positions, with_kwargs=True))
            if self.normed_keys is not None:
                stack.enter_context(self.normed_keys.recording())
            for index, adapters in enumerate(self._recorded):
                for adapter in adapters:
                    stack.enter_context(hooked(self._lora(index).lora_A[adapter], after=self._recorder(index)))
            yield

    def _lora(self, index: int) -> LoraModule:
        """Projection ``index`` where adapters of it are recorded: a PEFT LoRA linear, as ``_adapters`` checked."""
        return cast("LoraModule", self.projections[index])

    def _lora_b(self, index: int, adapter: str) -> nn.Linear:
        """LoRA B of a recorded ``adapter`` of projection ``index``: an nn.Linear (typed any nn.Module by PEFT)."""
        return cast(nn.Linear, self._lora(index).lora_B[adapter])

    def _recorder(self, index: int) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._inputs[index].append(output)

        return record

    def _record_positions(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._inputs = [[] for _ in self.projections]  # a forward without a cache never takes them
        self._positions = kwargs.get("position_ids")

    def take(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of this forward as [batch, 1, length, ·]: position ids, and u of every adapter side by side."""
        if self._positions is None:
            raise TuCoError(
                "this cache holds FTC_α-steered keys/values in low-rank form and is only usable inside the "
                "ftc_scale block that filled it (or the decoder passed its block no position_ids)."
            )
        inputs, self._inputs = self._inputs, [[] for _ in self.projections]
        positions, self._positions = self._positions.expand(batch, -1), None
        parts = [part for per_projection in inputs for part in per_projection]
        u = torch.cat(parts, dim=-1) if parts else torch.zeros(batch, length, 0)
        return positions[:, None, :, None], u.to(positions.device)[:, None]

    def _split(self, u: torch.Tensor) -> list[list[torch.Tensor]]:
        """The stored u [batch, seq, R] back into one [batch, seq, r] part per projection and adapter."""
        ranks = [self._lora_b(i, a).in_features for i, names in enumerate(self._recorded) for a in names]
        parts = iter(u.split(ranks, dim=-1))
        return [[next(parts) for _ in names] for names in self._recorded]

    def _delta(self, part: tuple[int, OutputRows], inputs: list[list[torch.Tensor]]) -> torch.Tensor | None:
        """Σ_a s_a·B_a·u_a over the rows ``part`` names, as [batch, kv_heads, seq, head_dim]; None without adapters."""
        index, rows = part
        total = None
        for adapter, u in zip(self._recorded[index], inputs[index]):
            lora_b = self._lora_b(index, adapter)
            bias = None if lora_b.bias is None else rows.of(lora_b.bias)
            scaling = self._lora(index).scaling[adapter]
            term = F.linear(u.to(lora_b.weight.dtype), rows.of(lora_b.weight), bias) * scaling
            total = term if total is None else total + term
        if total is None:
            return None
        batch, seq = total.shape[:2]
        return total.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def rebuild(self, stored: KeysValues, pretrained: KeysValues, new: KeysValues) -> KeysValues:
        """Fine-tuned keys and values: of the past tokens, from their ``pretrained`` ones (pre-norm keys K0 in a
        k-norm block) and their ``stored`` position ids and u, followed by the ``new`` ones of this forward."""
        positions, u = stored
        positions = positions[:, 0, :, 0]
        inputs = self._split(u[:, 0])
        delta_k, delta_v = (self._delta(part, inputs) for part in self.parts)
        values = _joined(pretrained[1], delta_v, new[1])
        if self.normed_keys is None:
            if delta_k is not None:
                delta_k = self._rotated(delta_k, positions)
            return _joined(pretrained[0], delta_k, new[0]), values
        self._past_positions = positions  # the pre-trained slot's past too: it is written after this one
        # As PEFT adds them: base output + LoRA term in the promoted dtype, then back to the base output's.
        base_keys = pretrained[0] if delta_k is None else (pretrained[0] + delta_k).to(pretrained[0].dtype)
        keys = self._rotated(self.normed_keys.normed(base_keys), positions)
        return torch.cat([keys, new[0]], dim=-2), values

    def pretrained_keys(self, base_keys: torch.Tensor) -> torch.Tensor:
        """The pre-trained keys RoPE(k_norm(K0)) of a k-norm block's past, from its pre-norm keys ``base_keys``."""
        # A k-norm block's delta; the fine-tuned slot, written first, rebuilt the same past this forward.
        assert self.normed_keys is not None and self._past_positions is not None
        return self._rotated(self.normed_keys.normed(base_keys), self._past_positions)

    def _rotated(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of past keys (or key deltas) at their ``positions``, in their dtype as the attention returns them
        (OLMo-2's cos/sin are fp32); the identity without a rotary embedding."""
        if self.rotary_emb is None:
            return keys
        cos, sin = self.past_rotary(self.rotary_emb, keys, positions, self.layer_type)
        return apply_rope(keys, cos, sin).to(keys.dtype)


def _tables_per_layer_type(rotary_emb: nn.Module | None) -> bool:
    """Whether the rotary embedding makes its tables per type of layer (Gemma 3's local and global layers have
    rotary bases of their own)."""
    return rotary_emb is not None and "layer_type" in inspect.signature(rotary_emb.forward).parameters


def _joined(past: torch.Tensor, delta: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """[past + delta | new] along the sequence, written once into one tensor (not summed, then copied)."""
    length = past.shape[-2]
    joined = past.new_empty(*past.shape[:-2], length + new.shape[-2], past.shape[-1])
    if delta is None:
        joined[..., :length, :] = past
    else:
        torch.add(past, delta, out=joined[..., :length, :])  # in the promoted dtype, as PEFT adds the LoRA term
    joined[..., length:, :] = new
    return joined


def _keys_values(slot: DynamicLayer) -> KeysValues:
    """The keys and values of a slot that holds some tokens (its sequence length is above 0)."""
    assert slot.keys is not None and slot.values is not None
    return slot.keys, slot.values


class LowRankSlot(DynamicLayer):
    """The lean fine-tuned cache slot of a block: its ``keys`` hold the position ids, its ``values`` the u of
    each token, as [batch, 1, seq, ·] tensors.

    Stored that way, every inherited operation (beam reorder, batch selection, cropping, reset, sequence
    length, a sliding window) acts on them exactly as on real keys/values of the pre-trained twin.
    """

    def __init__(self, pretrained: DynamicLayer, delta: LowRankDelta, **layer_kwargs: Any):
        super().__init__(**layer_kwargs)
        self.pretrained = pretrained
        self.delta = delta

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        assert self.values is not None  # set by the initialization just made
        self.values = self.values.to(value_states.dtype)  # u is not in the dtype of the (integer) positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's low-rank inputs; return what the plain layer kind would: the past (rebuilt)
        and the new keys/values, cut to the tokens the kind returns (a window may return fewer)."""
        stored = _keys_values(self) if self.get_seq_length() > 0 else None
        positions, u = self.delta.take(key_states.shape[0], key_states.shape[-2])
        visible = super().update(positions, u)[0].shape[-2]
        if stored is not None:
            pretrained = _keys_values(self.pretrained)
            key_states, value_states = self.delta.rebuild(stored, pretrained, (key_states, value_states))
        return key_states[..., -visible:, :], value_states[..., -visible:, :]


class LowRankSlidingWindowSlot(LowRankSlot, DynamicSlidingWindowLayer):
    """The lean twin of a sliding-window slot: the inherited window keeps the same tokens as the twin's."""

    def __init__(self, pretrained: DynamicSlidingWindowLayer, delta: LowRankDelta):
        super().__init__(pretrained, delta, sliding_window=pretrained.sliding_window)
        # Assisted decoding sets it before the first forward (so before this slot exists); older transformers
        # versions have no such flag.
        self.record_past = getattr(pretrained, "record_past", False)


class PreNormKeySlot(DynamicLayer):
    """The pre-trained slot of a k-norm block beside a lean fine-tuned slot: its ``keys`` hold the pre-norm
    keys K0 of each token ([batch, kv_heads, seq, head_dim], the size of the keys), from which the fine-tuned
    slot rebuilds its own; it returns the past's keys recomputed as RoPE(k_norm(K0)), then the new ones."""

    def __init__(self, replaced: DynamicLayer, delta: LowRankDelta, **layer_kwargs: Any):
        super().__init__(**layer_kwargs)
        self.replaced = replaced
        self.delta = delta

    def plain(self) -> DynamicLayer:
        """An empty slot of the plain kind this one replaced (for a cache that another ``ftc_scale`` reuses)."""
        return copy.deepcopy(self.replaced)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K0 and the values of this forward's tokens; return what the plain layer kind would."""
        past_base_keys = _keys_values(self)[0] if self.get_seq_length() > 0 else None
        normed_keys = self.delta.normed_keys
        assert normed_keys is not None  # this slot is made for the blocks of k-norm families only
        values = super().update(normed_keys.take(key_states.shape[0]), value_states)[1]
        if past_base_keys is not None:
            key_states = torch.cat([self.delta.pretrained_keys(past_base_keys), key_states], dim=-2)
        return key_states[..., -values.shape[-2] :, :], values


class PreNormKeySlidingWindowSlot(PreNormKeySlot, DynamicSlidingWindowLayer):
    """The pre-norm pre-trained slot of a sliding-window layer: the inherited window crops K0 as keys."""

    replaced: DynamicSlidingWindowLayer

    def __init__(self, replaced: DynamicSlidingWindowLayer, delta: LowRankDelta):
        super().__init__(replaced, delta, sliding_window=replaced.sliding_window)
        self.record_past = getattr(replaced, "record_past", False)

    def plain(self) -> DynamicSlidingWindowLayer:
        slot = copy.deepcopy(self.replaced)
        slot.record_past = self.record_past  # set by assisted decoding since this slot replaced it
        return slot


# A plain slot kind → its lean fine-tuned twin, and its pre-trained slot in a k-norm block.
_LEAN_SLOTS: dict[type[CacheLayerMixin], tuple[type[LowRankSlot], type[PreNormKeySlot]]] = {
    DynamicLayer: (LowRankSlot, PreNormKeySlot),
    DynamicSlidingWindowLayer: (LowRankSlidingWindowSlot, PreNormKeySlidingWindowSlot),
}


def use_lean_slots(layers: list[CacheLayerMixin], n_layers: int, deltas: dict[int, LowRankDelta]) -> None:
    """Make the empty fine-tuned slots ``layers[l]`` of the blocks in ``deltas`` lean twins of their
    pre-trained slots ``layers[n_layers + l]``, where that kind of slot has one (not a static slot); the
    pre-trained slot of a k-norm block then stores pre-norm keys."""
    for index in range(n_layers):
        # Slots left by an earlier ftc_scale, whose deltas no longer record, go back to the plain kind.
        pretrained = layers[n_layers + index]
        if isinstance(pretrained, PreNormKeySlot):
            pretrained = layers[n_layers + index] = pretrained.plain()
        if isinstance(layers[index], LowRankSlot):
            layers[index] = copy.deepcopy(pretrained)
        slot_classes = _LEAN_SLOTS.get(type(pretrained))
        if index in deltas and slot_classes is not None and type(layers[index]) is type(pretrained):
            finetuned_class, pretrained_class = slot_classes
            assert isinstance(pretrained, DynamicLayer)  # as every slot kind in _LEAN_SLOTS
            if deltas[index].normed_keys is not None:
                pretrained = layers[n_layers + index] = pretrained_class(pretrained, deltas[index])
            layers[index] = finetuned_class(pretrained, deltas[index])
