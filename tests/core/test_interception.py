"""tuco_peft.model.interception: every interception is undone on exit, also after an exception."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tuco_peft.model.interception import (
    CacheView,
    SlotView,
    any_forward_replaced,
    forward_replaced,
    hooked,
    replaced_forward,
)


class _Boom(Exception):
    pass


def test_hooks_run_in_order_and_are_removed_after_an_exception():
    layer = nn.Linear(3, 3)
    seen = []
    layer.register_forward_hook(lambda module, args, output: seen.append("own"))
    with pytest.raises(_Boom), hooked(
        layer, before=lambda module, args: seen.append("before"), after=lambda module, args, out: seen.append("ours")
    ):
        layer(torch.ones(1, 3))
        with hooked(layer, after=lambda module, args, out: seen.append("first"), first=True):
            layer(torch.ones(1, 3))
        raise _Boom
    assert seen == ["before", "own", "ours", "before", "first", "own", "ours"]
    assert len(layer._forward_hooks) == 1 and not layer._forward_pre_hooks


def test_a_replaced_forward_is_restored_and_never_stacked():
    block = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(_Boom), replaced_forward(block[0], lambda x: x * 0):
        assert forward_replaced(block[0]) and any_forward_replaced(block)
        assert torch.equal(block(torch.ones(1, 3)), torch.zeros(1, 3))
        with pytest.raises(RuntimeError, match="already replaced"), replaced_forward(block[0], lambda x: x):
            pass
        raise _Boom
    assert not any_forward_replaced(block)
    assert "forward" not in block[0].__dict__


def test_a_cache_view_redirects_updates_and_passes_the_rest_through():
    class Cache:
        def __init__(self):
            self.writes = []

        def update(self, key, value, layer_idx):
            self.writes.append(layer_idx)
            return key, value

        def get_seq_length(self):
            return 7

    cache = Cache()
    view = CacheView(cache, lambda key, value, layer_idx: cache.update(key, value, layer_idx + 10))
    view.update(1, 2, 3)
    assert cache.writes == [13] and view.get_seq_length() == 7


def test_a_slot_view_sends_every_call_that_names_a_layer_to_its_slot():
    """Positional or keyword, keys/values or recurrent states: a named layer becomes the slot, and so does a layer
    taken from ``layers`` by index (hybrid blocks before transformers 5.25 read them there); a call that names
    none (a default layer, ``None`` for "the last recurrent layer"), other attributes, and the list's length,
    iteration and slices pass through."""

    class Cache:
        def __init__(self):
            self.layers = list("abcdefghij")
            self.calls = []

        def update(self, key, value, layer_idx, *args, **kwargs):
            self.calls.append(("update", layer_idx, args, kwargs))
            return key, value

        def update_recurrent_state(self, state, layer_idx, state_idx=0):
            self.calls.append(("recurrent", layer_idx, state_idx))
            return state

        def get_seq_length(self, layer_idx=0):
            return layer_idx

        def has_previous_state(self, layer_idx=None):
            return layer_idx

    cache = Cache()
    view = SlotView(cache, 9)
    assert view.update(1, 2, 3, "extra", kwargs={}) == (1, 2)
    view.update_recurrent_state("s", layer_idx=3, state_idx=1)
    view.update_recurrent_state("s", 2)
    assert cache.calls == [("update", 9, ("extra",), {"kwargs": {}}), ("recurrent", 9, 1), ("recurrent", 9, 0)]
    assert view.get_seq_length(3) == 9 and view.get_seq_length() == 0
    assert view.has_previous_state(None) is None and view.has_previous_state(layer_idx=1) == 9
    assert view.layers[3] == view.layers[0] == "j"
    assert len(view.layers) == 10 and list(view.layers) == cache.layers and view.layers[:2] == ["a", "b"]
