"""Every way tuco-peft steps into a model's forward, in one place.

The rules every site follows:

- **Undone on exit.** Each interception is a context manager that undoes itself when its block ends, also
  when the block raises; several are entered on one ``ExitStack`` and undone in reverse order. The model is
  left exactly as it was found.
- **Hook order.** Our hooks go after the model's own (transformers' output recorders, users') unless an
  interception changes a block's output: then it is prepended (``first=True``) so that every other hook
  sees the changed output, as it would see the output of a model that computes it natively.
- **Instance forwards.** A forward is replaced only on the instance (``module.forward = …``), never on the
  class, and removed again by deleting the instance attribute. A forward that something else replaced on
  an instance (accelerate's device hooks, another library's patch) is detected by ``forward_replaced`` and
  never stacked on: such a module takes a path that calls it as it is.
- **Caches.** A block that must keep its cache somewhere other than its own layer gets a view of the model's
  cache: ``SlotView`` sends every call that names a layer to another slot (keys/values, and a hybrid
  decoder's convolution and recurrent states); ``CacheView`` redirects ``update`` alone, as a function
  chooses. Everything else passes through.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import nn

PreHook = Callable[[nn.Module, tuple, dict[str, Any]], Any]
PostHook = Callable[..., Any]


@contextmanager
def hooked(
    module: nn.Module,
    *,
    before: PreHook | None = None,
    after: PostHook | None = None,
    with_kwargs: bool = False,
    first: bool = False,
) -> Iterator[None]:
    """``before`` / ``after`` as forward pre-hook / hook of ``module`` for the block (``with_kwargs``: they also
    receive the keyword arguments; ``first``: ahead of the hooks already there)."""
    handles = []
    try:
        if before is not None:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=with_kwargs, prepend=first))
        if after is not None:
            handles.append(module.register_forward_hook(after, with_kwargs=with_kwargs, prepend=first))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_replaced(module: nn.Module) -> bool:
    """Whether something replaced ``module``'s forward on the instance (a call through the class would skip it)."""
    return "forward" in module.__dict__


def submodules(root: nn.Module) -> list[nn.Module]:
    """Every module below ``root`` (not ``root`` itself), in a fixed order. Without their names, which
    ``nn.Module.modules`` builds and drops: several times faster, and asked of the model and its blocks on
    every call."""
    found: list[nn.Module | None] = list(root._modules.values())
    for module in found:  # breadth first: the list grows while it is read
        if module is not None:  # a module registered as None (an absent submodule) has no children
            found += module._modules.values()
    return [module for module in found if module is not None]


def any_forward_replaced(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it has an instance forward."""
    return forward_replaced(module) or any(forward_replaced(m) for m in submodules(module))


def module_hooked(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook observes ``module``."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> AbstractContextManager[None]:
    """``module.forward`` is ``forward`` for the block. Refused where another instance forward is already in
    place: replacing it would silently drop what it does."""
    return replaced_forwards([(module, forward)])


@contextmanager
def class_forwards(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The modules run their class's forward for a while, where something replaced it on the instance."""
    replaced = [(module, module.__dict__.pop("forward")) for module in modules if forward_replaced(module)]
    try:
        yield
    finally:
        for module, forward in replaced:
            module.__dict__["forward"] = forward


@contextmanager
def replaced_forwards(replacements: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """``replaced_forward`` of many modules at once, in one frame (a switch entered once per block and call);
    all undone if any is refused."""
    done: list[nn.Module] = []
    try:
        for module, forward in replacements:
            if forward_replaced(module):
                raise RuntimeError(f"{type(module).__name__}.forward is already replaced on this instance.")
            module.__dict__["forward"] = forward  # what ``module.forward = forward`` stores, without its checks
            done.append(module)
        yield
    finally:
        for module in done:
            module.__dict__.pop("forward", None)


class CacheView:
    """A transformers cache as one block sees it: ``update`` goes where ``write`` sends it, the rest passes
    through to the cache (sequence lengths, masks, reordering)."""

    def __init__(self, cache: Any, write: Callable[..., tuple[Any, Any]]):
        self._cache = cache
        self._write = write

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any):
        return self._write(key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class SlotView:
    """A transformers cache as a block whose state lives in another layer slot sees it.

    Every call that names a layer by ``layer_idx`` (``update``; a hybrid decoder's ``get_conv_state``,
    ``update_recurrent_state``, ``increase_count``, ``is_recording_past``, …) addresses ``slot`` instead,
    whatever index the block passes, and so does a layer read from ``cache.layers`` by index (hybrid blocks
    before transformers 5.25 read their convolution and recurrent states there). Calls that name none
    (lengths and masks at their default layer, reordering) pass through.
    """

    def __init__(self, cache: Any, slot: int):
        self._cache = cache
        self._cache_class: type = type(cache)
        self._slot = slot

    @property
    def layers(self) -> _SlotLayers:
        return _SlotLayers(self._cache.layers, self._slot)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cache, name)
        position = _layer_index_position(self._cache_class, name)
        if position is None:
            return value
        slot = self._slot

        def at_slot(*args: Any, **kwargs: Any) -> Any:
            if len(args) > position:
                if isinstance(args[position], int):
                    args = (*args[:position], slot, *args[position + 1 :])
            elif isinstance(kwargs.get("layer_idx"), int):
                kwargs["layer_idx"] = slot
            return value(*args, **kwargs)

        self.__dict__[name] = at_slot  # found without ``__getattr__`` from now on
        return at_slot


class _SlotLayers(Sequence[Any]):
    """A cache's list of layers as a block whose state lives in ``slot`` sees it: whichever layer it takes by
    index is the slot's; its length and a slice are the list's own."""

    def __init__(self, layers: list[Any], slot: int):
        self._layers = layers
        self._slot = slot

    def __getitem__(self, index: Any) -> Any:
        return self._layers[self._slot] if isinstance(index, int) else self._layers[index]

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._layers)


@functools.cache
def _layer_index_position(cache_class: type, name: str) -> int | None:
    """Where a cache method's ``layer_idx`` argument comes among the positional arguments of a call (``sys.maxsize``
    where it is keyword-only), or None for an attribute that is no method taking ``layer_idx``."""
    method = inspect.getattr_static(cache_class, name, None)
    if not inspect.isfunction(method):
        return None
    parameters = list(inspect.signature(method).parameters.values())[1:]  # without ``self``
    names = [parameter.name for parameter in parameters]
    if "layer_idx" not in names:
        return None
    position = names.index("layer_idx")
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return position if parameters[position].kind in positional else sys.maxsize
