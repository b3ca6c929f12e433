"""Bad input gets a clear error; the model is left exactly as it was found, also after an exception."""

import copy
import importlib

import pytest
import torch
from helpers.gradients import tuco_gradients
from helpers.models import base_model, lora_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import model_snapshot
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import BertConfig, BertForMaskedLM

import tuco_peft


def snapshot(model):
    """Everything about a model that an analysis call could disturb."""
    modules = dict(model.named_modules())
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in modules.items()},
        "hooks": {
            n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
            for n, m in modules.items()
        },
        "instance_attrs": {
            n: {k: v for k, v in vars(m).items() if not k.startswith("_") or k == "_disable_adapters"}
            for n, m in modules.items()
        },
        "active_adapters": list(model.active_adapters),
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def assert_same_state(before, after):
    for key in ("requires_grad", "training", "hooks", "active_adapters"):
        assert before[key] == after[key], key
    for name, attrs in before["instance_attrs"].items():
        assert attrs.keys() == after["instance_attrs"][name].keys(), name
        for attr, value in attrs.items():
            if not isinstance(value, torch.Tensor):
                assert after["instance_attrs"][name][attr] == value, (name, attr)
    for name, value in before["parameters"].items():
        assert torch.equal(value, after["parameters"][name]), name


def _mixed_training_model():
    model = lora_model(base_model("llama"))
    model.train()
    first_lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
    first_lora.requires_grad_(False)  # a user's own choice, which must survive
    model.get_base_model().model.layers[1].eval()
    return model


def test_state_is_unchanged_after_calls():
    model = _mixed_training_model()
    ids, mask = padded_batch()
    before = snapshot(model)
    tuco_peft.tuco(model, ids, mask).sum().backward()
    with torch.no_grad():
        tuco_peft.decompose(model, ids, mask, positions="all")
        tuco_peft.decompose(model, ids, mask, replay=True)
    assert_same_state(before, snapshot(model))


def test_state_is_unchanged_after_an_exception_inside_the_forward():
    model = _mixed_training_model()
    ids, mask = padded_batch()

    def explode(module, args, output):
        raise RuntimeError("boom")

    handle = model.get_base_model().model.layers[2].mlp.register_forward_hook(explode)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        tuco_peft.decompose(model, ids, mask)
    assert_same_state(before, snapshot(model))
    handle.remove()


def test_state_is_unchanged_after_an_exception_inside_the_pretrained_path(monkeypatch):
    """The pre-trained rows run with adapters off and each LoRA linear's forward short-cut to its base layer's
    call: an error raised there leaves neither behind."""
    monkeypatch.setattr(importlib.import_module("tuco_peft.core.decompose"), "PAIRED_MAX_TOKENS", 0)  # rows after
    model = lora_model(base_model("llama")).eval()
    ids, mask = padded_batch()
    down = model.get_base_model().model.layers[1].mlp.down_proj
    before = snapshot(model)
    seen = []

    def explode_on_the_pretrained_call(module, args, output):
        seen.append("forward" in vars(down))  # the fine-tuned forward first, then the pre-trained rows
        if len(seen) == 2:
            raise RuntimeError("boom")

    handle = down.base_layer.register_forward_hook(explode_on_the_pretrained_call)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        tuco_peft.decompose(model, ids, mask)
    handle.remove()
    assert seen == [False, True]
    assert_same_state(before, snapshot(model))


def test_gradient_checkpointing_is_paused_and_restored():
    pretrained, model = model_pair("llama")
    model.get_base_model().gradient_checkpointing_enable()
    model.train()
    ids, mask = padded_batch()
    before = snapshot(model)
    tuco_peft.tuco(model, ids, mask).sum().backward()
    assert_same_state(before, snapshot(model))
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    tuco_at_last(ptc, ftc, mask).sum().backward()
    assert ours.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


def test_gradients_reach_every_lora_weight_and_match_the_oracle():
    pretrained, model = model_pair("gemma2")
    ours, expected = tuco_gradients(model, pretrained, *padded_batch())
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert set(lora) <= ours.keys() and all(ours[n].abs().sum() > 0 for n in lora)
    for name in lora:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-6, rtol=1e-4)


def test_lora_dropout_in_training_mode_is_exact_for_the_drawn_mask():
    pretrained, model = model_pair("llama", lora_dropout=0.3)
    model.train()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.manual_seed(11)
        ours = tuco_peft.decompose(model, ids, mask, positions="all")
        torch.manual_seed(11)
        _ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        torch.manual_seed(12)
        other_mask = tuco_peft.decompose(model, ids, mask, positions="all")
    real = mask.bool()[:, None, :, None]
    torch.testing.assert_close(ours.ftc, ftc * real, atol=1e-5, rtol=1e-4)
    assert (other_mask.ftc - ours.ftc).abs().max() > 1e-3  # the dropout really was on


def test_base_model_dropout_in_training_mode_is_refused():
    model = lora_model(base_model("gpt2"))  # GPT-2 has attention and residual dropout 0.1
    model.train()
    ids, mask = padded_batch()
    with pytest.raises(tuco_peft.UnsupportedModelError, match=r"dropout.*model\.eval\(\)"):
        tuco_peft.tuco(model, ids, mask)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda base: get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
            "prompt learning",
        ),
        (lambda base: base, "no LoRA adapters"),
        (lambda base: torch.nn.Linear(2, 2), "PeftModel"),
    ],
    ids=["prompt-tuning", "no-adapter", "not-a-model"],
)
def test_unsupported_models_are_refused(make, message):
    model = make(base_model("llama"))
    ids, mask = padded_batch()
    with pytest.raises(tuco_peft.UnsupportedModelError, match=message):
        tuco_peft.tuco(model, ids, mask)


@pytest.mark.parametrize("keep", ["all", "sums"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_a_residual_stream_that_changes_between_blocks_is_refused(keep, positions):
    """x_L = x_0 + ΣPTC + ΣFTC only if each block's input is the previous block's output, bit for bit: a change
    between blocks, however small (here a user's pre-hook that scales block 2's input by 1 + 2⁻²⁰), is named
    whatever is kept."""
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch()
    decoder_blocks(model)[2].register_forward_pre_hook(lambda module, args: (args[0] * (1 + 2**-20), *args[1:]))
    with pytest.raises(tuco_peft.UnsupportedModelError, match="changes between blocks 1 and 2"):
        tuco_peft.decompose(model, ids, mask, positions=positions, keep=keep)


def test_merged_adapters_are_refused_and_left_merged():
    model = lora_model(base_model("llama"))
    model.merge_adapter()
    weights = copy.deepcopy(model.state_dict())
    ids, mask = padded_batch()
    with pytest.raises(tuco_peft.UnsupportedModelError, match="unmerge_adapter"):
        tuco_peft.tuco(model, ids, mask)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_a_model_that_is_not_a_causal_decoder_is_refused():
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    bert = BertForMaskedLM(config)
    model = get_peft_model(bert, LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    with pytest.raises(tuco_peft.UnsupportedModelError, match="not a decoder-only causal LM"):
        tuco_peft.tuco(model, torch.ones(1, 4, dtype=torch.long))


def test_a_model_whose_blocks_share_keys_values_without_handing_them_over_is_refused_and_left_as_found():
    """A config that marks its last block ``"reuse"``, as Kolibri's do, on blocks that take no store of shared
    keys/values (as transformers 5.5 kept Gemma 4's on the cache): the pre-trained blocks could not be given their
    own, so decompose and steering refuse it rather than give wrong numbers (before the refusal, decompose and the
    two-model oracle disagreed by up to 4.3 in a block's PTC on such a Gemma 4)."""
    llama = base_model("llama")
    llama.config.kv_sharing_modes = [None, "store", "reuse"]
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(llama, lora).eval()
    ids = torch.ones(1, 4, dtype=torch.long)
    before = model_snapshot(model)
    with pytest.raises(tuco_peft.UnsupportedModelError, match="reuse the keys/values of earlier blocks, but"):
        tuco_peft.decompose(model, ids)
    with pytest.raises(tuco_peft.UnsupportedModelError, match="Upgrade transformers"), tuco_peft.ftc_scale(model, 1.5):
        pass
    assert model_snapshot(model) == before


@pytest.mark.parametrize(
    "ids, mask, positions, message",
    [
        (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), "last", "attention_mask has shape"),
        (torch.ones(2, 5, dtype=torch.long), torch.tensor([[1] * 5, [0] * 5]), "last", r"rows \[1\].*all padding"),
        (torch.ones(0, 5, dtype=torch.long), None, "last", "empty"),
        (torch.ones(2, 0, dtype=torch.long), None, "last", "empty"),
        (torch.ones(5, dtype=torch.long), None, "last", "unsqueeze"),
        (torch.ones(2, 5), None, "last", "integer token ids"),
        (torch.ones(2, 5, dtype=torch.long), torch.full((2, 5), 0.5), "last", "0 .padding. and 1"),
        (torch.ones(2, 5, dtype=torch.long), None, "first", "positions must be"),
        (torch.ones(2, 5, dtype=torch.long), None, [7], r"\[-5, 5\)"),
        (torch.ones(2, 5, dtype=torch.long), torch.tensor([[1] * 5, [0, 1, 1, 1, 1]]), [0], "padding"),
    ],
    ids=["shape-mismatch", "all-padding-row", "empty-batch", "empty-sequence", "1d", "float-ids", "float-mask",
         "bad-positions", "position-out-of-range", "position-on-padding"],
)
def test_malformed_inputs_are_refused(ids, mask, positions, message):
    model = lora_model(base_model("llama"))
    with pytest.raises(tuco_peft.InputError, match=message):
        tuco_peft.decompose(model, ids, mask, positions=positions)


@pytest.mark.parametrize("keep", ["all", "sums"])
def test_a_block_the_forward_skips_is_refused(keep):
    """A decoder that runs fewer blocks than it holds (here a config cut after loading): the residual stream
    does not run through every block, which is said, whatever the path (a small paired call holds every block's
    states to the end, a larger one takes each as it comes)."""
    for length in (12, 200):  # paired and held; rows after each block
        _, model = model_pair("llama")
        model.get_base_model().config.num_hidden_layers = 2
        ids, mask = padded_batch(lengths=(length,))
        with torch.no_grad(), pytest.raises(tuco_peft.UnsupportedModelError, match="a block was skipped"):
            tuco_peft.decompose(model, ids, mask, keep=keep)


@pytest.mark.parametrize("length", [12, 200], ids=["small batch", "large batch"])
def test_a_hook_that_returns_another_block_output_counts_in_that_blocks_ftc(length):
    """A forward hook on a block that returns a new output changes the residual stream inside that block: its
    change is part of the block's update, so x0 + ΣPTC + ΣFTC is still xL, on a small batch as on a large one."""
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(length,))
    block = decoder_blocks(model)[1]
    handle = block.register_forward_hook(lambda module, args, output: output + 0.5)
    try:
        with torch.no_grad():
            result = tuco_peft.decompose(model, ids, mask)
            plain = tuco_peft.decompose(model, ids, mask, replay=True)
    finally:
        handle.remove()
    torch.testing.assert_close(result.x0 + result.ptc.sum(1) + result.ftc.sum(1), result.xL, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.ftc, plain.ftc, atol=1e-5, rtol=1e-5)
