"""Cached steered generation as users run it, against the two-model reference without a cache.

What users get: the attention implementation that ``from_config`` / ``from_pretrained`` pick by themselves
(sdpa), one prompt or prompts of one length with no padding, as well as padded batches and eager attention.
Issue 23: transformers 5.24 renamed the blocks' cache argument, which steering then no longer saw; the
pre-trained blocks' keys/values went into the fine-tuned slots (no lean slots; beam search and full
fine-tunes failed), while the steering tests, all eager and padded, did not look there.

The reference (tests/helpers/steering_reference.py) runs the pre-trained model's block beside each fine-tuned
block and re-runs the whole prefix for every token; its pre-trained model uses the same attention
implementation, since the blocks share their attention mask.
"""

import pytest
import torch
import transformers
from helpers.models import FAMILIES, VOCAB, full_finetune_pair, model_pair, padded_batch
from helpers.quantized_models import quantized_pair
from helpers.steering import greedy_generate, model_snapshot, plain_logits
from helpers.steering_reference import assert_greedy_choices, steered_logits, step_logits
from transformers import DynamicCache
from transformers.utils import is_flash_attn_2_available

import tuco_peft.core.paired
import tuco_peft.steering.forward
from tuco_peft.errors import UnsupportedModelError
from tuco_peft.steering.forward import ftc_scale
from tuco_peft.steering.generation import generate

N_NEW = 5
ALPHAS = (0.5, 1.25, [0.6, 1.0, 1.7])  # below one, above one, one per block


def prompts(kind: str):
    """One prompt of 11 tokens, two of 9 tokens (neither padded), or three left-padded ones."""
    if kind == "padded":
        return padded_batch(lengths=(7, 4, 9))
    rows, length = (1, 11) if kind == "one prompt" else (2, 9)
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def per_block(alpha, n_layers=3):
    return [alpha] * n_layers if isinstance(alpha, float) else alpha


def with_new_tokens(mask):
    """The attention mask of the prompts followed by the N_NEW generated tokens."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], N_NEW)], dim=1)


def assert_steered_generation_follows_the_reference(pretrained, model, ids, mask, alpha, base_model=None):
    """``ftc_scale`` + ``generate`` has the reference's logits at every step and picks their largest, and so does
    ``tuco_peft.generate``; the logits show that α mattered (cached α = 1 keys would fail the check).
    ``base_model``: for a full fine-tune, passed to both (``pretrained`` is then the same model)."""
    alphas, width = per_block(alpha), ids.shape[1]
    with ftc_scale(model, alpha, base_model=base_model):
        out = greedy_generate(model, ids, mask, N_NEW, output_logits=True, return_dict_in_generate=True)
    reference = step_logits(model, pretrained, out.sequences, mask, alphas)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-4, rtol=1e-4)
    assert_greedy_choices(model, out.sequences, reference, width)
    full_mask = with_new_tokens(mask)
    assert (reference - plain_logits(model, out.sequences, full_mask)[:, width - 1 : -1]).abs().max() > 1e-3  # 10× atol
    steered = generate(model, ids, mask, alpha=alpha, base_model=base_model, max_new_tokens=N_NEW,
                       min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    assert_greedy_choices(
        model, steered.sequences, step_logits(model, pretrained, steered.sequences, mask, alphas), width
    )


def test_issue_23_one_unpadded_prompt_with_the_default_attention_generates_the_reference_tokens():
    """The report's case: a Llama built by ``from_config`` (sdpa), one prompt of 11 tokens, mask all ones, α = 0.5.
    On 5.24 the blocks' renamed cache argument went unseen: the pre-trained half's keys went into the fine-tuned
    slots (two prompts' worth of keys in one slot, no lean slots), and the hooked path decoded from wrong keys."""
    pretrained, model = model_pair("llama", attention=None)
    assert model.config._attn_implementation == "sdpa"
    ids, mask = prompts("one prompt")
    assert_steered_generation_follows_the_reference(pretrained, model, ids, mask, 0.5)
    cache = DynamicCache(config=model.config)
    with ftc_scale(model, 0.5):
        greedy_generate(model, ids, mask, N_NEW, past_key_values=cache)
    assert [type(layer).__name__ for layer in cache.layers] == ["LowRankSlot"] * 3 + ["DynamicLayer"] * 3
    assert {layer.keys.shape[0] for layer in cache.layers} == {1}  # one prompt in every slot


@pytest.mark.device
@pytest.mark.parametrize("kind", ["one prompt", "unpadded", "padded"])
@pytest.mark.parametrize("attention", [None, "eager"], ids=["default", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steered_generation_equals_the_reference_without_a_cache(family, attention, kind, device):
    pretrained, model = (m.to(device) for m in model_pair(family, attention=attention))
    ids, mask = (t.to(device) for t in prompts(kind))
    alpha = ALPHAS[(FAMILIES.index(family) + len(kind)) % len(ALPHAS)]  # each α on every family
    assert_steered_generation_follows_the_reference(pretrained, model, ids, mask, alpha)


@pytest.mark.device
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["one prompt", "padded"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_flex_attention(family, kind, device):
    pretrained, model = (m.to(device) for m in model_pair(family, attention="flex_attention"))
    ids, mask = (t.to(device) for t in prompts(kind))
    try:
        greedy_generate(pretrained, ids, mask, N_NEW)
    except Exception as error:  # noqa: BLE001 - transformers 5.5 compiles flex attention, which inductor fails to build on a CPU
        pytest.skip(f"flex attention itself does not run here (transformers {transformers.__version__}): "
                    f"{type(error).__name__}")
    assert_steered_generation_follows_the_reference(pretrained, model, ids, mask, 1.25)


@pytest.mark.device
@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn is not installed (it needs a CUDA GPU)")
@pytest.mark.parametrize("kind", ["one prompt", "padded"])
def test_flash_attention(kind, device):
    _, model = (m.to(device, torch.bfloat16) for m in model_pair("llama", attention="flash_attention_2"))
    ids, mask = (t.to(device) for t in prompts(kind))
    assert_cached_steps_match_uncached_forwards(model, ids, mask, 1.25, atol=0.05)


def assert_cached_steps_match_uncached_forwards(model, ids, mask, alpha, atol):
    """Half precision: each cached step's logits equal the steered forward of the same prefix without a cache
    (teacher-forced on the generated tokens, so a near tie cannot send the two down different paths)."""
    with ftc_scale(model, alpha), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        full_mask = with_new_tokens(mask)
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        uncached = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=position_ids,
                         use_cache=False).logits
    width = ids.shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits.float(), uncached[:, width - 1 + step].float(), atol=atol, rtol=0)


@pytest.mark.device
@pytest.mark.parametrize("kind", ["one prompt", "unpadded", "padded"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_bf16_cached_steps_match_the_uncached_steered_forward(family, kind, device):
    pretrained, model = (m.to(device, torch.bfloat16) for m in model_pair(family, attention=None))
    ids, mask = (t.to(device) for t in prompts(kind))
    assert_cached_steps_match_uncached_forwards(model, ids, mask, 0.5, atol=0.05)
    # The uncached steered forward is the reference's, to bf16 rounding, so the check above is against it.
    with ftc_scale(model, 0.5):
        ours = plain_logits(model, ids, mask).float()
    reference = steered_logits(model, pretrained, ids, mask, per_block(0.5)).float()
    torch.testing.assert_close(ours[mask.bool()], reference[mask.bool()], atol=0.1, rtol=0)


@pytest.mark.parametrize("kind", ["one prompt", "unpadded"])
def test_4bit_base_with_the_default_attention(kind, tmp_path):
    pretrained, model = quantized_pair(tmp_path)  # loaded by from_pretrained: sdpa
    assert model.config._attn_implementation == "sdpa"
    ids, mask = prompts(kind)
    assert_steered_generation_follows_the_reference(pretrained, model, ids, mask, [1.5, 0.6, 2.0])


@pytest.mark.parametrize("kind", ["one prompt", "padded"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_finetune_with_the_default_attention(family, kind):
    pretrained, finetuned = full_finetune_pair(family, attention=None)
    ids, mask = prompts(kind)
    assert_steered_generation_follows_the_reference(pretrained, finetuned, ids, mask, 1.4, base_model=pretrained)


@pytest.mark.parametrize("kind", ["one prompt", "unpadded"])
def test_beam_search_with_the_default_attention(kind):
    """Each returned beam's score is the reference's log-probability of its tokens (issue 23: a size error)."""
    pretrained, model = model_pair("llama", attention=None)
    ids, mask = prompts(kind)
    with ftc_scale(model, 0.7), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    sequences = out.sequences
    log_probs = steered_logits(model, pretrained, sequences, torch.ones_like(sequences), [0.7] * 3).log_softmax(-1)
    width = ids.shape[1]
    chosen = log_probs[:, width - 1 : -1].gather(-1, sequences[:, width:, None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, chosen.sum(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("paired", [True, False], ids=["paired", "hooked"])
def test_a_cache_that_cannot_be_followed_is_refused_not_decoded(paired, monkeypatch):
    """Were the blocks' cache not found (as under 5.24's renamed argument), the pre-trained blocks would write
    into the fine-tuned slots: the check after every forward refuses its output instead."""
    _, model = model_pair("llama", attention=None)
    if not paired:
        monkeypatch.setattr(tuco_peft.steering.forward, "paired_block", lambda *args: None)
    monkeypatch.setattr(tuco_peft.steering.forward, "find_cache", lambda args, kwargs: None)
    monkeypatch.setattr(tuco_peft.core.paired, "find_cache", lambda args, kwargs: None)
    ids, mask = prompts("one prompt")
    before = model_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="lost track of the cache"), ftc_scale(model, 0.5):
        greedy_generate(model, ids, mask, N_NEW)
    assert model_snapshot(model) == before
