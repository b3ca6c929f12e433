"""OLMo-2: Llama's parts wired post-norm (no norm before attention or MLP, one after each), q/k norms over
the whole projection width (its lean cache stores pre-norm keys, see ``steering.lean_cache``), no sliding window."""

from dataclasses import replace

from .llama import SPEC as LLAMA
from .registry import register
from .spec import QKNorm, WindowSource, Wiring

register(
    "olmo2",
    "Olmo2DecoderLayer",
    replace(
        LLAMA,
        wiring=Wiring.POST_NORM,
        attention_norm=None,
        mlp_norm=None,
        post_attention_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        window=WindowSource.NONE,
        qk_norm=QKNorm.FULL_WIDTH,
    ),
)
