"""The family registry (tuco_peft.families): every registered family gets the capabilities its spec claims."""

import importlib
import sys

import pytest
import torch
from helpers.models import FAMILIES, base_model, family_config, lora_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.cache_utils import DynamicSlidingWindowLayer

from tuco_peft.core.paired import PairedBlock
from tuco_peft.core.pretrained_path import OwnProjectionBlock, ReplayBlock, SharedProjectionBlock, pretrained_path
from tuco_peft.families import (
    FamilySpec,
    QKNorm,
    QKVLayout,
    Wiring,
    attention_heads,
    registered_families,
    spec_for,
)
from tuco_peft.model.attention import RotaryTables
from tuco_peft.model.parts import model_parts
from tuco_peft.steering.forward import ftc_scale
from tuco_peft.steering.lean_cache import LowRankDelta, LowRankSlot, PastRotary, PreNormKeySlot


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_takes_the_path_its_spec_allows(family):
    _pretrained, model = model_pair(family)
    parts = model_parts(model)
    layer, config = parts.layers[0], parts.config
    spec = spec_for(layer, config)
    assert spec is not None
    expected = SharedProjectionBlock if spec.shared_projections else ReplayBlock
    assert type(pretrained_path(layer, config)) is expected
    assert isinstance(pretrained_path(layer, config, separate_model=True), OwnProjectionBlock)
    assert (LowRankDelta.for_block(layer, parts.decoder, config, PastRotary()) is not None) == spec.lean_cache
    assert PairedBlock.supports(layer, config) == spec.pairable


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_cache_slots_follow_the_spec(family):
    """Steered generation makes every fine-tuned slot (full-attention or sliding-window) a lean twin of its
    pre-trained slot where the family's spec allows it, and none elsewhere; the pre-trained slot of a k-norm
    block then stores pre-norm keys."""
    _, model = model_pair(family)
    spec = spec_for(model_parts(model).layers[0], model.config)
    ids, mask = padded_batch(lengths=(5, 3))
    with torch.no_grad(), ftc_scale(model, 1.5):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    finetuned, pretrained = out.past_key_values.layers[:3], out.past_key_values.layers[3:]
    for lean, twin in zip(finetuned, pretrained):
        assert isinstance(lean, LowRankSlot) == spec.lean_cache
        assert isinstance(twin, PreNormKeySlot) == (spec.lean_cache and spec.qk_norm is not QKNorm.NONE)
        # the same kind: a sliding window stays one
        assert isinstance(lean, DynamicSlidingWindowLayer) == isinstance(twin, DynamicSlidingWindowLayer)


@pytest.mark.parametrize("family", FAMILIES)
def test_key_value_rows_are_what_the_block_splits_off(family):
    """The lean cache's rows of B (keys, values) and the one-pass path's split of q/k/v follow one layout."""
    _, model = model_pair(family)
    parts = model_parts(model)
    layer, config = parts.layers[0], parts.config
    spec = spec_for(layer, config)
    attention = getattr(layer, spec.attention)
    outputs = {name: torch.randn(5, getattr(attention, name).out_features) for name in spec.projections}
    _, key, value = pretrained_path(layer, config)._split(list(outputs.values()))
    n_heads, n_kv_heads = attention_heads(config)
    rows = spec.key_value_rows(n_heads, n_kv_heads, getattr(attention, spec.head_dim))
    for expected, name, part in zip((key, value), spec.key_value_projections, rows):
        assert torch.equal(part.of(outputs[name].T).T, expected)


def test_a_spec_is_checked_against_the_layer_class():
    llama_config = family_config("llama")
    gpt2_block = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=1, n_head=4)).transformer.h[0]
    assert spec_for(gpt2_block, llama_config) is None  # a llama model_type with another block class
    assert isinstance(pretrained_path(gpt2_block, llama_config), ReplayBlock)
    llama_config.model_type = "not-a-family"
    llama_block = decoder_blocks(base_model("llama"))[0]
    assert spec_for(llama_block, llama_config) is None


def test_a_config_flag_can_switch_the_wiring():
    config = family_config("gpt_neox")
    layer = decoder_blocks(lora_model(base_model("gpt_neox")))[0]
    assert spec_for(layer, config).wiring is Wiring.PARALLEL
    config.use_parallel_residual = False
    assert spec_for(layer, config).wiring is Wiring.SEQUENTIAL


def test_the_registry_records_each_family_as_registered():
    """``registered_families`` is what the reference pages are generated from: each family's block class, its
    module, and its spec per config, the spec ``spec_for`` gives a block of that class."""
    families = registered_families()
    assert [family.model_type for family in families] == list(FAMILIES)
    for family in families:
        config = family_config(family.model_type)
        block = decoder_blocks(base_model(family.model_type))[0]
        assert type(block).__name__ == family.layer_class
        assert family.module.startswith("tuco_peft.families.") and family.module in sys.modules
        assert family.spec_of(config) == spec_for(block, config)
    per_config = {family.model_type for family in families if family.per_config}
    assert "gpt_neox" in per_config and "llama" not in per_config  # gpt_neox's wiring follows a config flag


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(wiring=Wiring.POST_NORM, attention_norm="ln"),  # post-norm blocks have no norm before attention
        dict(wiring=Wiring.SEQUENTIAL, attention_norm="ln", mlp_norm="ln2", qkv_layout=QKVLayout.CONCATENATED),
        dict(  # the pre-norm keys of a lean cache are a separate k_proj's output
            wiring=Wiring.SEQUENTIAL, attention_norm="ln", mlp_norm="ln2", projections=("qkv",),
            qkv_layout=QKVLayout.CONCATENATED, qk_norm=QKNorm.PER_HEAD, lean_cache=True,
        ),
    ],
    ids=["norms-vs-wiring", "projections-vs-layout", "lean-cache-with-k-norm-on-fused-projection"],
)
def test_inconsistent_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        FamilySpec(**{"attention": "attn", "projections": ("q", "k", "v"), "output": "o", **kwargs})


def test_a_lean_cache_with_a_k_norm_on_a_separate_key_projection_is_allowed():
    spec = FamilySpec(
        attention="attn", projections=("q", "k", "v"), output="o", wiring=Wiring.SEQUENTIAL, attention_norm="ln",
        mlp_norm="ln2", qk_norm=QKNorm.FULL_WIDTH, lean_cache=True,
    )
    assert spec.lean_cache


@pytest.mark.parametrize(
    ("module", "rot_dim", "whole_head", "interleaved"),
    [
        ("llama", 16, None, False),
        ("phi3", 8, None, False),  # partial: the dims past the table pass through
        ("gpt_oss", 16, 16, False),  # tables of half the head's width, each frequency once
        ("glm", 8, None, True),  # partial and interleaved
        ("glm4", 16, None, True),
    ],
)
def test_rotary_tables_turn_states_bit_for_bit_as_the_models_own_embedding(module, rot_dim, whole_head, interleaved):
    apply_rotary = importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb
    generator = torch.Generator().manual_seed(0)
    frequencies = 7 * torch.rand(2, 5, rot_dim // 2, generator=generator)
    angles = frequencies if whole_head else torch.cat((frequencies, frequencies), dim=-1)
    query, key = torch.randn(2, 2, 3, 5, 16, generator=generator)
    expected, _ = apply_rotary(query, key, angles.cos(), angles.sin())
    tables = RotaryTables.of(angles.cos(), angles.sin(), whole_head, interleaved)
    assert torch.equal(tables.apply(query), expected)
