"""What a call learns about a model is kept for the next call (``model.parts.model_parts``), and never used
once the model has changed: after each change below, decompose still equals the two-model oracle, or
refuses, exactly as on a model it never saw."""

import copy
import gc
import importlib
import weakref

import pytest
import torch
from helpers.models import base_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from peft import LoraConfig

import tuco_peft
from tuco_peft.errors import UnsupportedModelError
from tuco_peft.model.parts import model_parts


def _oracle_tuco(pretrained, model, ids, mask):
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    return tuco_at_last(ptc, ftc, mask)


def _tuco(model, ids, mask):
    with torch.no_grad():
        return tuco_peft.tuco(model, ids, mask)


@pytest.fixture
def pair():
    return model_pair("llama")


def test_an_unchanged_model_is_surveyed_once(pair):
    _, model = pair
    first, second = model_parts(model), model_parts(model)
    assert first.modules is second.modules
    assert first.layers is second.layers


def test_a_new_adapter_and_set_adapter_are_seen(pair):
    pretrained, model = pair
    ids, mask = padded_batch()
    before = _tuco(model, ids, mask)
    torch.manual_seed(9)
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    model.set_adapter("other")
    after = _tuco(model, ids, mask)
    torch.testing.assert_close(after, _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)
    model.set_adapter("default")
    torch.testing.assert_close(_tuco(model, ids, mask), before, rtol=0, atol=1e-6)


def test_a_swapped_block_is_seen(pair):
    pretrained, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    layers = decoder_blocks(model)
    replacement = copy.deepcopy(layers[1])
    with torch.no_grad():
        for name, param in replacement.named_parameters():
            if "lora_B" in name:
                param.mul_(3)
    layers[1] = replacement
    torch.testing.assert_close(_tuco(model, ids, mask), _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)


def test_a_module_replaced_behind_setattr_is_seen(pair):
    """bitsandbytes' and other converters write ``_modules`` directly, which no registration hook sees."""
    pretrained, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    for layer in decoder_blocks(model):
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer.mlp._modules[name] = layer.mlp._modules[name].get_base_layer()  # the MLP's adapters, gone
    parts = model_parts(model)
    assert len(parts.modules.lora_layers) == 4 * len(parts.layers)  # q, k, v and o of each block
    torch.testing.assert_close(_tuco(model, ids, mask), _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)


def test_merge_and_unload_is_refused_not_read_from_a_stale_survey(pair):
    _, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    merged = model.merge_and_unload()
    with pytest.raises(UnsupportedModelError, match="no LoRA adapters"):
        tuco_peft.tuco(merged, ids, mask)


def test_dropout_switched_on_after_a_call_is_refused(pair):
    _, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    for layer in decoder_blocks(model):
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(UnsupportedModelError, match="dropout p=0.1"):
        tuco_peft.tuco(model, ids, mask)


def test_gradient_checkpointing_switched_on_after_a_call_is_paused():
    """A checkpointed block re-runs without our hooks in backward; enabled after the first call, it must still be
    paused, or the pre-trained path would drop out of the gradient."""
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parts = model_parts(model)
    assert all(layer.gradient_checkpointing is True for layer in parts.layers)
    seen = []
    for layer in parts.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(module.gradient_checkpointing))
    tuco_peft.tuco(model, ids, mask).sum().backward()
    assert seen == [False] * len(parts.layers)
    assert all(layer.gradient_checkpointing is True for layer in parts.layers)


def test_another_attention_implementation_is_seen(pair):
    pretrained, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    model.set_attn_implementation("sdpa")
    pretrained.set_attn_implementation("sdpa")
    assert model_parts(model).config._attn_implementation == "sdpa"
    torch.testing.assert_close(_tuco(model, ids, mask), _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)


def test_a_config_value_set_after_a_call_is_seen():
    """Mistral's attention reads its sliding window from the config at every forward; a pre-trained path kept
    from the call before must read the new one too."""
    _, model = model_pair("mistral")
    ids, mask = padded_batch()
    before = _tuco(model, ids, mask)
    model.get_base_model().config.sliding_window = 2
    with torch.no_grad():
        kept = tuco_peft.decompose(model, ids, mask, keep="sums").tuco
        replayed = tuco_peft.decompose(model, ids, mask, keep="sums", replay=True).tuco
    assert not torch.allclose(kept, before, atol=1e-3)
    torch.testing.assert_close(kept, replayed, rtol=0, atol=1e-5)


@pytest.fixture
def shared_reads(monkeypatch):
    """Every block on the path that replaces forwards inside it (``SharedReadBlock``), whatever the width."""
    decompose_module = importlib.import_module("tuco_peft.core.decompose")
    monkeypatch.setattr(decompose_module, "SHARED_READS_MIN_WIDTH", 0)


@pytest.mark.usefixtures("shared_reads")
def test_a_forward_replaced_on_an_instance_after_a_call_is_seen(pair):
    """Accelerate's device hooks replace forwards on instances; a block's pre-trained path chosen before (and kept
    between calls) would step on them."""
    pretrained, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    mlp = decoder_blocks(model)[1].mlp
    calls = []

    def device_hook_forward(*args, **kwargs):
        calls.append(1)
        return type(mlp).forward(mlp, *args, **kwargs)

    mlp.forward = device_hook_forward
    torch.testing.assert_close(_tuco(model, ids, mask), _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)
    assert calls and mlp.forward is device_hook_forward


@pytest.mark.usefixtures("shared_reads")
def test_a_call_that_failed_inside_a_block_leaves_nothing_for_the_next(pair):
    pretrained, model = pair
    ids, mask = padded_batch()
    _tuco(model, ids, mask)
    mlp = decoder_blocks(model)[2].mlp

    def fail(module, args, output):
        raise RuntimeError("a user's hook failed")

    handle = mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="a user's hook failed"):
        _tuco(model, ids, mask)
    handle.remove()
    torch.testing.assert_close(_tuco(model, ids, mask), _oracle_tuco(pretrained, model, ids, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrapped", [True, False], ids=["peft model", "causal lm"])
def test_the_survey_does_not_keep_a_model_alive(wrapped):
    pretrained, model = model_pair("llama")
    if not wrapped:
        model = base_model("llama")
        tuco_peft.tuco(model, *padded_batch(), base_model=pretrained)
    else:
        _tuco(model, *padded_batch())
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
