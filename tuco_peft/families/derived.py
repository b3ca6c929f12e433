"""A spec for a decoder family nobody registered, read from its block's module tree.

Most new decoders reuse a known block (SmolLM3, OLMo-3, Seed-OSS, Qwen3-MoE, ...): Llama's pre-norm parts,
Gemma 2's sandwich norms or OLMo-2's post-norms, q/k norms per head or over the whole width, an MLP or a
mixture of experts that acts on each position alone. ``derive_spec`` recognises such a block by the names and
shapes of its parts, and nothing else: a name says where a part sits, not what the forward does with it
(a norm applied twice, a rotary embedding's convention). So a derived spec is a candidate only, which
``core.pretrained_path`` proves against the generic path on the first batch before it is trusted; where the parts
allow more than one reading (``spec_readings``), the proof chooses.

It claims the one-pass path alone (``claimed``): no lean KV cache, no pairing, whose assumptions the proof does
not test.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from transformers import PretrainedConfig

from .spec import FamilySpec, QKNorm, WindowSource, Wiring, attention_heads

_ATTENTION = "self_attn"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_OUTPUT = "o_proj"
_MLPS = ("mlp", "block_sparse_moe")  # the second: the mixture of experts of Granite-MoE

# The norms a block holds, by name, and the wiring and places they say.
_NORM_LAYOUTS: dict[frozenset[str], tuple[Wiring, dict[str, str]]] = {
    frozenset({"input_layernorm", "post_attention_layernorm"}): (
        Wiring.SEQUENTIAL,
        {"attention_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    ),
    frozenset(
        {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    ): (
        Wiring.SANDWICH,
        {
            "attention_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "post_mlp_norm": "post_feedforward_layernorm",
        },
    ),
    # GLM-4's sandwich, under other names
    frozenset({"input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"}): (
        Wiring.SANDWICH,
        {
            "attention_norm": "input_layernorm",
            "post_attention_norm": "post_self_attn_layernorm",
            "mlp_norm": "post_attention_layernorm",
            "post_mlp_norm": "post_mlp_layernorm",
        },
    ),
    frozenset({"post_attention_layernorm", "post_feedforward_layernorm"}): (
        Wiring.POST_NORM,
        {"post_attention_norm": "post_attention_layernorm", "post_mlp_norm": "post_feedforward_layernorm"},
    ),
}


def derive_spec(layer: nn.Module, config: PretrainedConfig) -> FamilySpec | None:
    """A candidate spec for the decoder block ``layer``, or None where its parts fit no known layout. Rotary
    embeddings are assumed, from the block's ``position_embeddings``, unless its attention says ``use_rope``
    false (SmolLM3's NoPE layers) or it is a global layer of a sliding model (EXAONE 4), rotate-half
    (``spec_readings`` gives the interleaved reading too), over the whole head unless the config gives a
    partial rotary factor; an attention's ``sinks``, one per head, are read as gpt-oss's, and a layer's
    ``residual_multiplier`` as Granite's."""
    children = dict(layer.named_children())
    attention = children.get(_ATTENTION)
    mlp = next((name for name in _MLPS if name in children), None)
    if attention is None or mlp is None:
        return None
    layout = _NORM_LAYOUTS.get(frozenset(name for name, child in children.items() if _is_norm(child)))
    if layout is None or set(children) - {_ATTENTION, mlp, *layout[1].values()}:
        return None
    if not all(isinstance(getattr(attention, n, None), nn.Module) for n in (*_PROJECTIONS, _OUTPUT)):
        return None
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or not hasattr(attention, "scaling"):
        return None
    qk_norm, window = _qk_norm(attention, head_dim, config), _window(attention, config)
    if qk_norm is None or window is None:
        return None
    # EXAONE 4's global layers: not sliding, though the attention holds a window, and without RoPE (Gemma 3's
    # global layers hold no window, and keep their RoPE)
    global_layer = (
        attention.__dict__.get("is_sliding") is False and attention.__dict__.get("sliding_window") is not None
    )
    if global_layer:
        window = WindowSource.NONE
    wiring, norms = layout
    spec = FamilySpec(
        attention=_ATTENTION,
        projections=_PROJECTIONS,
        output=_OUTPUT,
        wiring=wiring,
        mlp=mlp,
        rotary_module=None if global_layer or getattr(attention, "use_rope", True) in (False, 0) else "rotary_emb",
        window=window,
        qk_norm=qk_norm,
        rotary_whole_head=_rotates_whole_head(config),
        sinks="sinks" if _has_sinks(attention, config) else None,
        residual_multiplier="residual_multiplier" if _is_number(layer.__dict__.get("residual_multiplier")) else None,
        attention_norm=norms.get("attention_norm"),
        mlp_norm=norms.get("mlp_norm"),
        post_attention_norm=norms.get("post_attention_norm"),
        post_mlp_norm=norms.get("post_mlp_norm"),
    )
    return claimed(spec)


def spec_readings(spec: FamilySpec) -> list[FamilySpec]:
    """``spec`` and the other readings of the same parts, the most common first, for the proof to choose from: a
    rotary embedding's convention is in the forward, not the parts (rotate-half, as Llama's, or interleaved, as
    GLM's and GLM-4's)."""
    return [spec] if spec.rotary_module is None else [spec, replace(spec, rotary_interleaved=True)]


def claimed(spec: FamilySpec) -> FamilySpec:
    """``spec`` with the capabilities a derived spec claims: the one-pass path alone."""
    return replace(spec, lean_cache=False, pairable=False)


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _qk_norm(attention: nn.Module, head_dim: int, config: PretrainedConfig) -> QKNorm | None:
    """Where the attention's q/k norms apply, told by their widths; None where that is not clear, or the
    attention holds another norm."""
    norms = {name for name, child in attention.named_children() if _is_norm(child)}
    if not norms:
        return QKNorm.NONE
    width = getattr(attention.q_norm, "weight", None) if norms == {"q_norm", "k_norm"} else None
    if width is None or width.ndim != 1:
        return None
    n_heads, _ = attention_heads(config)
    # with one head the widths agree, and it is read per head
    return {n_heads * head_dim: QKNorm.FULL_WIDTH, head_dim: QKNorm.PER_HEAD}.get(width.shape[0])


def _window(attention: nn.Module, config: PretrainedConfig) -> WindowSource | None:
    """The attention's own sliding window (None on its full-attention layers); a window the config alone
    holds is not derived (which layers use it is the family's business)."""
    if "sliding_window" in attention.__dict__:
        return WindowSource.ATTENTION
    return WindowSource.NONE if getattr(config, "sliding_window", None) is None else None


def _rotates_whole_head(config: PretrainedConfig) -> bool:
    """Whether the rotary embedding turns every dim of each head: the config gives no partial factor below 1."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = getattr(config, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0
    return factor == 1.0


def _has_sinks(attention: nn.Module, config: PretrainedConfig) -> bool:
    """Whether the attention holds a sink logit per head (gpt-oss's ``sinks``)."""
    sinks = getattr(attention, "sinks", None)
    return isinstance(sinks, nn.Parameter) and tuple(sinks.shape) == (attention_heads(config)[0],)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
