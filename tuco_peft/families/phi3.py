"""Phi-3: Llama's block with one fused [q | k | v] projection, partial rotary and ``config.sliding_window``."""

from dataclasses import replace

from .llama import SPEC as LLAMA
from .registry import register
from .spec import QKVLayout, WindowSource

register(
    "phi3",
    "Phi3DecoderLayer",
    replace(
        LLAMA,
        projections=("qkv_proj",),
        qkv_layout=QKVLayout.CONCATENATED,
        window=WindowSource.CONFIG,
    ),
)
