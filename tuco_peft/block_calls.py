"""The arguments a decoder block is called with, as hooks see them: its hidden states and its cache.

Decoders pass some of these by keyword and some positionally (GPT-2 passes the cache positionally), so a
hook that reads or replaces one must look in both places.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

CACHE_ARGUMENT = "past_key_values"


def hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def cache_position(layer: nn.Module) -> int | None:
    """Index of the cache parameter among the layer's positional parameters, if it has one."""
    names = [
        name
        for name, p in inspect.signature(layer.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return names.index(CACHE_ARGUMENT) if CACHE_ARGUMENT in names else None


def find_cache(args: tuple, kwargs: dict[str, Any], position: int | None) -> Any:
    if CACHE_ARGUMENT in kwargs:
        return kwargs[CACHE_ARGUMENT]
    if position is not None and len(args) > position:
        return args[position]
    return None


def with_cache(args: tuple, kwargs: dict[str, Any], position: int | None, cache: Any) -> tuple[tuple, dict]:
    """The same call with ``cache`` in place of the one it was given (see ``find_cache``)."""
    if CACHE_ARGUMENT in kwargs:
        return args, {**kwargs, CACHE_ARGUMENT: cache}
    return (*args[:position], cache, *args[position + 1 :]), kwargs


def replace_output(output: Any, states: torch.Tensor) -> Any:
    """A block's output with its hidden states replaced (transformers 5 returns a tensor, older a tuple)."""
    if isinstance(output, tuple):
        return (states, *output[1:])
    return states
