"""GPT-2: pre-norm blocks, one fused [q | k | v] Conv1D, learned absolute positions (no rotary)."""

from .registry import register
from .spec import FamilySpec, QKVLayout, WindowSource, Wiring

register(
    "gpt2",
    "GPT2Block",
    FamilySpec(
        attention="attn",
        projections=("c_attn",),
        output="c_proj",
        wiring=Wiring.SEQUENTIAL,
        attention_norm="ln_1",
        mlp_norm="ln_2",
        qkv_layout=QKVLayout.CONCATENATED,
        rotary_module=None,
        window=WindowSource.NONE,
        lean_cache=True,
    ),
)
