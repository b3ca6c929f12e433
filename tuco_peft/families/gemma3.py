"""Gemma 3 (text; ``gemma3_text``, e.g. Gemma 3 270M): Gemma 2's sandwich-normed block with a norm on each
query and key head, and local (sliding-window) and global layers with rotary bases of their own.

The decoder hands each layer the position embeddings of its type, which the one-pass path reads from the
layer's arguments, and each attention module knows its own window. The lean KV cache would recompute past
rotary tables from the decoder's one rotary module, which needs the layer's type to know its base: Gemma 3's
cache slots under ``ftc_scale`` stay full (exact, at the memory of two caches).
"""

from dataclasses import replace

from .gemma2 import SPEC as GEMMA2
from .registry import register
from .spec import QKNorm

register("gemma3_text", "Gemma3DecoderLayer", replace(GEMMA2, qk_norm=QKNorm.PER_HEAD, lean_cache=False))
