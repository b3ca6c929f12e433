"""The arguments a decoder block is called with, as hooks see them: its hidden states and its cache.

Decoders pass some of these by keyword and some positionally (GPT-2 passes the cache positionally), and
name the cache differently (GPT-NeoX: ``layer_past``), so a hook that reads or replaces one must look in
both places, under the block's own name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from .interception import forward_replaced

_CACHE_NAMES = ("past_key_values", "layer_past", "past_key_value")


def hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class CacheArgument:
    """The name of a block's cache parameter and its index among the positional parameters (None: keyword only)."""

    name: str
    position: int | None


def cache_argument(layer: nn.Module) -> CacheArgument:
    """Where ``layer``'s forward takes its cache (the first known cache name of its signature)."""
    forward = layer.forward
    if forward_replaced(layer):  # a function of this instance alone: not worth keeping
        return _read_cache_argument(inspect.signature(forward))
    return _class_cache_argument(type(layer))


@cache
def _class_cache_argument(cls: type[nn.Module]) -> CacheArgument:
    """Read once per block class: every block of a model shares the signature."""
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    return _read_cache_argument(inspect.Signature(parameters))


def _read_cache_argument(signature: inspect.Signature) -> CacheArgument:
    parameters = signature.parameters
    name = next((n for n in _CACHE_NAMES if n in parameters), _CACHE_NAMES[0])
    positional = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return CacheArgument(name, positional.index(name) if name in positional else None)


def find_cache(args: tuple, kwargs: dict[str, Any], argument: CacheArgument) -> Any:
    if argument.name in kwargs:
        return kwargs[argument.name]
    if argument.position is not None and len(args) > argument.position:
        return args[argument.position]
    return None


def with_cache(args: tuple, kwargs: dict[str, Any], argument: CacheArgument, cache: Any) -> tuple[tuple, dict]:
    """The same call with ``cache`` in place of the one it was given (see ``find_cache``)."""
    if argument.name in kwargs:
        return args, {**kwargs, argument.name: cache}
    position = argument.position
    return (*args[:position], cache, *args[position + 1 :]), kwargs


def replace_output(output: Any, states: torch.Tensor) -> Any:
    """A block's output with its hidden states replaced (transformers 5 returns a tensor, older a tuple)."""
    if isinstance(output, tuple):
        return (states, *output[1:])
    return states
