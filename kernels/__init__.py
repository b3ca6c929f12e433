"""Triton kernels of tuco-peft, installed as ``tuco_peft.kernels``: pure ops, tensors in and tensors out.

Fused LoRA linears that read each base-weight tile (dense, or bitsandbytes NF4/FP4 decoded in the tile)
once for the pre-trained and the fine-tuned outputs. They import torch and triton only: reading PEFT
layers into these tensors is ``tuco_peft.lora_tensors``' job. Using them needs Triton; on CPU, set
TRITON_INTERPRET=1 before triton is imported.

Names load on first use: in a source checkout this folder is also importable as a top-level ``kernels``,
which transformers probes for the unrelated Hugging Face package of that name; importing it must do nothing.
"""

from importlib import import_module

_EXPORTS = {
    "lora_linear": ".ops",
    "dequantize_4bit": ".bnb_4bit",
    "DenseWeight": ".weights",
    "Packed4bitWeight": ".weights",
    "BaseWeight": ".weights",
    "INTERPRETING": ".settings",
    "SUPPORTED_DTYPES": ".settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
