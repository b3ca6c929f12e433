"""benchmarks/bench_callback.py --quick: every step of the callback benchmark (a real Trainer on the demo-shaped
LoRA model, two training steps, one probe and one plain forward), so that the script a quiet machine is needed
for does not break unnoticed in between. It runs in this process: a few seconds on two idle cores.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_callback_benchmark_times_the_probe_the_plain_forward_and_the_step(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from bench_callback import main

    out = tmp_path / "callback.json"
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the script and its Trainer seed the global RNG
            code = main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-4000:]
    assert "| probe / plain |" in printed.out

    report = json.loads(out.read_text())
    assert report["quick"] is True and report["prompts"] == [8] and report["every_n_steps"] == 50
    (result,) = report["results"]
    assert result["model"] == "demo" and result["parameters"] > 0 and result["prompts"] == 8
    assert 16 <= result["prompt_tokens"]["min"] <= result["prompt_tokens"]["max"] <= 64
    assert result["batches"] == 1  # 8 prompts, batch_size 8

    seconds = result["seconds"]
    assert set(seconds) == {"probe", "measure_call", "plain_forward", "train_step"}
    assert all(value > 0 for value in seconds.values())
    assert seconds["measure_call"] >= seconds["probe"]  # the call by the wall clock holds the probe's own timing
    assert {name: len(values) for name, values in result["samples"].items()} == {
        "probe": 1,
        "measure_call": 1,
        "plain_forward": 1,
        "train_step": 2,  # one step before the probe, one before the plain forward
    }

    ratios = result["ratios"]
    assert set(ratios) == {"probe_to_plain_forward", "probe_every_n_to_training"}
    assert ratios["probe_to_plain_forward"] == pytest.approx(seconds["probe"] / seconds["plain_forward"])
    assert ratios["probe_every_n_to_training"] == pytest.approx(seconds["probe"] / (50 * seconds["train_step"]))
