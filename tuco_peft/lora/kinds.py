"""PEFT's tuner layer kinds as data: what each one's forward does with its base layer.

Every PEFT tuner is switched off by its layers' ``_disable_adapters`` flag, and its forward then calls its base
layer alone: that is the pre-trained projection. The one-pass paths need to know more, per layer:

- where the pre-trained projection is found in the fine-tuned forward (``BaseOutput``). *Captured*: the
  forward calls its base layer on its own input first and changes only that call's result (LoRA and its
  variants, LoHa, LoKr, VeRA, RandLoRA, AdaLoRA, IA3 outside feed-forward layers); the base layer's output is
  read as it passes. *Recomputed*: the forward changes the input or the weight before the base layer sees it
  (IA3 on feed-forward layers, OFT, BOFT, HRA, LoRA on a parameter through ``target_parameters``); the
  pre-trained projection is one more call of that one layer with its adapters off, not a second pass through
  the block;
- whether the forward adds into the base output in place (AdaLoRA, some LoRA variants), so that what is
  captured must be a copy;
- whether its adapters add a plain low-rank term ``Σ scaling·B(A(x))`` (LoRA without a variant): the lean
  KV cache, the fused kernels and the two-stream linear need that form;
- whether, adapters off, its forward is exactly its base layer's call (no cast after it), so that the call
  can stand in for the forward.

One entry per layer class, registered by its qualified name (``register_adapter_kind``), with a rule where
the instance decides (a DoRA adapter, an IA3 layer on a feed-forward module). A mixed model's tuner layers
nested one over another are of the kind their stack composes. A tuner layer whose class is not registered is
decomposed exactly by switching it off (the generic path), with one warning naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, cast

from torch import nn

if TYPE_CHECKING:
    from ..model.inventory import LoraModule


class BaseOutput(Enum):
    """Where a tuner layer's pre-trained projection is found."""

    CAPTURED = "captured"  # its base layer's call in the fine-tuned forward, on the layer's own input
    RECOMPUTED = "recomputed"  # one more call of the layer, adapters off, on its input


@dataclass(frozen=True)
class AdapterKind:
    """What the one-pass paths may assume of a tuner layer's forward (see the module docstring)."""

    name: str
    base_output: BaseOutput
    adds_in_place: bool = False
    low_rank: bool = False
    off_is_base_call: bool = False

    @property
    def captured(self) -> bool:
        return self.base_output is BaseOutput.CAPTURED


LORA = AdapterKind("LoRA", BaseOutput.CAPTURED, low_rank=True, off_is_base_call=True)
# Some variants add into the base output in place (BD-LoRA; aLoRA at its invocation tokens).
LORA_VARIANT = AdapterKind(
    "LoRA variant (DoRA, aLoRA, ...)", BaseOutput.CAPTURED, adds_in_place=True, off_is_base_call=True
)
ADALORA = AdapterKind("AdaLoRA", BaseOutput.CAPTURED, adds_in_place=True, off_is_base_call=True)
IA3 = AdapterKind("IA3", BaseOutput.CAPTURED, off_is_base_call=True)
IA3_FEEDFORWARD = AdapterKind("IA3 on a feed-forward layer", BaseOutput.RECOMPUTED, off_is_base_call=True)
LOHA = AdapterKind("LoHa", BaseOutput.CAPTURED)
LOKR = AdapterKind("LoKr", BaseOutput.CAPTURED)
VERA = AdapterKind("VeRA", BaseOutput.CAPTURED)
RANDLORA = AdapterKind("RandLoRA", BaseOutput.CAPTURED)
OFT = AdapterKind("OFT", BaseOutput.RECOMPUTED)
BOFT = AdapterKind("BOFT", BaseOutput.RECOMPUTED)
HRA = AdapterKind("HRA", BaseOutput.RECOMPUTED)
# LoRA through ``target_parameters`` (a mixture of experts' fused 3-D weights, a router's) adds its delta to the
# wrapped parameter for the duration of the base layer's call.
LORA_ON_PARAMETERS = AdapterKind("LoRA on parameters (target_parameters)", BaseOutput.RECOMPUTED, off_is_base_call=True)

KindOfLayer = Callable[[nn.Module], AdapterKind]


@dataclass(frozen=True)
class RegisteredKind:
    """A tuner layer class as ``register_adapter_kind`` recorded it: the kinds its layers can be, and the rule
    that picks one for a layer."""

    layer_class: str  # "module.QualifiedName"
    kinds: tuple[AdapterKind, ...]
    pick: KindOfLayer


_KINDS: dict[str, RegisteredKind] = {}


def register_adapter_kind(layer_class: str, *kinds: AdapterKind, pick: KindOfLayer | None = None) -> None:
    """Make the tuner layers of class ``layer_class`` (``"module.QualifiedName"``) of kind ``kinds[0]``, or of
    the one of ``kinds`` that ``pick`` returns for a layer. Only exact instances of that class: a subclass may
    change the forward."""
    if layer_class in _KINDS:
        raise ValueError(f"the adapter kind of {layer_class!r} is registered twice")
    if not kinds or (pick is None) != (len(kinds) == 1):
        raise ValueError("register one kind, or several and a pick that chooses among them per layer")
    only = kinds[0]
    _KINDS[layer_class] = RegisteredKind(layer_class, kinds, pick or (lambda layer: only))
    _registered.cache_clear()


def registered_adapter_kinds() -> tuple[RegisteredKind, ...]:
    """Every registered tuner layer class, in the order of registration."""
    return tuple(_KINDS.values())


def adapter_kind(module: nn.Module) -> AdapterKind | None:
    """The kind of a PEFT tuner layer, or None where it, or a tuner layer nested beneath it, is of no registered
    kind. A mixed model nests one tuner layer over another: the stack is of the kind ``stacked`` makes.

    Asked per module on every call (and per linear call by the fused backend): the class is looked up once,
    the rule reads plain attributes; only a mixed model's stack is walked."""
    registered = _registered(type(module))  # type: ignore[arg-type]  # mypy#11470: classes are Hashable
    if registered is None:
        return None
    if not holds_tuner_layer(module):
        return registered.pick(module)
    kinds = stacked_kinds(module)
    return None if kinds is None else _stacked(kinds)


def stacked_kinds(module: nn.Module) -> tuple[AdapterKind, ...] | None:
    """The kinds of ``module`` and of the tuner layers nested beneath it, outermost first; None where one of
    them is of no registered kind."""
    kinds: list[AdapterKind] = []
    layer = module
    while True:
        registered = _registered(type(layer))  # type: ignore[arg-type]  # mypy#11470: classes are Hashable
        if registered is None:
            return None
        kinds.append(registered.pick(layer))
        if not holds_tuner_layer(layer):
            return tuple(kinds)
        layer = cast(nn.Module, layer._modules["base_layer"])  # a tuner layer, as holds_tuner_layer found


def holds_tuner_layer(layer: nn.Module) -> bool:
    """Whether a tuner layer's base layer is another tuner layer (a mixed model nests them)."""
    base_layer = layer._modules.get("base_layer")
    return base_layer is not None and "base_layer" in base_layer._modules


@cache
def _stacked(kinds: tuple[AdapterKind, ...]) -> AdapterKind:
    """The kind of tuner layers nested one over another, each the base layer of the one above. Its pre-trained
    projection is the innermost base layer's output: captured where every layer passes its input on unchanged,
    else recomputed by the stack's forward with all its adapters off. It adds in place where one layer does (the
    base output then reaches an in-place add), and it is never plain low-rank."""
    captured = all(kind.captured for kind in kinds)
    return AdapterKind(
        " over ".join(kind.name for kind in kinds),
        BaseOutput.CAPTURED if captured else BaseOutput.RECOMPUTED,
        adds_in_place=any(kind.adds_in_place for kind in kinds),
        off_is_base_call=all(kind.off_is_base_call for kind in kinds),
    )


@cache
def _registered(cls: type) -> RegisteredKind | None:
    return _KINDS.get(f"{cls.__module__}.{cls.__qualname__}")


def _lora(layer: nn.Module) -> AdapterKind:
    """Plain LoRA unless an active adapter is DoRA or another variant, which rescale or reshape the output."""
    lora = cast("LoraModule", layer)
    variants, dora = lora.lora_variant, lora.use_dora
    if not variants and not any(dora.values()):
        return LORA
    return LORA_VARIANT if any(a in variants or dora.get(a, False) for a in lora.active_adapters) else LORA


def _ia3(layer: nn.Module) -> AdapterKind:
    """IA3 scales a feed-forward layer's input, any other layer's output."""
    return IA3_FEEDFORWARD if layer.is_feedforward else IA3


# A tuner's bitsandbytes classes (4-bit and 8-bit bases) call their base layer as its dense class does.
for _class in ("layer.Linear", "bnb.Linear4bit", "bnb.Linear8bitLt"):
    register_adapter_kind(f"peft.tuners.lora.{_class}", LORA, LORA_VARIANT, pick=_lora)
for _class in ("layer.SVDLinear", "bnb.SVDLinear4bit", "bnb.SVDLinear8bitLt"):
    register_adapter_kind(f"peft.tuners.adalora.{_class}", ADALORA)
for _class in ("layer.Linear", "bnb.Linear4bit", "bnb.Linear8bitLt"):
    register_adapter_kind(f"peft.tuners.ia3.{_class}", IA3, IA3_FEEDFORWARD, pick=_ia3)
register_adapter_kind("peft.tuners.loha.layer.Linear", LOHA)
register_adapter_kind("peft.tuners.lokr.layer.Linear", LOKR)
register_adapter_kind("peft.tuners.vera.layer.Linear", VERA)
for _class in ("layer.Linear", "bnb.Linear4bit", "bnb.Linear8bitLt"):
    register_adapter_kind(f"peft.tuners.randlora.{_class}", RANDLORA)
register_adapter_kind("peft.tuners.oft.layer.Linear", OFT)
register_adapter_kind("peft.tuners.boft.layer.Linear", BOFT)
register_adapter_kind("peft.tuners.hra.layer.HRALinear", HRA)
register_adapter_kind("peft.tuners.lora.layer.ParamWrapper", LORA_ON_PARAMETERS)
