"""ftc_scale and generate with ``base_model=`` (full fine-tunes) against the plain two-model reference.

The reference (tests/helpers/steering_reference.py) runs the base model's block beside each fine-tuned block on
the steered stream, without a cache and re-running every prefix; it shares nothing with tuco_peft.
"""

import copy

import pytest
import torch
from helpers.models import base_model, full_finetune_pair, padded_batch
from helpers.oracle import decoder_blocks
from helpers.quantized_models import quantized_pair
from helpers.steering import N_NEW, greedy_generate, model_snapshot, plain_logits, prefixes, real_rows
from helpers.steering_reference import greedy, steered_last_token_tuco, steered_logits
from transformers import DynamicCache

from tuco_peft.core.decompose import decompose
from tuco_peft.errors import UnsupportedModelError
from tuco_peft.steering.forward import ftc_scale
from tuco_peft.steering.generation import generate

FAMILIES = ("llama", "gpt2")


def base_blocks_in_finetuned_shell(pretrained, finetuned):
    """The fine-tuned model with every block's weights replaced by the base model's: what α = 0 must give."""
    shell = copy.deepcopy(finetuned)
    for block, base_block in zip(decoder_blocks(shell), decoder_blocks(pretrained)):
        block.load_state_dict(base_block.state_dict())
    return shell


def _greedy_kwargs(n_new):
    return {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_one_is_the_fine_tuned_model_and_zero_the_base_blocks_under_fine_tuned_embeddings(family):
    pretrained, finetuned = full_finetune_pair(family)
    shell = base_blocks_in_finetuned_shell(pretrained, finetuned)
    ids, mask = padded_batch()
    with ftc_scale(finetuned, 1.0, base_model=pretrained):
        at_one = plain_logits(finetuned, ids, mask)
    with ftc_scale(finetuned, 0.0, base_model=pretrained):
        at_zero = plain_logits(finetuned, ids, mask)
    with ftc_scale(finetuned, 0.0, base_model=shell):  # a base that shares the fine-tuned embeddings and head
        at_zero_shared_shell = plain_logits(finetuned, ids, mask)
    expected_zero = real_rows(plain_logits(shell, ids, mask), mask)
    torch.testing.assert_close(
        real_rows(at_one, mask), real_rows(plain_logits(finetuned, ids, mask), mask), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(real_rows(at_zero, mask), expected_zero, atol=1e-5, rtol=0)
    torch.testing.assert_close(real_rows(at_zero_shared_shell, mask), expected_zero, atol=1e-5, rtol=0)
    # In a full fine-tune the embeddings and head moved too, so α = 0 is not the base model itself,
    # and the blocks' fine-tuning matters, so the checks above can fail.
    assert (real_rows(at_zero, mask) - real_rows(plain_logits(pretrained, ids, mask), mask)).abs().max() > 1e-2
    assert (real_rows(at_zero, mask) - real_rows(at_one, mask)).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alpha", [1.3, [0.4, 1.0, 1.7]])
def test_scaled_logits_match_two_model_reference(family, alpha):
    pretrained, finetuned = full_finetune_pair(family)
    ids, mask = padded_batch()
    with ftc_scale(finetuned, alpha, base_model=pretrained):
        steered = plain_logits(finetuned, ids, mask)
    alphas = [alpha] * 3 if isinstance(alpha, float) else alpha
    expected = steered_logits(finetuned, pretrained, ids, mask, alphas)
    torch.testing.assert_close(real_rows(steered, mask), real_rows(expected, mask), atol=1e-5, rtol=1e-5)
    assert (real_rows(steered, mask) - real_rows(plain_logits(finetuned, ids, mask), mask)).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_cache_equals_reference_without(family):
    pretrained, finetuned = full_finetune_pair(family)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    alphas = [1.5, 0.6, 2.0]
    cache = DynamicCache(config=finetuned.config)
    with ftc_scale(finetuned, alphas, base_model=pretrained), torch.no_grad():
        out = finetuned.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            output_logits=True,
            return_dict_in_generate=True,
            **_greedy_kwargs(8),
        )
    assert torch.equal(out.sequences, greedy(finetuned, pretrained, ids, mask, alphas, 8))
    # Tiny random models tend to repeat a token, so every step's logits are checked too, not only the argmax.
    for step, (prefix, prefix_mask) in enumerate(prefixes(out.sequences, mask)):
        expected = steered_logits(finetuned, pretrained, prefix, prefix_mask, alphas)[:, -1]
        torch.testing.assert_close(out.logits[step], expected, atol=1e-5, rtol=1e-5)
    # Fine-tuned and base keys differ by a full-rank delta: both slots hold full keys/values.
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer"] * 6
    assert all(layer.keys.shape == cache.layers[0].keys.shape for layer in cache.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_tuco_of_each_token_equals_decompose_with_the_base_model_on_its_prefix(family):
    pretrained, finetuned = full_finetune_pair(family)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    out = generate(finetuned, ids, mask, base_model=pretrained, **_greedy_kwargs(N_NEW))
    assert torch.equal(out.sequences, greedy_generate(finetuned, ids, mask, N_NEW))
    with torch.no_grad():
        expected = torch.stack(
            [decompose(finetuned, p, m, base_model=pretrained).tuco for p, m in prefixes(out.sequences, mask)], dim=1
        )
    torch.testing.assert_close(out.tuco, expected, atol=1e-5, rtol=0)
    assert out.tuco.std() > 1e-3


def test_steered_tuco_and_tokens_match_the_no_cache_reference():
    pretrained, finetuned = full_finetune_pair("llama")
    ids, mask = padded_batch(lengths=(5, 8))
    alphas = [1.4, 0.5, 1.9]
    out = generate(finetuned, ids, mask, alpha=alphas, base_model=pretrained, **_greedy_kwargs(N_NEW))
    assert torch.equal(out.sequences, greedy(finetuned, pretrained, ids, mask, alphas, N_NEW))
    expected = torch.stack(
        [steered_last_token_tuco(finetuned, pretrained, p, m, alphas) for p, m in prefixes(out.sequences, mask)],
        dim=1,
    )
    torch.testing.assert_close(out.tuco, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_checkpoint_equals_resident_model(tmp_path, family):
    pretrained, finetuned = full_finetune_pair(family)
    pretrained.save_pretrained(tmp_path)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    logits = {}
    for name, base in (("resident", pretrained), ("streamed", tmp_path)):
        with ftc_scale(finetuned, [1.5, 0.6, 2.0], base_model=base):
            logits[name] = plain_logits(finetuned, ids, mask)
    torch.testing.assert_close(logits["streamed"], logits["resident"], atol=0, rtol=0)
    resident = generate(finetuned, ids, mask, alpha=1.3, base_model=pretrained, **_greedy_kwargs(4))
    streamed = generate(finetuned, ids, mask, alpha=1.3, base_model=tmp_path / "model.safetensors", **_greedy_kwargs(4))
    assert torch.equal(streamed.sequences, resident.sequences)
    torch.testing.assert_close(streamed.tuco, resident.tuco, atol=0, rtol=0)


def test_separately_loaded_4bit_base_equals_the_adapter_path_and_the_reference(tmp_path):
    """A LoRA fine-tune steered against its base loaded on its own (both 4-bit): the base model's blocks then
    play the pre-trained role that the adapters-off blocks play otherwise, so both paths must agree."""
    pretrained, model = quantized_pair(tmp_path)
    ids, mask = padded_batch(lengths=(6, 8))
    with ftc_scale(model, 1.6, base_model=pretrained):
        separate = greedy_generate(model, ids, mask, 6)
        separate_logits = plain_logits(model, ids, mask)
    with ftc_scale(model, 1.6):
        adapter_logits = plain_logits(model, ids, mask)
    assert torch.equal(separate, greedy(model, pretrained, ids, mask, [1.6] * 3, 6))
    torch.testing.assert_close(real_rows(separate_logits, mask), real_rows(adapter_logits, mask), atol=1e-5, rtol=1e-5)


def test_base_of_another_architecture_is_refused_and_nothing_is_hooked(tmp_path):
    _, finetuned = full_finetune_pair("llama")
    base_model("gpt2").save_pretrained(tmp_path)
    before = model_snapshot(finetuned)
    ids, mask = padded_batch(lengths=(5, 8))
    for other in (base_model("gpt2"), tmp_path, base_model("qwen2")):
        with (
            pytest.raises(UnsupportedModelError, match="architecture and size"),
            ftc_scale(finetuned, 0.5, base_model=other),
        ):
            pass
        with pytest.raises(UnsupportedModelError, match="architecture and size"):
            generate(finetuned, ids, mask, base_model=other, max_new_tokens=2)
        assert model_snapshot(finetuned) == before
    # Without base_model, a model with no adapters has nothing to steer against.
    with pytest.raises(UnsupportedModelError, match="no LoRA adapters"), ftc_scale(finetuned, 0.5):
        pass


def test_both_models_are_restored_after_exit_and_after_an_exception():
    pretrained, finetuned = full_finetune_pair("llama")
    finetuned.model.layers[1].mlp.train()  # unusual states that must survive
    pretrained.model.layers[2].mlp.up_proj.weight.requires_grad_(False)
    before = (model_snapshot(finetuned), model_snapshot(pretrained))
    ids, mask = padded_batch()
    plain = plain_logits(finetuned, ids, mask)
    with ftc_scale(finetuned, [0.3, 1.0, 2.0], base_model=pretrained):
        plain_logits(finetuned, ids, mask)
    assert (model_snapshot(finetuned), model_snapshot(pretrained)) == before
    with pytest.raises(RuntimeError, match="boom"), ftc_scale(finetuned, 0.5, base_model=pretrained):
        greedy_generate(finetuned, ids, mask, 2)
        raise RuntimeError("boom")
    assert (model_snapshot(finetuned), model_snapshot(pretrained)) == before
    torch.testing.assert_close(plain_logits(finetuned, ids, mask), plain, atol=0, rtol=0)
