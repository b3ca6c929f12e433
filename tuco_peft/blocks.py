"""The pre-trained path of one decoder block, evaluated on the fine-tuned hidden states.

Two strategies, chosen per block:

- ``SharedProjectionBlock`` (known layouts: Llama, Mistral, Qwen2/3, Gemma/Gemma2, Phi-3, GPT-2). The
  pre-trained block at a query row needs its query there and its keys/values at every position. Those are
  the *base* projections of the same normed hidden states, which every LoRA linear computes before adding
  its low-rank delta: they are captured during the fine-tuned forward, for free. Everything after attention
  is position-wise, so the rest of the block runs on the requested rows only.
- ``ReplayBlock`` (any other block): the block runs a second time with its adapters off, on the inputs the
  fine-tuned forward gave it. Exact for any architecture, at the cost of a second pass through the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .adapters import adapters_disabled, is_additive_lora, is_switchable
from .attention import apply_rope, attend_rows, key_visibility
from .inputs import Batch


@dataclass(frozen=True)
class BlockLayout:
    """Where a block family keeps its parts (attribute names on the decoder layer and its attention)."""

    attention: str
    attention_norm: str
    mlp_norm: str
    projections: tuple[str, ...]  # (q, k, v), or one fused qkv projection
    output: str
    post_attention_norm: str | None = None
    post_mlp_norm: str | None = None
    mlp: str = "mlp"


_PRE_NORM = BlockLayout("self_attn", "input_layernorm", "post_attention_layernorm", ("q_proj", "k_proj", "v_proj"), "o_proj")
_SANDWICH_NORM = BlockLayout(
    "self_attn",
    "input_layernorm",
    "pre_feedforward_layernorm",
    ("q_proj", "k_proj", "v_proj"),
    "o_proj",
    post_attention_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
_FUSED_QKV = BlockLayout("self_attn", "input_layernorm", "post_attention_layernorm", ("qkv_proj",), "o_proj")
_GPT2 = BlockLayout("attn", "ln_1", "ln_2", ("c_attn",), "c_proj")

LAYOUTS: dict[str, BlockLayout] = {
    "LlamaDecoderLayer": _PRE_NORM,
    "MistralDecoderLayer": _PRE_NORM,
    "Qwen2DecoderLayer": _PRE_NORM,
    "Qwen3DecoderLayer": _PRE_NORM,
    "GemmaDecoderLayer": _PRE_NORM,
    "Gemma2DecoderLayer": _SANDWICH_NORM,
    "Phi3DecoderLayer": _FUSED_QKV,
    "GPT2Block": _GPT2,
}


def block_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def gather_rows(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """states [b, seq, ...] at rows [b, k] → [b, k, ...]."""
    index = rows.reshape(*rows.shape, *([1] * (states.ndim - 2))).expand(-1, -1, *states.shape[2:])
    return states.gather(1, index)


class ReplayBlock:
    """Pre-trained path of any block: run it again with its adapters off."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.switchable = [m for m in layer.modules() if is_switchable(m)]

    def hook_targets(self) -> list[nn.Module]:
        return []

    def pretrained_update(
        self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        with adapters_disabled(self.switchable):
            out = block_output(self.layer.forward(*args, **kwargs))
        return gather_rows(out.float() - x.float(), batch.rows)


class SharedProjectionBlock:
    """Pre-trained path of a block of known layout, from the base q/k/v captured in the fine-tuned forward."""

    def __init__(self, layer: nn.Module, layout: BlockLayout, config: PretrainedConfig):
        self.layer = layer
        self.layout = layout
        self.attention = getattr(layer, layout.attention)
        self.projections = [getattr(self.attention, name) for name in layout.projections]
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = self.attention.head_dim
        if hasattr(self.attention, "sliding_window"):
            self.sliding_window = self.attention.sliding_window
        else:
            self.sliding_window = getattr(config, "sliding_window", None)
        self.softcap = getattr(self.attention, "attn_logit_softcapping", None)
        self.q_norm = getattr(self.attention, "q_norm", None)
        self.k_norm = getattr(self.attention, "k_norm", None)
        self.switchable = [m for m in layer.modules() if is_switchable(m)]
        self._captured: list[torch.Tensor] = []

    @staticmethod
    def supports(layer: nn.Module, layout: BlockLayout) -> bool:
        """The layout matches and the shared (all-position) parts carry no adapter of their own."""
        attention = getattr(layer, layout.attention, None)
        names = (layout.attention_norm, layout.mlp_norm, layout.mlp, layout.post_attention_norm, layout.post_mlp_norm)
        if attention is None or any(name and not hasattr(layer, name) for name in names):
            return False
        if not all(hasattr(attention, name) for name in (*layout.projections, layout.output, "head_dim")):
            return False
        shared = [getattr(layer, layout.attention_norm)]
        shared += [getattr(attention, name) for name in ("q_norm", "k_norm") if hasattr(attention, name)]
        if any(is_switchable(m) for part in shared for m in part.modules()):
            return False
        for name in layout.projections:
            projection = getattr(attention, name)
            if is_switchable(projection) and not is_additive_lora(projection):
                return False
        return True

    def hook_targets(self) -> list[nn.Module]:
        """Modules whose outputs are the base projections: a LoRA layer's base_layer, or the plain layer."""
        return [p.base_layer if is_additive_lora(p) else p for p in self.projections]

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured.append(output)

    def _split_projections(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        captured, self._captured = self._captured, []
        if len(captured) != len(self.projections):
            raise RuntimeError(
                f"expected {len(self.projections)} captured projections, got {len(captured)}: the block's "
                "forward does not match its layout."
            )
        if len(captured) == 3:
            return captured[0], captured[1], captured[2]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return captured[0].split([q_size, kv_size, kv_size], dim=-1)

    def _attention_rows(self, kwargs: dict[str, Any], batch: Batch) -> torch.Tensor:
        query, key, value = self._split_projections()
        bsz, seq = key.shape[:2]
        query = gather_rows(query, batch.rows).reshape(bsz, -1, self.n_heads, self.head_dim)
        key = key.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        value = value.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is not None:
            cos, sin = (t.expand(bsz, -1, -1) for t in position_embeddings)
            query = apply_rope(query, gather_rows(cos, batch.rows), gather_rows(sin, batch.rows))
            key = apply_rope(key, cos, sin)
        visible = key_visibility(batch.attention_mask, batch.rows, self.sliding_window)
        return attend_rows(query, key, value, visible, self.attention.scaling, self.softcap).to(value.dtype)

    def pretrained_update(
        self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        layout, layer = self.layout, self.layer
        attended = self._attention_rows(kwargs, batch)
        x_rows = gather_rows(x, batch.rows)
        with adapters_disabled(self.switchable):
            attn_update = getattr(self.attention, layout.output)(attended)
            if layout.post_attention_norm:
                attn_update = getattr(layer, layout.post_attention_norm)(attn_update)
            mlp_update = getattr(layer, layout.mlp)(getattr(layer, layout.mlp_norm)(x_rows + attn_update))
            if layout.post_mlp_norm:
                mlp_update = getattr(layer, layout.post_mlp_norm)(mlp_update)
        return attn_update.float() + mlp_update.float()


PretrainedPath = ReplayBlock | SharedProjectionBlock


def pretrained_path(layer: nn.Module, config: PretrainedConfig, replay_only: bool = False) -> PretrainedPath:
    layout = LAYOUTS.get(type(layer).__name__)
    if replay_only or layout is None or not SharedProjectionBlock.supports(layer, layout):
        return ReplayBlock(layer)
    return SharedProjectionBlock(layer, layout, config)
