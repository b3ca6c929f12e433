"""Gemma: Llama's block (the sqrt(d) embedding scale lives outside the blocks)."""

from .llama import SPEC as LLAMA
from .registry import register

register("gemma", "GemmaDecoderLayer", LLAMA)
