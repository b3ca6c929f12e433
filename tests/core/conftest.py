"""Fixtures of the core tests."""

from collections import Counter

import pytest


@pytest.fixture
def peft_forward_calls(monkeypatch) -> Counter:
    """How often PEFT's forward of a LoRA linear ran during the test, by ``id`` of the layer."""
    # Imported here: peft imports Triton, which must not load before the root conftest sets its interpreter.
    from peft.tuners.lora import Linear as LoraLinear

    calls: Counter = Counter()
    forward = LoraLinear.forward

    def counted(self, *args, **kwargs):
        calls[id(self)] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", counted)
    return calls
