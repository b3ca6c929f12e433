"""LoRA configurations users meet in practice, each against the two-model oracle."""

import copy

import pytest
import torch
from helpers.models import base_model, lora_model, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from peft import LoraConfig, get_peft_model

import tuco_peft


def _check_against_oracle(pretrained, model, ids=None, mask=None):
    if ids is None:
        ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        d = tuco_peft.decompose(model, ids, mask, positions="all")
    real = mask.bool()[:, None, :, None]
    scale = ptc.abs().max()
    assert (d.ptc - ptc * real).abs().max() <= 1e-4 * scale
    assert (d.ftc - ftc * real).abs().max() <= 1e-4 * scale
    with torch.no_grad():
        assert (tuco_peft.tuco(model, ids, mask) - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5


def _pair(family="llama", **lora_kwargs):
    base = base_model(family)
    return copy.deepcopy(base), lora_model(base, **lora_kwargs)


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(use_rslora=True, r=8, lora_alpha=4),
        dict(rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 32}),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], layers_to_transform=[0, 2]),  # block 1: none
        dict(target_modules=["down_proj", "o_proj"]),  # q/k/v stay plain Linear
        dict(lora_bias=True),
        dict(modules_to_save=["lm_head"]),
    ],
    ids=[
        "rslora", "rank-alpha-patterns", "layers-without-adapters", "mlp-and-output-only", "lora-bias", "lm-head-saved"
    ],
)
def test_lora_variants_match_oracle(lora_kwargs):
    _check_against_oracle(*_pair(**lora_kwargs))


def test_modules_to_save_inside_a_block_uses_the_exact_replay_path():
    # A fully trained attention norm is shared by every position: the one-pass path cannot reuse it, the
    # replay path must, and the result must still match the two-model oracle (whose norm is the original).
    pretrained, model = _pair(modules_to_save=["input_layernorm"])
    with torch.no_grad():
        for wrapper in [m for n, m in model.named_modules() if n.endswith("input_layernorm")]:
            wrapper.modules_to_save["default"].weight.mul_(1.5)
    _check_against_oracle(pretrained, model)


def test_several_active_adapters_are_summed():
    base = base_model("qwen2")
    pretrained = copy.deepcopy(base)
    torch.manual_seed(3)
    first = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, first, adapter_name="first")
    second = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    model.add_adapter("second", second)
    model.base_model.set_adapter(["first", "second"])
    model.eval()
    _check_against_oracle(pretrained, model)
    ids, mask = padded_batch()
    with torch.no_grad():
        both = tuco_peft.tuco(model, ids, mask)
        model.base_model.set_adapter("first")
        only_first = tuco_peft.tuco(model, ids, mask)
    assert (both - only_first).abs().max() > 1e-3


def test_gpt2_conv1d_fan_in_fan_out():
    pretrained, model = _pair("gpt2", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    _check_against_oracle(pretrained, model)


def test_lora_on_embeddings_changes_x0_not_the_definition():
    pretrained, model = _pair(target_modules=["embed_tokens", "q_proj", "v_proj"])
    _check_against_oracle(pretrained, model)


def test_trainable_tokens_beside_lora_are_part_of_x0():
    pretrained, model = _pair(target_modules=["q_proj", "v_proj", "down_proj"], trainable_token_indices=[3, 5, 7])
    assert any(type(m).__name__ == "TrainableTokensLayer" for m in model.modules())
    ids, mask = padded_batch(side="right")
    ids[torch.arange(3), mask.sum(-1) - 1] = 5  # a trained token at the last real position of every row
    _check_against_oracle(pretrained, model, ids, mask)
