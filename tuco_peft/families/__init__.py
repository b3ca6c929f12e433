"""Decoder families with a one-pass pre-trained path: one module per family registers its spec; ``derived`` reads
a candidate spec from the parts of a block nobody registered."""

from . import gemma, gemma2, gemma3, gpt2, gpt_neox, llama, mistral, olmo2, phi3, qwen2, qwen3  # noqa: F401 (they register)
from .derived import derive_spec, spec_readings
from .registry import RegisteredFamily, register, registered_families, registered_model_types, spec_for
from .spec import (
    FamilySpec,
    OutputRows,
    QKNorm,
    QKVLayout,
    WindowSource,
    Wiring,
    attention_heads,
    attention_implementation,
)

__all__ = [
    "FamilySpec",
    "OutputRows",
    "QKNorm",
    "QKVLayout",
    "RegisteredFamily",
    "WindowSource",
    "Wiring",
    "attention_heads",
    "attention_implementation",
    "derive_spec",
    "register",
    "registered_families",
    "registered_model_types",
    "spec_for",
    "spec_readings",
]
