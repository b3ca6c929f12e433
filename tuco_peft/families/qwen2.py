"""Qwen2: Llama's block; the attention of each layer carries its own sliding window (or None)."""

from .llama import SPEC as LLAMA
from .registry import register

register("qwen2", "Qwen2DecoderLayer", LLAMA)
