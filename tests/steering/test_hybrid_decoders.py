"""Hybrid decoders (linear-attention or Mamba blocks beside attention ones: Qwen3-Next, NemotronH): decompose and
uncached FTC_α steering exact against the two-model references; cached steering refused by name, since their
caches hold recurrent and convolution states that the pre-trained blocks' cache slots do not duplicate."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.models import VOCAB, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import greedy_generate, model_snapshot
from helpers.steering_reference import steered_logits
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import tuco_peft
from tuco_peft.errors import UnsupportedModelError

_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=None, pad_token_id=0, bos_token_id=1,
)
HYBRIDS = ["qwen3_next", "nemotron_h"]  # their default configs mix recurrent and attention blocks


def hybrid_pair(model_type: str):
    """(pre-trained model, PeftModel with random LoRA on the attention, recurrent-input and MLP projections)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **_SHAPE)).eval()
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "in_proj_qkvz", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT names the targets one family lacks
        model = get_peft_model(base, lora).eval()
    return pretrained, model


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_decompose_matches_the_oracle(model_type):
    pretrained, model = hybrid_pair(model_type)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        decomposition = tuco_peft.decompose(model, ids, mask, positions="all")
        tuco = tuco_peft.tuco(model, ids, mask)
    real = mask.bool()[:, None, :, None]
    torch.testing.assert_close(decomposition.ptc, ptc * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decomposition.ftc, ftc * real, atol=1e-5, rtol=1e-5)
    assert (ftc * real).abs().max() > 1e-3
    torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_uncached_steered_generation_matches_the_reference(model_type):
    pretrained, model = hybrid_pair(model_type)
    ids = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    mask, alphas = torch.ones_like(ids), [1.7, 0.4, 1.0, 2.0]
    with torch.no_grad(), tuco_peft.ftc_scale(model, alphas):
        out = greedy_generate(model, ids, mask, 5, output_logits=True, return_dict_in_generate=True, use_cache=False)
    with torch.no_grad():
        reference = steered_logits(model, pretrained, out.sequences, torch.ones_like(out.sequences), alphas)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference[:, ids.shape[1] - 1 : -1], atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_cached_steered_generation_is_refused_and_the_model_left_as_found(model_type):
    _, model = hybrid_pair(model_type)
    ids = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    before = model_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="recurrent or convolution states.*use_cache=False"):
        tuco_peft.generate(model, ids, alpha=1.5, max_new_tokens=3, do_sample=False)
    assert model_snapshot(model) == before
    steered = tuco_peft.generate(model, ids, alpha=1.5, max_new_tokens=3, do_sample=False, use_cache=False)
    assert steered.tuco.shape == (1, 3) and bool(torch.isfinite(steered.tuco).all())
