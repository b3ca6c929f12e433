"""benchmarks/bench_checkpoints.py --quick: every step of the checkpoints benchmark (issue 20) on a tiny run
folder, so that the script a quiet machine is needed for does not break unnoticed in between.

The script's own process is this one (its imports are the tests'); each measurement is a fresh CLI process,
about 6 s each on two idle cores, four of them in --quick.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_checkpoints_benchmark_times_every_run_and_writes_positive_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from bench_checkpoints import main

    out = tmp_path / "checkpoints.json"
    with torch.random.fork_rng(devices=[]):  # the script seeds the models it builds
        code = main(["--quick", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-4000:]
    assert "one run / yardstick" in printed.out

    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["quick"] is True
    (result,) = report["results"]
    assert result["model"] == "demo" and result["parameters"] > 0
    n, prompts = result["checkpoints"], result["prompts"]
    assert n >= 2 and 16 <= result["prompt_tokens"]["min"] <= result["prompt_tokens"]["max"] <= 130

    seconds = result["seconds"]
    assert set(seconds) == {"one_run", "separate_runs", "separate_run", "load", "compute_per_checkpoint", "yardstick"}
    assert all(seconds[key] > 0 for key in ("one_run", "separate_runs", "separate_run", "load", "yardstick"))
    assert seconds["compute_per_checkpoint"] >= 0  # below a process start's noise on 4 tiny prompts, clamped at 0
    assert seconds["yardstick"] == pytest.approx(seconds["load"] + n * seconds["compute_per_checkpoint"])

    memory = result["memory_mib"]
    positive = ("one_run_peak", "one_prompt_peak", "separate_run_peak", "base_weights", "adapter_each", "expected")
    assert all(memory[key] > 0 for key in positive) and memory["activations"] >= 0
    assert memory["weights_and_activations"] > memory["base_weights"]
    assert memory["adapters_all"] == pytest.approx(n * memory["adapter_each"])

    ratios = result["ratios"]
    assert all(ratios[key] > 0 for key in ("one_run_to_yardstick", "separate_to_one_run", "peak_rss_to_expected"))
    # Above the runtime, the demo model's ~2 MiB are within a process' RSS noise: a number, of either sign.
    assert isinstance(ratios.pop("above_runtime_to_weights_and_activations"), float) and len(ratios) == 3
    assert isinstance(result["target"]["met"], bool) and result["target"]["one_run_to_yardstick_max"] == 1.15

    (round_,) = result["rounds"]  # --quick: one round, each of its runs a process with its own peak
    assert round_["one_run"]["rows"] == n * prompts  # the multi-adapter run: a row per checkpoint and prompt
    assert round_["one_prompt"]["rows"] == 1
    assert [process["rows"] for process in round_["separate"]] == [prompts] * n
