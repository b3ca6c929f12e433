"""GPT-NeoX / Pythia: parallel residual (attention and MLP both read the block input, unless
``use_parallel_residual`` is off), one fused projection interleaved by head, partial rotary."""

from transformers import PretrainedConfig

from .registry import register
from .spec import FamilySpec, QKVLayout, WindowSource, Wiring


def spec(config: PretrainedConfig) -> FamilySpec:
    return FamilySpec(
        attention="attention",
        projections=("query_key_value",),
        output="dense",
        wiring=Wiring.PARALLEL if config.use_parallel_residual else Wiring.SEQUENTIAL,
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        qkv_layout=QKVLayout.INTERLEAVED_BY_HEAD,
        head_dim="head_size",
        window=WindowSource.NONE,
        lean_cache=True,
    )


register("gpt_neox", "GPTNeoXLayer", spec)
