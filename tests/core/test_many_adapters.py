"""decompose_adapters: one decomposition per adapter a model holds, each exactly the model with that adapter set
(PEFT's set_adapter on a copy, and the two-model oracle), the model left as it was found."""

import copy

import pytest
import torch
from helpers.models import base_model, lora_model, padded_batch
from helpers.oracle import decoder_blocks, two_pass
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

import tuco_peft
from tuco_peft.errors import InputError

ADAPTERS = ["default", "wide", "attention-only"]


def _add(model, name, seed, **config):
    torch.manual_seed(seed)
    model.add_adapter(name, LoraConfig(init_lora_weights=False, **config))


def several_adapters(base):
    """A LoRA model holding three adapters of different ranks and targets; "default" active."""
    model = lora_model(base)
    _add(model, "wide", seed=7, r=8, lora_alpha=32, target_modules="all-linear")
    _add(model, "attention-only", seed=8, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return model.eval()


def _with_adapter_set(model, name):
    """An independent reference: a copy of the model with ``name`` set by PEFT's own API."""
    reference = copy.deepcopy(model)
    reference.set_adapter(name)
    return reference


def _state(model):
    return {
        "active": list(model.active_adapters),
        "layers": {n: m.__dict__.get("_active_adapter") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize("keep", ["all", "sums"])
def test_each_adapter_is_the_model_with_that_adapter_set(keep):
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    before = _state(model)
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, positions="all", keep=keep)
    assert list(results) == ADAPTERS
    assert _state(model) == before
    tucos = []
    for name, result in results.items():
        reference = _with_adapter_set(model, name)
        with torch.no_grad():
            alone = tuco_peft.decompose(reference, ids, mask, positions="all", keep=keep)
            ptc, ftc, _, _ = two_pass(reference, decoder_blocks(reference), ids, mask, pt_context=reference.disable_adapter)
        torch.testing.assert_close(result.tuco, alone.tuco, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.layer_norms(), alone.layer_norms(), rtol=0, atol=1e-6)
        real = mask[:, None, :, None]
        oracle_norms = ((ptc * real).abs().sum(-1), (ftc * real).abs().sum(-1))
        torch.testing.assert_close(result.layer_norms(), oracle_norms, rtol=1e-4, atol=1e-5)
        tucos.append(result.tuco)
    assert not torch.allclose(tucos[0], tucos[1], atol=1e-3) and not torch.allclose(tucos[0], tucos[2], atol=1e-3)


def test_chosen_adapters_in_their_order():
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, adapters=["attention-only", "default"])
        alone = tuco_peft.decompose(_with_adapter_set(model, "attention-only"), ids, mask)
    assert list(results) == ["attention-only", "default"]
    torch.testing.assert_close(results["attention-only"].ptc, alone.ptc, rtol=0, atol=1e-6)


def test_gradients_reach_each_adapter_and_only_it():
    model = several_adapters(base_model("llama"))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    ids, mask = padded_batch()
    before = _state(model)
    results = tuco_peft.decompose_adapters(model, ids, mask, adapters=["wide"], keep="sums")
    results["wide"].tuco.sum().backward()
    touched = {n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"wide"}
    assert _state(model) == before


@pytest.mark.parametrize(
    "adapters, message",
    [
        (["default", "missing"], "no adapter named 'missing'; it holds 'default', 'wide', 'attention-only'"),
        (["wide", "wide"], "names 'wide' more than once"),
        ([], "adapters is empty"),
        ("wide", "a list of adapter names"),
    ],
    ids=["unknown", "repeated", "empty", "a string"],
)
def test_bad_adapter_lists_are_refused(adapters, message):
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    with pytest.raises(InputError, match=message):
        tuco_peft.decompose_adapters(model, ids, mask, adapters=adapters)


def test_the_model_is_left_as_found_after_an_error_inside_a_decomposition():
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    before = _state(model)
    with pytest.raises(InputError, match="positions must lie in"):
        tuco_peft.decompose_adapters(model, ids, mask, adapters=["wide"], positions=[99])
    assert _state(model) == before


def test_on_a_4bit_base_each_adapter_is_the_model_with_that_adapter_set():
    pytest.importorskip("bitsandbytes")
    from helpers.quantized_models import quantize_decoder_linears

    model = several_adapters(quantize_decoder_linears(base_model("llama", intermediate_size=128)))
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, keep="sums")
        for name in ADAPTERS:
            model.set_adapter(name)
            torch.testing.assert_close(results[name].tuco, tuco_peft.tuco(model, ids, mask), rtol=0, atol=1e-6)
