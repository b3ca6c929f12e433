"""The families tuco-peft knows, by ``config.model_type``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from .spec import FamilySpec

SpecOfConfig = Callable[[PretrainedConfig], FamilySpec]


@dataclass(frozen=True)
class RegisteredFamily:
    """A decoder family as ``register`` recorded it."""

    model_type: str
    layer_class: str  # the class name of its decoder blocks
    module: str  # the module that registered it
    per_config: bool  # whether its spec is picked per config
    spec_of: SpecOfConfig


_FAMILIES: dict[str, RegisteredFamily] = {}


def register(model_type: str, layer_class: str, spec: FamilySpec | SpecOfConfig) -> None:
    """Make ``spec`` the family of ``model_type``, whose decoder blocks are ``layer_class`` instances;
    a callable ``spec`` picks it per config (e.g. a wiring a config flag switches)."""
    if model_type in _FAMILIES:
        raise ValueError(f"the family {model_type!r} is registered twice")
    module = sys._getframe(1).f_globals.get("__name__", "")  # the caller's, as warnings finds it
    spec_of = spec if callable(spec) else lambda config: spec
    _FAMILIES[model_type] = RegisteredFamily(model_type, layer_class, module, callable(spec), spec_of)


def spec_for(layer: nn.Module, config: PretrainedConfig) -> FamilySpec | None:
    """The spec of ``layer``'s family, or None when the family is unknown or the layer is not its block class
    (a custom block under a known ``model_type``)."""
    # "" is PretrainedConfig's own model_type, that of a config without one: never a registered family
    family = _FAMILIES.get(getattr(config, "model_type", ""))
    if family is None or type(layer).__name__ != family.layer_class:
        return None
    return family.spec_of(config)


def registered_families() -> tuple[RegisteredFamily, ...]:
    """Every registered family, in the order of registration."""
    return tuple(_FAMILIES.values())


def registered_model_types() -> tuple[str, ...]:
    return tuple(_FAMILIES)
