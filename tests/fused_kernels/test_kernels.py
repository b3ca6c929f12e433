"""Fused Triton LoRA linears (under TRITON_INTERPRET=1) against references written plainly.

References (tests/helpers/kernel_reference.py): float64 ``x·Wᵀ + b + Σ s·(x·Aᵀ)·Bᵀ`` with W dense, or
decoded from the packed 4-bit bytes by ``decode_4bit_reference`` (itself checked against bitsandbytes here);
PEFT's own forward (the torch path); torch autograd through the plain formula for gradients.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import triton
import triton.language as tl
from helpers.assertions import assert_close
from helpers.kernel_reference import decode_4bit_reference, reference_outputs
from helpers.lora_layers import (
    IN,
    OUT,
    CustomForwardLinear,
    cpu_repacked_linear_4bit,
    dense_linear,
    linear_4bit,
    lora_layer,
)
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D
from tuco_peft.kernels import Packed4bitWeight, dequantize_4bit, settings
from tuco_peft.kernels.lora_linear_kernel import _lora_linear_kernel

from tuco_peft.errors import InputError, UnsupportedModelError
from tuco_peft.lora.fused import dual_lora_linear, two_stream_lora_linear
from tuco_peft.lora.tensors import base_weight

pytestmark = pytest.mark.interpreter

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative to the largest |y|


def inputs(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_interpreter_autotunes_over_a_single_config():
    assert len(_lora_linear_kernel.configs) == 1


def test_gpu_config_lists_respect_the_dot_side_and_prune_by_kind():
    kinds = [(False, tl.float16, False), (False, tl.bfloat16, False), (False, tl.float32, False)]
    kinds += [(True, dtype, blockwise) for dtype in (tl.float16, tl.bfloat16) for blockwise in (True, False)]
    union = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
             for m, n, k, w, s in dict.fromkeys(sum((settings.config_shapes(*kind) for kind in kinds), ()))]
    for weight_4bit, dtype, blockwise in kinds:
        shapes = settings.config_shapes(weight_4bit, dtype, blockwise)
        assert shapes and all(min(m, n, k) >= settings.MIN_DOT_SIDE for m, n, k, _, _ in shapes)
        assert any(m == settings.MIN_DOT_SIDE for m, *_ in shapes)  # a skinny tile for decode steps
        assert any(m >= 64 and n >= 64 for m, n, *_ in shapes)  # square tiles for prefill
        kept = settings.prune_matmul_configs(
            union, {"WEIGHT_4BIT": weight_4bit}, DOT_DTYPE=dtype, BLOCKWISE_4BIT=blockwise
        )
        kept_shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                       for c in kept]
        assert sorted(kept_shapes) == sorted(shapes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_4bit_is_bit_identical_to_bitsandbytes(quant_type, nested, dtype):
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=nested
    )
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(decode_4bit_reference(packed, state), expected)
    actual = dequantize_4bit(Packed4bitWeight.from_quant_state(packed, state))
    assert actual.dtype == dtype and torch.equal(actual, expected)


def test_dequantize_4bit_with_a_larger_block_and_a_partial_last_block():
    weight = torch.randn(OUT, IN - 2, generator=torch.Generator().manual_seed(1))  # 2800 = 21·128 + 112
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=128, quant_type="nf4", compress_statistics=True)
    actual = dequantize_4bit(Packed4bitWeight.from_quant_state(packed, state))
    assert torch.equal(actual, bnb_functional.dequantize_4bit(packed, state))


def _probe_columns(in_features: int, step: int = 16) -> torch.Tensor:
    """Columns 16j and 16j + 1 (a high and a low nibble in every quantization block), and the last two."""
    columns = torch.arange(0, in_features, step)
    return torch.cat([columns, columns + 1, torch.tensor([in_features - 2, in_features - 1])]).unique()


def _one_hot_rows(columns: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Inputs whose base output rows are columns of W exactly: one product per sum, no bias."""
    return torch.eye(in_features, dtype=dtype)[columns]


_BLOCKWISE_CASES = [
    (quant_type, nested, dtype, (128, 40), 64)
    for quant_type in ("nf4", "fp4") for nested in (False, True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
] + [("nf4", True, torch.bfloat16, (256, 96), 128), ("fp4", False, torch.float16, (256, 96), 128)]


@pytest.mark.parametrize("quant_type,nested,dtype,shape,blocksize", _BLOCKWISE_CASES)
def test_blockwise_4bit_tile_decode_is_bit_identical_to_bitsandbytes(quant_type, nested, dtype, shape, blocksize):
    """K a multiple of the quantization block: the GEMM decodes whole byte tiles, one absmax per block.

    With one-hot rows as inputs and no bias, the base output rows are columns of W (one product per sum),
    so the decoded values are compared bit for bit, in every quantization block and tile. The second shape
    has more quantization blocks than one nested block (256) holds, and tiles inside one quantization block
    (BLOCK_K 32 < 128).
    """
    layer = lora_layer(linear_4bit(quant_type, nested, dtype, shape=shape), ranks=(8,))
    base = layer.get_base_layer()
    # Quantized from the weight in ``dtype``, so that bitsandbytes decodes to ``dtype`` (rounded once).
    base.weight.data, base.weight.quant_state = bnb_functional.quantize_4bit(
        dense_linear(dtype, shape=shape).weight.data, blocksize=blocksize, quant_type=quant_type,
        compress_statistics=nested,
    )
    assert Packed4bitWeight.from_quant_state(base.weight.data, base.weight.quant_state).blockwise
    with torch.no_grad():
        base.bias.zero_()
    columns = _probe_columns(shape[0])
    y_base, y_ft = dual_lora_linear(_one_hot_rows(columns, shape[0], dtype), layer)
    expected = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    assert expected.dtype == dtype and torch.equal(y_base, expected[:, columns].t())
    x = inputs(3, dtype=dtype)[:, :1].expand(3, shape[0]) * torch.linspace(-1, 1, shape[0], dtype=dtype)
    y_base, y_ft = dual_lora_linear(x.contiguous(), layer)
    with torch.no_grad():
        expected_base, expected_ft = reference_outputs(x.double(), x.double(), layer)
    assert_close(y_base, expected_base, TOLERANCE[dtype])
    assert_close(y_ft, expected_ft, TOLERANCE[dtype])


def test_blockwise_decode_is_used_only_when_blocks_lie_in_rows():
    def packed(shape, blocksize):
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        return Packed4bitWeight.from_quant_state(*bnb_functional.quantize_4bit(weight, blocksize=blocksize))

    assert packed((40, 128), 64).blockwise and packed((8, 256), 128).blockwise
    assert not packed((40, IN), 64).blockwise  # 72 columns: blocks straddle rows, element-wise decode
    assert not packed((8, 64), 128).blockwise


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("two_streams", [False, True], ids=["dual", "two-stream"])
def test_tiles_spanning_several_quantization_blocks_via_the_config_pruner(monkeypatch, nested, two_streams):
    """BLOCK_K 128 over 64-column quantization blocks, with a partial last tile (K = 192).

    The autotuner is given two configs and a 4-bit config list holding only the wide one: the pruner
    must leave that one (a single config is launched without timing, so this runs in the interpreter).
    """
    narrow = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
    wide = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1)
    monkeypatch.setattr(_lora_linear_kernel, "configs", [narrow, wide])
    monkeypatch.setattr(_lora_linear_kernel, "cache", {})
    # Triton 3.6 times even a lone surviving config (3.9 does not), and the interpreter has no timer for it.
    monkeypatch.setattr(_lora_linear_kernel, "_bench", lambda *args, config, **kwargs: [0.0, 0.0, 0.0])
    monkeypatch.setattr(settings, "PACKED_4BIT_SHAPES", ((16, 32, 128, 4, 1),))
    monkeypatch.setattr(settings, "HALF_DENSE_SHAPES", ((16, 32, 32, 4, 1),))
    monkeypatch.setattr(settings, "FP32_DENSE_SHAPES", ((16, 32, 32, 4, 1),))
    layer = lora_layer(linear_4bit("nf4", nested, shape=(192, 40)), ranks=(8,))
    base = layer.get_base_layer()
    with torch.no_grad():
        base.bias.zero_()
    columns = _probe_columns(192)
    x_pt = _one_hot_rows(columns, 192, torch.float32)
    x_ft = torch.randn(5, 192, generator=torch.Generator().manual_seed(4)) if two_streams else x_pt
    if two_streams:
        y_base, y_ft = two_stream_lora_linear(x_pt, x_ft, layer)
    else:
        y_base, y_ft = dual_lora_linear(x_pt, layer)
    assert _lora_linear_kernel.best_config is wide
    expected = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    assert torch.equal(y_base, expected[:, columns].t())
    with torch.no_grad():
        assert_close(y_ft, reference_outputs(x_pt.double(), x_ft.double(), layer)[1], 1e-5)
        assert_close(y_ft, layer(x_ft), 1e-4)
    dense_layer = lora_layer(dense_linear(shape=(192, 40)))
    dual_lora_linear(torch.randn(3, 192), dense_layer)
    assert _lora_linear_kernel.best_config is narrow


@pytest.mark.device
@pytest.mark.parametrize("rank", [1, 8, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dual_dense_matches_reference_and_peft(rank, dtype, device):
    layer = lora_layer(dense_linear(dtype), ranks=(rank,)).to(device)
    x = inputs(2, 5, dtype=dtype).to(device)
    y_base, y_ft = dual_lora_linear(x, layer)
    assert y_base.dtype == y_ft.dtype == dtype and y_ft.shape == (2, 5, OUT)
    with torch.no_grad():
        expected_base, expected_ft = reference_outputs(x.double(), x.double(), layer)
        assert_close(y_base, expected_base, TOLERANCE[dtype])
        assert_close(y_ft, expected_ft, TOLERANCE[dtype])
        assert_close(y_base, layer.base_layer(x), 2 * TOLERANCE[dtype])
        assert_close(y_ft, layer(x), 2 * TOLERANCE[dtype])
    assert (y_ft - y_base).abs().max() > 1e-2  # the adapter really contributes


@pytest.mark.device
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dual_4bit_matches_dequantize_plus_matmul_and_peft(quant_type, nested, device):
    layer = lora_layer(linear_4bit(quant_type, nested, device=device), ranks=(8,))
    x = inputs(7).to(device)
    y_base, y_ft = dual_lora_linear(x, layer)
    base = layer.get_base_layer()
    dense = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    with torch.no_grad():
        assert_close(y_base, x.double() @ dense.double().t() + base.bias.double(), 1e-5)
        assert_close(y_ft, reference_outputs(x.double(), x.double(), layer)[1], 1e-5)
        assert_close(y_ft, layer(x), 1e-4)


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dual_4bit_in_half_precision(dtype, device):
    layer = lora_layer(linear_4bit("nf4", True, dtype, device=device), ranks=(16,))
    x = inputs(3, dtype=dtype).to(device)
    y_base, y_ft = dual_lora_linear(x, layer)
    with torch.no_grad():
        expected_base, expected_ft = reference_outputs(x.double(), x.double(), layer)
    assert y_ft.dtype == dtype
    assert_close(y_base, expected_base, TOLERANCE[dtype])
    assert_close(y_ft, expected_ft, TOLERANCE[dtype])


def _base_on(device: torch.device, kind: str) -> nn.Module:
    """A dense fp32 linear moved to ``device``, or an NF4 one (nested absmax) quantized there."""
    return dense_linear().to(device) if kind == "dense" else linear_4bit("nf4", True, device=device)


@pytest.mark.device
@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_two_stream_matches_two_reference_products(kind, device):
    layer = lora_layer(_base_on(device, kind), ranks=(8,))
    x_pt, x_ft = inputs(3, seed=6).to(device), inputs(2, 9, seed=7).to(device)  # different row counts
    y_pt, y_ft = two_stream_lora_linear(x_pt, x_ft, layer)
    assert y_pt.shape == (3, OUT) and y_ft.shape == (2, 9, OUT)
    with torch.no_grad():
        expected_pt, expected_ft = reference_outputs(x_pt.double(), x_ft.double(), layer)
        assert_close(y_pt, expected_pt, 1e-5)
        assert_close(y_ft, expected_ft, 1e-5)
        assert_close(y_ft, layer(x_ft), 1e-4)


def test_several_adapters_are_summed_with_their_own_rank_and_scaling():
    layer = lora_layer(dense_linear(), ranks=(4, 12, 1))
    assert len(layer.active_adapters) == 3 and len(set(layer.scaling.values())) == 3
    x = inputs(6)
    _y_base, y_ft = dual_lora_linear(x, layer)
    with torch.no_grad():
        assert_close(y_ft, reference_outputs(x.double(), x.double(), layer)[1], 1e-5)
        assert_close(y_ft, layer(x), 1e-5)


def test_disabled_adapters_give_the_base_output_twice():
    layer = lora_layer(dense_linear())
    layer.enable_adapters(False)
    x = inputs(4)
    y_base, y_ft = dual_lora_linear(x, layer)
    assert torch.equal(y_base, y_ft)
    with torch.no_grad():
        assert_close(y_base, layer.base_layer(x), 1e-6)


def test_gpt2_conv1d_base_reads_the_transposed_weight():
    torch.manual_seed(0)
    conv = Conv1D(OUT, IN)
    nn.init.normal_(conv.bias)
    layer = lora_layer(conv)
    assert layer.fan_in_fan_out
    x = inputs(5)
    y_base, y_ft = dual_lora_linear(x, layer)
    with torch.no_grad():
        assert_close(y_base, conv(x), 1e-5)
        assert_close(y_ft, layer(x), 1e-5)


def _loss(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A loss that weights the two outputs differently, so a swapped gradient would show."""
    first, second = outputs
    weights = torch.linspace(-1.0, 2.0, OUT, device=first.device)
    return (first * weights).sum() + (second * weights.flip(0) ** 2).sum()


def _trainables(layer: nn.Module) -> list[torch.Tensor]:
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    bias = layer.get_base_layer().bias
    return params + ([bias] if bias.requires_grad else [])


@pytest.mark.device
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("two_streams", [False, True], ids=["dual", "two-stream"])
def test_backward_matches_torch_autograd(kind, two_streams, device):
    layer = lora_layer(_base_on(device, kind), ranks=(8,))
    if kind == "dense":
        layer.get_base_layer().bias.requires_grad_(True)
    x_pt = inputs(2, 3, seed=8).to(device).requires_grad_(True)
    x_ft = inputs(5, seed=9).to(device).requires_grad_(True) if two_streams else x_pt
    leaves = [x_pt, x_ft] if two_streams else [x_pt]
    params = _trainables(layer)

    kernel = two_stream_lora_linear(x_pt, x_ft, layer) if two_streams else dual_lora_linear(x_pt, layer)
    actual = torch.autograd.grad(_loss(kernel), leaves + params)
    expected = torch.autograd.grad(_loss(reference_outputs(x_pt, x_ft, layer)), leaves + params)
    for got, want in zip(actual, expected):
        assert_close(got, want, 1e-5)
    assert layer.get_base_layer().weight.grad is None


def test_cpu_repacked_4bit_weight_is_refused_with_the_way_out():
    layer = lora_layer(cpu_repacked_linear_4bit())
    with pytest.raises(UnsupportedModelError, match="support_avx512bf16_for_cpu"):
        dual_lora_linear(torch.randn(2, 128), layer)


def test_unsupported_layers_and_inputs_are_refused_clearly():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="not a plain"):
        base_weight(CustomForwardLinear(IN, OUT))
    with pytest.raises(UnsupportedModelError, match="not a plain"):
        base_weight(bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False))
    with pytest.raises(UnsupportedModelError, match="float64"):
        dual_lora_linear(inputs(2).double(), lora_layer(dense_linear()))
    with pytest.raises(UnsupportedModelError, match="not a PEFT LoRA linear"):
        dual_lora_linear(inputs(2), dense_linear())
    with pytest.raises(InputError, match="features"):
        dual_lora_linear(torch.randn(2, IN + 1), lora_layer(dense_linear()))


def test_train_time_dropout_and_lora_bias_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(dense_linear()), LoraConfig(r=4, target_modules=["0"], lora_dropout=0.1))
    layer = model.base_model.model[0].train()
    with pytest.raises(UnsupportedModelError, match="dropout"):
        dual_lora_linear(inputs(2), layer)
    layer.eval()
    dual_lora_linear(inputs(2), layer)  # dropout is the identity in eval mode
    model = get_peft_model(nn.Sequential(dense_linear()), LoraConfig(r=4, target_modules=["0"], lora_bias=True))
    with pytest.raises(UnsupportedModelError, match="LoRA bias"):
        dual_lora_linear(inputs(2), model.base_model.model[0])
