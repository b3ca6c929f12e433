"""Tiny models on bitsandbytes NF4 bases, quantized on the CPU (without bitsandbytes' in-place CPU repacking)."""

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from helpers.lora_layers import as_linear_4bit
from helpers.models import base_model, lora_model


def quantize_decoder_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear inside the decoder blocks → a bitsandbytes NF4 Linear4bit (nested absmax), on CPU."""
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, as_linear_4bit(child, "nf4", True, torch.float32))
    return model


def nf4_llama() -> nn.Module:
    """A Llama fine-tune on an NF4 base whose every in_features is a multiple of the 64-wide quantization
    block: bitsandbytes' AVX512 CPU dequantization (seen on 0.50) is wrong for other widths (it decodes row by row),
    so its own forward would not be the reference there. The kernels' decoding of such widths is checked
    against bitsandbytes' format in test_kernels."""
    return lora_model(quantize_decoder_linears(base_model("llama", intermediate_size=128)))


def quantized_pair(tmp_path):
    """(4-bit pre-trained model, LoRA on a second 4-bit copy) loaded through bitsandbytes on the CPU."""
    base_model("llama").save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return model.eval()

    return load(), lora_model(load())
