"""QLoRA: LoRA on a bitsandbytes 4-bit base, against the two-pass oracle, and bitsandbytes' CPU repacking."""

import pytest
import torch
from helpers.models import base_model, lora_model, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from peft import AdaLoraConfig, IA3Config, RandLoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tuco_peft
from tuco_peft.core.pretrained_path import SharedProjectionBlock, pretrained_path
from tuco_peft.model.parts import model_parts

bnb = pytest.importorskip("bitsandbytes")


def _linear4bit_modules(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _repacked(model):
    return [m for m in _linear4bit_modules(model) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def _quantized_base(tmp_path, quantization, device="cpu"):
    """A tiny Llama whose linears bitsandbytes quantized on ``device`` (its own kernels there: CUDA, or the CPU
    backend)."""
    base_model("llama", intermediate_size=128).save_pretrained(tmp_path)
    device_map = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map=device_map)
    for module in _linear4bit_modules(model):
        module.support_avx512bf16_for_cpu = False  # keep the oracle's weights as loaded
    return model


def _quantized_lora_model(tmp_path, quantization, device="cpu", **lora_kwargs):
    """A LoRA fine-tune of ``_quantized_base``."""
    return lora_model(_quantized_base(tmp_path, quantization, device), **lora_kwargs)


def qlora_model(tmp_path, quant_type="nf4", double_quant=False, device="cpu", **lora_kwargs):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return _quantized_lora_model(tmp_path, quantization, device, **lora_kwargs)


def _oracle(model, ids, mask):
    return two_pass(model, decoder_blocks(model), ids, mask, pt_context=model.disable_adapter)


@pytest.mark.device
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain-absmax", "nested-absmax"])
def test_qlora_matches_oracle(tmp_path, quant_type, double_quant, device):
    model = qlora_model(tmp_path, quant_type, double_quant, device)
    assert len(_linear4bit_modules(model)) == 21
    assert all(m.weight.device.type == device.type for m in _linear4bit_modules(model))
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad():
        ptc, ftc, _, _ = _oracle(model, ids, mask)
        d = tuco_peft.decompose(model, ids, mask, positions="all")
        last = tuco_peft.tuco(model, ids, mask)
    real = mask.bool()[:, None, :, None]
    scale = ptc.abs().max()
    assert (d.ptc - ptc * real).abs().max() <= 1e-4 * scale
    assert (d.ftc - ftc * real).abs().max() <= 1e-4 * scale
    assert (last - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5


def _assert_one_pass_matches_the_oracle(model) -> None:
    """Every block takes the one-pass path (its q/k/v captured), and every component at every position is the
    oracle's; the tuner changed the blocks."""
    parts = model_parts(model)
    assert all(type(pretrained_path(layer, parts.config)) is SharedProjectionBlock for layer in parts.layers)
    ids, mask = (t.to(next(model.parameters()).device) for t in padded_batch())
    with torch.no_grad():
        ptc, ftc, _, _ = _oracle(model, ids, mask)
        d = tuco_peft.decompose(model, ids, mask, positions="all")
    real = mask.bool()[:, None, :, None]
    scale = ptc.abs().max()
    assert (ftc * real).abs().max() > 1e-2 * scale
    assert (d.ptc - ptc * real).abs().max() <= 1e-4 * scale
    assert (d.ftc - ftc * real).abs().max() <= 1e-4 * scale


def test_dora_on_a_4bit_base_matches_oracle_in_one_pass(tmp_path):
    """QDoRA: DoRA's forward computes the dequantized base output first, so its q/k/v are captured (no block is
    replayed) and its magnitude vector rescales only the fine-tuned path."""
    model = qlora_model(tmp_path, double_quant=True, use_dora=True)
    _assert_one_pass_matches_the_oracle(model)
    assert not _repacked(model)


def test_lora_on_an_8bit_base_matches_oracle(tmp_path):
    model = _quantized_lora_model(tmp_path, BitsAndBytesConfig(load_in_8bit=True))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = _oracle(model, ids, mask)
        ours = tuco_peft.tuco(model, ids, mask)
    assert (ours - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5


# The other tuners that PEFT gives bitsandbytes classes, on the q/k/v projections and in the MLP.
_QUANTIZED_TUNERS = {
    "ia3": lambda: IA3Config(
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
    "adalora": lambda: AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
    ),
    "randlora": lambda: RandLoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False),
}  # fmt: skip


@pytest.mark.device
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tuner", _QUANTIZED_TUNERS)
def test_other_tuners_on_a_quantized_base_match_the_oracle_in_one_pass(tmp_path, tuner, bits, device):
    """Their 4-bit and 8-bit layers compute the base output as their dense ones do: captured, no block replayed.
    LLM.int8 without its outlier columns: with them, which columns run in 16 bits is chosen over the whole batch,
    so a row's output depends on the other rows (the oracle's too), and the pre-trained MLP at fewer rows differs
    from the replay by up to 1% here."""
    quantization = BitsAndBytesConfig(
        **(
            {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float32}
            if bits == 4
            else {"load_in_8bit": True, "llm_int8_threshold": 0.0}
        )
    )
    torch.manual_seed(1)
    model = get_peft_model(_quantized_base(tmp_path, quantization, device), _QUANTIZED_TUNERS[tuner]()).eval()
    _assert_one_pass_matches_the_oracle(model)


def test_decompose_never_repacks_and_leaves_the_flag(tmp_path):
    model = qlora_model(tmp_path)
    for module in _linear4bit_modules(model):  # as bitsandbytes sets it on an AVX512-BF16 CPU
        module.support_avx512bf16_for_cpu = True
    ids, mask = padded_batch()
    with torch.no_grad():
        tuco_peft.tuco(model, ids, mask)
    assert not _repacked(model)
    assert all(m.support_avx512bf16_for_cpu for m in _linear4bit_modules(model))


@pytest.mark.device
def test_gradients_through_a_4bit_base_match_the_oracle(tmp_path, device):
    model = qlora_model(tmp_path, device=device)
    ids, mask = (t.to(device) for t in padded_batch())
    tuco_peft.tuco(model, ids, mask).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert sum("layers.0." in n for n in ours) > 0  # reaches the first block through every 4-bit layer
    model.zero_grad()
    ptc, ftc, _, _ = _oracle(model, ids, mask)
    tuco_at_last(ptc, ftc, mask).sum().backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, atol=1e-6, rtol=1e-4)


def _repack_like_bitsandbytes(model):
    """What bitsandbytes' first eval no-grad forward does to each 4-bit weight on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for module in _linear4bit_modules(model):
        if module.in_features % module.weight.quant_state.blocksize:
            continue  # bitsandbytes cannot repack this shape either
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
            module.weight.data, module.weight.quant_state
        )


def test_gradients_through_repacked_weights_are_refused(tmp_path):
    model = qlora_model(tmp_path)
    _repack_like_bitsandbytes(model)
    ids, mask = padded_batch()
    with pytest.raises(tuco_peft.UnsupportedModelError, match="repacked"):
        tuco_peft.tuco(model, ids, mask)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacked 4-bit matmul needs an AVX512-BF16 CPU")
def test_an_already_repacked_model_is_consistent_without_grad(tmp_path):
    model = qlora_model(tmp_path)
    _repack_like_bitsandbytes(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = _oracle(model, ids, mask)
        ours = tuco_peft.tuco(model, ids, mask)
    assert (ours - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5
