"""Gemma2: Llama's block with sandwich norms (before and after attention and MLP), soft-capped logits and
per-layer sliding windows."""

from dataclasses import replace

from .llama import SPEC as LLAMA
from .registry import register
from .spec import Wiring

SPEC = replace(
    LLAMA,
    wiring=Wiring.SANDWICH,
    mlp_norm="pre_feedforward_layernorm",
    post_attention_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)

register("gemma2", "Gemma2DecoderLayer", SPEC)
