"""Data-parallel `tuco-peft analyze`: two CPU ranks (torchrun, gloo) write the JSONL one process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli_fixtures import read_rows

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
