"""decompose(backend="triton") against backend="torch" on tiny models (fp32 and nf4), under the interpreter."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

import tuco_peft
from models import base_model, lora_model, padded_batch
from test_decompose import _assert_components_close as _assert_close

pytestmark = pytest.mark.interpreter


def quantize_decoder_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear inside the decoder blocks → a bitsandbytes NF4 Linear4bit (nested absmax), on CPU."""
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                )
                quantized.load_state_dict(child.state_dict())
                quantized = quantized.to("cpu")
                quantized.support_avx512bf16_for_cpu = False
                setattr(module, name, quantized)
    return model


def nf4_llama() -> nn.Module:
    """A Llama fine-tune on an NF4 base whose every in_features is a multiple of the 64-wide quantization
    block: bitsandbytes' AVX512 CPU dequantization (seen on 0.50) is wrong for other widths (it decodes row by row),
    so its own forward would not be the reference there. The kernels' decoding of such widths is checked
    against bitsandbytes' format in test_kernels."""
    return lora_model(quantize_decoder_linears(base_model("llama", intermediate_size=128)))


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
    _assert_close(fused.ptc, reference.ptc)
    _assert_close(fused.ftc, reference.ftc)
    assert (fused.tuco - reference.tuco).abs().max() < 1e-5


def test_gradients_through_the_fused_path():
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch(lengths=(6, 4))
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    grads = []
    for backend in ("torch", "triton"):
        d = tuco_peft.decompose(model, ids, mask, backend=backend)
        grads.append(torch.autograd.grad(d.ftc.abs().sum(), lora_a)[0])
    _assert_close(grads[1], grads[0])
