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

A sliding-window slot gets a lean twin that keeps the same window (``LowRankSlidingWindowSlot``: the
inherited cropping acts on the stored u as on keys). Applies to the families whose spec allows it
(``FamilySpec.lean_cache``), when no adapter sits on the attention norm (the two blocks would project
differently normed states). Two kinds of block keep two full slots:

- k-norm families (Qwen3 per head, OLMo-2 over the full width): k_FT = RoPE(norm(W_k·n(x) + s·B_k·u)) is
  not k_PT plus a low-rank term. An exact lean form would store the pre-norm base keys W_k·n(x) (captured
  inside the projection: the attention hands the cache normed, rotated keys) instead of the pre-trained
  keys, and both slots would re-apply the norm and RoPE to every past token of every block at every step:
  the pre-trained keys, stored bit-exact today, would become recomputed ones, and each step would pay two
  norms and two RoPEs over the whole past per block on top of the low-rank rebuild (which alone already
  takes about a tenth of a CPU decode step: 30 blocks of width 576, r = 16, 32 + 16 tokens).
- static slots (``StaticCache``): they exist for fixed shapes and buffer addresses (torch.compile, CUDA
  graphs); a lean slot returns freshly rebuilt keys at every step, over the whole preallocated length.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .adapters import is_additive_lora
from .attention import apply_rope
from .blocks import SharedProjectionBlock
from .errors import TuCoError
from .families import OutputRows, attention_heads, spec_for
from .interception import hooked

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

    def __call__(self, rotary_emb: nn.Module, like: torch.Tensor, positions: torch.Tensor) -> RotaryTable:
        """``rotary_emb(like, positions)``, from the memo when a slot of this forward already asked for it."""
        key = (id(rotary_emb), tuple(positions.shape), like.dtype, like.device)
        if key not in self._tables:
            self._tables[key] = rotary_emb(like, positions)
        return self._tables[key]


class LowRankDelta:
    """The LoRA part of one block's keys and values: records u = A·x in the forward, rebuilds s·B·u later.

    ``projections``: the distinct modules holding the keys and values (k_proj and v_proj, or one fused
    q/k/v projection); ``parts``: for the keys, then the values, (index into ``projections``, output rows).
    """

    def __init__(
        self,
        projections: list[nn.Module],
        parts: tuple[tuple[int, OutputRows], tuple[int, OutputRows]],
        rotary_emb: nn.Module | None,
        shape: tuple[int, int],
        past_rotary: PastRotary,
    ):
        self.projections = projections
        self.parts = parts
        self.rotary_emb = rotary_emb
        self.past_rotary = past_rotary
        self.n_kv_heads, self.head_dim = shape
        self._recorded: list[list[str]] = [[] for _ in projections]  # per projection, the adapters whose u is recorded
        self._inputs: list[list[torch.Tensor]] = [[] for _ in projections]
        self._positions: torch.Tensor | None = None

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
        n_heads, n_kv_heads = attention_heads(config)
        head_dim = getattr(attention, spec.head_dim)
        names = spec.key_value_projections
        distinct = list(dict.fromkeys(names))
        rows = spec.key_value_rows(n_heads, n_kv_heads, head_dim)
        parts = ((distinct.index(names[0]), rows[0]), (distinct.index(names[1]), rows[1]))
        rotary_emb = None if spec.rotary_module is None else getattr(decoder, spec.rotary_module)
        projections = [getattr(attention, name) for name in distinct]
        return LowRankDelta(projections, parts, rotary_emb, (n_kv_heads, head_dim), past_rotary)

    @staticmethod
    def _adapters(projection: nn.Module) -> list[str]:
        if not is_additive_lora(projection) or projection.disable_adapters:
            return []
        return [a for a in projection.active_adapters if a in projection.lora_A]

    @contextmanager
    def recording(self, layer: nn.Module) -> Iterator[None]:
        """While active, record u = A·dropout(x) of every active adapter, and the position ids of the block's
        input."""
        self._recorded = [self._adapters(projection) for projection in self.projections]
        with ExitStack() as stack:
            stack.enter_context(hooked(layer, before=self._record_positions, with_kwargs=True))
            for index, projection in enumerate(self.projections):
                for adapter in self._recorded[index]:
                    stack.enter_context(hooked(projection.lora_A[adapter], after=self._recorder(index)))
            yield

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
        u = [part for per_projection in inputs for part in per_projection]
        u = torch.cat(u, dim=-1) if u else torch.zeros(batch, length, 0)
        return positions[:, None, :, None], u.to(positions.device)[:, None]

    def _split(self, u: torch.Tensor) -> list[list[torch.Tensor]]:
        """The stored u [batch, seq, R] back into one [batch, seq, r] part per projection and adapter."""
        ranks = [self.projections[i].lora_B[a].in_features for i, names in enumerate(self._recorded) for a in names]
        parts = iter(u.split(ranks, dim=-1))
        return [[next(parts) for _ in names] for names in self._recorded]

    def _delta(self, part: tuple[int, OutputRows], inputs: list[list[torch.Tensor]]) -> torch.Tensor | None:
        """Σ_a s_a·B_a·u_a over the rows ``part`` names, as [batch, kv_heads, seq, head_dim]; None without adapters."""
        index, rows = part
        projection, total = self.projections[index], None
        for adapter, u in zip(self._recorded[index], inputs[index]):
            lora_b = projection.lora_B[adapter]
            bias = None if lora_b.bias is None else rows.of(lora_b.bias)
            term = F.linear(u.to(lora_b.weight.dtype), rows.of(lora_b.weight), bias) * projection.scaling[adapter]
            total = term if total is None else total + term
        if total is None:
            return None
        batch, seq = total.shape[:2]
        return total.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def rebuild(self, stored: KeysValues, pretrained: KeysValues, new: KeysValues) -> KeysValues:
        """Fine-tuned keys and values: of the past tokens, from their ``pretrained`` ones and their ``stored``
        position ids and u, followed by the ``new`` ones of this forward."""
        positions, u = stored
        inputs = self._split(u[:, 0])
        delta_k, delta_v = (self._delta(part, inputs) for part in self.parts)
        if delta_k is not None and self.rotary_emb is not None:
            cos, sin = self.past_rotary(self.rotary_emb, delta_k, positions[:, 0, :, 0])
            delta_k = apply_rope(delta_k, cos, sin)
        return _joined(pretrained[0], delta_k, new[0]), _joined(pretrained[1], delta_v, new[1])


def _joined(past: torch.Tensor, delta: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """[past + delta | new] along the sequence, written once into one tensor (not summed, then copied)."""
    length = past.shape[-2]
    joined = past.new_empty(*past.shape[:-2], length + new.shape[-2], past.shape[-1])
    if delta is None:
        joined[..., :length, :] = past
    else:
        torch.add(past, delta.to(past.dtype), out=joined[..., :length, :])
    joined[..., length:, :] = new
    return joined


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
        self.values = self.values.to(value_states.dtype)  # u is not in the dtype of the (integer) positions

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's low-rank inputs; return what the plain layer kind would: the past (rebuilt)
        and the new keys/values, cut to the tokens the kind returns (a window may return fewer)."""
        has_past = self.get_seq_length() > 0
        stored = (self.keys, self.values)
        positions, u = self.delta.take(key_states.shape[0], key_states.shape[-2])
        visible = super().update(positions, u)[0].shape[-2]
        if has_past:
            pretrained = (self.pretrained.keys, self.pretrained.values)
            key_states, value_states = self.delta.rebuild(stored, pretrained, (key_states, value_states))
        return key_states[..., -visible:, :], value_states[..., -visible:, :]


class LowRankSlidingWindowSlot(LowRankSlot, DynamicSlidingWindowLayer):
    """The lean twin of a sliding-window slot: the inherited window keeps the same tokens as the twin's."""

    def __init__(self, pretrained: DynamicSlidingWindowLayer, delta: LowRankDelta):
        super().__init__(pretrained, delta, sliding_window=pretrained.sliding_window)
        # Assisted decoding sets it before the first forward (so before this slot exists); older transformers
        # versions have no such flag.
        self.record_past = getattr(pretrained, "record_past", False)


_LEAN_SLOTS: dict[type[CacheLayerMixin], type[LowRankSlot]] = {
    DynamicLayer: LowRankSlot,
    DynamicSlidingWindowLayer: LowRankSlidingWindowSlot,
}


def use_lean_slots(layers: list[CacheLayerMixin], n_layers: int, deltas: dict[int, LowRankDelta]) -> None:
    """Make the empty fine-tuned slots ``layers[l]`` of the blocks in ``deltas`` lean twins of their
    pre-trained slots ``layers[n_layers + l]``, where that kind of slot has one (not a static slot)."""
    for index in range(n_layers):
        pretrained = layers[n_layers + index]
        if isinstance(layers[index], LowRankSlot):  # left by an earlier ftc_scale: its delta no longer records
            layers[index] = copy.deepcopy(pretrained)
        slot_class = _LEAN_SLOTS.get(type(pretrained))
        if index in deltas and slot_class is not None and type(layers[index]) is type(pretrained):
            layers[index] = slot_class(pretrained, deltas[index])
