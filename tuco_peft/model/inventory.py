"""The modules an analysis checks and switches, found in one walk over the model.

Every call of ``decompose``, ``ftc_scale`` or ``generate`` checks the adapters, refuses train-mode dropout,
pauses gradient checkpointing, guards 4-bit weights and switches adapters block by block. Each of those
used to walk the model on its own; on a 30-block model the walks cost as much as the pre-trained rows
themselves. The inventory is taken in one walk and holds only what the model's structure decides (module
classes, attributes a module has at all), never a value that can change without the structure changing
(a dropout rate, a checkpointing flag): those are read at each call. So it stays true while the structure
does, and ``parts.model_parts`` keeps it from call to call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .interception import submodules

_BNB_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")

if TYPE_CHECKING:
    # PEFT's tuner layers are nn.Modules too (``class Linear(nn.Module, LoraLayer)``, ...). Type checkers have no
    # intersection types, so these classes spell them; they exist for type checkers only.

    class TunerModule(nn.Module, BaseTunerLayer):
        """A PEFT tuner layer: LoRA, LoHa, LoKr, IA3, ..."""

    class LoraModule(TunerModule, LoraLayer):
        """A PEFT LoRA layer: ``lora.Linear`` and its bitsandbytes twins, ``lora.Embedding``, ..."""


def is_switchable(module: nn.Module) -> bool:
    """True for modules whose fine-tuned behaviour PEFT can switch off (tuner layers, modules_to_save)."""
    return _kind(type(module)).switchable  # type: ignore[arg-type]  # mypy#11470: classes are Hashable


def outermost_switchable(module: nn.Module) -> list[nn.Module]:
    """The switchable modules in ``module`` (itself included) that no other switchable module holds: those whose
    forward an analysis takes over (a mixed model nests tuner layers)."""
    switchable = [m for m in [module, *submodules(module)] if is_switchable(m)]
    nested = {id(inner) for m in switchable for inner in submodules(m)}
    return [m for m in switchable if id(m) not in nested]


def is_bnb_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear (Linear4bit and its NF4/FP4 subclasses)."""
    return _kind(type(module)).quantized_4bit and hasattr(module, "weight")  # type: ignore[arg-type]  # mypy#11470


@dataclass(frozen=True)
class ModuleInventory:
    """What the checks and switches of an analysis need, by name where an error message names it.

    ``lora_layers`` are the whole model's (an adapter on the head must not be merged either); everything
    else is inside the decoder blocks. ``dropouts`` are the base model's dropouts (``nn.Dropout`` and modules
    with an ``attention_dropout`` rate), whatever their rate: LoRA's own dropout only acts on the fine-tuned
    branch and is left out. ``checkpointable`` are the modules that have a ``gradient_checkpointing`` flag,
    whatever its value. ``switchable`` holds each block's tuner layers and modules_to_save, in module order.
    ``adapter_holders`` are the whole model's modules that hold adapters by name and switch between them:
    tuner layers and PEFT's auxiliary wrappers (modules_to_save, trainable tokens).
    """

    lora_layers: tuple[tuple[str, LoraModule], ...]
    other_adapters: tuple[tuple[str, TunerModule], ...]
    dropouts: tuple[tuple[str, nn.Module], ...]
    checkpointable: tuple[nn.Module, ...]
    quantized_4bit: tuple[nn.Module, ...]
    switchable: tuple[tuple[nn.Module, ...], ...]
    adapter_holders: tuple[tuple[str, nn.Module], ...]


@dataclass(frozen=True)
class _Kind:
    """What a module's class makes it, worked out once per class (a model has thousands of modules and a few
    dozen classes, and ``isinstance`` against PEFT's abstract classes is slow)."""

    lora: bool
    other_adapter: bool
    switchable: bool
    quantized_4bit: bool
    checkpointable: bool  # a class-level gradient_checkpointing flag (transformers' GradientCheckpointingLayer)
    dropout: bool


@cache
def _kind(cls: type) -> _Kind:
    lora = issubclass(cls, LoraLayer)
    return _Kind(
        lora=lora,
        other_adapter=issubclass(cls, BaseTunerLayer) and not lora,
        switchable=issubclass(cls, (BaseTunerLayer, AuxiliaryTrainingWrapper)),
        quantized_4bit=cls.__name__ in _BNB_4BIT_CLASSES and cls.__module__.startswith("bitsandbytes"),
        checkpointable=isinstance(getattr(cls, "gradient_checkpointing", None), bool),
        dropout=issubclass(cls, nn.Dropout),
    )


def take_inventory(model: nn.Module, layers: nn.ModuleList) -> ModuleInventory:
    """One walk over ``model``, whose decoder blocks are ``layers``."""
    block_index = {id(layer): index for index, layer in enumerate(layers)}
    lora_layers, other_adapters, dropouts, checkpointable, quantized, holders = [], [], [], [], [], []
    switchable: list[list[nn.Module]] = [[] for _ in layers]
    lora_dropouts: set[int] = set()
    block, block_prefix = None, ""
    # named_modules is a pre-order walk: a block's modules follow it, their names under the block's own.
    for name, module in model.named_modules():
        if id(module) in block_index:
            block, block_prefix = block_index[id(module)], name + "."
        elif block is not None and not name.startswith(block_prefix):
            block = None
        kind = _kind(type(module))  # type: ignore[arg-type]  # mypy#11470: classes are Hashable
        if kind.lora:
            lora_layers.append((name, module))
            lora_dropouts.update(id(d) for d in module.lora_dropout.values())
        if kind.switchable:
            holders.append((name, module))
        if block is None:
            continue
        if kind.other_adapter:
            other_adapters.append((name, module))
        if kind.switchable:
            switchable[block].append(module)
        if kind.quantized_4bit:
            quantized.append(module)
        # Instance attributes where set (transformers enables checkpointing per instance); reading __dict__
        # spares the failing nn.Module.__getattr__ on every other module.
        if kind.checkpointable or "gradient_checkpointing" in module.__dict__:
            checkpointable.append(module)
        if kind.dropout or "attention_dropout" in module.__dict__:
            dropouts.append((name, module))
    return ModuleInventory(
        lora_layers=tuple(lora_layers),
        other_adapters=tuple(other_adapters),
        dropouts=tuple(d for d in dropouts if id(d[1]) not in lora_dropouts),
        checkpointable=tuple(checkpointable),
        quantized_4bit=tuple(quantized),
        switchable=tuple(tuple(modules) for modules in switchable),
        adapter_holders=tuple(holders),
    )
