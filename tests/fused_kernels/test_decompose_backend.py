"""decompose(backend="triton") against backend="torch" on tiny models (fp32 and nf4), under the interpreter."""

import pytest
import torch
from helpers.assertions import assert_components_close
from helpers.models import base_model, lora_model, padded_batch
from helpers.quantized_models import nf4_llama

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
