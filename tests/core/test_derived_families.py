"""Decoders nobody registered, whose blocks reuse a known layout (``tuco_peft.families.derive_spec``): the one-pass
path proved on the first batch against the generic replay, then trusted; where the parts allow two readings (a
rotary embedding's convention), the proof chooses; refused, with one warning, where the block's forward does
something no reading of its parts says. Every case against the two-model oracle."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import torch
import transformers.models.smollm3.modeling_smollm3 as smollm3
from helpers.lora_layers import as_linear_4bit
from helpers.models import FAMILIES, VOCAB, base_model, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.strategies import STRATEGIES, force, pretrained_paths, record_strategies
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import tuco_peft
from tuco_peft.core import pretrained_path as pretrained_path_module
from tuco_peft.core.pretrained_path import ProvedBlock, SharedProjectionBlock
from tuco_peft.families import QKNorm, Wiring, derive_spec, spec_for
from tuco_peft.families.registry import _FAMILIES, RegisteredFamily

_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=None, pad_token_id=0, bos_token_id=1,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# Shipped with transformers, registered by nobody, and built on a block of a known layout; four blocks, so that
# every pattern's odd layer is among them (SmolLM3's NoPE layer, OLMo-3's global one).
PROVED = {
    "smollm3": ({}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "seed_oss": ({}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "arcee": ({}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "olmo": ({}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "olmo3": ({"sliding_window": 6}, Wiring.POST_NORM, QKNorm.FULL_WIDTH),
    "qwen3_moe": (_MOE, Wiring.SEQUENTIAL, QKNorm.PER_HEAD),
    "olmoe": (_MOE, Wiring.SEQUENTIAL, QKNorm.FULL_WIDTH),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, Wiring.SEQUENTIAL, QKNorm.NONE),
    # a dense first block, then routed and shared experts; partial rotary (GLM-4.5)
    "glm4_moe": (
        {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
         "n_group": 1, "topk_group": 1},
        Wiring.SEQUENTIAL,
        QKNorm.NONE,
    ),
    # three sliding layers with RoPE, then a global one without (its attention's window attribute is set too)
    "exaone4": ({"sliding_window": 6, "sliding_window_pattern": 4}, Wiring.POST_NORM, QKNorm.PER_HEAD),
    # both updates scaled before each residual add; Granite-MoE's experts are its "block_sparse_moe"
    "granite": ({"residual_multiplier": 0.5, "attention_multiplier": 0.2}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "granitemoe": (
        {"residual_multiplier": 0.5, "num_local_experts": 4, "num_experts_per_tok": 2},
        Wiring.SEQUENTIAL,
        QKNorm.NONE,
    ),
    # interleaved rotary embeddings, over half of each head; GLM-4's sandwich norms under other names
    "glm": ({}, Wiring.SEQUENTIAL, QKNorm.NONE),
    "glm4": ({}, Wiring.SANDWICH, QKNorm.NONE),
    # attention sinks, rotary tables of half the head's width, an MoE that returns its router's scores too
    "gpt_oss": (
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6},
        Wiring.SEQUENTIAL,
        QKNorm.NONE,
    ),
}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the warning a process gives once per model type."""
    monkeypatch.setattr(pretrained_path_module, "_REFUTED_MODEL_TYPES", set())


def base_model_of(model_type: str, **overrides):
    """A random model of ``model_type`` in the shape of these tests."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**_SHAPE, **overrides})).eval()


def adapted_pair(model_type: str, **overrides):
    """(pre-trained model, PeftModel with random LoRA on attention and MLP linears), the default attention."""
    base = base_model_of(model_type, **overrides)
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return pretrained, get_peft_model(base, lora).eval()


def tuco_against_the_oracle(pretrained, model, ids, mask) -> list[str]:
    """TuCo of three calls against the oracle's; the warnings they gave."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        expected = tuco_at_last(ptc, ftc, mask)
        for _ in range(3):  # the proof (of a second reading, where the first failed), then the trusted path
            torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), expected, atol=1e-5, rtol=1e-5)
    return [str(w.message) for w in caught if "read the layout" in str(w.message)]


@pytest.mark.device
@pytest.mark.parametrize("model_type", PROVED)
def test_a_known_layout_is_proved_then_trusted(model_type, device):
    overrides, wiring, qk_norm = PROVED[model_type]
    pretrained, model = (m.to(device) for m in adapted_pair(model_type, **overrides))
    layer = decoder_blocks(model)[0]
    assert spec_for(layer, model.config) is None  # no registered family
    spec = derive_spec(layer, model.config)
    assert spec is not None and (spec.wiring, spec.qk_norm) == (wiring, qk_norm)
    ids, mask = (t.to(device) for t in padded_batch())
    assert tuco_against_the_oracle(pretrained, model, ids, mask) == []
    proved = pretrained_paths(model)
    assert proved and all(isinstance(p, ProvedBlock) and not p.refuted and p.proved_reach > 1 for p in proved)
    interleaved = model_type in ("glm", "glm4")
    assert all(p.candidate.spec.rotary_interleaved is interleaved for p in proved)


def test_a_forward_no_reading_of_its_parts_describes_takes_the_generic_path_with_one_warning(monkeypatch):
    """SmolLM3's rotary embedding turned the other way: neither rotate-half nor interleaved."""
    apply_rotary = smollm3.apply_rotary_pos_emb
    monkeypatch.setattr(smollm3, "apply_rotary_pos_emb", lambda q, k, cos, sin, *a: apply_rotary(q, k, cos, -sin, *a))
    pretrained, model = adapted_pair("smollm3")
    assert derive_spec(decoder_blocks(model)[0], model.config) is not None  # the parts fit a layout
    messages = tuco_against_the_oracle(pretrained, model, *padded_batch())
    assert len(messages) == 1 and "'smollm3'" in messages[0] and "largest difference" in messages[0]
    assert [p.refuted for p in pretrained_paths(model)] == [True, True, True, False]  # the last block has no RoPE


def test_a_batch_whose_rows_see_more_keys_than_the_window_is_proved_again():
    """The first batch's rows see no more keys than the sliding window, where a wrong window would not show; rows
    that see more prove it again. What counts is the keys a row sees, not the batch's padded length."""
    pretrained, model = adapted_pair("olmo3", sliding_window=6)
    ids, mask = padded_batch(lengths=(4, 5, 3), side="right")
    ids, mask = torch.cat([ids, torch.zeros_like(ids)], 1), torch.cat([mask, torch.zeros_like(mask)], 1)
    tuco_against_the_oracle(pretrained, model, ids, mask)
    sliding = [p for p in pretrained_paths(model) if p.candidate.sliding_window is not None]
    assert sliding and {p.proved_reach for p in sliding} == {5}  # 10 columns, 5 keys at most
    ids, mask = padded_batch()
    assert tuco_against_the_oracle(pretrained, model, ids, mask) == []
    assert {p.proved_reach for p in sliding} == {12}


def test_rows_that_see_one_key_prove_nothing():
    """With one key, attention returns its value whatever the scores: read rotate-half, GLM's interleaved rotary
    embedding goes unnoticed there, and gives way to the interleaved reading at the first batch with longer rows."""
    pretrained, model = adapted_pair("glm")
    ids = torch.tensor([[5], [7]])
    assert tuco_against_the_oracle(pretrained, model, ids, torch.ones_like(ids)) == []
    assert all(p.proved_reach < 2 and not p.candidate.spec.rotary_interleaved for p in pretrained_paths(model))
    assert tuco_against_the_oracle(pretrained, model, *padded_batch()) == []
    assert all(p.proved_reach > 1 and p.candidate.spec.rotary_interleaved and not p.refuted for p in pretrained_paths(model))


@pytest.mark.parametrize(("model_type", "dtype"), [("smollm3", torch.float16), ("glm", torch.bfloat16)])
def test_a_half_precision_batch_proves_the_reading_on_a_float32_copy_of_the_block(model_type, dtype):
    """Half precision rounds the one-pass path and the replay apart, so the proof runs both on a float32 copy of
    the pre-trained block, its inputs cast; the model itself stays in its dtype, and every call gives the oracle's
    TuCo (to half precision's rounding). GLM's first reading (rotate-half) fails there, its second proves."""
    pretrained, model = adapted_pair(model_type)
    pretrained.to(dtype)
    model.to(dtype)
    ids, mask = padded_batch()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        expected = tuco_at_last(ptc, ftc, mask)
        calls = 3 if model_type == "glm" else 2
        for _ in range(calls):
            torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), expected, atol=5e-3, rtol=0)
    assert not [w for w in caught if "read the layout" in str(w.message)]
    proved = pretrained_paths(model)
    assert proved and all(p.proved_reach == 12 and not p.refuted for p in proved)
    assert all(p.candidate.spec.rotary_interleaved is (model_type == "glm") for p in proved)
    assert {param.dtype for param in model.parameters()} == {dtype}


def test_a_quantized_block_has_no_float32_copy_and_replays_until_an_fp32_batch():
    """A 4-bit base computing in bf16: its blocks cannot be copied to float32, so its batches replay, neither
    proving nor refuting the reading."""
    base = base_model_of("smollm3", intermediate_size=128).to(torch.bfloat16)
    for module in list(base.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, as_linear_4bit(child, "nf4", True, torch.bfloat16))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        tuco = tuco_peft.tuco(model, ids, mask)
        proved = pretrained_paths(model)
        assert proved and all(p.proved_reach < 2 and not p.refuted and not p.copyable for p in proved)
        assert torch.equal(tuco, tuco_peft.decompose(model, ids, mask, replay=True).tuco)


def test_a_block_with_sinks_proved_in_fp32_computes_bfloat16_as_the_model_does():
    """gpt-oss's attention takes each row's largest logit off and runs its softmax in the logits' dtype: the
    trusted one-pass path does the same, so in bf16 it gives the oracle's TuCo, not one some rounding away."""
    pretrained, model = adapted_pair("gpt_oss", **PROVED["gpt_oss"][0])
    ids, mask = padded_batch()
    assert tuco_against_the_oracle(pretrained, model, ids, mask) == []  # proved in fp32
    model.to(torch.bfloat16)
    pretrained.to(torch.bfloat16)
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), tuco_at_last(ptc, ftc, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gpt2", "gpt_neox", "phi3", "mistral")])
def test_the_spec_read_from_a_registered_familys_parts_is_its_registered_spec(family):
    """The registered specs are an oracle for the reading: the same wiring, norms and q/k norm (not read: fused
    q/k/v projections, and Mistral's window, which only its config holds)."""
    model = base_model(family)
    layer, config = decoder_blocks(model)[0], model.config
    registered, derived = spec_for(layer, config), derive_spec(layer, config)
    assert derived is not None
    fields = ("wiring", "attention_norm", "mlp_norm", "post_attention_norm", "post_mlp_norm", "qk_norm", "projections")
    assert [getattr(derived, f) for f in fields] == [getattr(registered, f) for f in fields]


def test_a_global_layer_without_rope_is_exaone_4s_not_gemma_3s():
    """EXAONE 4's global layer holds the sliding window it does not use and has no RoPE; Gemma 3's holds none
    and keeps its RoPE: read from the parts, only the first loses its rotary embedding."""
    exaone = base_model_of("exaone4", **PROVED["exaone4"][0])
    gemma = base_model("gemma3_text")
    exaone_specs = [derive_spec(layer, exaone.config) for layer in decoder_blocks(exaone)]
    gemma_specs = [derive_spec(layer, gemma.config) for layer in decoder_blocks(gemma)]
    assert [s.rotary_module for s in exaone_specs] == ["rotary_emb"] * 3 + [None]
    assert all(s.rotary_module == "rotary_emb" for s in gemma_specs)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_registered_residual_multiplier_holds_in_every_strategy(strategy, monkeypatch):
    """Registered (not on probation, so any strategy, not only the proof's), Granite's spec scales both updates
    where shared reads, separate reads and paired blocks compose a block's output."""
    force(monkeypatch, strategy)
    chosen = record_strategies(monkeypatch)
    pretrained, model = adapted_pair("granite", **PROVED["granite"][0])
    layer = decoder_blocks(model)[0]
    spec = replace(derive_spec(layer, model.config), pairable=True)
    registered = RegisteredFamily("granite", type(layer).__name__, __name__, False, lambda config: spec)
    monkeypatch.setitem(_FAMILIES, "granite", registered)
    assert tuco_against_the_oracle(pretrained, model, *padded_batch()) == []
    assert chosen and set(chosen) == {STRATEGIES[strategy]}


def test_a_registered_family_is_not_put_on_probation(monkeypatch):
    force(monkeypatch, "separate reads")
    _, model = adapted_pair("llama")
    tuco_peft.tuco(model, *padded_batch())
    taken = pretrained_paths(model)
    assert taken and all(type(p) is SharedProjectionBlock for p in taken)


@pytest.mark.parametrize("model_type", ["smollm3", "olmo3", "gpt_oss", "granite"])
def test_a_full_fine_tune_of_a_known_layout_is_proved_then_trusted(model_type):
    """The pre-trained blocks are another model's (``base_model=``): the candidate projects its own q/k/v."""
    pretrained, _ = adapted_pair(model_type, **PROVED[model_type][0])
    finetuned = copy.deepcopy(pretrained)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(0.05 * param.std() * torch.randn(param.shape, generator=generator))
    ids, mask = padded_batch()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, mask)
        for _ in range(2):  # the proof, then the trusted path
            tuco = tuco_peft.tuco(finetuned, ids, mask, base_model=pretrained)
            torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)
    assert not [w for w in caught if "read the layout" in str(w.message)]
    proved = pretrained_paths(finetuned)
    assert proved and all(isinstance(p, ProvedBlock) and p.proved_reach > 1 and not p.refuted for p in proved)


class _Untouchable:
    """A hook or instance forward that reaches the whole model (as an analysis' probes do): never to be copied."""

    def __deepcopy__(self, memo):
        raise AssertionError("the float32 copy of a block copied a hook or an instance forward")

    def __call__(self, *args, **kwargs):
        return None


def test_the_float32_copy_of_a_block_holds_the_block_alone():
    _, model = adapted_pair("smollm3")
    model.to(torch.bfloat16)
    block = decoder_blocks(model)[0]
    handles = [block.register_forward_hook(_Untouchable()), block.mlp.register_forward_pre_hook(_Untouchable())]
    block.self_attn.o_proj.__dict__["forward"] = _Untouchable()
    copied = pretrained_path_module._float32_copy(block)
    assert copied is not None and copied is not block
    originals, copies = dict(block.named_parameters()), dict(copied.named_parameters())
    assert copies.keys() == originals.keys()
    for name, param in copies.items():
        assert param.dtype == torch.float32 and not param.requires_grad
        assert torch.equal(param, originals[name].float()) and originals[name].dtype == torch.bfloat16
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in copied.modules())
    assert block._forward_hooks and block.mlp._forward_pre_hooks and "forward" in block.self_attn.o_proj.__dict__
    for handle in handles:
        handle.remove()
