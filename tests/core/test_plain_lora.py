"""The torch backend computes a plain LoRA linear without PEFT's forward (``lora.backend._PlainLora``): the same
operations in the same order, so the outputs equal PEFT's; every layer it cannot read so exactly (hooked factors,
dropout at work, variants, casts, merged or disabled adapters, other base layers) keeps PEFT's forward.

The oracle is PEFT's own forward of the layer, ``layer(x)``, and its base layer's, ``layer.base_layer(x)``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers.lora_layers import dense_linear, lora_layer
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from tuco_peft.lora.backend import make_backend

BACKEND = make_backend("torch")


def _outputs(layer: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(pre-trained, fine-tuned) outputs on ``x`` by each of the backend's ways, ``x`` on both streams."""
    stacked = BACKEND.stacked(torch.cat([x, x]), layer)
    return {
        "dual": BACKEND.dual(x, layer),
        "two_stream": BACKEND.two_stream(x, x, layer),
        "stacked": (stacked[: len(x)], stacked[len(x) :]),
    }


def _expected(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return layer.base_layer(x), layer(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", [(8,), (4, 2)], ids=["one adapter", "two adapters"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_a_plain_lora_linear_skips_peft_and_equals_it(dtype, ranks, lora_bias, peft_forward_calls):
    layer = lora_layer(dense_linear(dtype), ranks=ranks)
    if lora_bias:
        for b in layer.lora_B.values():
            b.bias = nn.Parameter(torch.randn(b.out_features, dtype=dtype))
    x = torch.randn(2, 5, layer.in_features, dtype=dtype)
    expected = _expected(layer, x)
    peft_forward_calls.clear()
    with torch.no_grad():
        outputs = _outputs(layer, x)
    assert not peft_forward_calls
    assert all(torch.equal(output, expected_output) for output, expected_output in zip(outputs["dual"], expected))
    for way in ("two_stream", "stacked"):  # one matmul over both streams' rows: equal up to its blocking
        for output, expected_output in zip(outputs[way], expected):
            torch.testing.assert_close(output, expected_output, atol=1e-6, rtol=1e-5)


def test_the_stacked_sum_in_place_gives_peft_gradients():
    """The fine-tuned half of a paired linear adds its adapters' terms into the base output in place."""
    layer = lora_layer(dense_linear(), ranks=(4, 2))
    x = torch.randn(3, layer.in_features)

    def gradients(run) -> list[torch.Tensor]:
        inputs = x.clone().requires_grad_()
        layer.zero_grad()
        pretrained, finetuned = run(inputs)
        (pretrained.square().sum() + finetuned.sin().sum()).backward()
        factors = [p.grad.clone() for name, p in layer.named_parameters() if "lora_" in name]
        return [inputs.grad.clone(), *factors]

    def stacked(inputs):
        both = BACKEND.stacked(torch.cat([inputs, inputs]), layer)
        return both[:3], both[3:]

    for ours, peft in zip(gradients(stacked), gradients(lambda inputs: (layer.base_layer(inputs), layer(inputs)))):
        torch.testing.assert_close(ours, peft, atol=1e-5, rtol=1e-5)


def _hook_lora_a(layer: nn.Module) -> None:
    layer.lora_A["default"].register_forward_hook(lambda module, args, output: None)


def _backward_hook_on_lora_b(layer: nn.Module) -> None:
    layer.lora_B["default"].register_full_backward_hook(lambda module, grad_input, grad_output: None)


def _dropout_in_training(layer: nn.Module) -> None:
    layer.lora_dropout["default"] = nn.Dropout(0.5).train()


def _disabled(layer: nn.Module) -> None:
    layer.enable_adapters(False)


def _fp32_factors_over_bf16(layer: nn.Module) -> None:
    layer.to(torch.bfloat16)
    layer.lora_A.float()
    layer.lora_B.float()


def _subclassed_base(layer: nn.Module) -> None:
    class Custom(nn.Linear):
        pass

    layer.base_layer.__class__ = Custom


@pytest.mark.parametrize(
    "change",
    [_hook_lora_a, _backward_hook_on_lora_b, _dropout_in_training, _disabled, _fp32_factors_over_bf16, _subclassed_base],
    ids=[
        "hooked lora_A",
        "backward hook on lora_B",
        "dropout in training",
        "adapters disabled",
        "fp32 factors over bf16",
        "subclassed base",
    ],
)
def test_layers_it_cannot_read_exactly_keep_peft_forward(change, peft_forward_calls):
    layer = lora_layer(dense_linear(), ranks=(4,))
    change(layer)
    x = torch.randn(4, layer.in_features, dtype=layer.base_layer.weight.dtype)
    torch.manual_seed(0)
    expected = _expected(layer, x)
    peft_forward_calls.clear()
    torch.manual_seed(0)  # the same dropout mask
    with torch.no_grad():
        pretrained, finetuned = BACKEND.dual(x, layer)
    assert peft_forward_calls == Counter({id(layer): 1})
    assert torch.equal(pretrained, expected[0]) and torch.equal(finetuned, expected[1])


def _dora_layer() -> nn.Module:
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=9, target_modules=["0"], use_dora=True, init_lora_weights=False)
    return get_peft_model(nn.Sequential(dense_linear()), config).base_model.model[0].eval()


@pytest.mark.parametrize(
    "make", [_dora_layer, lambda: lora_layer(Conv1D(40, 72), ranks=(4,))], ids=["DoRA", "Conv1D base"]
)
def test_variants_and_other_base_layers_keep_peft_forward(make, peft_forward_calls):
    layer = make()
    x = torch.randn(4, 72)
    expected = _expected(layer, x)
    peft_forward_calls.clear()
    with torch.no_grad():
        pretrained, finetuned = BACKEND.dual(x, layer)
    assert peft_forward_calls == Counter({id(layer): 1})
    assert torch.equal(pretrained, expected[0]) and torch.equal(finetuned, expected[1])


def test_a_global_module_hook_sees_every_call(peft_forward_calls):
    """Hooks registered for every module (module trackers, FLOP counters) see each linear PEFT's forward calls."""
    layer = lora_layer(dense_linear(), ranks=(4,))
    x = torch.randn(4, layer.in_features)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module))
    try:
        with torch.no_grad():
            BACKEND.dual(x, layer)
    finally:
        handle.remove()
    assert peft_forward_calls == Counter({id(layer): 1})
    assert layer.base_layer in seen and layer.lora_A["default"] in seen and layer.lora_B["default"] in seen
