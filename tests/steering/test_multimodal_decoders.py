"""Multimodal models as ``AutoModelForCausalLM`` loads them (Gemma 3 from 4B up, Gemma 4): a text prompt goes
through the text decoder alone, whose blocks TuCo decomposes. Decompose, TuCo and cached FTC_α steering against the
two-model references, which run the whole multimodal model; Gemma 3's text blocks take each of their family's
one-pass strategies.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.assertions import assert_decomposition_matches_the_oracle
from helpers.models import VOCAB, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import greedy_generate, model_snapshot
from helpers.steering_reference import step_logits
from helpers.strategies import STRATEGIES, force, record_strategies
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import tuco_peft
from tuco_peft.model.shared_keys_values import passes_store

_TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=4, pad_token_id=0, bos_token_id=1,
    eos_token_id=None, layer_types=["sliding_attention", "full_attention"] * 3,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _gemma3():
    vision = dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14)
    return AutoConfig.for_model(
        "gemma3", text_config=dict(_TEXT, model_type="gemma3_text"), vision_config=vision, mm_tokens_per_image=4
    )


def _gemma4():
    """Its last two blocks reuse the keys/values of blocks 2 and 3; per-layer inputs."""
    text = dict(
        _TEXT, model_type="gemma4_text", num_kv_shared_layers=2, global_head_dim=16, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
    )
    vision = dict(_VISION, model_type="gemma4_vision", num_key_value_heads=2, head_dim=16)
    return AutoConfig.for_model("gemma4", text_config=text, vision_config=vision, audio_config=None)


def _hands_blocks_a_store() -> bool:
    text = AutoConfig.for_model("gemma4_text", **dict(_TEXT, num_kv_shared_layers=2, global_head_dim=16))
    return passes_store(AutoModelForCausalLM.from_config(text).model.layers[0])


MODELS = {
    "gemma3": _gemma3,
    "gemma4": pytest.param(
        _gemma4,
        marks=pytest.mark.skipif(
            not _hands_blocks_a_store(), reason="this transformers keeps Gemma 4's shared keys/values on the cache"
        ),
    ),
}


def adapted_pair(build):
    """(pre-trained model, PeftModel with random LoRA on the text decoder's attention and MLP linears)."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(build()).eval()
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return pretrained, get_peft_model(base, lora).eval()


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_decompose_matches_the_oracle(build):
    pretrained, model = adapted_pair(build)
    assert type(model.get_base_model()).__name__.endswith("ForConditionalGeneration")
    assert_decomposition_matches_the_oracle(model, pretrained, *padded_batch())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gemma3_text_blocks_take_each_one_pass_strategy(strategy, monkeypatch):
    pretrained, model = adapted_pair(_gemma3)
    force(monkeypatch, strategy)
    chosen = record_strategies(monkeypatch)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        tuco = tuco_peft.tuco(model, ids, mask, backend="torch")
    assert chosen == [STRATEGIES[strategy]] * 6
    torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_cached_steered_generation_matches_the_reference(build):
    """Every cached step has the logits of the reference, which re-runs the whole prefix through both multimodal
    models, and they differ from the fine-tuned model's; the model is left as it was."""
    pretrained, model = adapted_pair(build)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    alphas = [1.7, 0.4, 1.0, 2.0, 1.0, 0.5]
    before = model_snapshot(model)
    with torch.no_grad(), tuco_peft.ftc_scale(model, alphas):
        out = greedy_generate(model, ids, mask, 5, output_logits=True, return_dict_in_generate=True)
    assert model_snapshot(model) == before
    reference = step_logits(model, pretrained, out.sequences, mask, alphas)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)
    assert (reference - step_logits(model, pretrained, out.sequences, mask, [1.0] * 6)).abs().max() > 1e-3


@pytest.mark.parametrize("streamed", [False, True], ids=["loaded base", "streamed base"])
def test_a_full_finetune_against_its_base_model(streamed, tmp_path):
    """The base model loaded, or streamed block by block from its safetensors checkpoint, whose config.json is the
    multimodal one: its text decoder's blocks are the pre-trained blocks."""
    torch.manual_seed(0)
    pretrained = AutoModelForCausalLM.from_config(_gemma3()).eval()
    finetuned = copy.deepcopy(pretrained)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    if streamed:
        pretrained.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, mask)
        tuco = tuco_peft.tuco(finetuned, ids, mask, base_model=tmp_path if streamed else pretrained)
    torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)


def test_a_prompt_with_a_media_placeholder_is_refused():
    """The text decoder alone would embed the placeholder itself, where the model puts an image (or padding)."""
    config = _gemma3()
    config.image_token_id = VOCAB - 1
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj"]))
    ids = torch.tensor([[1, 5, VOCAB - 1, 6]])
    with pytest.raises(tuco_peft.InputError, match=f"media placeholder token {VOCAB - 1}"):
        tuco_peft.tuco(model, ids)
    assert tuco_peft.tuco(model, ids[:, [0, 1, 3]]).isfinite().all()


def test_a_streamed_base_without_a_block_is_refused_by_name(tmp_path):
    """Block 0 of the text decoder left out of the checkpoint: the vision tower's "layers.0." does not stand in."""
    torch.manual_seed(0)
    pretrained = AutoModelForCausalLM.from_config(_gemma3()).eval()
    pretrained.save_pretrained(tmp_path)
    (checkpoint,) = tmp_path.glob("*.safetensors")
    tensors = load_file(checkpoint)
    save_file({key: value for key, value in tensors.items() if ".model.layers.0." not in key}, checkpoint)
    assert any("vision" in key and ".layers.0." in key for key in tensors)
    with pytest.raises(tuco_peft.UnsupportedModelError, match="no tensors for block 0 .*ending in 'layers.0.'"):
        tuco_peft.tuco(copy.deepcopy(pretrained), *padded_batch(), base_model=tmp_path)
