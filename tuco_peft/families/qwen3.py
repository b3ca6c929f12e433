"""Qwen3: Llama's block with a norm on each query and key head (its lean cache stores pre-norm keys, see
``steering.lean_cache``)."""

from dataclasses import replace

from .llama import SPEC as LLAMA
from .registry import register
from .spec import QKNorm

register("qwen3", "Qwen3DecoderLayer", replace(LLAMA, qk_norm=QKNorm.PER_HEAD))
