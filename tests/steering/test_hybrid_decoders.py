"""Hybrid decoders (recurrent, convolution or linear-attention blocks beside attention ones): decompose and FTC_α
steering exact against the two-model references, with and without a cache.

Cached steering keeps each steered block's pre-trained convolution and recurrent states in its own cache slot,
as it keeps keys/values: the tests compare every cached step's logits with the reference, which re-runs the
whole prefix through both models. Where transformers' recurrent cache layers do not count their tokens (before
5.25), every block runs its pre-trained path, so that each pre-trained slot holds a state where its fine-tuned twin
does; generations that transformers itself cannot run there (static caches and prompt lookup on 5.5, a reset
cache reused on 5.5 and 5.17, assisted generation of stateful models) are skipped, with the reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from helpers.assertions import assert_decomposition_matches_the_oracle
from helpers.models import VOCAB, padded_batch
from helpers.steering import greedy_generate, model_snapshot
from helpers.steering_reference import assert_greedy_choices, steered_logits, step_logits
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, cache_utils

import tuco_peft
from tuco_peft.errors import InputError

_SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, eos_token_id=None, pad_token_id=0, bos_token_id=1,
)
_LINEAR_ATTENTION = dict(
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4
)
_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
HYBRIDS = {  # recurrent widths and expert counts cut to the 64-wide models' size
    "qwen3_next": dict(  # gated delta-net blocks, then attention; MoE MLPs
        **_LINEAR_ATTENTION, **_EXPERTS, num_experts=4, shared_expert_intermediate_size=32
    ),
    "qwen3_5_text": _LINEAR_ATTENTION,
    "nemotron_h": dict(  # Mamba-2, attention, MoE and MLP blocks; the last two cache nothing
        **_EXPERTS, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, n_routed_experts=4,
        moe_shared_expert_intermediate_size=32,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),  # short convolutions
    "falcon_h1": dict(  # attention and Mamba-2 side by side in every block: one cache layer holds both
        mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_n_groups=2
    ),
    "granitemoehybrid": dict(
        layers_block_type=["mamba", "attention"] * 2, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
        num_local_experts=4,
    ),
    "jamba": dict(  # Mamba-1
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=4, mamba_dt_rank=8
    ),
}
ALPHAS = [1.7, 0.4, 1.0, 2.0]  # block 2 is not steered
N_NEW = 5

# Recurrent cache layers count their tokens (transformers 5.25): a block that is not steered has a placeholder in
# its pre-trained slot. Before, every block is steered, its slot a copy of its fine-tuned one.
_COUNTED = hasattr(getattr(cache_utils, "LinearAttentionCacheLayerMixin", None), "get_seq_length")


def skip_where_transformers_cannot(model, ids, mask, **options):
    """Skip where this transformers fails the generation without steering."""
    try:
        greedy_generate(model, ids, mask, N_NEW, **options)
    except (KeyError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0]
        pytest.skip(f"transformers {transformers.__version__} fails this generation without steering: {reason}")


def hybrid_pair(model_type: str):
    """(pre-trained model, PeftModel with random LoRA on the attention, recurrent-input and MLP projections)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **_SHAPE, **HYBRIDS[model_type])
    base = AutoModelForCausalLM.from_config(config).eval()
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "in_proj_qkvz", "down_proj", "w2"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT names the targets one family lacks
        model = get_peft_model(base, lora).eval()
    return pretrained, model


def prompts(kind: str):
    """One prompt of 7 tokens, or three left-padded ones."""
    if kind == "padded":
        return padded_batch(lengths=(7, 4, 9))
    ids = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_decompose_matches_the_oracle(model_type):
    pretrained, model = hybrid_pair(model_type)
    assert_decomposition_matches_the_oracle(model, pretrained, *padded_batch())


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_uncached_steered_generation_matches_the_reference(model_type):
    pretrained, model = hybrid_pair(model_type)
    ids, mask = prompts("one prompt")
    with torch.no_grad(), tuco_peft.ftc_scale(model, ALPHAS):
        out = greedy_generate(model, ids, mask, N_NEW, output_logits=True, return_dict_in_generate=True,
                              use_cache=False)
    reference = step_logits(model, pretrained, out.sequences, mask, ALPHAS)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["one prompt", "padded"])
@pytest.mark.parametrize("model_type", HYBRIDS)
def test_cached_steered_generation_matches_the_reference(model_type, kind):
    """Every cached step has the reference's logits, and they differ from the fine-tuned model's (α mattered);
    ``tuco_peft.generate`` gives with a cache what it gives without one."""
    pretrained, model = hybrid_pair(model_type)
    ids, mask = prompts(kind)
    before = model_snapshot(model)
    with torch.no_grad(), tuco_peft.ftc_scale(model, ALPHAS):
        out = greedy_generate(model, ids, mask, N_NEW, output_logits=True, return_dict_in_generate=True)
    assert model_snapshot(model) == before
    reference = step_logits(model, pretrained, out.sequences, mask, ALPHAS)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)
    finetuned = step_logits(model, pretrained, out.sequences, mask, [1.0] * 4)
    assert (reference - finetuned).abs().max() > 1e-3
    options = dict(alpha=ALPHAS, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    cached = tuco_peft.generate(model, ids, mask, **options)
    uncached = tuco_peft.generate(model, ids, mask, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.tuco, uncached.tuco, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1"])
def test_beam_search_reorders_the_pretrained_states(model_type):
    """Each returned beam's score is the reference's log-probability of its tokens: the pre-trained slots'
    recurrent states follow the beams as the fine-tuned ones do."""
    pretrained, model = hybrid_pair(model_type)
    ids, mask = prompts("one prompt")
    with torch.no_grad(), tuco_peft.ftc_scale(model, ALPHAS):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                             num_beams=3, num_return_sequences=3, length_penalty=0.0, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        log_probs = steered_logits(model, pretrained, out.sequences, torch.ones_like(out.sequences), ALPHAS)
    chosen = log_probs.log_softmax(-1)[:, ids.shape[1] - 1 : -1].gather(-1, out.sequences[:, ids.shape[1]:, None])
    torch.testing.assert_close(out.sequences_scores, chosen[..., 0].sum(-1), atol=1e-4, rtol=1e-5)


def test_static_cache():
    pretrained, model = hybrid_pair("nemotron_h")
    ids, mask = prompts("padded")
    skip_where_transformers_cannot(model, ids, mask, cache_implementation="static")
    with tuco_peft.ftc_scale(model, ALPHAS):
        out = greedy_generate(model, ids, mask, N_NEW, cache_implementation="static", output_logits=True,
                              return_dict_in_generate=True)
    reference = step_logits(model, pretrained, out.sequences, mask, ALPHAS)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)


class _RollbackCache(DynamicCache):
    """A DynamicCache that records its rollbacks."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rollbacks: list[int] = []

    def crop(self, tokens_to_remove: int) -> None:
        self.rollbacks.append(tokens_to_remove)
        super().crop(tokens_to_remove)


@pytest.mark.parametrize("model_type", ["lfm2", "falcon_h1"])
def test_assisted_generation_rolls_back_both_slots(model_type):
    """Prompt lookup proposes tokens and crops the cache where it rejects them: the pre-trained slots roll back
    with the fine-tuned ones (the recurrent layer of a block that is not steered has an empty placeholder, with
    nothing to roll back), and each token is a largest logit of the reference. (Families whose rollback
    transformers 5.25 itself gets wrong, by 1e-3 and more without steering, are left out: Qwen3-Next, Qwen3.5,
    Jamba.)"""
    pretrained, model = hybrid_pair(model_type)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeats, so that prompt lookup finds candidates
    mask = torch.ones_like(ids)
    skip_where_transformers_cannot(model, ids, mask, prompt_lookup_num_tokens=3)
    cache = _RollbackCache(config=model.config)
    with tuco_peft.ftc_scale(model, ALPHAS):
        out = greedy_generate(model, ids, mask, N_NEW, prompt_lookup_num_tokens=3, past_key_values=cache)
    assert any(removed < 0 for removed in cache.rollbacks)
    assert (type(cache.layers[4 + 2]).__name__ == "DummyLayer") == _COUNTED  # block 2 (α = 1) holds recurrent states
    assert_greedy_choices(model, out, step_logits(model, pretrained, out, mask, ALPHAS), ids.shape[1])


def test_a_cache_reused_by_another_generation_fits_its_steered_blocks():
    """A cache emptied by ``reset`` serves a generation that steers other blocks: the pre-trained slots beside
    recurrent layers are fitted anew, a copy where a block is steered, a placeholder where it is not (from
    transformers 5.25 on; before, every block is steered)."""
    pretrained, model = hybrid_pair("lfm2")
    ids, mask = prompts("one prompt")
    cache = DynamicCache(config=model.config)
    unsteered = []
    for _ in range(2):
        cache.reset()
        out = greedy_generate(model, ids, mask, N_NEW, past_key_values=cache, output_logits=True,
                              return_dict_in_generate=True)
        unsteered.append(torch.stack(out.logits, dim=1))
    if not torch.equal(*unsteered):
        pytest.skip(f"transformers {transformers.__version__} reuses a reset cache wrongly without steering")
    for alphas in (ALPHAS, [1.5] * 4, ALPHAS):  # block 2 (recurrent) unsteered, steered, unsteered
        cache.reset()
        with tuco_peft.ftc_scale(model, alphas):
            out = greedy_generate(model, ids, mask, N_NEW, past_key_values=cache, output_logits=True,
                                  return_dict_in_generate=True)
        reference = step_logits(model, pretrained, out.sequences, mask, alphas)
        torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)
        assert (type(cache.layers[4 + 2]).__name__ == "DummyLayer") == (alphas[2] == 1.0 and _COUNTED)


@pytest.mark.skipif(not _COUNTED, reason="before transformers 5.25 every block is steered: no slot is a placeholder")
def test_a_filled_cache_whose_slots_were_fitted_for_other_blocks_is_refused():
    _, model = hybrid_pair("lfm2")
    ids, mask = prompts("one prompt")
    cache = DynamicCache(config=model.config)
    with tuco_peft.ftc_scale(model, ALPHAS):  # block 2 (recurrent) not steered: a placeholder in its slot
        greedy_generate(model, ids, mask, N_NEW, past_key_values=cache)
    with pytest.raises(InputError, match="tokens processed outside ftc_scale"), tuco_peft.ftc_scale(model, 1.5):
        greedy_generate(model, ids, mask, N_NEW, past_key_values=cache)


