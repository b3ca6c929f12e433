"""The pre-trained path of one decoder block, evaluated on the fine-tuned hidden states.

The pre-trained block at a query row needs its query there and its keys/values at every position;
everything after attention is position-wise. Three strategies, chosen per block:

- ``SharedProjectionBlock`` (adapter fine-tunes, known layouts: Llama, Mistral, Qwen2/3, Gemma/Gemma2,
  Phi-3, GPT-2). The pre-trained q/k/v are the *base* projections of the same normed hidden states, which
  every LoRA linear computes before adding its low-rank delta: captured during the fine-tuned forward, for
  free. The rest of the block runs on the requested rows only.
- ``OwnProjectionBlock`` (a separate pre-trained model, known layouts): the pre-trained block computes its
  own keys/values at every position and everything else on the requested rows only.
- ``ReplayBlock`` (any other block): the pre-trained block runs in full on the inputs the fine-tuned
  forward gave its twin. Exact for any architecture, at the cost of a second pass through the block.

``pretrained_update`` takes the pre-trained block as an argument: the fine-tuned block itself (its adapters
are switched off for the call), the same block of another model, or one streamed from disk.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .adapters import adapters_disabled, is_additive_lora, is_switchable, pretrained_projection
from .attention import apply_rope, attend_rows, key_visibility
from .backend import LoraLinearRouter
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
    window_from_config: bool = False  # the family reads config.sliding_window (Mistral, Phi-3), not a per-layer one


_PRE_NORM = BlockLayout(
    "self_attn", "input_layernorm", "post_attention_layernorm", ("q_proj", "k_proj", "v_proj"), "o_proj"
)
_SANDWICH_NORM = BlockLayout(
    "self_attn",
    "input_layernorm",
    "pre_feedforward_layernorm",
    ("q_proj", "k_proj", "v_proj"),
    "o_proj",
    post_attention_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
_PRE_NORM_CONFIG_WINDOW = replace(_PRE_NORM, window_from_config=True)
_FUSED_QKV = BlockLayout(
    "self_attn", "input_layernorm", "post_attention_layernorm", ("qkv_proj",), "o_proj", window_from_config=True
)
_GPT2 = BlockLayout("attn", "ln_1", "ln_2", ("c_attn",), "c_proj")

LAYOUTS: dict[str, BlockLayout] = {
    "LlamaDecoderLayer": _PRE_NORM,
    "MistralDecoderLayer": _PRE_NORM_CONFIG_WINDOW,
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
    """Pre-trained path of any block: run the pre-trained block in full, adapters off."""

    def capturing(self, router: LoraLinearRouter) -> AbstractContextManager[None]:
        return nullcontext()

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        with adapters_disabled(pretrained.modules()):
            out = block_output(pretrained.forward(*args, **kwargs))
        return gather_rows(out.float() - x.float(), batch.rows)


def _layout_matches(layer: nn.Module, layout: BlockLayout) -> bool:
    attention = getattr(layer, layout.attention, None)
    names = (layout.attention_norm, layout.mlp_norm, layout.mlp, layout.post_attention_norm, layout.post_mlp_norm)
    if attention is None or any(name and not hasattr(layer, name) for name in names):
        return False
    return all(hasattr(attention, name) for name in (*layout.projections, layout.output, "head_dim", "scaling"))


class _RowwiseBlock:
    """Attention at the requested rows, then the position-wise rest of the block on those rows only.

    Subclasses supply the pre-trained projections (query at the rows, keys and values everywhere).
    """

    def __init__(self, layer: nn.Module, layout: BlockLayout, config: PretrainedConfig):
        attention = getattr(layer, layout.attention)
        self.layout = layout
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        if layout.window_from_config:
            self.sliding_window = getattr(config, "sliding_window", None)
        else:
            self.sliding_window = getattr(attention, "sliding_window", None)
        self.softcap = getattr(attention, "attn_logit_softcapping", None)
        self.eager = config._attn_implementation == "eager"

    def capturing(self, router: LoraLinearRouter) -> AbstractContextManager[None]:
        return nullcontext()

    def _split(self, projections: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(projections) == 3:
            return tuple(projections)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return projections[0].split([q_size, kv_size, kv_size], dim=-1)

    def _projections(
        self, pretrained: nn.Module, x: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query [b, rows, heads·hd], key and value [b, seq, kv_heads·hd]) of the pre-trained block."""
        raise NotImplementedError

    def _attend(self, attention: nn.Module, query, key, value, kwargs: dict[str, Any], batch: Batch) -> torch.Tensor:
        bsz, seq = key.shape[:2]
        query = query.reshape(bsz, -1, self.n_heads, self.head_dim)
        key = key.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        value = value.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        if getattr(attention, "q_norm", None) is not None:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is not None:
            cos, sin = (t.expand(bsz, -1, -1) for t in position_embeddings)
            query = apply_rope(query, gather_rows(cos, batch.rows), gather_rows(sin, batch.rows))
            key = apply_rope(key, cos, sin)
        visible = key_visibility(batch.attention_mask, batch.rows, self.sliding_window)
        return attend_rows(query, key, value, visible, self.scaling, self.softcap, eager=self.eager)

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        # The residual adds stay in the model's dtype, as in the block itself: in bf16/fp16 the fine-tuned
        # update carries their rounding, and so must the pre-trained one, or FTC would absorb the difference.
        layout = self.layout
        attention = getattr(pretrained, layout.attention)
        with adapters_disabled(pretrained.modules()):
            attended = self._attend(attention, *self._projections(pretrained, x, batch), kwargs, batch)
            attn_update = getattr(attention, layout.output)(attended)
            if layout.post_attention_norm:
                attn_update = getattr(pretrained, layout.post_attention_norm)(attn_update)
            x_rows = gather_rows(x, batch.rows)
            hidden = x_rows + attn_update
            mlp_update = getattr(pretrained, layout.mlp)(getattr(pretrained, layout.mlp_norm)(hidden))
            if layout.post_mlp_norm:
                mlp_update = getattr(pretrained, layout.post_mlp_norm)(mlp_update)
        return (hidden + mlp_update).float() - x_rows.float()


class SharedProjectionBlock(_RowwiseBlock):
    """Adapter fine-tunes: the pre-trained q/k/v are the base projections captured in the fine-tuned forward."""

    def __init__(self, layer: nn.Module, layout: BlockLayout, config: PretrainedConfig):
        super().__init__(layer, layout, config)
        attention = getattr(layer, layout.attention)
        self.projections = [getattr(attention, name) for name in layout.projections]
        self._base_layers = [pretrained_projection(p) for p in self.projections]
        self._captured: dict[int, torch.Tensor] = {}

    @staticmethod
    def supports(layer: nn.Module, layout: BlockLayout) -> bool:
        """The layout matches and the parts shared by every position carry no adapter of their own."""
        if not _layout_matches(layer, layout):
            return False
        attention = getattr(layer, layout.attention)
        shared = [getattr(layer, layout.attention_norm)]
        shared += [getattr(attention, name) for name in ("q_norm", "k_norm") if hasattr(attention, name)]
        if any(is_switchable(m) for part in shared for m in part.modules()):
            return False
        projections = [getattr(attention, name) for name in layout.projections]
        return all(is_additive_lora(p) or not is_switchable(p) for p in projections)

    def capturing(self, router: LoraLinearRouter) -> AbstractContextManager[None]:
        """Send the base q/k/v of the fine-tuned forward to ``capture``: computed in the same fused kernel as
        the LoRA output on the Triton backend, read by hooks on the base layers otherwise."""
        return router.report_base_outputs(self.projections, self.capture)

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured[id(module)] = output

    def _projections(self, pretrained: nn.Module, x: torch.Tensor, batch: Batch):
        captured, self._captured = self._captured, {}
        missing = [i for i, base in enumerate(self._base_layers) if id(base) not in captured]
        if missing:
            raise RuntimeError(
                f"the block's forward did not run its projections {[self.layout.projections[i] for i in missing]}: "
                "it does not match its layout."
            )
        query, key, value = self._split([captured[id(base)] for base in self._base_layers])
        return gather_rows(query, batch.rows), key, value


class OwnProjectionBlock(_RowwiseBlock):
    """A separate pre-trained model: its block projects its own normed input (keys/values everywhere)."""

    def _projections(self, pretrained: nn.Module, x: torch.Tensor, batch: Batch):
        attention = getattr(pretrained, self.layout.attention)
        normed = getattr(pretrained, self.layout.attention_norm)(x)
        projections = [getattr(attention, name) for name in self.layout.projections]
        if len(projections) == 1:
            query, key, value = self._split([projections[0](normed)])
            return gather_rows(query, batch.rows), key, value
        query = projections[0](gather_rows(normed, batch.rows))
        return query, projections[1](normed), projections[2](normed)


PretrainedPath = ReplayBlock | SharedProjectionBlock | OwnProjectionBlock


def pretrained_path(
    layer: nn.Module, config: PretrainedConfig, *, separate_model: bool = False, replay_only: bool = False
) -> PretrainedPath:
    """The cheapest exact strategy for this block (``separate_model``: the pre-trained block is another model's)."""
    layout = LAYOUTS.get(type(layer).__name__)
    if replay_only or layout is None:
        return ReplayBlock()
    if separate_model:
        return OwnProjectionBlock(layer, layout, config) if _layout_matches(layer, layout) else ReplayBlock()
    if SharedProjectionBlock.supports(layer, layout):
        return SharedProjectionBlock(layer, layout, config)
    return ReplayBlock()
