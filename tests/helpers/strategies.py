"""Force the strategy decompose takes for every block (``core.decompose``), and record the ones taken."""

import importlib

from tuco_peft.core.pretrained_path import SharedProjectionBlock, SharedReadBlock
from tuco_peft.model.parts import model_parts

decompose_module = importlib.import_module("tuco_peft.core.decompose")
PAIRED = "paired"
STRATEGIES = {"shared reads": SharedReadBlock, "separate reads": SharedProjectionBlock, PAIRED: PAIRED}


def force(monkeypatch, strategy: str) -> None:
    """Whatever the batch and the model's width."""
    paired = strategy == PAIRED
    monkeypatch.setattr(decompose_module, "PAIRED_MAX_TOKENS", 10**9 if paired else 0)
    monkeypatch.setattr(decompose_module, "SHARED_READS_MAX_TOKENS", 10**9 if strategy == "shared reads" else 0)
    monkeypatch.setattr(decompose_module, "SHARED_READS_MIN_WIDTH", 10**9 if paired else 0)


def record_strategies(monkeypatch) -> list:
    """The strategy each block of each later call takes: its pre-trained path's class, or ``PAIRED``."""
    chosen = []
    probe = decompose_module._probe

    def spy(*args, **kwargs):
        made = probe(*args, **kwargs)
        chosen.append(PAIRED if isinstance(made, decompose_module._PairedProbe) else type(made.path))
        return made

    monkeypatch.setattr(decompose_module, "_probe", spy)
    return chosen


def pretrained_paths(model) -> list:
    """The pre-trained path of each block of ``model``, as its last calls left them."""
    derived = model_parts(model)._derived
    return [path for key, path in derived.items() if isinstance(key, tuple) and key[0] == "pretrained path"]
