"""Data-parallel `tuco-peft analyze`: two CPU ranks (torchrun, gloo) write the JSONL one process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli_fixtures import read_rows, save_run

from tuco_peft.apps.distributed import Ranks, part_file, parts_directory
from tuco_peft.cli import main
from tuco_peft.io.locking import lock_path, results_lock

PROMPTS = [
    "the quick brown fox",
    "how can I help you today?",
    "",  # empty: skipped with one warning, from rank 0
    "a small model reads",
    "tell me about the old mill by the water near the river bank",
    "the lazy dog",
    "a shorter answer",
]
SENTINEL = 0.123456  # a TuCo no computation here gives: a row that keeps it was not recomputed


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def _analyze_argv(checkpoints, prompts, out):
    return [
        "analyze",
        *("--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)),
        *("--prompts", str(prompts), "--out", str(out), "--batch-size", "2"),
    ]


@pytest.fixture(scope="module")
def one_process_rows(checkpoints, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "rows.jsonl"
    assert main(_analyze_argv(checkpoints, prompts, out)) == 0
    return read_rows(out)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch_two_ranks(argv: list[str]) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "tuco_peft.cli",
        *argv,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)


def _assert_same_rows(got: list[dict], expected: list[dict], keep_tuco: set[int] = frozenset()) -> None:
    assert [row["id"] for row in got] == [row["id"] for row in expected]
    for row, reference in zip(got, expected):
        assert row.keys() == reference.keys()
        assert (row["prompt"], row["n_tokens"]) == (reference["prompt"], reference["n_tokens"])
        if row["id"] in keep_tuco:
            assert row["tuco"] == SENTINEL
            continue
        assert row["tuco"] == pytest.approx(reference["tuco"], abs=1e-6)
        for field in ("ptc_l1", "ftc_l1", "cumulative_tuco"):
            assert row[field] == pytest.approx(reference[field], abs=1e-6, rel=1e-6)


@pytest.mark.slow  # processes of their own
def test_two_ranks_write_the_rows_of_one_process_in_prompt_order(checkpoints, prompts, one_process_rows, tmp_path):
    out = tmp_path / "rows.jsonl"
    run = _launch_two_ranks(_analyze_argv(checkpoints, prompts, out))
    assert run.returncode == 0, run.stderr
    assert [row["id"] for row in one_process_rows] == [1, 2, 4, 5, 6, 7]
    _assert_same_rows(read_rows(out), one_process_rows)
    assert not parts_directory(out).exists() and not lock_path(out).exists()
    assert "rank 0/2" in run.stderr and "rank 1/2" in run.stderr  # both ranks did their share
    assert run.stdout.count("prompts: 6") == 1  # one summary, from rank 0


def _interrupted_run(out: Path, rows: list[dict]) -> None:
    """What an interrupted two-rank run leaves: rank 0 wrote one row and was cut mid-row, rank 1 wrote one;
    the rows written carry the sentinel TuCo."""
    by_id = {row["id"]: {**row, "tuco": SENTINEL} for row in rows}
    parts_directory(out).mkdir(parents=True)
    rank0, rank1 = part_file(out, Ranks(0, 2)), part_file(out, Ranks(1, 2))
    rank0.write_text(json.dumps(by_id[1]) + "\n" + json.dumps(by_id[4])[:25])
    rank1.write_text(json.dumps(by_id[2]) + "\n")


@pytest.mark.slow  # processes of their own
def test_interrupted_distributed_run_resumes_under_two_ranks(checkpoints, prompts, one_process_rows, tmp_path):
    out = tmp_path / "rows.jsonl"
    _interrupted_run(out, one_process_rows)
    run = _launch_two_ranks(_analyze_argv(checkpoints, prompts, out))
    assert run.returncode == 0, run.stderr
    assert "resuming: 2 of 6 prompts are already in" in run.stderr  # the empty prompt is never counted
    assert run.stderr.count("prompt 3 (line 3) is empty; skipped") == 1
    _assert_same_rows(read_rows(out), one_process_rows, keep_tuco={1, 2})
    assert not parts_directory(out).exists()


@pytest.mark.slow  # processes of their own
def test_interrupted_distributed_run_resumes_in_one_process(checkpoints, prompts, one_process_rows, tmp_path):
    out = tmp_path / "rows.jsonl"
    _interrupted_run(out, one_process_rows)
    assert main(_analyze_argv(checkpoints, prompts, out)) == 0
    resumed = sorted(read_rows(out), key=lambda row: row["id"])  # one process appends in the order it computes
    _assert_same_rows(resumed, one_process_rows, keep_tuco={1, 2})
    assert not parts_directory(out).exists()


@pytest.mark.slow  # processes of their own
def test_an_error_stops_every_rank_with_one_line(checkpoints, prompts, tmp_path):
    out = tmp_path / "rows.jsonl"
    out.write_text("not a row\n")
    run = _launch_two_ranks(_analyze_argv(checkpoints, prompts, out))
    assert run.returncode != 0
    workers = run.stderr.split("torch/distributed/elastic", 1)[0]  # then the launcher's own failure report
    errors = [line for line in workers.splitlines() if line.startswith("tuco-peft: error: ")]
    assert any("rows.jsonl:1 is not a tuco-peft result row" in line for line in errors), run.stderr
    assert "Traceback" not in workers
    assert out.read_text() == "not a row\n" and not parts_directory(out).exists()


@pytest.mark.slow  # processes of their own
def test_ranks_hold_one_lock_and_a_held_lock_stops_every_rank(checkpoints, prompts, tmp_path):
    out = tmp_path / "rows.jsonl"
    with results_lock(out):  # another run writing --out
        run = _launch_two_ranks(_analyze_argv(checkpoints, prompts, out))
    assert run.returncode != 0
    workers = run.stderr.split("torch/distributed/elastic", 1)[0]
    assert f"being written by another tuco-peft run (pid {os.getpid()})" in workers, run.stderr
    assert "Traceback" not in workers
    assert not out.exists() and not parts_directory(out).exists() and not lock_path(out).exists()


def test_process_group_waits_long_for_slow_ranks(monkeypatch):
    """A rank that finished its share waits at the next step for the slowest: gloo's 30 minutes is too short."""
    import torch.distributed as dist

    from tuco_peft.apps.distributed import process_group

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with process_group(Ranks(rank=1, world_size=2)):
        pass
    assert calls[0]["rank"] == 1 and calls[0]["world_size"] == 2
    assert calls[0]["timeout"].total_seconds() >= 24 * 3600


# A data-parallel run over several adapters: a training run's checkpoint-N adapters on one base load per rank.
LOSSES = {10: 2.5, 20: 2.0, 30: 1.75}
STEPS = tuple(LOSSES)
ANALYSED = [1, 2, 4, 5, 6, 7]  # the ids of PROMPTS with tokens


@pytest.fixture(scope="module")
def training_run(checkpoints, tmp_path_factory):
    return save_run(checkpoints.base, tmp_path_factory.mktemp("lora") / "run", LOSSES)


def _series_argv(checkpoints, run, prompts, out):
    return [
        "analyze",
        *("--base", str(checkpoints.base), "--adapter", str(run)),
        *("--prompts", str(prompts), "--out", str(out), "--batch-size", "2"),
    ]


@pytest.fixture(scope="module")
def one_process_series_rows(checkpoints, training_run, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-series") / "rows.jsonl"
    assert main(_series_argv(checkpoints, training_run, prompts, out)) == 0
    return read_rows(out)


def _assert_same_series_rows(got: list[dict], expected: list[dict], keep_tuco: set[tuple[str, int]] = frozenset()):
    """The rows of ``expected`` in its order (adapter by adapter, each in prompt order), value for value; the rows
    of ``keep_tuco`` (adapter, id) keep the sentinel TuCo of a row that was not computed again."""
    assert [(row["adapter"], row["id"]) for row in got] == [(row["adapter"], row["id"]) for row in expected]
    for row, reference in zip(got, expected):
        assert row.keys() == reference.keys()
        for field in ("prompt", "n_tokens", "step", "train_loss", "settings", "fingerprint"):
            assert row[field] == reference[field], (row["adapter"], row["id"], field)
        fields = ("ptc_l1", "ftc_l1", "cumulative_tuco")
        if (row["adapter"], row["id"]) in keep_tuco:
            assert row["tuco"] == SENTINEL, (row["adapter"], row["id"])
        else:
            fields = ("tuco", *fields)
        for field in fields:
            assert row[field] == pytest.approx(reference[field], rel=1e-6, abs=1e-6), (row["adapter"], row["id"], field)


@pytest.mark.slow  # processes of their own
def test_two_ranks_over_a_run_folder_write_the_rows_of_one_process_and_resume(
    checkpoints, training_run, prompts, one_process_series_rows, tmp_path
):
    names = [f"run/checkpoint-{step}" for step in STEPS]
    order = [(name, prompt_id) for name in names for prompt_id in ANALYSED]
    assert [(row["adapter"], row["id"]) for row in one_process_series_rows] == order
    assert [(row["step"], row["train_loss"]) for row in one_process_series_rows] == [
        (step, LOSSES[step]) for step in STEPS for _ in ANALYSED
    ]
    out = tmp_path / "rows.jsonl"
    run = _launch_two_ranks(_series_argv(checkpoints, training_run, prompts, out))
    assert run.returncode == 0, run.stderr
    assert "rank 0/2" in run.stderr and "rank 1/2" in run.stderr  # both ranks did their share
    assert run.stderr.count("prompt 3 (line 3) is empty; skipped") == 1
    _assert_same_series_rows(read_rows(out), one_process_series_rows)
    assert not parts_directory(out).exists() and not lock_path(out).exists()

    # Cut: the first adapter whole, one row of the second, then half a row; rank 1 of an interrupted run left
    # one row of the third in its part. The rows that stay carry the sentinel: a rerun must not compute them.
    lines = out.read_text().splitlines(keepends=True)
    kept = [{**json.loads(line), "tuco": SENTINEL} for line in lines[: len(ANALYSED) + 1]]
    out.write_text("".join(json.dumps(row) + "\n" for row in kept) + lines[len(ANALYSED) + 1][:25])
    in_part = {**json.loads(lines[2 * len(ANALYSED) + 3]), "tuco": SENTINEL}  # (run/checkpoint-30, id 5)
    parts_directory(out).mkdir()
    part_file(out, Ranks(1, 2)).write_text(json.dumps(in_part) + "\n")
    rerun = _launch_two_ranks(_series_argv(checkpoints, training_run, prompts, out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: 6 of 6 prompts of adapter '{names[0]}'" in rerun.stderr
    assert f"resuming: 1 of 6 prompts of adapter '{names[1]}'" in rerun.stderr
    assert f"resuming: 1 of 6 prompts of adapter '{names[2]}'" in rerun.stderr
    stay = {(row["adapter"], row["id"]) for row in [*kept, in_part]}
    assert len(stay) == len(ANALYSED) + 2
    _assert_same_series_rows(read_rows(out), one_process_series_rows, keep_tuco=stay)
    assert not parts_directory(out).exists() and not lock_path(out).exists()
