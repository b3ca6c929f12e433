"""decompose(backend="triton") against backend="torch" on tiny models (fp32 and nf4), under the interpreter."""

import pytest
import torch
from helpers.assertions import assert_components_close
from helpers.models import base_model, lora_model, padded_batch
from helpers.quantized_models import nf4_llama
from peft import LoraConfig

import tuco_peft

pytestmark = pytest.mark.interpreter


def _fp32(family):
    return lambda: lora_model(base_model(family))


@pytest.mark.parametrize(
    "make_model",
    [_fp32("llama"), _fp32("phi3"), _fp32("gpt2"), nf4_llama],
    ids=["llama", "phi3", "gpt2", "llama-nf4"],
)
@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.device
def test_triton_equals_torch(make_model, positions, device):
    model = make_model().to(device)  # moving a 4-bit base to a GPU quantizes it there
    ids, mask = (t.to(device) for t in padded_batch(lengths=(6, 4)))
    with torch.no_grad():
        reference = tuco_peft.decompose(model, ids, mask, positions=positions, backend="torch")
        fused = tuco_peft.decompose(model, ids, mask, positions=positions, backend="triton")
    assert_components_close(fused.ptc, reference.ptc)
    assert_components_close(fused.ftc, reference.ftc)
    assert (fused.tuco - reference.tuco).abs().max() < 1e-5


def test_gradients_through_the_fused_path():
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch(lengths=(6, 4))
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    grads = []
    for backend in ("torch", "triton"):
        d = tuco_peft.decompose(model, ids, mask, backend=backend)
        grads.append(torch.autograd.grad(d.ftc.abs().sum(), lora_a)[0])
    assert_components_close(grads[1], grads[0])


def test_a_batch_of_mixed_adapters_on_the_fused_backend():
    """Under adapter_names PEFT's forward adds each row's adapter into the base output in place; the fused
    backend's q/k/v then report a copy of it, as the torch backend does."""
    model = lora_model(base_model("llama"))
    torch.manual_seed(3)
    model.add_adapter("other", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    ids, mask = padded_batch(lengths=(6, 4))
    with torch.no_grad():
        fused = tuco_peft.decompose_adapters(model, ids, mask, backend="triton", mixed_batches=True)
        reference = tuco_peft.decompose_adapters(model, ids, mask, backend="torch", mixed_batches=False)
    for name in ("default", "other"):
        assert_components_close(fused[name].ptc, reference[name].ptc)
        assert_components_close(fused[name].ftc, reference[name].ftc)
