"""The lean dual KV cache of FTC_α steering: fine-tuned keys/values stored as a low-rank delta.

Under steering, the fine-tuned and the pre-trained block l see the same state x_l, so their keys and
values share the base projection: k_FT = RoPE(W_k·n(x) + s·B_k·A_k·n(x)) = k_PT + RoPE(s·B_k·u_k) with
u_k = A_k·n(x) (RoPE is linear), and v_FT = v_PT + s·B_v·u_v. The pre-trained slot keeps full keys/values;
the fine-tuned slot keeps only u_k, u_v (rank r each) and the position ids, and rebuilds its past
keys/values from them at every step. Memory: 1 + (r + 1)/(kv_heads·head_dim) of plain generation
instead of 2×.

Applies to the families whose spec allows it (``FamilySpec.lean_cache``: separate q/k/v projections, no
k-norm, RoPE from the decoder's ``rotary_module``), when no adapter sits on the attention norm (the two
blocks would project differently normed states), on full-attention ``DynamicLayer`` slots; every other
block keeps two full slots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicLayer

from .adapters import is_additive_lora
from .attention import apply_rope
from .blocks import SharedProjectionBlock
from .errors import TuCoError
from .families import attention_heads, spec_for
from .interception import hooked


class LowRankDelta:
    """The LoRA part of one block's k/v projections: captures u = A·x in the forward, rebuilds B·u later."""

    def __init__(self, projections: tuple[nn.Module, nn.Module], rotary_emb: nn.Module, shape: tuple[int, int]):
        self.projections = projections
        self.rotary_emb = rotary_emb
        self.n_kv_heads, self.head_dim = shape
        self._recorded: tuple[list[str], list[str]] = ([], [])  # the adapters whose u = A·x is recorded, k and v
        self._inputs: list[list[torch.Tensor]] = [[], []]
        self._positions: torch.Tensor | None = None

    @staticmethod
    def for_block(layer: nn.Module, decoder: nn.Module, config: PretrainedConfig) -> LowRankDelta | None:
        """A delta for ``layer`` when its keys/values are base + low-rank linear in the block input, else None."""
        spec = spec_for(layer, config)
        if spec is None or not spec.lean_cache or not hasattr(decoder, spec.rotary_module):
            return None
        if not SharedProjectionBlock.supports(layer, spec):  # e.g. a trained attention norm: k_FT ≠ k_PT + B·A·n(x)
            return None
        attention = getattr(layer, spec.attention)
        _, key, value = (getattr(attention, name) for name in spec.projections)
        _, n_kv_heads = attention_heads(config)
        head_dim = getattr(attention, spec.head_dim)
        return LowRankDelta((key, value), getattr(decoder, spec.rotary_module), (n_kv_heads, head_dim))

    def _adapters(self, index: int) -> list[str]:
        projection = self.projections[index]
        if not is_additive_lora(projection) or projection.disable_adapters:
            return []
        return [a for a in projection.active_adapters if a in projection.lora_A]

    @contextmanager
    def recording(self, layer: nn.Module) -> Iterator[None]:
        """While active, record u = A·dropout(x) of every active adapter, and the position ids of the block's
        input."""
        self._recorded = (self._adapters(0), self._adapters(1))
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
        self._inputs = [[], []]  # a forward without a cache never takes them
        self._positions = kwargs.get("position_ids")

    def take(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed [batch, 1, length, ·] (u_k, position) and u_v of the tokens of this forward."""
        if self._positions is None:
            raise TuCoError(
                "this cache holds FTC_α-steered keys/values in low-rank form and is only usable inside the "
                "ftc_scale block that filled it (or the decoder passed its block no position_ids)."
            )
        inputs, self._inputs = self._inputs, [[], []]
        u_k, u_v = (torch.cat(u, dim=-1).float() if u else torch.zeros(batch, length, 0) for u in inputs)
        positions, self._positions = self._positions.expand(batch, -1).to(u_k), None
        packed_k = torch.cat([u_k.to(positions.device), positions[..., None]], dim=-1)
        return packed_k[:, None], u_v.to(positions.device)[:, None]

    def _delta(self, index: int, u: torch.Tensor) -> torch.Tensor | None:
        """Σ_a s_a·B_a·u_a as [batch, kv_heads, seq, head_dim], or None without adapters."""
        projection, total, start = self.projections[index], None, 0
        for adapter in self._recorded[index]:
            lora_b = projection.lora_B[adapter]
            rank = lora_b.in_features
            part = lora_b(u[..., start : start + rank].to(lora_b.weight.dtype)) * projection.scaling[adapter]
            total, start = part if total is None else total + part, start + rank
        if total is None:
            return None
        batch, seq = u.shape[:2]
        return total.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)

    def rebuild(self, packed_k: torch.Tensor, packed_v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        """Fine-tuned keys/values of past tokens from the pre-trained ones and the stored low-rank inputs."""
        packed_k, packed_v = packed_k[:, 0], packed_v[:, 0]
        delta_k, delta_v = self._delta(0, packed_k[..., :-1]), self._delta(1, packed_v)
        if delta_k is not None:
            cos, sin = self.rotary_emb(delta_k, packed_k[..., -1].long())
            keys = keys + apply_rope(delta_k, cos, sin).to(keys.dtype)
        if delta_v is not None:
            values = values + delta_v.to(values.dtype)
        return keys, values


class LowRankSlot(DynamicLayer):
    """The fine-tuned cache slot of a block: stores the packed low-rank inputs in ``keys``/``values``.

    Packing them as [batch, 1, seq, ·] tensors lets every inherited operation (beam reorder, batch
    selection, cropping, reset, sequence length) act on them exactly as on real keys/values.
    """

    def __init__(self, pretrained: DynamicLayer, delta: LowRankDelta):
        super().__init__()
        self.pretrained = pretrained
        self.delta = delta

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        past = self.get_seq_length()
        past_k, past_v = self.keys, self.values
        packed_k, packed_v = self.delta.take(key_states.shape[0], key_states.shape[-2])
        super().update(packed_k, packed_v)
        if past == 0:
            return key_states, value_states
        keys, values = self.delta.rebuild(past_k, past_v, self.pretrained.keys, self.pretrained.values)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
