"""The pre-trained path of one decoder block, evaluated on the fine-tuned hidden states.

The pre-trained block at a query row needs its query there and its keys/values at every position;
everything after attention is position-wise. Three strategies, chosen per block:

- ``SharedProjectionBlock`` (adapter fine-tunes of a registered family, ``tuco_peft.families``). The
  pre-trained q/k/v are the *base* projections of the same (normed) hidden states, which every LoRA linear
  computes before adding its low-rank delta: captured during the fine-tuned forward, for free. The rest of
  the block runs on the requested rows only, wired as the family's spec says.
- ``OwnProjectionBlock`` (a separate pre-trained model of a registered family): the pre-trained block
  computes its own keys/values at every position and everything else on the requested rows only.
- ``ReplayBlock`` (any other block): the pre-trained block runs in full on the inputs the fine-tuned
  forward gave its twin. Exact for any architecture, at the cost of a second pass through the block.

``pretrained_update`` takes the pre-trained block as an argument (``pretrained.PretrainedBlocks.block``): the
fine-tuned block itself with its adapters switched off, the same block of another model, or one streamed
from disk.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .adapters import is_additive_lora, pretrained_projection
from .attention import apply_rope, attend_rows, key_visibility
from .backend import LoraLinearBackend
from .families import (
    FamilySpec,
    QKNorm,
    QKVLayout,
    WindowSource,
    Wiring,
    attention_heads,
    attention_implementation,
    spec_for,
)
from .inputs import Batch
from .inventory import is_switchable


def block_output(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def gather_rows(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """states [b, seq, ...] at rows [b, k] → [b, k, ...]."""
    index = rows.reshape(*rows.shape, *([1] * (states.ndim - 2))).expand(-1, -1, *states.shape[2:])
    return states.gather(1, index)


class ReplayBlock:
    """Pre-trained path of any block: run the pre-trained block (adapters off) in full."""

    def capturing(self, backend: LoraLinearBackend) -> AbstractContextManager[None]:
        return nullcontext()

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        out = block_output(pretrained.forward(*args, **kwargs))
        return gather_rows(out.float() - x.float(), batch.rows)


def has_parts(layer: nn.Module, spec: FamilySpec) -> bool:
    """The layer has every part its family's spec names (a custom block of a known family may not)."""
    if not all(hasattr(layer, name) for name in spec.layer_parts):
        return False
    attention = getattr(layer, spec.attention)
    return all(hasattr(attention, name) for name in spec.attention_parts)


def _apply(layer: nn.Module, norm: str | None, states: torch.Tensor) -> torch.Tensor:
    """``states`` through the layer's norm ``norm``, or unchanged where the wiring has none there."""
    return states if norm is None else getattr(layer, norm)(states)


class _RowwiseBlock:
    """Attention at the requested rows, then the position-wise rest of the block on those rows only.

    Subclasses supply the pre-trained projections (query at the rows, keys and values everywhere).
    """

    def __init__(self, layer: nn.Module, spec: FamilySpec, config: PretrainedConfig):
        attention = getattr(layer, spec.attention)
        self.spec = spec
        self.n_heads, self.n_kv_heads = attention_heads(config)
        self.head_dim = getattr(attention, spec.head_dim)
        self.scaling = attention.scaling
        self.sliding_window = {
            WindowSource.NONE: None,
            WindowSource.ATTENTION: getattr(attention, "sliding_window", None),
            WindowSource.CONFIG: getattr(config, "sliding_window", None),
        }[spec.window]
        self.softcap = getattr(attention, "attn_logit_softcapping", None)
        self.eager = attention_implementation(config) == "eager"

    def capturing(self, backend: LoraLinearBackend) -> AbstractContextManager[None]:
        return nullcontext()

    def _split(self, projections: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(query, key, value), each [b, seq, heads·hd], from the projections' outputs."""
        if self.spec.qkv_layout is QKVLayout.SEPARATE:
            return tuple(projections)
        rows = self.spec.qkv_rows(self.n_heads, self.n_kv_heads, self.head_dim)
        return tuple(part.of(projections[0], dim=-1) for part in rows)

    def _projections(
        self, pretrained: nn.Module, x: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query [b, rows, heads·hd], key and value [b, seq, kv_heads·hd]) of the pre-trained block."""
        raise NotImplementedError

    def _attend(self, attention: nn.Module, query, key, value, kwargs: dict[str, Any], batch: Batch) -> torch.Tensor:
        bsz, seq = key.shape[:2]
        if self.spec.qk_norm is QKNorm.FULL_WIDTH:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query = query.reshape(bsz, -1, self.n_heads, self.head_dim)
        key = key.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        value = value.reshape(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.spec.qk_norm is QKNorm.PER_HEAD:
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.spec.rotary_module is not None:
            cos, sin = (t.expand(bsz, -1, -1) for t in kwargs["position_embeddings"])
            query = apply_rope(query, gather_rows(cos, batch.rows), gather_rows(sin, batch.rows))
            key = apply_rope(key, cos, sin)
        visible = key_visibility(batch.attention_mask, batch.rows, self.sliding_window)
        return attend_rows(query, key, value, visible, self.scaling, self.softcap, eager=self.eager)

    def pretrained_update(
        self, pretrained: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict[str, Any], batch: Batch
    ) -> torch.Tensor:
        # The residual adds stay in the model's dtype and order, as in the block itself: in bf16/fp16 the
        # fine-tuned update carries their rounding, and so must the pre-trained one, or FTC would absorb it.
        spec = self.spec
        attention = getattr(pretrained, spec.attention)
        mlp = getattr(pretrained, spec.mlp)
        attended = self._attend(attention, *self._projections(pretrained, x, batch), kwargs, batch)
        attn_update = _apply(pretrained, spec.post_attention_norm, getattr(attention, spec.output)(attended))
        x_rows = gather_rows(x, batch.rows)
        if spec.wiring is Wiring.PARALLEL:
            out = mlp(_apply(pretrained, spec.mlp_norm, x_rows)) + attn_update + x_rows
        else:
            hidden = x_rows + attn_update
            out = hidden + _apply(pretrained, spec.post_mlp_norm, mlp(_apply(pretrained, spec.mlp_norm, hidden)))
        return out.float() - x_rows.float()


class SharedProjectionBlock(_RowwiseBlock):
    """Adapter fine-tunes: the pre-trained q/k/v are the base projections captured in the fine-tuned forward."""

    def __init__(self, layer: nn.Module, spec: FamilySpec, config: PretrainedConfig):
        super().__init__(layer, spec, config)
        attention = getattr(layer, spec.attention)
        self.projections = [getattr(attention, name) for name in spec.projections]
        self._base_layers = [pretrained_projection(p) for p in self.projections]
        self._captured: dict[int, torch.Tensor] = {}

    @staticmethod
    def supports(layer: nn.Module, spec: FamilySpec) -> bool:
        """The family allows it, the layer has its parts, and the parts shared by every position (the
        attention norm, q/k norms) carry no adapter of their own."""
        if not spec.shared_projections or not has_parts(layer, spec):
            return False
        attention = getattr(layer, spec.attention)
        shared = [] if spec.attention_norm is None else [getattr(layer, spec.attention_norm)]
        if spec.qk_norm is not QKNorm.NONE:
            shared += [attention.q_norm, attention.k_norm]
        if any(is_switchable(m) for part in shared for m in part.modules()):
            return False
        projections = [getattr(attention, name) for name in spec.projections]
        return all(is_additive_lora(p) or not is_switchable(p) for p in projections)

    def capturing(self, backend: LoraLinearBackend) -> AbstractContextManager[None]:
        """Send the base q/k/v of the fine-tuned forward to ``capture``: computed in the same fused kernel as
        the LoRA output on the Triton backend, read by hooks on the base layers otherwise."""
        return backend.report_base_outputs(self.projections, self.capture)

    def capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured[id(module)] = output

    def _projections(self, pretrained: nn.Module, x: torch.Tensor, batch: Batch):
        captured, self._captured = self._captured, {}
        missing = [i for i, base in enumerate(self._base_layers) if id(base) not in captured]
        if missing:
            raise RuntimeError(
                f"the block's forward did not run its projections {[self.spec.projections[i] for i in missing]}: "
                "it does not match its family's spec."
            )
        query, key, value = self._split([captured[id(base)] for base in self._base_layers])
        return gather_rows(query, batch.rows), key, value


class OwnProjectionBlock(_RowwiseBlock):
    """A separate pre-trained model: its block projects its own (normed) input, keys/values everywhere."""

    def _projections(self, pretrained: nn.Module, x: torch.Tensor, batch: Batch):
        attention = getattr(pretrained, self.spec.attention)
        normed = _apply(pretrained, self.spec.attention_norm, x)
        projections = [getattr(attention, name) for name in self.spec.projections]
        if self.spec.qkv_layout is not QKVLayout.SEPARATE:  # one fused projection
            query, key, value = self._split([projections[0](normed)])
            return gather_rows(query, batch.rows), key, value
        query = projections[0](gather_rows(normed, batch.rows))
        return query, projections[1](normed), projections[2](normed)


PretrainedPath = ReplayBlock | SharedProjectionBlock | OwnProjectionBlock


def pretrained_path(
    layer: nn.Module, config: PretrainedConfig, *, separate_model: bool = False, replay_only: bool = False
) -> PretrainedPath:
    """The cheapest exact strategy for this block (``separate_model``: the pre-trained block is another model's)."""
    spec = spec_for(layer, config)
    if replay_only or spec is None:
        return ReplayBlock()
    if separate_model:
        return OwnProjectionBlock(layer, spec, config) if has_parts(layer, spec) else ReplayBlock()
    if SharedProjectionBlock.supports(layer, spec):
        return SharedProjectionBlock(layer, spec, config)
    return ReplayBlock()
