"""Model state that an analysis pass must change briefly, and must put back exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .inventory import ModuleInventory


def cpu_repacked(module: nn.Module) -> bool:
    """Its 4-bit weight was repacked in place by bitsandbytes for AVX512-BF16 CPU inference."""
    quant_state = getattr(module.weight, "quant_state", None)
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


@contextmanager
def analysis_state(modules: ModuleInventory) -> Iterator[None]:
    """Hold the blocks whose ``modules`` these are in a state where one hooked forward gives exact,
    differentiable components.

    - Gradient checkpointing is paused: a checkpointed block re-runs its forward in backward without our
      hooks, which would drop the pre-trained path from the graph.
    - bitsandbytes' CPU repacking (on AVX512-BF16 machines) is prevented: it rewrites 4-bit weights in place
      on the first eval no-grad forward, after which dequantization and gradients are wrong.
    """
    if torch.is_grad_enabled() and any(cpu_repacked(m) for m in modules.quantized_4bit):
        raise UnsupportedModelError(
            "bitsandbytes has repacked this model's 4-bit weights for AVX512-BF16 CPU inference, and gradients "
            "through repacked weights are wrong. Reload the model (tuco-peft prevents the repacking during its "
            "own calls), or run the analysis under torch.no_grad()."
        )
    checkpointed = [m for m in modules.checkpointable if m.gradient_checkpointing is True]
    repack_flags = [
        (m, m.support_avx512bf16_for_cpu) for m in modules.quantized_4bit if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    try:
        # torch types Module.__setattr__'s value as Tensor | Module; a plain attribute takes any value.
        for module in checkpointed:
            module.gradient_checkpointing = False  # type: ignore[assignment]
        for module, _ in repack_flags:
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]
        yield
    finally:
        for module in checkpointed:
            module.gradient_checkpointing = True  # type: ignore[assignment]
        for module, flag in repack_flags:
            module.support_avx512bf16_for_cpu = flag


def check_deterministic(modules: ModuleInventory) -> None:
    """Refuse train-mode dropout of the base model inside the blocks.

    LoRA dropout is fine: it only acts on the fine-tuned branch, which the pre-trained path never runs, so
    the components stay exact for the mask the forward drew. Dropout of the pre-trained weights would need
    the same mask twice.
    """
    for name, module in modules.dropouts:
        rate = _dropout_rate(module)
        if module.training and isinstance(rate, float) and rate > 0:
            raise UnsupportedModelError(
                f"the model is in training mode with dropout p={rate} at {name}; the pre-trained "
                "component is defined for the deterministic block. Call model.eval() (LoRA dropout alone is "
                "fine in training mode), or set the model's dropout to 0."
            )


def _dropout_rate(module: nn.Module) -> float | None:
    """The rate of a dropout module, or of a module's ``attention_dropout`` (None where it has neither)."""
    return module.p if isinstance(module, nn.Dropout) else module.__dict__.get("attention_dropout")
