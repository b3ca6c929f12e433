"""`tuco-peft eval`: lm-evaluation-harness tasks on the FTC_α-steered tiny checkpoints, and every bad input."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli_fixtures import fails, save_run
from helpers.lm_eval_tasks import write_tasks

from tuco_peft.cli import main
from tuco_peft.demo import DemoRecipe, ensure_demo_checkpoints
from tuco_peft.io.checkpoints import _PROXY_VARIABLES

EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "lm_eval_tasks"


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


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory):
    """The demo pair as `tuco-peft demo` builds it, at 1% of its training steps (seconds)."""
    return ensure_demo_checkpoints(tmp_path_factory.mktemp("demo"), DemoRecipe().scaled(0.01))


@pytest.fixture(scope="module")
def lm_eval_index():
    """lm-eval's index of its own ~14,000 task files, which takes seconds to build with or without network."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture
def no_cached_data_sets(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


@pytest.mark.slow
def test_eval_writes_lm_evals_results_for_each_alpha_and_the_cv_gain(checkpoints, task_dir, tmp_path, capsys, caplog):
    out = tmp_path / "results.json"
    argv = _eval_argv(checkpoints, out, "--include-path", str(task_dir), "--cv", "2", "--batch-size", "4")
    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    warnings = [record.getMessage() for record in caplog.records if record.name.startswith("lm_eval")]
    assert any("aggregation is not" in warning for warning in warnings)  # the tiny tasks leave it to lm-eval
    assert len(warnings) == len(set(warnings)), warnings  # each once, not once per α
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


@pytest.mark.slow
def test_eval_over_a_run_folder_gives_each_checkpoint_the_results_it_has_alone(
    checkpoints, task_dir, tmp_path, monkeypatch
):
    """Each adapter evaluated as the only one active, on one load of the base, equals its own eval run; the
    model lm-eval is given computes what that adapter alone computes (its logits, recorded on the way in)."""
    run = save_run(checkpoints.base, tmp_path / "run", {10: 2.0, 20: 1.5})
    evaluation = importlib.import_module("tuco_peft.integrations.evaluation")
    evaluate_alphas, logits = evaluation.evaluate_alphas, []

    def recording(model, *args, **kwargs):
        with torch.no_grad():
            logits.append(model(input_ids=torch.tensor([[1, 5, 9, 14]])).logits[0, -1])
        return evaluate_alphas(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_alphas", recording)

    def argv(adapter, out):
        model = ["--base", str(checkpoints.base), "--adapter", str(adapter)]
        tasks = ["--tasks", "tiny_mc,tiny_gen", "--include-path", str(task_dir), "--alphas", "0,1.5"]
        return ["eval", *model, *tasks, "--batch-size", "4", "--out", str(out)]

    out = tmp_path / "results.json"
    assert main(argv(run, out)) == 0
    report = json.loads(out.read_text())
    assert list(report["adapters"]) == ["run/checkpoint-10", "run/checkpoint-20"]
    for step in (10, 20):
        own = report["adapters"][f"run/checkpoint-{step}"]
        assert own["step"] == step and own["train_loss"] == {10: 2.0, 20: 1.5}[step]
        alone = tmp_path / f"alone-{step}.json"
        assert main(argv(run / f"checkpoint-{step}", alone)) == 0
        expected = json.loads(alone.read_text())["alphas"]
        for alpha, output in own["alphas"].items():
            assert output["results"] == expected[alpha]["results"], (step, alpha)
    in_series, alone_10, alone_20 = logits[:2], logits[2], logits[3]
    torch.testing.assert_close(in_series[0], alone_10)
    torch.testing.assert_close(in_series[1], alone_20)
    assert not torch.allclose(alone_10, alone_20, atol=1e-3)


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
    monkeypatch.delitem(sys.modules, "tuco_peft.integrations.evaluation", raising=False)
    fails(_eval_argv(checkpoints, tmp_path / "results.json"), capsys, "pip install 'tuco-peft[eval]'", status=2)


@pytest.mark.slow
def test_the_example_task_runs_offline_on_the_demo_pair_without_git_noise(
    demo_pair, tmp_path, monkeypatch, capfd, no_cached_data_sets
):
    """examples/lm_eval_tasks, as the README runs it, from a folder that is no git repository (where lm-eval's
    own git call would print "fatal: not a git repository" once per α)."""
    shutil.copytree(EXAMPLE_TASKS, tmp_path / "examples" / "lm_eval_tasks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, adapter = demo_pair
    model = ["--base", str(base), "--adapter", str(adapter)]
    tasks = ["--tasks", "demo_chat_replies", "--include-path", "examples/lm_eval_tasks", "--limit", "4"]
    assert main(["eval", *model, *tasks, "--alphas", "0,1", "--out", "results.json"]) == 0
    printed, err = capfd.readouterr()
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["alphas"]) == ["0.0", "1.0"]
    for alpha, output in report["alphas"].items():
        accuracy = output["results"]["demo_chat_replies"]["acc,none"]
        assert accuracy in {0, 0.25, 0.5, 0.75, 1}  # four items
        assert f"α = {float(alpha):g}: demo_chat_replies acc,none {accuracy:.4f}" in printed
    assert not [line for line in err.splitlines() if line.startswith("fatal:")], err


@pytest.mark.slow
@pytest.mark.parametrize("no_hub", ["offline mode", "no connection"])
def test_a_task_whose_data_set_is_not_cached_is_refused_at_once_without_the_hub(
    no_hub, checkpoints, lm_eval_index, tmp_path, monkeypatch, capsys, loading_forbidden, no_cached_data_sets
):
    """One line, before the model loads, in well under the ~20 s that datasets retries an unreachable Hub."""
    import datasets.config
    import huggingface_hub.constants

    from tuco_peft.integrations import evaluation

    monkeypatch.setattr(evaluation, "TaskManager", lambda include_path=None: lm_eval_index)  # built once, above
    if no_hub == "no connection":
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *_PROXY_VARIABLES):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(evaluation, "hub_connection_failure", lambda: "Name or service not known")
    argv = _eval_argv(checkpoints, tmp_path / "results.json", "--tasks", "arc_easy")
    start = time.perf_counter()
    line = fails(argv, capsys, "'arc_easy'", "must be cached or given locally", "--include-path", status=2)
    assert time.perf_counter() - start < 2.0
    assert ("cannot be reached (Name or service not known)" if no_hub == "no connection" else "offline mode") in line
    assert not (tmp_path / "results.json").exists()
