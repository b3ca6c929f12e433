"""What tuco-peft needs to know about one decoder family: where a block keeps its parts, how they are wired,
and which of the one-pass capabilities the family allows.

Every family fact lives in one spec (see ``families/<model_type>.py``); blocks, the lean cache, pairing and
steering read it instead of re-deriving it from class names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum

import torch
from transformers import PretrainedConfig


class Wiring(Enum):
    """How a block combines its attention and MLP with the residual stream."""

    SEQUENTIAL = "sequential"  # h = x + attn(n₁(x));  out = h + mlp(n₂(h))                  (Llama, GPT-2)
    SANDWICH = "sandwich"  # as sequential, with a second norm after attention and after the MLP   (Gemma2)
    PARALLEL = "parallel"  # out = x + attn(n₁(x)) + mlp(n₂(x))                                  (GPT-NeoX)
    POST_NORM = "post_norm"  # h = x + n₁(attn(x));  out = h + n₂(mlp(h))                        (OLMo-2)


class QKVLayout(Enum):
    """How the query, key and value projections are stored."""

    SEPARATE = "separate"  # q_proj, k_proj, v_proj
    CONCATENATED = "concatenated"  # one projection, output [q | k | v] (Phi-3, GPT-2)
    INTERLEAVED_BY_HEAD = "interleaved_by_head"  # one projection, [q₁ k₁ v₁ | q₂ k₂ v₂ | …] (GPT-NeoX)


class QKNorm(Enum):
    """Where a norm on queries and keys (``q_norm``/``k_norm`` of the attention) applies."""

    NONE = "none"
    PER_HEAD = "per_head"  # on each head, after the split into heads (Qwen3)
    FULL_WIDTH = "full_width"  # on the whole projection, before the split (OLMo-2)


class WindowSource(Enum):
    """Where a sliding attention window comes from."""

    NONE = "none"
    ATTENTION = "attention"  # the attention module's ``sliding_window`` (per layer; None on full-attention layers)
    CONFIG = "config"  # ``config.sliding_window``, for every layer (Mistral, Phi-3)


@dataclass(frozen=True)
class OutputRows:
    """Some rows of a projection's output (or of its weight or bias): with the rows split into ``groups``
    equal blocks, the ``part`` of each block, in order."""

    groups: int
    part: slice

    def of(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """These rows of ``tensor`` along ``dim`` (a weight's or bias's first, an output's last): a view where
        they are contiguous."""
        dim = dim % tensor.ndim
        if self.groups == 1:
            return tensor[(slice(None),) * dim + (self.part,)]
        grouped = tensor.unflatten(dim, (self.groups, -1))
        return grouped[(slice(None),) * (dim + 1) + (self.part,)].flatten(dim, dim + 1)


_NORMS_OF_WIRING = {  # (pre-attention, pre-MLP, post-attention, post-MLP) norms each wiring has
    Wiring.SEQUENTIAL: (True, True, False, False),
    Wiring.SANDWICH: (True, True, True, True),
    Wiring.PARALLEL: (True, True, False, False),
    Wiring.POST_NORM: (False, False, True, True),
}


@dataclass(frozen=True)
class FamilySpec:
    """A family's block: attribute names on the decoder layer (norms, ``mlp``, ``attention``) and on its
    attention (``projections``, ``output``, ``head_dim``), its wiring, and its capabilities.

    Capabilities: ``shared_projections``: the pre-trained q/k/v of an adapter fine-tune are the base outputs of
    the fine-tuned projections (the one-pass path); ``lean_cache``: under steering, fine-tuned keys/values are
    the pre-trained ones plus a low-rank delta (before the k-norm, if any, which then needs a separate key
    projection; RoPE, if any, from the decoder's ``rotary_module``); ``pairable``: the block may run on its
    input stacked twice (``core.paired.PairedBlock``).
    """

    attention: str
    projections: tuple[str, ...]
    output: str
    wiring: Wiring
    attention_norm: str | None = None
    mlp_norm: str | None = None
    post_attention_norm: str | None = None
    post_mlp_norm: str | None = None
    mlp: str = "mlp"
    qkv_layout: QKVLayout = QKVLayout.SEPARATE
    head_dim: str = "head_dim"
    rotary_module: str | None = "rotary_emb"  # on the decoder; None: no rotary embedding (GPT-2)
    # Whether the rotary embedding turns every dim of each head: a table of half the head's width (gpt-oss's)
    # then holds each frequency once, for dims i and i + hd/2. Otherwise a table narrower than the head turns
    # its first dims only (partial rotary: Phi-3, GPT-NeoX).
    rotary_whole_head: bool = False
    # Whether the rotary embedding turns adjacent dims together, (0, 1), (2, 3), ... (GLM, GLM-4), not dims i and
    # i + rot_dim/2 (rotate-half, Llama's); either way each pair turns by the table's first half of frequencies.
    rotary_interleaved: bool = False
    sinks: str | None = None  # the attention's per-head sink logits (gpt-oss): one more score in each softmax
    residual_multiplier: str | None = None  # the layer's scale of both updates before each residual add (Granite)
    window: WindowSource = WindowSource.ATTENTION
    qk_norm: QKNorm = QKNorm.NONE
    shared_projections: bool = True
    lean_cache: bool = False
    pairable: bool = True

    def __post_init__(self) -> None:
        norms = (self.attention_norm, self.mlp_norm, self.post_attention_norm, self.post_mlp_norm)
        if tuple(name is not None for name in norms) != _NORMS_OF_WIRING[self.wiring]:
            raise ValueError(f"the norms {norms} do not fit the {self.wiring.value} wiring")
        if (len(self.projections) == 3) != (self.qkv_layout is QKVLayout.SEPARATE):
            raise ValueError(f"{len(self.projections)} projections do not fit the {self.qkv_layout.value} layout")
        if self.lean_cache and (self.rotary_whole_head or self.rotary_interleaved):
            raise ValueError("a lean cache re-rotates past keys rotate-half, with tables as wide as the dims they turn")
        if self.lean_cache and self.qk_norm is not QKNorm.NONE and self.qkv_layout is not QKVLayout.SEPARATE:
            raise ValueError("a lean cache with a k-norm records the pre-norm keys of a separate key projection")

    @property
    def layer_parts(self) -> tuple[str, ...]:
        """The attributes the decoder layer must have."""
        norms = (self.attention_norm, self.mlp_norm, self.post_attention_norm, self.post_mlp_norm)
        return (self.attention, self.mlp, *(name for name in norms if name is not None))

    @property
    def attention_parts(self) -> tuple[str, ...]:
        """The attributes the attention module must have."""
        qk_norms = () if self.qk_norm is QKNorm.NONE else ("q_norm", "k_norm")
        return (*self.projections, self.output, self.head_dim, "scaling", *qk_norms)

    @property
    def key_value_projections(self) -> tuple[str, str]:
        """The projections whose outputs hold the keys and the values (the same one where q/k/v are fused)."""
        if self.qkv_layout is QKVLayout.SEPARATE:
            return self.projections[1], self.projections[2]
        return self.projections[0], self.projections[0]

    def qkv_rows(self, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[OutputRows, OutputRows, OutputRows]:
        """The rows of a fused q/k/v projection's output that are the queries, the keys and the values."""
        if self.qkv_layout is QKVLayout.CONCATENATED:
            q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
            bounds = (0, q_size, q_size + kv_size, q_size + 2 * kv_size)
            queries, keys, values = (OutputRows(1, slice(start, stop)) for start, stop in itertools.pairwise(bounds))
            return queries, keys, values
        if self.qkv_layout is QKVLayout.INTERLEAVED_BY_HEAD:
            queries, keys, values = (OutputRows(n_heads, slice(i * head_dim, (i + 1) * head_dim)) for i in range(3))
            return queries, keys, values
        raise ValueError("separate q/k/v projections have no fused output rows")

    def key_value_rows(self, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[OutputRows, OutputRows]:
        """The output rows of ``key_value_projections`` that are the keys, and those that are the values."""
        if self.qkv_layout is QKVLayout.SEPARATE:
            return OutputRows(1, slice(None)), OutputRows(1, slice(None))
        _, keys, values = self.qkv_rows(n_heads, n_kv_heads, head_dim)
        return keys, values


def attention_heads(config: PretrainedConfig) -> tuple[int, int]:
    """(query heads, key/value heads): the key/value heads default to the query heads (no GQA)."""
    n_heads = config.num_attention_heads
    return n_heads, getattr(config, "num_key_value_heads", None) or n_heads


def attention_implementation(config: PretrainedConfig) -> str:
    """The attention kernel transformers runs ("eager", "sdpa", "flash_attention_2", "flex_attention", …)."""
    return config._attn_implementation
