"""Decoders whose blocks reuse the keys/values of earlier blocks (Gemma 4): decompose, gradients and
FTC_α steering, cached and not, against the two-model references.

The pre-trained block of a reusing layer attends to the keys/values of the *pre-trained* storing block, computed
from the same fine-tuned state; the references give the pre-trained blocks a store of their own. Releases that kept
the shared keys/values on the cache (transformers 5.5) are refused, and so are Gemma 3n, whose blocks carry several
residual streams, and Kolibri 1.1, whose blocks carry a pool of keys.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.assertions import assert_decomposition_matches_the_oracle
from helpers.gradients import tuco_gradients
from helpers.models import VOCAB, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import greedy_generate, model_snapshot
from helpers.steering_reference import step_logits
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import tuco_peft
from tuco_peft.errors import UnsupportedModelError
from tuco_peft.model.shared_keys_values import passes_store

_SHAPE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
    max_position_embeddings=64, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)
_GEMMA_LAYERS = dict(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
SHARING = {
    # blocks 2 and 3 store their keys/values, blocks 4 and 5 reuse them; per-layer inputs beside the stream
    "gemma4_text": dict(
        **_GEMMA_LAYERS, intermediate_size=96, num_kv_shared_layers=2, global_head_dim=16,
        hidden_size_per_layer_input=8,
    ),
}
_KOLIBRI = dict(  # indexed-attention block 9 reuses the keys/values of block 4, in the key pool block 4 selected
    num_hidden_layers=10, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, mlp_only_intermediate_size=96, index_topk=4, index_pool_size=8,
    index_compression=4, index_num_heads=2, index_num_local_tokens=2, index_num_sink_tokens=1,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_NEW = 5


def base_of(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **_SHAPE, **SHARING[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


def lora_on(model: nn.Module):
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).eval()


def adapted_pair(model_type: str):
    """(pre-trained model, PeftModel with random LoRA on attention, keys/values of the storing blocks included)."""
    base = base_of(model_type)
    return copy.deepcopy(base), lora_on(base)


def alphas(model_type: str) -> list[float]:
    """A steered reusing block (the last) after a storing block that is not steered (α = 1)."""
    values = [1.0] * base_of(model_type).config.num_hidden_layers
    values[0], values[-1] = 1.6, 0.3
    return values


needs_a_store_argument = pytest.mark.skipif(
    not passes_store(decoder_blocks(base_of("gemma4_text"))[0]),
    reason="this transformers keeps shared keys/values on the cache, which is refused (test below)",
)


@needs_a_store_argument
@pytest.mark.parametrize("model_type", SHARING)
def test_decompose_matches_the_oracle(model_type):
    pretrained, model = adapted_pair(model_type)
    ids, mask = padded_batch()
    ptc = assert_decomposition_matches_the_oracle(model, pretrained, ids, mask)
    # what a pre-trained block reading the fine-tuned keys/values would give: the oracle's choice shows
    with torch.no_grad():
        naive, _, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask, pt_reads_ft_keys_values=True)
    assert ((naive - ptc) * mask.bool()[:, None, :, None]).abs().max() > 1e-3


@needs_a_store_argument
def test_gradients_match_the_oracle():
    pretrained, model = adapted_pair("gemma4_text")
    ids, mask = padded_batch()
    ours, oracle = tuco_gradients(model, pretrained, ids, mask)
    assert ours.keys() == oracle.keys() and ours
    for name, gradient in ours.items():
        torch.testing.assert_close(gradient, oracle[name], atol=1e-5 * oracle[name].abs().max(), rtol=1e-4)


@needs_a_store_argument
def test_a_full_finetune_against_its_base_model():
    pretrained = base_of("gemma4_text")
    finetuned = copy.deepcopy(pretrained)
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, mask)
        tuco = tuco_peft.tuco(finetuned, ids, mask, base_model=pretrained)
    torch.testing.assert_close(tuco, tuco_at_last(ptc, ftc, mask), atol=1e-5, rtol=1e-5)


@needs_a_store_argument
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("kind", ["one prompt", "padded"])
@pytest.mark.parametrize("model_type", SHARING)
def test_steered_generation_matches_the_reference(model_type, kind, use_cache):
    """Every step's logits are the reference's (which re-runs the whole prefix through both models), and differ
    from the fine-tuned model's; the model is left as it was."""
    pretrained, model = adapted_pair(model_type)
    if kind == "padded":
        ids, mask = padded_batch(lengths=(7, 4, 9))
    else:
        ids = torch.randint(2, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
    steering, before = alphas(model_type), model_snapshot(model)
    with torch.no_grad(), tuco_peft.ftc_scale(model, steering):
        out = greedy_generate(model, ids, mask, N_NEW, output_logits=True, return_dict_in_generate=True,
                              use_cache=use_cache)
    assert model_snapshot(model) == before
    reference = step_logits(model, pretrained, out.sequences, mask, steering)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-5, rtol=1e-5)
    finetuned = step_logits(model, pretrained, out.sequences, mask, [1.0] * len(steering))
    assert (reference - finetuned).abs().max() > 1e-3


@needs_a_store_argument
def test_generate_gives_with_a_cache_what_it_gives_without():
    _, model = adapted_pair("gemma4_text")
    ids, mask = padded_batch(lengths=(7, 4, 9))
    options = dict(alpha=0.4, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    cached = tuco_peft.generate(model, ids, mask, **options)
    uncached = tuco_peft.generate(model, ids, mask, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.tuco, uncached.tuco, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    passes_store(decoder_blocks(base_of("gemma4_text"))[0]), reason="this transformers hands blocks their store"
)
def test_a_release_that_keeps_shared_keys_values_on_the_cache_is_refused():
    _, model = adapted_pair("gemma4_text")
    with pytest.raises(UnsupportedModelError, match="not handed them as an argument.*Upgrade transformers"):
        tuco_peft.tuco(model, *padded_batch())


@pytest.mark.skipif("kolibri1_1" not in CONFIG_MAPPING_NAMES, reason="this transformers has no Kolibri 1.1")
def test_blocks_that_carry_a_key_pool_are_refused():
    """Kolibri 1.1's indexer blocks select a pool of keys from the fine-tuned queries and keys, which later blocks
    attend within: the pre-trained blocks would need a pool of their own. Refused, and the model left as found."""
    config = AutoConfig.for_model("kolibri1_1", **_SHAPE, **_KOLIBRI)
    model = lora_on(AutoModelForCausalLM.from_config(config))
    before = model_snapshot(model)
    with pytest.raises(UnsupportedModelError, match="pool of keys their indexer selected"):
        tuco_peft.tuco(model, *padded_batch())
    with pytest.raises(UnsupportedModelError, match="index_pool, Kolibri 1.1"), tuco_peft.ftc_scale(model, 0.5):
        pass
    assert model_snapshot(model) == before


def test_several_residual_streams_are_refused():
    config = AutoConfig.for_model(
        "gemma3n_text", **{**_SHAPE, **_GEMMA_LAYERS}, num_kv_shared_layers=2, intermediate_size=[96] * 6, altup_num_inputs=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, laurel_rank=4,
        activation_sparsity_pattern=[0.0] * 6,
    )
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedModelError, match="2 residual streams .*AltUp"):
        tuco_peft.tuco(model, *padded_batch())
