"""The families tuco-peft knows, by ``config.model_type``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import PretrainedConfig

from .spec import FamilySpec

SpecOfConfig = Callable[[PretrainedConfig], FamilySpec]

_FAMILIES: dict[str, tuple[str, SpecOfConfig]] = {}


def register(model_type: str, layer_class: str, spec: FamilySpec | SpecOfConfig) -> None:
    """Make ``spec`` the family of ``model_type``, whose decoder blocks are ``layer_class`` instances;
    a callable ``spec`` picks it per config (e.g. a wiring a config flag switches)."""
    if model_type in _FAMILIES:
        raise ValueError(f"the family {model_type!r} is registered twice")
    _FAMILIES[model_type] = (layer_class, spec if callable(spec) else lambda config: spec)


def spec_for(layer: nn.Module, config: PretrainedConfig) -> FamilySpec | None:
    """The spec of ``layer``'s family, or None when the family is unknown or the layer is not its block class
    (a custom block under a known ``model_type``)."""
    # "" is PretrainedConfig's own model_type, that of a config without one: never a registered family
    entry = _FAMILIES.get(getattr(config, "model_type", ""))
    if entry is None or type(layer).__name__ != entry[0]:
        return None
    return entry[1](config)


def registered_model_types() -> tuple[str, ...]:
    return tuple(_FAMILIES)
