"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE, OLMoE, gpt-oss): exact against the two-model references.

No MoE family is registered: their blocks have Llama's parts with a mixture of experts for an MLP, which acts
on each position alone, so each block's one-pass path is read from its parts and proved against the generic
replay on the first batch (``families.derive_spec``), then trusted: at the analysed rows, the pre-trained MoE
layer is the router and experts with their adapters off. Adapters on the attention projections, and through PEFT's
``target_parameters`` on the router's weight and the experts' fused 3-D weights (transformers 5 stores the
experts of a block as one parameter each; PEFT 0.18 cannot wrap the router module itself). A mixture of experts
without adapters computes the pre-trained rows in the fine-tuned forward's own call (``SharedReadBlock``), whatever
the batch's size.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.assertions import assert_close
from helpers.gradients import tuco_gradients
from helpers.models import VOCAB, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import greedy_generate
from helpers.steering_reference import greedy
from helpers.strategies import pretrained_paths
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import tuco_peft
from tuco_peft.core.pretrained_path import ProvedBlock, SharedProjectionBlock, SharedReadBlock, pretrained_path
from tuco_peft.model.parts import model_parts
from tuco_peft.steering.forward import ftc_scale

_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=None,
)
_FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # attention sinks, alternating sliding and full layers, biased experts, an MoE returning its router's scores
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
}
_ROUTER = {"gpt_oss": "router"}  # the others call it "gate"
_ADAPTERS = {
    "attention": dict(target_modules=["q_proj", "v_proj", "o_proj"]),
    "experts and router": dict(
        target_modules=["q_proj"], target_parameters=["{router}.weight", "experts.gate_up_proj", "experts.down_proj"]
    ),
}


def _moe_pair(model_type: str, adapters: str):
    """(pre-trained copy, PeftModel in eval mode), with the default (sdpa) attention and random LoRA weights."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_SHAPE, **_FAMILIES[model_type]))
    pretrained = copy.deepcopy(base).eval()
    torch.manual_seed(1)
    targets = dict(_ADAPTERS[adapters])
    router = _ROUTER.get(model_type, "gate")
    targets["target_parameters"] = [name.format(router=router) for name in targets.get("target_parameters", [])]
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets)
    return pretrained, get_peft_model(base, config).eval()


@pytest.mark.device
@pytest.mark.parametrize("adapters", _ADAPTERS)
@pytest.mark.parametrize("model_type", _FAMILIES)
def test_every_block_matches_the_two_model_oracle(model_type, adapters, device):
    pretrained, model = (m.to(device) for m in _moe_pair(model_type, adapters))
    assert type(pretrained_path(model_parts(model).layers[0], model.config)) is ProvedBlock
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuco_peft.decompose(model, ids, mask, positions="all")  # proves each block's one-pass path
        ours = tuco_peft.decompose(model, ids, mask, positions="all")
        ptc, ftc, x0, xL = two_pass(model, decoder_blocks(pretrained), ids, mask)
    assert not [w for w in caught if "no one-pass rule" in str(w.message)]  # target_parameters is a known kind
    proved = pretrained_paths(model)
    assert proved and all(isinstance(p, ProvedBlock) and not p.refuted for p in proved)
    real = mask.bool()[:, None, :, None]
    assert ftc[real.expand_as(ftc)].abs().max() > 1e-2  # the adapters change every batch's blocks
    torch.testing.assert_close(ours.ptc * real, ptc * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.ftc * real, ftc * real, atol=1e-5, rtol=1e-5)
    for ends, expected in ((ours.x0, x0), (ours.xL, xL)):
        torch.testing.assert_close(ends * real[:, 0], expected * real[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", _FAMILIES)
def test_tuco_of_one_unpadded_prompt_is_the_oracles(model_type):
    pretrained, model = _moe_pair(model_type, "experts and router")
    ids, mask = padded_batch(lengths=(11,))
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        for _ in range(2):  # the proof, then the one-pass path
            torch.testing.assert_close(tuco_peft.tuco(model, ids), tuco_at_last(ptc, ftc, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_steered_generation_with_cache_equals_the_reference_without(model_type):
    pretrained, model = _moe_pair(model_type, "experts and router")
    ids, mask = padded_batch(lengths=(7, 4, 9))
    alphas = [1.5, 0.6, 2.0]
    with ftc_scale(model, alphas):
        generated = greedy_generate(model, ids, mask, 6)
    assert torch.equal(generated, greedy(model, pretrained, ids, mask, alphas, 6))
    assert not torch.equal(generated, greedy_generate(model, ids, mask, 6))  # steering changed the tokens


@pytest.mark.parametrize("model_type", _FAMILIES)
def test_a_mixture_of_experts_without_adapters_shares_its_reads_once_proved(model_type):
    """At the analysed rows the router and experts serve both paths in one call, checked against the oracle on
    the batches after the proof. gpt-oss's MoE also returns its router's scores, which rows cannot share: its
    blocks hand over to the rows computed after the block, proved on the next batch."""
    pretrained, model = _moe_pair(model_type, "attention")
    ids, mask = padded_batch(lengths=(9, 5, 12))
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        results = [tuco_peft.decompose(model, ids, mask, positions="all") for _ in range(3)]
    paths = pretrained_paths(model)
    taken = SharedProjectionBlock if model_type == "gpt_oss" else SharedReadBlock
    assert paths and all(isinstance(p, ProvedBlock) and not p.refuted and type(p.candidate) is taken for p in paths)
    real = mask.bool()[:, None, :, None]
    for result in results:
        torch.testing.assert_close(result.ptc * real, ptc * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result.ftc * real, ftc * real, atol=1e-5, rtol=1e-5)


def test_hooks_on_a_shared_mixture_of_experts_see_the_fine_tuned_stream_alone():
    _, model = _moe_pair("qwen3_moe", "attention")
    ids, mask = padded_batch()
    mlp = decoder_blocks(model)[1].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda module, args, output: seen.append((args[0].clone(), output.clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            tuco_peft.tuco(model, ids, mask)  # the proof, whose replay calls the MoE with adapters off
            (expected, *_), seen[:] = seen, []
            tuco_peft.tuco(model, ids, mask)
    finally:
        handle.remove()
    ((normed, out),) = seen
    torch.testing.assert_close(normed, expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, expected[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("model_type", _FAMILIES)
def test_gradients_through_experts_and_router_match_the_two_model_oracle(model_type):
    """The first call proves each block's path against the replay, in the same graph; the second trusts it."""
    pretrained, model = _moe_pair(model_type, "experts and router")
    for _ in range(2):
        ours, expected = tuco_gradients(model, pretrained, *padded_batch())
        assert any("experts" in name for name in expected) and ours.keys() == expected.keys()
        for name, grad in ours.items():
            assert_close(grad, expected[name], relative=1e-4)


def test_rows_a_shared_call_cannot_compute_hand_the_block_to_separate_reads(monkeypatch):
    """On probation, pre-trained rows that raise inside the fine-tuned forward's calls leave that forward as it
    runs without tuco-peft; the block then computes its rows after the block, proved on the next batch."""

    def misread(*args, **kwargs):
        raise KeyError("position_embeddings")

    monkeypatch.setattr(SharedReadBlock, "_attend", misread)
    pretrained, model = _moe_pair("qwen3_moe", "attention")
    ids, mask = padded_batch()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        expected = tuco_at_last(ptc, ftc, mask)
        for _ in range(3):  # the shared call's fault, the proof of separate reads, the trusted path
            torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), expected, atol=1e-6, rtol=1e-5)
    paths = pretrained_paths(model)
    assert paths and all(type(p.candidate) is SharedProjectionBlock and p.proved_reach > 1 for p in paths)
    assert not [w for w in caught if "read the layout" in str(w.message)]


def test_a_bfloat16_mixture_of_experts_is_proved_on_a_float32_copy_then_shares_its_reads():
    """The proof's float32 copy of the block carries none of the forward's interceptions (the shared calls of the
    output projection and the MoE), which would otherwise run in the copy on the original block."""
    pretrained, model = (m.to(torch.bfloat16) for m in _moe_pair("qwen3_moe", "attention"))
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        expected = tuco_at_last(ptc, ftc, mask)
        for _ in range(2):  # the proof on the copy, then the shared reads
            torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), expected, atol=5e-3, rtol=0)
    paths = pretrained_paths(model)
    assert paths and all(type(p.candidate) is SharedReadBlock and p.proved_reach > 1 for p in paths)
