"""Backend selection, the per-layer torch fallback, and fused forwards on a whole tiny model."""

from __future__ import annotations

import pytest
import torch
from helpers.lora_layers import CustomForwardLinear, cpu_repacked_linear_4bit, lora_layer
from helpers.models import base_model, lora_model, padded_batch
from torch import nn

import tuco_peft.lora.fused as kernels_api
from tuco_peft.errors import InputError
from tuco_peft.lora import backend
from tuco_peft.lora.adapters import is_additive_lora
from tuco_peft.lora.backend import LoraLinearBackend, make_backend, resolve_backend

pytestmark = pytest.mark.interpreter

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "requested, device, expected",
    [("torch", CUDA, "torch"), ("auto", CPU, "torch"), ("auto", CUDA, "triton"), ("triton", CPU, "triton")],
)
def test_resolve_backend(requested, device, expected):
    assert resolve_backend(requested, device) == expected


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "Triton")
    assert resolve_backend(None, CPU) == "triton"
    monkeypatch.setenv(backend.BACKEND_ENV_VAR, "cuda")
    with pytest.raises(InputError, match="TUCO_PEFT_BACKEND='cuda'"):
        resolve_backend(None, CPU)
    monkeypatch.delenv(backend.BACKEND_ENV_VAR)
    assert resolve_backend(None, CPU) == "torch"


def test_bad_or_impossible_requests_say_why(monkeypatch):
    with pytest.raises(InputError, match="'auto', 'torch', 'triton'"):
        resolve_backend("cublas", CPU)
    monkeypatch.setattr(kernels_api, "INTERPRETING", False)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)
    monkeypatch.setattr(backend, "_kernels", lambda: None)
    assert resolve_backend("auto", CUDA) == "torch"
    with pytest.raises(InputError, match=r"tuco-peft\[triton\]"):
        resolve_backend("triton", CUDA)


def test_router_backends_agree_on_dual_and_two_stream():
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(48, 40), ranks=(4,))
    x_pt, x_ft = torch.randn(3, 48), torch.randn(2, 5, 48)
    torch_router, triton_router = make_backend("torch"), make_backend("triton")
    with torch.no_grad():
        expected = (layer.base_layer(x_ft), layer(x_ft))
        for actual in (torch_router.dual(x_ft, layer), triton_router.dual(x_ft, layer)):
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        expected = (layer.base_layer(x_pt), layer(x_ft))
        for actual in (torch_router.two_stream(x_pt, x_ft, layer), triton_router.two_stream(x_pt, x_ft, layer)):
            for got, want in zip(actual, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unsupported_layers_fall_back_to_torch_with_one_warning():
    torch.manual_seed(0)
    layers = [lora_layer(CustomForwardLinear(48, 40), ranks=(4,)) for _ in range(2)]
    router = make_backend("triton")
    x = torch.randn(4, 48)
    with pytest.warns(UserWarning, match="torch path.*CustomForwardLinear") as caught:
        outputs = [router.dual(x, layer) for layer in layers for _ in range(2)]
    assert len(caught) == 1
    with torch.no_grad():
        for layer, (y_base, y_ft) in zip(layers, outputs[::2]):
            torch.testing.assert_close(y_base, layer.base_layer(x))
            torch.testing.assert_close(y_ft, layer(x))


def test_cpu_repacked_4bit_falls_back_to_torch(recwarn):
    layer = lora_layer(cpu_repacked_linear_4bit(), ranks=(4,))
    x = torch.randn(2, 128)
    with torch.no_grad():
        _y_base, y_ft = make_backend("triton").dual(x, layer)
        torch.testing.assert_close(y_ft, layer(x))
    assert [str(w.message) for w in recwarn if "packing_format_for_cpu" in str(w.message)]


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_additive_lora(m)]


def _run_capturing_base_outputs(model: nn.Module, router: LoraLinearBackend | None, ids, mask):
    """Logits and every LoRA layer's base output: through hooks (router None) or fused forwards."""
    layers = _lora_layers(model)
    captured: dict[nn.Module, torch.Tensor] = {}

    def record(base_layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured[base_layer] = output

    with torch.no_grad():
        if router is None:
            handles = [layer.base_layer.register_forward_hook(record) for layer in layers]
            logits = model(input_ids=ids, attention_mask=mask).logits
            for handle in handles:
                handle.remove()
        else:
            with router.report_base_outputs(layers, record):
                logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, [captured[layer.base_layer] for layer in layers]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_reported_base_outputs_and_logits_match_a_hooked_plain_forward(backend_name):
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch(lengths=(5, 3))
    expected_logits, expected_bases = _run_capturing_base_outputs(model, None, ids, mask)
    logits, bases = _run_capturing_base_outputs(model, make_backend(backend_name), ids, mask)
    assert len(bases) == 3 * 7
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(bases, expected_bases):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer in _lora_layers(model):
        assert "forward" not in layer.__dict__ and not layer.base_layer._forward_hooks


def test_instance_forwards_and_plain_layers_are_hooked_and_everything_is_restored():
    torch.manual_seed(0)
    fusable, accelerated = lora_layer(nn.Linear(16, 16), ranks=(4,)), lora_layer(nn.Linear(16, 16), ranks=(4,))
    plain = nn.Linear(16, 16)
    hooked_forward = accelerated.forward  # stands for the forward accelerate's device hooks install
    accelerated.forward = hooked_forward
    reported: list[nn.Module] = []
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="boom"), make_backend("triton").report_base_outputs(
        [fusable, accelerated, plain], lambda module, args, output: reported.append(module)
    ):
        assert "forward" in fusable.__dict__ and accelerated.forward is hooked_forward
        with torch.no_grad():
            fusable(x), accelerated(x), plain(x)
        raise RuntimeError("boom")
    assert reported == [fusable.base_layer, accelerated.base_layer, plain]
    assert "forward" not in fusable.__dict__ and accelerated.__dict__["forward"] is hooked_forward
    assert not any(m._forward_hooks for m in (fusable.base_layer, accelerated.base_layer, plain))
