"""Check that a model's adapters can be decomposed exactly, and switch them off without side effects.

PEFT's ``disable_adapter()`` is avoided on purpose: it flips ``requires_grad`` (peft#3447) and unmerges
merged weights in place. Here only the per-module ``_disable_adapters`` flag is toggled, and it is put
back exactly as it was found.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from peft.tuners.lora import LoraLayer
from torch import nn

from .errors import UnsupportedModelError
from .inventory import ModuleInventory, is_switchable

# LoRA layers whose forward is ``base_layer(x) + Σ scaling·B(A(dropout(x)))``: the base output of these is
# exactly the pre-trained projection, so it can be captured during the fine-tuned forward.
_ADDITIVE_LORA_TYPES = frozenset({"Linear", "Linear4bit", "Linear8bitLt"})


def is_additive_lora(module: nn.Module) -> bool:
    return (
        isinstance(module, LoraLayer)
        and type(module).__module__.startswith("peft.tuners.lora")
        and type(module).__name__ in _ADDITIVE_LORA_TYPES
    )


def pretrained_projection(module: nn.Module) -> nn.Module:
    """The module whose output is the pre-trained projection: a LoRA layer's base layer, or the layer itself."""
    return module.get_base_layer() if is_additive_lora(module) else module


def check_adapters(modules: ModuleInventory) -> None:
    """Refuse adapters whose pre-trained path is not ``adapters off`` on unmerged weights.

    Tuner layers of other kinds are allowed outside the decoder blocks (e.g. the trainable tokens of
    ``LoraConfig(trainable_token_indices=...)``): the embeddings and the head belong to no component.
    """
    if modules.other_adapters:
        name, module = modules.other_adapters[0]
        raise UnsupportedModelError(
            f"{name} is a {type(module).__module__}.{type(module).__name__} adapter; tuco-peft decomposes "
            "LoRA/QLoRA fine-tunes only. For other fine-tunes, save the merged model and pass "
            "the pre-trained model explicitly."
        )
    if not modules.lora_layers:
        raise UnsupportedModelError(
            "the model has no LoRA adapters, so there is no fine-tuned component to measure; wrap the base "
            "model with peft.get_peft_model(...) or PeftModel.from_pretrained(base, adapter_path); for a full "
            "fine-tune pass base_model=<the pre-trained model or its checkpoint path>."
        )
    merged = [name for name, module in modules.lora_layers if module.merged]
    if merged:
        raise UnsupportedModelError(
            f"{len(merged)} LoRA layers are merged into their base weights (e.g. {merged[0]}), so the "
            "pre-trained block is no longer in the model; call model.unmerge_adapter() first."
        )
    for name, module in modules.lora_layers:
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter, False):
                raise UnsupportedModelError(
                    f"adapter {adapter!r} uses DoRA ({name}); DoRA rescales the base output, which the "
                    "one-pass decomposition does not model yet. Use a plain LoRA adapter."
                )
            if adapter in getattr(module, "lora_variant", {}):
                variant = type(module.lora_variant[adapter]).__name__
                raise UnsupportedModelError(
                    f"adapter {adapter!r} at {name} is a LoRA variant ({variant}) that is not supported; "
                    "use a plain LoRA adapter."
                )


@contextmanager
def adapters_disabled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the pre-trained path of ``modules``: their adapters off, restored exactly afterwards."""
    saved = [(m, m.__dict__.get("_disable_adapters", _MISSING)) for m in modules if is_switchable(m)]
    try:
        for module, _ in saved:
            module._disable_adapters = True
        yield
    finally:
        for module, previous in saved:
            if previous is _MISSING:
                del module._disable_adapters
            else:
                module._disable_adapters = previous


_MISSING = object()
