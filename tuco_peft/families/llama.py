"""Llama: pre-norm blocks, separate q/k/v projections, rotary embeddings from the decoder."""

from .registry import register
from .spec import FamilySpec, Wiring

SPEC = FamilySpec(
    attention="self_attn",
    projections=("q_proj", "k_proj", "v_proj"),
    output="o_proj",
    wiring=Wiring.SEQUENTIAL,
    attention_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    lean_cache=True,
)

register("llama", "LlamaDecoderLayer", SPEC)
