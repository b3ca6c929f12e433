"""`tuco-peft analyze` over several adapters on one base: a training run's checkpoints, or a shelf of adapters.

The oracle of every row is the single-adapter run of the same prompt on that adapter alone, itself checked
against the paper's two-model method in test_cli.py.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers.cli_fixtures import fails, read_rows, save_run, write_lines

from tuco_peft.cli import main

RUNNER = importlib.import_module("tuco_peft.apps.runner")
PROMPTS = [
    "the quick brown fox",
    "how can I help you today?",
    "tell me about the old mill by the water near the river bank",
    "the lazy dog",
]
LOSSES = {10: 2.5, 20: 2.0, 30: 1.75}
STEPS = tuple(LOSSES)
COMPARED = ("tuco", "ptc_l1", "ftc_l1", "cumulative_tuco")


@pytest.fixture(scope="module")
def run(checkpoints, tmp_path_factory):
    return save_run(checkpoints.base, tmp_path_factory.mktemp("lora") / "run", LOSSES)


def _analyze_argv(checkpoints, adapters, prompts, out):
    flags = [part for adapter in adapters for part in ("--adapter", str(adapter))]
    return ["analyze", "--base", str(checkpoints.base), *flags, "--prompts", str(prompts), "--out", str(out)]


def _alone(checkpoints, adapter, prompts, out):
    """The rows of one adapter, analysed by itself."""
    assert main(_analyze_argv(checkpoints, [adapter], prompts, out)) == 0
    return read_rows(out)


def _assert_rows_equal(rows, oracle):
    assert [row["id"] for row in rows] == [row["id"] for row in oracle]
    for row, expected in zip(rows, oracle):
        for name in COMPARED:
            assert row[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), (row["adapter"], row["id"], name)


def _check_against_single_runs(checkpoints, run, rows, tmp_path, prompts):
    by_adapter = {}
    for row in rows:
        by_adapter.setdefault(row["adapter"], []).append(row)
    assert list(by_adapter) == [f"run/checkpoint-{step}" for step in STEPS]
    for step in STEPS:
        own = by_adapter[f"run/checkpoint-{step}"]
        assert {(row["step"], row["train_loss"]) for row in own} == {(step, LOSSES[step])}
        alone = _alone(checkpoints, run / f"checkpoint-{step}", prompts, tmp_path / f"alone-{step}.jsonl")
        _assert_rows_equal(own, alone)
        assert own[0]["fingerprint"]["adapter"] == alone[0]["fingerprint"]["adapter"]


def test_each_row_of_a_run_folder_equals_its_checkpoint_analysed_alone(checkpoints, run, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    assert main([*_analyze_argv(checkpoints, [run], prompts, out), "--batch-size", "5"]) == 0
    printed = capsys.readouterr().out
    assert all(f"run/checkpoint-{step}" in printed for step in STEPS)
    rows = read_rows(out)
    assert len(rows) == len(STEPS) * len(PROMPTS)
    _check_against_single_runs(checkpoints, run, rows, tmp_path, prompts)


def test_full_batches_run_one_adapter_and_short_ones_are_mixed(checkpoints, run, tmp_path, monkeypatch):
    """Each adapter's full batches run with it alone active (the plain forward); the short ones left over are
    pooled across adapters into mixed batches, each row through its own adapter."""
    module = importlib.import_module("tuco_peft.core.decompose")
    decompose, seen = module.decompose, []

    def recording(model, ids, *args, adapter_names=None, **kwargs):
        seen.append((len(ids), adapter_names))
        return decompose(model, ids, *args, adapter_names=adapter_names, **kwargs)

    monkeypatch.setattr(module, "decompose", recording)
    one = write_lines(tmp_path / "one.txt", ["the lazy dog"])
    assert main(_analyze_argv(checkpoints, [run], one, tmp_path / "one.jsonl")) == 0
    assert seen == [(3, [f"tuco:run/checkpoint-{step}" for step in STEPS])]  # one forward for all three
    seen.clear()
    three = write_lines(tmp_path / "three.txt", ["the quick brown fox", "the lazy dog runs", "a small model"])
    assert main([*_analyze_argv(checkpoints, [run], three, tmp_path / "three.jsonl"), "--batch-size", "2"]) == 0
    alone = [rows for rows, names in seen if names is None]
    mixed = [names for _, names in seen if names is not None]
    # A full batch of each adapter; of the three prompts left, one per adapter, two share a mixed batch and
    # the third is the only row of its batch, with its adapter active.
    assert alone == [2, 2, 2, 1]
    assert len(mixed) == 1 and len(set(mixed[0])) == 2


def test_dora_adapters_run_one_after_another_with_the_same_rows(checkpoints, tmp_path):
    """PEFT cannot mix DoRA adapters in a batch: each runs alone on the base, with rows equal to its own run."""
    run = save_run(checkpoints.base, tmp_path / "dora" / "run", LOSSES, use_dora=True)
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    assert main(_analyze_argv(checkpoints, [run], prompts, out)) == 0
    _check_against_single_runs(checkpoints, run, read_rows(out), tmp_path, prompts)


def test_an_adapter_added_later_runs_only_its_own_rows(checkpoints, run, tmp_path, monkeypatch, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    first_two = [run / f"checkpoint-{step}" for step in STEPS[:2]]
    assert main(_analyze_argv(checkpoints, first_two, prompts, out)) == 0
    before = read_rows(out)
    computed = []
    real_run = RUNNER.Runner.run

    def counting(self, prompts, write, *args, adapters=None, **kwargs):
        computed.extend(adapter.name for adapter in adapters)
        return real_run(self, prompts, write, *args, adapters=adapters, **kwargs)

    monkeypatch.setattr(RUNNER.Runner, "run", counting)
    capsys.readouterr()
    assert main(_analyze_argv(checkpoints, [run], prompts, out)) == 0
    assert computed == [f"run/checkpoint-{STEPS[2]}"] * len(PROMPTS)
    assert "resuming: 4 of 4 prompts of adapter 'run/checkpoint-10'" in capsys.readouterr().err
    after = read_rows(out)
    assert after[: len(before)] == before  # the file's order: adapter by adapter
    assert [row["adapter"] for row in after[len(before) :]] == [f"run/checkpoint-{STEPS[2]}"] * len(PROMPTS)
    computed.clear()
    assert main(_analyze_argv(checkpoints, first_two, prompts, out)) == 0  # fewer adapters: their rows are kept
    kept = read_rows(out)  # the other adapter's rows kept, before this run's
    assert computed == [] and sorted(kept, key=json.dumps) == sorted(after, key=json.dumps)


def test_a_run_cut_in_its_third_adapter_resumes_to_the_same_rows(checkpoints, run, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    assert main([*_analyze_argv(checkpoints, [run], prompts, out), "--batch-size", "3"]) == 0
    full = read_rows(out)
    lines = out.read_text().splitlines(keepends=True)
    cut = len(PROMPTS) * 2 + 1  # the first two adapters and one row of the third, then half a row
    out.write_text("".join(lines[:cut]) + lines[cut][:25])
    assert main([*_analyze_argv(checkpoints, [run], prompts, out), "--batch-size", "3"]) == 0
    resumed = read_rows(out)
    assert [(row["adapter"], row["id"]) for row in resumed] == [(row["adapter"], row["id"]) for row in full]
    _assert_rows_equal(resumed, full)


def test_bad_series_are_refused_before_any_model_loads(checkpoints, run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(RUNNER.Runner, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    fails(_analyze_argv(checkpoints, [run, run / "checkpoint-10"], prompts, out), capsys, "would both be named")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(_analyze_argv(checkpoints, [empty], prompts, out), capsys, "is not a PEFT adapter", status=2)
    fails(_analyze_argv(checkpoints, [run, empty], prompts, out), capsys, "holds no PEFT adapter", status=2)
    stateless = tmp_path / "stateless" / "run"
    shutil.copytree(run, stateless)
    (stateless / "checkpoint-20" / "trainer_state.json").unlink()
    fails(_analyze_argv(checkpoints, [stateless], prompts, out), capsys, "without trainer_state.json", status=2)
    other = tmp_path / "other"
    shutil.copytree(run / "checkpoint-10", other / "checkpoint-10")
    config = json.loads((other / "checkpoint-10" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(checkpoints.other_base)
    (other / "checkpoint-10" / "adapter_config.json").write_text(json.dumps(config))
    fails(_analyze_argv(checkpoints, [run, other], prompts, out), capsys, "was trained on", status=2)
    fails(
        [*_analyze_argv(checkpoints, [run], prompts, out), "--positions", "all", "--html", str(tmp_path / "t.html")],
        capsys,
        "--html shows the tokens of one fine-tune",
        status=2,
    )
    generate = ["generate", "--base", str(checkpoints.base), "--adapter", str(run), "--adapter", str(run), "hi"]
    fails(generate, capsys, "this command takes one adapter", status=2)
    assert not out.exists()


def test_rows_of_one_fine_tune_and_of_several_do_not_mix(checkpoints, run, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    single, several = tmp_path / "single.jsonl", tmp_path / "several.jsonl"
    assert main(_analyze_argv(checkpoints, [run / "checkpoint-10"], prompts, single)) == 0
    assert "adapter" not in read_rows(single)[0]
    fails(_analyze_argv(checkpoints, [run], prompts, single), capsys, "a run over one adapter", status=2)
    assert main(_analyze_argv(checkpoints, [run], prompts, several)) == 0
    fails(_analyze_argv(checkpoints, [run / "checkpoint-10"], prompts, several), capsys, "over several", status=2)


def test_on_a_4bit_base_each_row_equals_its_checkpoint_analysed_alone(checkpoints, run, tmp_path):
    pytest.importorskip("bitsandbytes")
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "rows.jsonl"
    assert main([*_analyze_argv(checkpoints, [run], prompts, out), "--load-in-4bit"]) == 0
    rows = read_rows(out)
    assert {row["settings"]["load_in_4bit"] for row in rows} == {True}
    for step in STEPS:
        alone = tmp_path / f"alone-{step}.jsonl"
        assert main([*_analyze_argv(checkpoints, [run / f"checkpoint-{step}"], prompts, alone), "--load-in-4bit"]) == 0
        _assert_rows_equal([row for row in rows if row["step"] == step], read_rows(alone))


def test_compare_over_a_run_gives_each_checkpoint_its_own_rows_and_roc_auc(checkpoints, run, tmp_path, capsys):
    chat = write_lines(tmp_path / "chat.txt", PROMPTS[:2])
    web = write_lines(tmp_path / "web.txt", PROMPTS[2:])
    out = tmp_path / "rows.jsonl"
    base = ["compare", "--base", str(checkpoints.base)]
    assert main([*base, "--adapter", str(run), str(chat), str(web), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [(row["adapter"], row["set"]) for row in rows] == [
        (f"run/checkpoint-{step}", name) for step in STEPS for name in ("chat", "web") for _ in range(2)
    ] or sorted((row["set"], row["adapter"], row["id"]) for row in rows) == sorted(
        (name, f"run/checkpoint-{step}", i) for name in ("chat", "web") for step in STEPS for i in (1, 2)
    )
    printed = capsys.readouterr().out
    for step in STEPS:
        alone = tmp_path / f"alone-{step}.jsonl"
        argv = [*base, "--adapter", str(run / f"checkpoint-{step}"), str(chat), str(web), "--out", str(alone)]
        assert main(argv) == 0
        auc = capsys.readouterr().out.split("ROC-AUC of TuCo, chat (positive) vs web: ")[1].split()[0]
        own = [row for row in rows if row["step"] == step]
        _assert_rows_equal(own, read_rows(alone))
        assert f"run/checkpoint-{step}" in printed and auc in printed


def test_rows_of_another_prompt_file_are_refused_whatever_their_adapter(checkpoints, run, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    first = [run / f"checkpoint-{step}" for step in STEPS[:2]]
    assert main(_analyze_argv(checkpoints, first, write_lines(tmp_path / "p.txt", PROMPTS), out)) == 0
    other = write_lines(tmp_path / "other.txt", ["a different first prompt", *PROMPTS[1:]])
    argv = _analyze_argv(checkpoints, [run / f"checkpoint-{STEPS[2]}"], other, out)
    fails([*argv[:3], "--adapter", str(run / "checkpoint-10"), *argv[3:]], capsys, "already has a row for id 1")


def test_folders_named_like_module_attributes_or_peft_words_are_adapters_like_any(checkpoints, run, tmp_path):
    """PEFT keeps adapters in module dicts and calls a row without one "__base__": neither name may leak."""
    shelf = tmp_path / "shelf"
    for folder, step in (("train", 10), ("__base__", 20)):
        shutil.copytree(run / f"checkpoint-{step}", shelf / folder)
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    assert main(_analyze_argv(checkpoints, [shelf], prompts, out)) == 0
    rows = read_rows(out)
    for folder, step in (("train", 10), ("__base__", 20)):
        alone = _alone(checkpoints, run / f"checkpoint-{step}", prompts, tmp_path / f"alone-{step}.jsonl")
        _assert_rows_equal([row for row in rows if row["adapter"] == folder], alone)


@pytest.mark.slow  # a process of its own
def test_a_run_killed_in_its_third_adapter_resumes_to_the_rows_of_an_uninterrupted_run(checkpoints, run, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", [f"the quick brown fox {i} jumps" for i in range(60)])
    argv = [*_analyze_argv(checkpoints, [run], prompts, tmp_path / "rows.jsonl"), "--batch-size", "1"]
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "tuco_peft.cli", *argv], env=env, stderr=subprocess.DEVNULL)
    third = f'"adapter": "run/checkpoint-{STEPS[2]}"'
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or third not in out.read_text()):
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs
    process.wait(timeout=60)
    kept = [json.loads(line) for line in out.read_text().split("\n")[:-1]]  # the last line may be cut
    assert {row["adapter"] for row in kept} == {f"run/checkpoint-{step}" for step in STEPS}
    assert len(kept) < len(STEPS) * 60
    assert main(argv) == 0
    full = tmp_path / "full.jsonl"
    assert main([*_analyze_argv(checkpoints, [run], prompts, full), "--batch-size", "1"]) == 0
    _assert_rows_equal(read_rows(out), read_rows(full))
