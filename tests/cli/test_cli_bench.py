"""`tuco-peft bench` and the measurement under it: a short prompt and a large batch side by side, each labelled
with its regime; warm-up, rotating order and several calls per sample, so that the medians are honest."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import pytest
import torch
from helpers.cli_fixtures import CONTEXT, fails, write_lines

from tuco_peft.apps.benchmark import (
    COMPUTE_BOUND,
    OVERHEAD_BOUND,
    _glibc,
    _measure,
    compare_workloads,
    token_windows,
)
from tuco_peft.cli import main

PROMPTS = ["the quick brown fox", "how can I help you today?", "a small model reads", "the lazy dog"]
METHODS = {
    "plain_forward",
    "decoder_forward",
    "decompose_last",
    "decompose_all",
    "disable_adapter_two_pass",
    "two_model_two_pass",
}


def _model_args(checkpoints):
    return ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]


def test_token_windows_are_exactly_the_shape_asked_unpadded_and_reuse_short_streams():
    input_ids, attention_mask = token_windows([1, 2, 3, 4, 5], batch_size=3, n_tokens=4)
    assert input_ids.tolist() == [[1, 2, 3, 4], [5, 1, 2, 3], [4, 5, 1, 2]]
    assert attention_mask.tolist() == [[1] * 4] * 3
    with pytest.raises(ValueError, match="no tokens"):
        token_windows([], batch_size=1, n_tokens=4)


def _plain_forward_taking(seconds_for):
    """A fake ``measure`` whose plain forward takes ``seconds_for(tokens)``."""
    return lambda input_ids, attention_mask: {
        "methods": {"plain_forward": {"median_s": seconds_for(input_ids.numel())}}
    }


def _workloads(*shapes):
    return {f"{batch}x{tokens}": token_windows(range(1, 50), batch, tokens) for batch, tokens in shapes}


def test_compare_workloads_fits_the_cost_per_call_and_per_token_and_labels_each_regime():
    report = compare_workloads(
        _plain_forward_taking(lambda tokens: 2e-3 + 1e-6 * tokens), _workloads((1, 16), (32, 256))
    )
    assert report["plain_forward_per_call_s"] == pytest.approx(2e-3)
    assert report["plain_forward_per_token_s"] == pytest.approx(1e-6)
    small, large = report["workloads"]["1x16"], report["workloads"]["32x256"]
    assert (small["regime"], large["regime"]) == (OVERHEAD_BOUND, COMPUTE_BOUND)
    assert small["per_call_share"] == pytest.approx(2e-3 / (2e-3 + 16e-6))
    assert large["tokens"] == 32 * 256 and large["per_call_share"] == pytest.approx(2e-3 / (2e-3 + 8192e-6))

    # Noise can put the fitted fixed cost below 0: it is kept at 0, and every workload is compute-bound.
    noisy = compare_workloads(_plain_forward_taking(lambda tokens: 2e-5 * tokens - 2e-4), _workloads((1, 16), (4, 256)))
    assert noisy["plain_forward_per_call_s"] == 0.0
    assert {w["regime"] for w in noisy["workloads"].values()} == {COMPUTE_BOUND}

    with pytest.raises(ValueError, match="at least two sizes"):
        compare_workloads(_plain_forward_taking(lambda tokens: 1e-3), _workloads((2, 8), (1, 16)))


def _recording(log, name, seconds):
    def method():
        log.append(name)
        time.sleep(seconds)
        return torch.zeros(2)

    return method


def test_measure_warms_up_then_times_every_method_in_a_rotating_order():
    log = []
    names = ["plain_forward", "decoder_forward", "decompose_last"]
    # Each call is longer than a sample needs, so that every sample is one call and the log shows the order.
    methods = {name: _recording(log, name, 0.021) for name in names}
    report = _measure(methods, dict.fromkeys(names, 0), torch.device("cpu"), repeats=3, warmup=2)
    plain, decoder, last = names
    expected = [
        [last],  # the call that checks the TuCo methods agree
        [plain, decoder, last],  # the first warm-up round
        [plain, decoder, last],  # the second, which sets how many calls a sample averages
        [plain, decoder, last],  # the timed rounds, each starting one method further
        [decoder, last, plain],
        [last, plain, decoder],
        [plain, decoder, last],  # peak memory
    ]
    assert log == [name for calls in expected for name in calls]
    for name in names:
        figures = report["methods"][name]
        assert figures["calls_per_sample"] == 1 and len(figures["samples_s"]) == 3
        assert figures["q1_s"] <= figures["median_s"] <= figures["q3_s"] and figures["median_s"] >= 0.021
    assert report["methods"]["plain_forward"]["time_ratio"] == 1.0
    assert (report["repeats"], report["warmup"], report["max_tuco_disagreement"]) == (3, 2, 0.0)
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        _measure(methods, dict.fromkeys(names, 0), torch.device("cpu"), repeats=1, warmup=0)


def test_a_sample_of_a_fast_method_averages_several_calls():
    log = []
    methods = {"plain_forward": _recording(log, "plain_forward", 0.002), "decompose_last": _recording(log, "x", 0.021)}
    report = _measure(methods, dict.fromkeys(methods, 0), torch.device("cpu"), repeats=2, warmup=1)
    fast, slow = report["methods"]["plain_forward"], report["methods"]["decompose_last"]
    assert 2 <= fast["calls_per_sample"] <= 10 and slow["calls_per_sample"] == 1
    assert log.count("plain_forward") == 1 + fast["calls_per_sample"] * 2 + 1  # calibration, 2 samples, memory
    assert fast["median_s"] >= 0.002  # per call, not per sample


def test_bench_reports_a_small_and_a_large_workload_each_with_its_regime(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    report = tmp_path / "bench.json"
    argv = ["bench", *_model_args(checkpoints), "--prompts", str(prompts), "--batch-size", "2", "--tokens", "100"]
    assert main([*argv, "--repeats", "2", "--warmup", "1", "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert f"--tokens 100 is more than the model's context of {CONTEXT}" in captured.err
    figures = json.loads(report.read_text())
    small, large = figures["workloads"]["small"], figures["workloads"]["large"]
    assert (small["batch"], large["batch"]) == ([1, 16], [2, CONTEXT])  # cut to the model's context
    for workload in (small, large):
        assert workload["regime"] in (OVERHEAD_BOUND, COMPUTE_BOUND) and 0 <= workload["per_call_share"] <= 1
        assert set(workload["methods"]) == METHODS and workload["max_tuco_disagreement"] < 1e-4
        assert (workload["repeats"], workload["warmup"]) == (2, 1)
        assert all(len(method["samples_s"]) == 2 for method in workload["methods"].values())
    assert figures["plain_forward_per_call_s"] >= 0
    assert f"small workload, 1 prompt × 16 tokens: {small['regime']}" in captured.out
    assert f"large workload, 2 prompts × {CONTEXT} tokens: {large['regime']}" in captured.out


def test_bench_without_a_model_honours_prompts_and_cache_dir(checkpoints, tmp_path, capsys, monkeypatch):
    asked = []
    demo = importlib.import_module("tuco_peft.demo")
    monkeypatch.setattr(
        demo,
        "ensure_demo_checkpoints",
        lambda cache_dir=None: asked.append(cache_dir) or (checkpoints.base, checkpoints.adapter),
    )
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:3])
    report = tmp_path / "bench.json"
    argv = ["bench", "--prompts", str(prompts), "--cache-dir", str(tmp_path / "cache"), "--repeats", "1"]
    assert main([*argv, "--json", str(report)]) == 0
    assert asked == [str(tmp_path / "cache")]
    workloads = json.loads(report.read_text())["workloads"]
    assert workloads["large"]["batch"] == [32, CONTEXT]  # the default batch, at the model's context
    assert "--tokens" not in capsys.readouterr().err  # not given: its default is cut to the context silently
    fails(["bench", *_model_args(checkpoints), "--prompts", str(prompts), "--cache-dir", "x"], capsys, "--cache-dir")


@pytest.mark.usefixtures("loading_forbidden")
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--warmup", "0"], "--warmup must be at least 1, got 0: a method's first call pays one-off costs"),
        (["--tokens", "0"], "--tokens must be at least 1, got 0"),
        (["--batch-size", "1", "--tokens", "16"], "the large workload, 1 × 16 tokens, must be larger than the small"),
    ],
)
def test_bench_refuses_workloads_it_cannot_measure_before_loading(checkpoints, tmp_path, capsys, flags, message):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    fails(["bench", *_model_args(checkpoints), "--prompts", str(prompts), *flags], capsys, message, status=2)


def _workload_report(regime, spread):
    times = {"median_s": 1e-3, "q1_s": 1e-3 * (1 - spread), "q3_s": 1e-3 * (1 + spread)}
    figures = {**times, "time_ratio": 1.0, "time_ratio_q1": 1.0, "time_ratio_q3": 1.0}
    figures.update(peak_total_bytes=2**20, peak_total_ratio=1.0)
    return {
        "batch": [1, 16],
        "regime": regime,
        "per_call_share": 0.9,
        "max_tuco_disagreement": 0.0,
        "methods": {"plain_forward": figures},
    }


@pytest.mark.parametrize(
    "large_regime, spread, notes",
    [
        (COMPUTE_BOUND, 0.02, []),
        (COMPUTE_BOUND, 0.3, ["times varied by up to ±30% between rounds"]),
        (OVERHEAD_BOUND, 0.02, ["even the large workload is per-call-overhead-bound"]),
    ],
)
def test_the_report_warns_of_unsteady_times_and_of_a_large_workload_still_overhead_bound(
    large_regime, spread, notes, capsys
):
    bench = importlib.import_module("tuco_peft.cli.bench")
    workloads = {"small": _workload_report(OVERHEAD_BOUND, 0.02), "large": _workload_report(large_regime, spread)}
    report = {"plain_forward_per_call_s": 1e-3, "plain_forward_per_token_s": 1e-7, "workloads": workloads}
    bench._print_report(report)
    printed = [line.removeprefix("note: ") for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(printed) == len(notes) and all(line.startswith(note) for line, note in zip(printed, notes))


# A forward's pattern in small: blocks of several sizes up to 30 MB, allocated, touched and freed, cycle after
# cycle. Prints the pages faulted in by four cycles after three (the heap settles), and the pages they touched.
_REUSE = """
import resource, sys, torch
from tuco_peft.apps import benchmark
getattr(benchmark, sys.argv[1])()
sizes = [(n << 20) for n in (30, 1, 12, 3, 24, 6)]
def cycle():
    blocks = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes[:3]]
    blocks = [torch.empty(n, dtype=torch.uint8).fill_(1) for n in sizes[3:]]
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, 4 * sum(sizes) // resource.getpagesize())
"""


def _faults(setting: str) -> tuple[int, int]:
    """(pages faulted in, pages touched) by ``_REUSE`` under ``setting``, in a process of its own: glibc's
    settings last."""
    run = subprocess.run([sys.executable, "-c", _REUSE, setting], capture_output=True, text=True, check=True)
    faults, touched = map(int, run.stdout.split())
    return faults, touched


@pytest.mark.skipif(_glibc() is None, reason="the allocator settings are glibc's")
def test_timings_reuse_freed_memory_and_memory_measurements_return_it():
    """The timed calls do not fault their memory in again; the memory measurement, which must see resident memory
    track live tensors, has the calls fault it in (fewer faults where the kernel maps huge pages)."""
    kept, touched = _faults("keep_freed_memory")
    returned, _ = _faults("_return_freed_memory_to_the_os")
    assert kept < 0.1 * touched, (kept, touched)
    assert returned > 5 * max(kept, 0.01 * touched), (returned, kept, touched)
