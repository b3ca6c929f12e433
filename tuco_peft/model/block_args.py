"""The arguments a decoder block is called with, as hooks see them: its hidden states and its cache.

Decoders pass the cache by keyword or positionally (GPT-2), under names that change between releases:
``past_key_values``, GPT-NeoX's ``layer_past``, and ``cache`` from transformers 5.24 on (whose decorator still
maps the old name onto the new one). A hook sees the call as the caller wrote it, before any such mapping,
so the cache is found by its type wherever it is passed and whatever it is called. A cache that is not a
transformers ``Cache`` is refused by name: it could not be followed, and steering must never decode with
keys it cannot place.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from ..errors import UnsupportedModelError

# Where a block call holds its cache: a keyword, or an index among the positional arguments.
CacheSite = str | int

# Names decoders have given their cache parameter, for refusing a cache of another type by name.
_CACHE_NAMES = ("cache", "past_key_values", "layer_past", "past_key_value")


def hidden_states(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def find_cache(args: tuple, kwargs: dict[str, Any]) -> tuple[CacheSite, Cache] | None:
    """The transformers cache a block is called with, and where the call holds it (None: called without one)."""
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            return name, value
    for index, value in enumerate(args):
        if isinstance(value, Cache):
            return index, value
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"the decoder passes its blocks a {type(kwargs[name]).__name__} as {name!r}, which is not a "
                "transformers Cache, so FTC_α steering cannot keep the pre-trained blocks' keys/values beside it. "
                "Use the default DynamicCache (or StaticCache)."
            )
    return None


def with_cache(args: tuple, kwargs: dict[str, Any], site: CacheSite, cache: Any) -> tuple[tuple, dict[str, Any]]:
    """The same call with ``cache`` at ``site`` (see ``find_cache``) in place of the one it was given."""
    if isinstance(site, str):
        return args, {**kwargs, site: cache}
    return (*args[:site], cache, *args[site + 1 :]), kwargs


def replace_output(output: Any, states: torch.Tensor) -> Any:
    """A block's output with its hidden states replaced (transformers 5 returns a tensor, older a tuple)."""
    if isinstance(output, tuple):
        return (states, *output[1:])
    return states
