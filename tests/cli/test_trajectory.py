"""`tuco-peft trajectory`: TuCo over the checkpoints of a run, from its rows. The numbers (median, 25-75 %
band, per-set medians, ROC-AUC, the prompts that moved most) are checked against values computed here
another way; the figure and the page are written and marked as tuco-peft's; bad input is one line, exit 2,
before anything is written; and no torch is imported unless the page shows token views. The end-to-end
tests run analyze on tiny checkpoints of a run folder on disk."""

from __future__ import annotations

import html
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers.cli_fixtures import fails, read_rows, write_lines

from tuco_peft.apps.trajectory import moved_most, trajectory
from tuco_peft.cli import main
from tuco_peft.io.results import ResultRow

STEPS = (100, 200, 300, 400)
LOSSES = (2.5, 1.75, 1.25, 1.0)
SETS = {"chat": 5, "web": 6}  # prompts per set
SETTINGS = {"base": "/nowhere/base", "adapter": "/nowhere/run", "chat_template": False, "positions": "last"}
FINGERPRINT = {"command": "analyze", "tokenizer": "t", "base": "b"}


def _name(step: int) -> str:
    return f"run/checkpoint-{step}"


def _tuco(set_name: str, index: int, step: int) -> float:
    """A made-up TuCo that grows with training, faster for chat prompts, with ties (two decimals)."""
    noise = random.Random(f"{set_name}-{index}-{step}").uniform(0, 0.2)
    start, slope = (0.05, 0.1) if set_name == "chat" else (0.2, 0.0)
    return round(start + slope * step / 100 + noise + 0.01 * index, 2)


def _rows(steps=STEPS, losses=LOSSES, sets=SETS, **fields) -> list[ResultRow]:
    rows = []
    for step, loss in zip(steps, losses):
        for set_name, count in sets.items():
            for index in range(count):
                rows.append(
                    ResultRow(
                        id=index,
                        prompt=f"{set_name} prompt number {index}: " + "words " * index,
                        tuco=_tuco(set_name, index, step),
                        ptc_l1=[1.0, 2.0],
                        ftc_l1=[0.5, 0.25],
                        cumulative_tuco=[0.3, 0.2],
                        set=set_name,
                        adapter=_name(step),
                        step=step,
                        train_loss=loss,
                        settings=SETTINGS,
                        fingerprint=FINGERPRINT,
                        **fields,
                    )
                )
    return rows


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row.to_json()) + "\n" for row in rows), encoding="utf-8")
    return path


def _pairwise_auc(positive, negative) -> float:
    pairs = [(p, n) for p in positive for n in negative]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def _values(rows, adapter, set_name=None) -> list[float]:
    return [row.tuco for row in rows if row.adapter == adapter and set_name in (None, row.set)]


def test_the_table_holds_each_checkpoints_median_band_set_medians_and_auc(tmp_path, capsys):
    rows = _rows()
    results = _write(tmp_path / "rows.jsonl", rows)
    assert main(["trajectory", str(results)]) == 0
    out = capsys.readouterr().out
    run = trajectory(rows)
    assert [c.adapter for c in run.checkpoints] == [_name(step) for step in STEPS]
    assert run.sets == ["chat", "web"] and run.by_step
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["adapter", "step", "train_loss", "prompts"]
    assert "ROC-AUC chat vs web" in lines[0]
    for checkpoint, step, loss in zip(run.checkpoints, STEPS, LOSSES):
        everything = _values(rows, _name(step))
        chat, web = _values(rows, _name(step), "chat"), _values(rows, _name(step), "web")
        q25, q75 = np.percentile(everything, [25, 75])
        auc = _pairwise_auc(chat, web)
        assert (checkpoint.step, checkpoint.train_loss) == (step, loss)
        assert checkpoint.overall.prompts == len(everything) == sum(SETS.values())
        assert checkpoint.overall.median == pytest.approx(statistics.median(everything))
        assert (checkpoint.overall.q25, checkpoint.overall.q75) == pytest.approx((q25, q75))
        assert checkpoint.by_set["chat"].median == pytest.approx(statistics.median(chat))
        assert checkpoint.by_set["web"].median == pytest.approx(statistics.median(web))
        assert checkpoint.auc == pytest.approx(auc)
        (line,) = [line for line in lines if line.startswith(_name(step) + " ")]
        expected = [
            _name(step),
            str(step),
            f"{loss:.4g}",
            str(len(everything)),
            f"{statistics.median(everything):.4f}",
            f"{q25:.4f}-{q75:.4f}",
            f"{statistics.median(chat):.4f}",
            f"{statistics.median(web):.4f}",
            f"{auc:.4f}",
        ]
        assert line.split() == expected
    # the run separates the sets better as it trains (chat TuCo grows faster): the table shows it
    aucs = [c.auc for c in run.checkpoints]
    assert aucs[0] < 0.75 and aucs[-1] == 1.0


def test_adapters_with_rows_of_different_prompts_are_warned_about(tmp_path, capsys):
    """An interrupted run leaves its last adapter with fewer rows: its median is of other prompts."""
    rows = _rows()
    cut = [row for row in rows if not (row.step == STEPS[-1] and row.set == "web")]
    assert main(["trajectory", str(_write(tmp_path / "cut.jsonl", cut))]) == 0
    err = capsys.readouterr().err
    assert f"different numbers of prompts ({_name(STEPS[-1])}: {SETS['chat']}, up to {sum(SETS.values())})" in err
    assert main(["trajectory", str(_write(tmp_path / "whole.jsonl", rows))]) == 0
    assert "different numbers of prompts" not in capsys.readouterr().err


def test_checkpoints_are_put_in_step_order_else_kept_in_file_order(tmp_path):
    rows = _rows()
    shuffled = [row for step in (300, 100, 400, 200) for row in rows if row.step == step]
    assert [c.step for c in trajectory(shuffled).checkpoints] == list(STEPS)
    unstepped = [replace(row, step=None, train_loss=None) for row in shuffled]
    run = trajectory(unstepped)
    assert not run.by_step
    assert [c.adapter for c in run.checkpoints] == [_name(step) for step in (300, 100, 400, 200)]
    one_set = trajectory([replace(row, set=None) for row in rows])
    assert one_set.sets == ["(no set)"] and one_set.auc_sets is None
    assert all(c.auc is None and not c.by_set for c in one_set.checkpoints)


def test_the_moved_most_table_orders_prompts_by_their_change(tmp_path, capsys):
    rows = _rows()
    results = _write(tmp_path / "rows.jsonl", rows)

    def expected(before, after, top):
        start = {(r.set, r.id): r.tuco for r in rows if r.adapter == before}
        changes = [(r.set, r.id, r.tuco - start[(r.set, r.id)]) for r in rows if r.adapter == after]
        order = {key: k for k, key in enumerate(start)}  # ties keep the file's order
        changes.sort(key=lambda c: (-abs(c[2]), order[(c[0], c[1])]))
        return changes[:top]

    moves = moved_most(rows, _name(100), _name(400), top=4)
    assert [(m.set, m.id, pytest.approx(m.change)) for m in moves] == expected(_name(100), _name(400), 4)
    assert main(["trajectory", str(results), "--top", "3"]) == 0
    out = capsys.readouterr().out
    table = out.split(f"TuCo moved most, {_name(100)} -> {_name(400)} (3 prompts):\n")[1].splitlines()
    assert table[0].split() == ["set", "id", "prompt", "TuCo", "at", _name(100), "TuCo", "at", _name(400), "change"]
    for line, (set_name, prompt_id, change) in zip(table[1:], expected(_name(100), _name(400), 3), strict=True):
        assert line.split()[:2] == [set_name, str(prompt_id)] and line.split()[-1] == f"{change:+.4f}"
    assert main(["trajectory", str(results), "--between", _name(300), _name(200), "--top", "20"]) == 0
    out = capsys.readouterr().out
    lines = out.split(f"TuCo moved most, {_name(300)} -> {_name(200)} (11 prompts):\n")[1].splitlines()
    assert [line.split()[-1] for line in lines[1:]] == [f"{c:+.4f}" for *_, c in expected(_name(300), _name(200), 20)]


def test_plot_writes_a_figure_and_html_a_page_with_both_tables(tmp_path, capsys):
    rows = _rows()
    results = _write(tmp_path / "rows.jsonl", rows)
    plot, page = tmp_path / "trajectory.png", tmp_path / "trajectory.html"
    assert main(["trajectory", str(results), "--plot", str(plot), "--html", str(page), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert f"plot: {plot}" in out and f"html: {page}" in out
    data = plot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000 and b"tuco-peft" in data
    document = page.read_text(encoding="utf-8")
    assert '<meta name="generator" content="tuco-peft' in document
    assert "http://" not in document and "https://" not in document  # self-contained
    assert 'src="data:image/png;base64,' in document
    assert "TuCo per checkpoint" in document and "ROC-AUC chat vs web" in document
    for checkpoint in trajectory(rows).checkpoints:
        assert f"<td>{checkpoint.adapter}</td>" in document
        assert f'<td class="number">{checkpoint.overall.median:.4f}</td>' in document
        assert f'<td class="number">{checkpoint.auc:.4f}</td>' in document
    assert html.escape(f"Prompts whose TuCo moved most, {_name(100)} → {_name(400)}") in document
    for move in moved_most(rows, _name(100), _name(400), top=3):
        assert f'<td class="number">{move.change:+.4f}</td>' in document
    assert "No token views: the rows hold no TuCo per token" in document
    # a rerun overwrites its own files; without steps the adapters are named along the axis (SVG too)
    _write(results, [replace(row, step=None) for row in rows])
    svg = tmp_path / "trajectory.svg"
    assert main(["trajectory", str(results), "--plot", str(svg), "--html", str(page)]) == 0
    assert b"<svg" in svg.read_bytes() and b"tuco-peft" in svg.read_bytes()
    assert '<td class="number">-</td>' in page.read_text(encoding="utf-8")  # no step


def _bad_inputs(tmp_path) -> list[tuple[list[str], tuple[str, ...]]]:
    rows = _rows()
    good = _write(tmp_path / "rows.jsonl", rows)
    one_adapter = _write(tmp_path / "single.jsonl", [replace(r, adapter=None, step=None) for r in rows[:11]])
    one_of_many = _write(tmp_path / "first.jsonl", rows[:11])
    mixed = _write(tmp_path / "mixed.jsonl", [*rows, replace(rows[0], adapter=None, id="other")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage = write_lines(tmp_path / "garbage.jsonl", [json.dumps(rows[0].to_json()), "not a row", ""])
    repeated = _write(tmp_path / "repeated.jsonl", [rows[0], *rows])
    theirs = write_lines(tmp_path / "theirs.html", ["<p>my notes</p>"])
    return [
        ([str(tmp_path / "missing.jsonl")], ("missing.jsonl: no such file", "analyze --out")),
        ([str(tmp_path)], ("is a folder",)),
        ([str(empty)], ("holds no result rows",)),
        ([str(garbage)], ("garbage.jsonl:2 is not a tuco-peft result row",)),
        ([str(repeated)], ("repeated.jsonl:2 repeats the row of line 1",)),
        ([str(one_adapter)], ("was written by a run over one adapter", "run analyze with several --adapter")),
        ([str(one_of_many)], ("one adapter only (run/checkpoint-100)", "several --adapter or a run folder")),
        ([str(mixed)], ("holds 1 row without an adapter beside rows of several adapters",)),
        ([str(good), "--between", "run/checkpoint-100", "nope"], ("--between nope: no such adapter",)),
        ([str(good), "--between", _name(100), _name(100)], ("names one adapter twice",)),
        ([str(good), "--top", "0"], ("--top must be at least 1",)),
        ([str(good), "--plot", str(tmp_path / "out.txt")], ("--plot", "must end in one of")),
        ([str(good), "--html", str(good)], ("--html", "is also the results file")),
        ([str(good), "--html", str(tmp_path / "no" / "page.html")], ("does not exist",)),
        ([str(good), "--html", str(theirs)], ("tuco-peft did not write", "--force")),
        ([str(good), "--plot", str(tmp_path / "p.png"), "--html", str(tmp_path / "p.png")], ("is also --plot",)),
    ]


def test_bad_input_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys):
    for argv, fragments in _bad_inputs(tmp_path):
        fails(["trajectory", *argv], capsys, *fragments, status=2)
    assert {path.name for path in tmp_path.iterdir()} == {
        "rows.jsonl",
        "single.jsonl",
        "first.jsonl",
        "mixed.jsonl",
        "empty.jsonl",
        "garbage.jsonl",
        "repeated.jsonl",
        "theirs.html",
    }
    assert (tmp_path / "theirs.html").read_text() == "<p>my notes</p>\n"
    # --force overwrites the user's file; a row cut short at the end (an interrupted run) is left out
    good = tmp_path / "rows.jsonl"
    with open(good, "a") as handle:
        handle.write('{"id": 3, "prompt": "cut sho')
    assert main(["trajectory", str(good), "--html", str(tmp_path / "theirs.html"), "--force"]) == 0


@pytest.mark.slow  # a process of its own
def test_the_command_imports_no_torch_without_token_views(tmp_path):
    """Rows with TuCo per token whose base is no local folder: the page says why it has no token views, and
    nothing imported torch to find that out."""
    results = _write(tmp_path / "rows.jsonl", _rows(token_tuco=[0.5, 0.25]))
    code = (
        "import sys; from tuco_peft.cli import main; code = main(sys.argv[1:]); "
        "print([name for name in ('torch', 'transformers', 'peft') if name in sys.modules]); sys.exit(code)"
    )
    argv = ["trajectory", str(results), "--plot", str(tmp_path / "t.png"), "--html", str(tmp_path / "t.html")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert html.escape("No token views: the tokenizer is read from the rows' base model in a local folder") in page
    assert "'/nowhere/base' is not one here" in html.unescape(page)


# ---- end to end: rows that analyze computed for the checkpoints of a run folder on disk ----

PROMPTS = ["the quick brown fox jumps", "how can I help you today?", "the lazy dog near the river", "a small model"]
_RUN_STEPS = {10: 2.0, 20: 1.5, 30: 1.25}
_TOKEN = re.compile(r'<span class="tuco-tok[^"]*"[^>]*title="TuCo ([0-9.]+)')
_SECTION = re.compile(r"<section><h3>(.*?) <small>.*?</h3>(.*?)</section>", re.DOTALL)


def _run_folder(checkpoints, root: Path) -> Path:
    """A Trainer run's folder: checkpoint-N adapters whose LoRA B grows with N, each with its trainer state."""
    from safetensors.torch import load_file, save_file

    run = root / "run"
    for step, loss in _RUN_STEPS.items():
        folder = run / f"checkpoint-{step}"
        shutil.copytree(checkpoints.adapter, folder)
        weights = folder / "adapter_model.safetensors"
        tensors = {name: t * (step / 30) if "lora_B" in name else t for name, t in load_file(weights).items()}
        save_file(tensors, weights)
        state = {"global_step": step, "log_history": [{"loss": loss, "step": step}]}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return run


@pytest.mark.slow  # three analyses of a tiny model
def test_a_page_of_real_rows_shows_the_moved_prompts_tokens_at_both_checkpoints(checkpoints, tmp_path, capsys):
    """analyze each checkpoint alone (--positions all), the rows labelled as a run over several adapters would
    label them: the page shows each moved prompt's tokens at both ends, with the TuCo of its rows."""
    run, prompts = _run_folder(checkpoints, tmp_path), write_lines(tmp_path / "p.txt", PROMPTS)
    rows = []
    for step, loss in _RUN_STEPS.items():
        out = tmp_path / f"rows-{step}.jsonl"
        argv = ["analyze", "--base", str(checkpoints.base), "--adapter", str(run / f"checkpoint-{step}")]
        assert main([*argv, "--prompts", str(prompts), "--out", str(out), "--positions", "all"]) == 0
        rows += [
            replace(ResultRow.from_json(record), adapter=f"run/checkpoint-{step}", step=step, train_loss=loss)
            for record in read_rows(out)
        ]
    results, page = _write(tmp_path / "run.jsonl", rows), tmp_path / "run.html"
    capsys.readouterr()
    assert main(["trajectory", str(results), "--html", str(page), "--top", "2"]) == 0
    assert "TuCo moved most, run/checkpoint-10 -> run/checkpoint-30 (2 prompts)" in capsys.readouterr().out
    sections = dict(_SECTION.findall(page.read_text(encoding="utf-8")))
    moves = moved_most(rows, "run/checkpoint-10", "run/checkpoint-30", top=2)
    assert len(sections) == 4
    for move in moves:
        for row in (move.before, move.after):
            body = sections[html.escape(f"prompt {row.id} at {row.adapter}")]
            values = [float(v) for v in _TOKEN.findall(body)]
            assert values == pytest.approx(row.token_tuco, abs=1e-3) and len(values) == row.n_tokens
            shown = html.unescape(re.sub(r"<[^>]+>", "", body))
            assert PROMPTS[int(row.id) - 1] in shown
    assert "No token views" not in page.read_text(encoding="utf-8")
    # rows computed with another tokenizer than the one in the base folder now: the page shows no tokens
    other = [replace(row, fingerprint={**row.fingerprint, "tokenizer": "another"}) for row in rows]
    assert main(["trajectory", str(_write(results, other)), "--html", str(page), "--top", "2"]) == 0
    document = page.read_text(encoding="utf-8")
    assert "<section>" not in document
    base = rows[0].settings["base"]  # where analyze found it, links resolved
    assert f"No token views: the tokenizer files at {base} are not those the rows were" in document


@pytest.mark.slow  # an analysis of a tiny model
def test_analyze_of_a_run_folder_feeds_trajectory(checkpoints, tmp_path, capsys):
    """analyze --adapter RUN_DIR writes the rows trajectory reads: each checkpoint's step and training loss in
    the table, and each moved prompt's tokens at both ends of the run on the page."""
    run, prompts = _run_folder(checkpoints, tmp_path), write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "run.jsonl"
    argv = ["analyze", "--base", str(checkpoints.base), "--adapter", str(run), "--prompts", str(prompts)]
    assert main([*argv, "--out", str(out), "--positions", "all"]) == 0
    assert {record["adapter"] for record in read_rows(out)} == {f"run/checkpoint-{step}" for step in _RUN_STEPS}
    capsys.readouterr()
    page = tmp_path / "run.html"
    assert main(["trajectory", str(out), "--html", str(page), "--plot", str(tmp_path / "run.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    for step, loss in _RUN_STEPS.items():
        (line,) = [line for line in lines if line.startswith(f"run/checkpoint-{step} ")]
        assert line.split()[1:4] == [str(step), f"{loss:.4g}", str(len(PROMPTS))]
    assert page.read_text(encoding="utf-8").count("<section>") == 2 * min(10, len(PROMPTS))
