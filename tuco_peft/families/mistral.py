"""Mistral: Llama's block; its sliding window is ``config.sliding_window`` on every layer."""

from dataclasses import replace

from .llama import SPEC as LLAMA
from .registry import register
from .spec import WindowSource

register("mistral", "MistralDecoderLayer", replace(LLAMA, window=WindowSource.CONFIG))
