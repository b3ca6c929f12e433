"""`tuco-peft eval`: lm-evaluation-harness tasks on the FTC_α-steered tiny checkpoints, and every bad input."""

from __future__ import annotations

import json
import sys

import pytest
from helpers.cli_fixtures import fails
from helpers.lm_eval_tasks import write_tasks

from tuco_peft.cli import main


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="the [eval] extra (lm-eval) is not installed")
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(autouse=True)
def offline_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _eval_argv(checkpoints, out, *extra: str) -> list[str]:
    model = ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
    return ["eval", *model, "--tasks", "tiny_mc,tiny_gen", "--alphas", "0,1,1.5", "--out", str(out), *extra]


@pytest.mark.slow
def test_eval_writes_lm_evals_results_for_each_alpha_and_the_cv_gain(checkpoints, task_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = _eval_argv(checkpoints, out, "--include-path", str(task_dir), "--cv", "2", "--batch-size", "4")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["alphas"]) == ["0.0", "1.0", "1.5"]
    for alpha, output in report["alphas"].items():
        results = output["results"]
        assert set(results) == {"tiny_mc", "tiny_gen"} and "samples" not in output
        line = next(line for line in printed.splitlines() if line.startswith(f"α = {float(alpha):g}:"))
        assert f"tiny_mc acc,none {results['tiny_mc']['acc,none']:.4f}" in line
        assert f"tiny_gen exact_match,none {results['tiny_gen']['exact_match,none']:.4f}" in line
    cv = report["cross_validation"]
    assert cv["tiny_mc"]["metric"] == "acc,none" and len(cv["tiny_mc"]["fold_alphas"]) == 2
    assert cv["tiny_mc"]["baseline_score"] == report["alphas"]["1.0"]["results"]["tiny_mc"]["acc,none"]
    assert f"CV gain {cv['tiny_mc']['cv_gain']:+.4f}" in printed
    assert f"results: {out}" in printed


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--alphas", "1,-0.5"], ["--alphas", "finite number ≥ 0", "-0.5"]),
        (["--alphas", "1,nan"], ["--alphas", "finite number ≥ 0"]),
        (["--alphas", "1,inf"], ["--alphas", "finite number ≥ 0"]),
        (["--alphas", "1,high"], ["'high' is not a number"]),
        (["--tasks", "tiny_mc,"], ["--tasks", "empty entry"]),
        (["--limit", "1.5"], ["--limit"]),
        (["--cv", "1"], ["--cv must be at least 2"]),
        (["--cv-metric", "acc"], ["--cv-metric goes with --cv"]),
        (["--include-path", "/no/such/folder"], ["--include-path", "is not a folder"]),
    ],
)
def test_bad_flags_are_one_line_before_the_model_loads(
    checkpoints, tmp_path, capsys, loading_forbidden, extra, fragments
):
    fails([*_eval_argv(checkpoints, tmp_path / "results.json"), *extra], capsys, *fragments, status=2)


def test_an_out_file_that_cannot_be_written_is_refused_before_loading(checkpoints, tmp_path, capsys, loading_forbidden):
    fails(_eval_argv(checkpoints, tmp_path / "missing" / "r.json"), capsys, "--out", "does not exist", status=2)
    fails(_eval_argv(checkpoints, tmp_path), capsys, "--out", "is a folder", status=2)


@pytest.mark.slow
def test_unknown_tasks_and_a_cv_without_alpha_one_are_refused_before_loading(
    checkpoints, task_dir, tmp_path, capsys, loading_forbidden
):
    argv = _eval_argv(checkpoints, tmp_path / "results.json", "--include-path", str(task_dir))
    fails([*argv, "--tasks", "tiny_mc,no_such_task_xyz"], capsys, "unknown lm-eval task 'no_such_task_xyz'", status=2)
    fails([*argv, "--alphas", "0.5,1.5", "--cv", "2"], capsys, "1.0", status=2)
    fails([*argv, "--alphas", "1,1.0"], capsys, "repeat", status=2)


def test_a_missing_lm_eval_names_the_extra(checkpoints, tmp_path, capsys, monkeypatch, loading_forbidden):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "tuco_peft.evaluation", raising=False)
    fails(_eval_argv(checkpoints, tmp_path / "results.json"), capsys, "pip install 'tuco-peft[eval]'", status=2)
