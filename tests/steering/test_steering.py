"""ftc_scale against a plain two-model, no-cache reference (tests/helpers/steering_reference.py)."""

import bitsandbytes as bnb
import pytest
import torch
from helpers.models import FAMILIES, base_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks
from helpers.quantized_models import quantized_pair
from helpers.steering import greedy_generate, model_snapshot, plain_logits, real_rows
from helpers.steering_reference import greedy, steered_logits
from transformers import DynamicCache

from tuco_peft.errors import InputError, TuCoError, UnsupportedModelError
from tuco_peft.steering.forward import ftc_scale


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_alpha_one_is_the_fine_tuned_model_and_zero_the_base_model(family):
    pretrained, model = model_pair(family)
    ids, mask = padded_batch()
    finetuned = plain_logits(model, ids, mask)
    with ftc_scale(model, 1.0):
        at_one = plain_logits(model, ids, mask)
    with ftc_scale(model, 0.0):
        at_zero = plain_logits(model, ids, mask)
    torch.testing.assert_close(real_rows(at_one, mask), real_rows(finetuned, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        real_rows(at_zero, mask), real_rows(plain_logits(pretrained, ids, mask), mask), atol=1e-5, rtol=0
    )
    assert (finetuned - at_zero).abs().max() > 1e-2  # the adapter matters, so the checks above can fail


@pytest.mark.device
@pytest.mark.parametrize("family", FAMILIES)
def test_scaled_logits_match_two_model_reference(family, device):
    pretrained, model = (m.to(device) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch())
    alpha = 1.3 if family in ("llama", "gpt2") else [0.5, 1.0, 1.8]  # one float, or one value per block
    with ftc_scale(model, alpha):
        steered = plain_logits(model, ids, mask)
    expected = steered_logits(model, pretrained, ids, mask, [alpha] * 3 if isinstance(alpha, float) else alpha)
    torch.testing.assert_close(real_rows(steered, mask), real_rows(expected, mask), atol=1e-5, rtol=1e-5)
    assert (real_rows(steered, mask) - real_rows(plain_logits(model, ids, mask), mask)).abs().max() > 1e-3


@pytest.mark.device
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_cache_equals_reference_without(family, device):
    pretrained, model = (m.to(device) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch(lengths=(7, 4, 9)))
    alphas = [1.5, 0.6, 2.0]
    with ftc_scale(model, alphas):
        generated = greedy_generate(model, ids, mask, 8)
    assert torch.equal(generated, greedy(model, pretrained, ids, mask, alphas, 8))
    assert not torch.equal(generated, greedy_generate(model, ids, mask, 8))  # steering changed the tokens


def test_static_cache_reused_across_generations_with_sdpa_attention():
    pretrained, model = model_pair("llama")
    model.get_base_model().set_attn_implementation("sdpa")
    ids, mask = padded_batch(lengths=(7, 4, 9))
    alphas = [1.5, 0.6, 2.0]
    expected = greedy(model, pretrained, ids, mask, alphas, 6)
    with ftc_scale(model, alphas):
        first = greedy_generate(model, ids, mask, 6, cache_implementation="static")
        second = greedy_generate(model, ids, mask, 6, cache_implementation="static")  # the cache is reset
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_greedy_generation_on_a_4bit_base(tmp_path):
    pretrained, model = quantized_pair(tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    ids, mask = padded_batch(lengths=(6, 8))
    with ftc_scale(model, 1.6):
        generated = greedy_generate(model, ids, mask, 6)
    assert torch.equal(generated, greedy(model, pretrained, ids, mask, [1.6] * 3, 6))


def test_beam_search_scores_match_the_reference_log_probabilities():
    pretrained, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(6, 8))
    n_new = 5
    with ftc_scale(model, 1.4), torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, num_beams=3,
            num_return_sequences=3, length_penalty=0.0, do_sample=False, pad_token_id=0, output_scores=True,
            return_dict_in_generate=True,
        )
    sequences = out.sequences
    full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones(sequences.shape[0], n_new, dtype=mask.dtype)], 1)
    log_probs = steered_logits(model, pretrained, sequences, full_mask, [1.4] * 3).log_softmax(-1)
    width = ids.shape[1]
    chosen = log_probs[:, width - 1 : -1].gather(-1, sequences[:, width:, None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, chosen.sum(-1), atol=1e-4, rtol=1e-5)
    assert len(set(map(tuple, sequences[:3].tolist()))) == 3  # three distinct beams, each checked


def _kv_bytes(cache):
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_lean_cache_keeps_full_pretrained_slots_and_rank_r_finetuned_ones():
    pretrained, model = model_pair("llama", r=4)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    plain_cache, steered_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    greedy_generate(model, ids, mask, 5, past_key_values=plain_cache)
    with ftc_scale(model, 1.7):
        generated = greedy_generate(model, ids, mask, 5, past_key_values=steered_cache)
    assert torch.equal(generated, greedy(model, pretrained, ids, mask, [1.7] * 3, 5))
    assert [type(layer).__name__ for layer in steered_cache.layers] == ["LowRankSlot"] * 3 + ["DynamicLayer"] * 3
    positions = ids.shape[0] * (ids.shape[1] + 4)  # the last token is never cached
    per_position = (4 + 4) * 4 + 8  # u_k and u_v (fp32), the position id (int64)
    assert _kv_bytes(steered_cache) == _kv_bytes(plain_cache) + 3 * positions * per_position


def test_a_cache_is_used_only_by_the_steering_that_filled_it():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 5))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        with ftc_scale(model, 1.2), pytest.raises(InputError, match="outside ftc_scale"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
        steered_cache = DynamicCache(config=model.config)
        with ftc_scale(model, 1.2):
            model(input_ids=ids, attention_mask=mask, past_key_values=steered_cache, use_cache=True)
        with pytest.raises(TuCoError, match="only usable inside"):
            model(input_ids=ids[:, :1], past_key_values=steered_cache, use_cache=True)


def test_model_is_restored_after_exit_and_after_an_exception():
    _, model = model_pair("llama")
    model.get_base_model().model.layers[1].mlp.train()  # an unusual state that must survive
    before = model_snapshot(model)
    ids, mask = padded_batch()
    plain = plain_logits(model, ids, mask)
    with ftc_scale(model, [0.3, 1.0, 2.0]):
        plain_logits(model, ids, mask)
    assert model_snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"), ftc_scale(model, 0.5):
        plain_logits(model, ids, mask)
        raise RuntimeError("boom")
    assert model_snapshot(model) == before
    torch.testing.assert_close(plain_logits(model, ids, mask), plain, atol=0, rtol=0)


@pytest.mark.parametrize(
    "alpha, message",
    [
        (-0.1, "≥ 0"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ([1.0, 1.0], "3 decoder blocks"),
        ([1.0, -1.0, 1.0], r"alpha\[1\]"),
        ("1.0", "number"),
        (True, "number"),
    ],
)
def test_bad_alpha_is_refused(alpha, message):
    _, model = model_pair("llama")
    before = model_snapshot(model)
    with pytest.raises(InputError, match=message), ftc_scale(model, alpha):
        pass
    assert model_snapshot(model) == before


def test_model_without_lora_and_nesting_are_refused():
    with pytest.raises(UnsupportedModelError, match="no LoRA adapters"), ftc_scale(base_model("llama"), 1.1):
        pass
    _, model = model_pair("gpt2")
    with ftc_scale(model, 1.1), pytest.raises(InputError, match="nesting"), ftc_scale(model, 0.9):
        pass
    assert all(len(b._forward_hooks) == 0 for b in decoder_blocks(model))
