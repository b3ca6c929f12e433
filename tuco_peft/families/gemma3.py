"""Gemma 3 (text; ``gemma3_text``, e.g. Gemma 3 270M): Gemma 2's sandwich-normed block with a norm on each
query and key head, and local (sliding-window) and global layers with rotary bases of their own.

The decoder hands each layer the position embeddings of its type, which the one-pass path reads from the
layer's arguments, and each attention module knows its own window and its type of layer, with which the lean
KV cache asks the decoder's rotary module for the past's tables of that type's base.
"""

from dataclasses import replace

from .gemma2 import SPEC as GEMMA2
from .registry import register
from .spec import QKNorm

register("gemma3_text", "Gemma3DecoderLayer", replace(GEMMA2, qk_norm=QKNorm.PER_HEAD))
