"""`tuco-peft` end to end on tiny checkpoints saved to disk: values, resuming, plots and every bad input."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.cli_fixtures import CONTEXT, fails, read_rows, write_lines
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuco_peft.apps.plotting import analysis_figure
from tuco_peft.apps.statistics import roc_auc
from tuco_peft.cli import main
from tuco_peft.core.decompose import decompose, tuco
from tuco_peft.io.results import ResultRow

DECOMPOSE_MODULE = importlib.import_module("tuco_peft.core.decompose")  # the package re-exports a function of that name
PROMPTS = [
    "the quick brown fox",
    "how can I help you today?",
    "a small model reads",
    "tell me about the old mill by the water near the river bank",
    "the lazy dog",
]


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """The pair loaded independently of tuco_peft.loading, and a separate pre-trained copy for the oracle."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.base)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(checkpoints.base), checkpoints.adapter
    ).eval()
    pretrained = AutoModelForCausalLM.from_pretrained(checkpoints.base).eval()
    return model, pretrained, tokenizer


def _model_args(checkpoints, base=None):
    return ["--base", str(base or checkpoints.base), "--adapter", str(checkpoints.adapter)]


def _alone(model, tokenizer, text, templated=False):
    ids = torch.tensor([tokenizer(text, add_special_tokens=not templated)["input_ids"]])
    with torch.no_grad():
        return float(tuco(model, ids)), ids


def _analyze_argv(checkpoints, prompts_file, out, base=None):
    return ["analyze", *_model_args(checkpoints, base), "--prompts", str(prompts_file), "--out", str(out)]


def _analyze(checkpoints, prompts_file, out, *extra):
    return main([*_analyze_argv(checkpoints, prompts_file, out), *extra])


def test_analyze_rows_equal_tuco_and_the_two_model_oracle(checkpoints, loaded, tmp_path, capsys):
    model, pretrained, tokenizer = loaded
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out, plot = tmp_path / "rows.jsonl", tmp_path / "profile.png"
    assert _analyze(checkpoints, prompts, out, "--batch-size", "2", "--plot", str(plot)) == 0
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [1, 2, 3, 4, 5]
    for row, text in zip(rows, PROMPTS):
        expected, ids = _alone(model, tokenizer, text)
        assert row["prompt"] == text and row["n_tokens"] == ids.shape[1]
        assert abs(row["tuco"] - expected) < 1e-5
        with torch.no_grad():
            ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, torch.ones_like(ids))
        assert abs(row["tuco"] - float(tuco_at_last(ptc, ftc, torch.ones_like(ids)))) < 1e-5
        torch.testing.assert_close(torch.tensor(row["ptc_l1"]), ptc[0, :, -1].abs().sum(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(row["ftc_l1"]), ftc[0, :, -1].abs().sum(-1), rtol=1e-4, atol=1e-5)
        first = ftc[0, 0, -1].abs().sum() / (ptc[0, 0, -1].abs().sum() + ftc[0, 0, -1].abs().sum())
        assert abs(row["cumulative_tuco"][0] - float(first)) < 1e-5 and row["cumulative_tuco"][-1] == pytest.approx(
            row["tuco"]
        )
    printed = capsys.readouterr().out
    assert "prompts: 5" in printed and f"{sum(r['tuco'] for r in rows) / 5:.4f}" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_template_system_prompt_and_all_positions(checkpoints, loaded, tmp_path):
    model, _, tokenizer = loaded
    records = [
        {"id": "a", "prompt": "how can I help you today?"},
        {"id": "b", "messages": [{"role": "user", "content": "the lazy dog"}]},
    ]
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, prompts, out, "--chat-template", "--system", "be brief", "--positions", "all") == 0
    for row, content in zip(read_rows(out), ["how can I help you today?", "the lazy dog"]):
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|assistant|>")
        expected, ids = _alone(model, tokenizer, text, templated=True)
        assert row["n_tokens"] == ids.shape[1] and abs(row["tuco"] - expected) < 1e-5
        with torch.no_grad():
            per_token = decompose(model, ids, positions="all").tuco[0]
        torch.testing.assert_close(torch.tensor(row["token_tuco"]), per_token)


def test_rerun_after_a_cut_resumes_without_duplicates(checkpoints, tmp_path, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, prompts, out) == 0
    full = read_rows(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:17])  # two rows, then a row cut mid-write
    computed = []
    monkeypatch.setattr(
        DECOMPOSE_MODULE, "decompose", lambda m, ids, *a, **k: computed.append(len(ids)) or decompose(m, ids, *a, **k)
    )
    assert _analyze(checkpoints, prompts, out) == 0
    assert sum(computed) == 3
    resumed = read_rows(out)
    assert sorted(row["id"] for row in resumed) == [1, 2, 3, 4, 5]
    by_id = {row["id"]: row for row in resumed}
    for row in full:
        assert by_id[row["id"]]["tuco"] == pytest.approx(row["tuco"], abs=1e-6)
    computed.clear()
    assert _analyze(checkpoints, prompts, out) == 0
    assert computed == [] and len(read_rows(out)) == 5


def test_resuming_into_rows_of_other_prompts_is_refused(checkpoints, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, write_lines(tmp_path / "a.txt", PROMPTS), out) == 0
    fails(
        _analyze_argv(checkpoints, write_lines(tmp_path / "b.txt", ["another prompt"]), out),
        capsys,
        "already has a row for id 1 with another prompt",
    )
    bad = write_lines(tmp_path / "bad.jsonl", ["not a row"])
    fails(
        _analyze_argv(checkpoints, tmp_path / "a.txt", bad),
        capsys,
        "bad.jsonl:1 is not a tuco-peft result row",
    )


@pytest.mark.slow  # a process of its own
def test_ctrl_c_keeps_written_rows_and_the_rerun_completes(checkpoints, tmp_path):
    n = 300
    prompts = write_lines(tmp_path / "p.txt", [f"the quick brown fox {i}" for i in range(n)])
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tuco_peft.cli", *_analyze_argv(checkpoints, prompts, out), "--batch-size", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    kept = read_rows(out)
    assert 3 <= len(kept) < n
    assert main([*_analyze_argv(checkpoints, prompts, out), "--batch-size", "16"]) == 0
    ids = [row["id"] for row in read_rows(out)]
    assert sorted(ids) == list(range(1, n + 1))


def test_compare_prints_the_roc_auc_of_its_rows(checkpoints, tmp_path, capsys):
    chat = write_lines(tmp_path / "chat.txt", ["how can I help you today?", "tell me about the old mill"])
    web = write_lines(
        tmp_path / "web.txt", ["the quick brown fox jumps", "the lazy dog near the river", "a small model"]
    )
    out, plot = tmp_path / "rows.jsonl", tmp_path / "hist.png"
    args = ["compare", *_model_args(checkpoints), str(chat), str(web), "--out", str(out), "--plot", str(plot)]
    assert main(args) == 0
    rows = read_rows(out)
    by_set = {name: [r["tuco"] for r in rows if r["set"] == name] for name in ("chat", "web")}
    assert len(by_set["chat"]) == 2 and len(by_set["web"]) == 3
    assert (
        f"ROC-AUC of TuCo, chat (positive) vs web: {roc_auc(by_set['chat'], by_set['web']):.4f}"
        in capsys.readouterr().out
    )
    assert plot.stat().st_size > 0
    assert main(args) == 0 and len(read_rows(out)) == 5  # resumed: nothing recomputed, nothing duplicated
    err = capsys.readouterr().err
    assert "resuming: 2 of 2 prompts of set 'chat'" in err and "resuming: 3 of 3 prompts of set 'web'" in err


def test_the_histograms_count_prompts_on_a_whole_number_axis():
    """A few prompts per bin: matplotlib's default ticks would read 0.25, 0.5 … prompts."""
    import matplotlib.pyplot as plt

    rows = [ResultRow(id=i, prompt="p", tuco=i / 10, ptc_l1=[1.0, 2.0], ftc_l1=[0.5, 0.5]) for i in range(1, 4)]
    figure = analysis_figure({"chat": rows[:2], "web": rows[2:]})
    try:
        figure.canvas.draw()
        ticks = figure.axes[1].get_yticks()
        assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
    finally:
        plt.close(figure)


def test_roc_auc_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    positive = torch.rand(30, generator=generator).round(decimals=1).tolist()
    negative = (torch.rand(40, generator=generator) * 0.8).round(decimals=1).tolist()
    expected = metrics.roc_auc_score([1] * 30 + [0] * 40, positive + negative)
    assert roc_auc(positive, negative) == pytest.approx(expected)


def test_generate_prints_the_tuco_of_each_new_token(checkpoints, loaded, capsys):
    model, _, tokenizer = loaded
    assert main(["generate", *_model_args(checkpoints), "the quick brown", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    ids = torch.tensor([tokenizer("the quick brown")["input_ids"]])
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        first = float(tuco(model, ids))
    assert printed.startswith(tokenizer.decode(greedy[0]))
    step_zero = next(line for line in printed.splitlines() if line.strip().startswith("0 "))
    assert float(step_zero.split()[1]) == pytest.approx(first, abs=1e-3)


def test_empty_and_over_long_prompts_are_skipped_or_cut_with_a_warning(checkpoints, loaded, tmp_path, capsys):
    model, _, tokenizer = loaded
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    prompts = write_lines(tmp_path / "p.txt", ["the lazy dog", "   ", long_text])
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, prompts, out) == 0
    warnings = capsys.readouterr().err
    assert "prompt 2 (line 2) is empty; skipped" in warnings
    assert f"more than the model's context of {CONTEXT}; analysing its last {CONTEXT} tokens" in warnings
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [1, 3] and rows[1]["n_tokens"] == CONTEXT
    ids = torch.tensor([tokenizer(long_text)["input_ids"][-CONTEXT:]])
    with torch.no_grad():
        assert abs(rows[1]["tuco"] - float(tuco(model, ids))) < 1e-5


def test_missing_and_unreadable_prompt_files(checkpoints, tmp_path, capsys):
    out = str(tmp_path / "rows.jsonl")
    fails(
        _analyze_argv(checkpoints, tmp_path / "none.txt", out),
        capsys,
        "does not exist",
    )
    fails(_analyze_argv(checkpoints, tmp_path, out), capsys, "must end in .txt")
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    fails(_analyze_argv(checkpoints, binary, out), capsys, "not UTF-8")


def test_malformed_jsonl_names_its_line(checkpoints, tmp_path, capsys):
    prompts = write_lines(
        tmp_path / "p.jsonl", ['{"id": 1, "prompt": "ok"}', '{"id": 2, "prompt": "unclosed', '{"id": 3}']
    )
    fails(
        _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl"),
        capsys,
        "p.jsonl:2: not valid JSON",
    )
    duplicate = write_lines(tmp_path / "d.jsonl", ['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'])
    fails(
        _analyze_argv(checkpoints, duplicate, tmp_path / "o.jsonl"),
        capsys,
        "d.jsonl:2: id 1 was already used on line 1",
    )


def test_adapter_for_another_base_names_module_and_shapes(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl", base=checkpoints.other_base)
    fails(argv, capsys, "does not fit this base", "model.layers.0.self_attn.q_proj takes inputs of size 32", "(4, 64)")


def test_pickle_weights_need_trust_pickle(checkpoints, loaded, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl", base=checkpoints.pickle_base)
    fails(argv, capsys, "pytorch_model.bin", "--trust-pickle")
    assert main([*argv, "--trust-pickle"]) == 0
    model, _, tokenizer = loaded
    assert abs(read_rows(tmp_path / "o.jsonl")[0]["tuco"] - _alone(model, tokenizer, PROMPTS[0])[0]) < 1e-5


def test_remote_code_needs_trust_remote_code(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl", base=checkpoints.remote_code_base)
    fails(argv, capsys, "custom model code", "--trust-remote-code")


def test_hub_id_without_network_says_so(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl", base="tuco-test-org/no-such-model")
    fails(argv, capsys, "tuco-test-org/no-such-model is not a local directory", "offline")
    fails([*argv[:2], "./not/here", *argv[3:]], capsys, "./not/here: no such directory")


def test_out_of_memory_suggests_a_smaller_batch(checkpoints, tmp_path, capsys, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DECOMPOSE_MODULE, "decompose", exhausted)
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    argv = [*_analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl"), "--batch-size", "4"]
    fails(argv, capsys, "out of memory on a batch of 4 prompts", "smaller --batch-size")


def test_flags_that_need_each_other_and_debug_traceback(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl")
    fails([*argv, "--system", "hi"], capsys, "--system needs --chat-template")
    messages = write_lines(tmp_path / "m.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    fails([*argv[:6], str(messages), *argv[7:]], capsys, "has chat messages; pass --chat-template")
    assert main([*argv, "--system", "hi", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_resuming_with_other_settings_is_refused(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, prompts, out) == 0
    settings = read_rows(out)[0]["settings"]
    assert settings["base"] == str(checkpoints.base.resolve()) and settings["chat_template"] is False
    argv = _analyze_argv(checkpoints, prompts, out)
    fails([*argv, "--chat-template"], capsys, "rows computed with other settings (chat_template differ)")
    fails([*argv, "--chat-template", "--system", "be brief"], capsys, "(chat_template, system differ)")
    fails([*argv, "--positions", "all"], capsys, "(positions differ)")
    other = _analyze_argv(checkpoints, prompts, out, base=checkpoints.pickle_base)
    fails([*other, "--trust-pickle"], capsys, "(base files differ)")  # weights of other content
    assert _analyze(checkpoints, prompts, out) == 0 and len(read_rows(out)) == 2


def test_out_must_be_a_results_file_other_than_the_prompts(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": 1, "prompt": "the lazy dog"})])
    fails(_analyze_argv(checkpoints, prompts, prompts), capsys, "is also the prompt file")
    other = write_lines(tmp_path / "other.jsonl", [json.dumps({"id": 1, "prompt": "the lazy dog"})])
    fails(_analyze_argv(checkpoints, prompts, other), capsys, "other.jsonl:1 is not a tuco-peft result row")
    chat = write_lines(tmp_path / "chat.txt", ["how can I help you today?"])
    fails(["compare", *_model_args(checkpoints), str(chat), str(prompts), "--out", str(chat)], capsys, "prompt file")


def test_resume_with_empty_prompts_loads_nothing(checkpoints, tmp_path, capsys, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", ["the lazy dog", "   ", "a small model reads", ""])
    out = tmp_path / "rows.jsonl"
    assert _analyze(checkpoints, prompts, out) == 0
    err = capsys.readouterr().err
    assert "prompts 2 (line 2), 4 (line 4) are empty; skipped" in err and err.count("empty") == 1
    monkeypatch.setattr(importlib.import_module("tuco_peft.io.loaders"), "load_pair", None)  # a reload would fail
    assert _analyze(checkpoints, prompts, out) == 0
    assert "resuming: 2 of 2 prompts are already in" in capsys.readouterr().err
    assert [row["id"] for row in read_rows(out)] == [1, 3]
    fails(_analyze_argv(checkpoints, write_lines(tmp_path / "e.txt", ["", " "]), out), capsys, "all empty")


def test_prompt_files_split_on_newline_only(tmp_path):
    from tuco_peft.io.prompts import read_prompts

    text = tmp_path / "p.txt"
    text.write_bytes("page\x0cbreak\r\nsecond\u2028half\n\nlast".encode())
    assert [(p.id, p.text) for p in read_prompts(text)] == [
        (1, "page\x0cbreak"),
        (2, "second\u2028half"),
        (3, ""),
        (4, "last"),
    ]
    records = tmp_path / "p.jsonl"
    records.write_text(json.dumps({"prompt": "one\u2028line"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [(p.id, p.text) for p in read_prompts(records)] == [(1, "one\u2028line")]


@pytest.mark.usefixtures("loading_forbidden")
def test_bad_input_is_refused_before_any_model_loads(checkpoints, tmp_path, capsys, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _analyze_argv(checkpoints, prompts, tmp_path / "o.jsonl")
    messages = write_lines(tmp_path / "m.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    fails([*argv[:6], str(messages), *argv[7:]], capsys, "has chat messages; pass --chat-template")
    fails([*argv, "--plot", str(tmp_path / "profile.xyz")], capsys, "--plot", "must end in one of", ".png")
    generate = ["generate", *_model_args(checkpoints)]
    fails([*generate, "the lazy dog", "--max-new-tokens", "0"], capsys, "--max-new-tokens must be at least 1")
    fails([*generate, " "], capsys, "the prompt is empty")
    fails([*generate, "the lazy dog", "--alpha", "inf"], capsys, "--alpha must be a finite number")
    fails([*generate, "the lazy dog", "--alpha", "nan"], capsys, "--alpha must be a finite number")
    bench = ["bench", *_model_args(checkpoints), "--prompts", str(prompts)]
    fails([*bench, "--repeats", "0"], capsys, "--repeats must be at least 1")
    fails(["bench", "--prompts", str(tmp_path / "missing.txt")], capsys, "missing.txt does not exist")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails([*argv, "--device", "cuda"], capsys, "CUDA is not available; pass --device cpu")


def test_generate_keeps_room_for_new_tokens_in_the_context(checkpoints, loaded, capsys):
    model, _, tokenizer = loaded
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    assert main(["generate", *_model_args(checkpoints), long_text, "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    kept = CONTEXT - 4
    assert f"of {CONTEXT} less 4 new tokens; analysing its last {kept} tokens" in captured.err
    ids = torch.tensor([tokenizer(long_text)["input_ids"][-kept:]])
    step_zero = next(line for line in captured.out.splitlines() if line.strip().startswith("0 "))
    with torch.no_grad():
        assert float(step_zero.split()[1]) == pytest.approx(float(tuco(model, ids)), abs=1e-3)
    fails(["generate", *_model_args(checkpoints), "the lazy dog", "--max-new-tokens", str(CONTEXT)], capsys, "no room")
