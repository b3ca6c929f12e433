"""The results file of `tuco-peft analyze`/`compare`: one writer at a time, rows resumed only when computed from
the same content, a writable path proven before any model loads, and a damaged file repaired, not discarded."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from helpers.cli_fixtures import CONTEXT, fails, read_rows, write_lines
from helpers.models import lora_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuco_peft.cli import main
from tuco_peft.core.decompose import decompose
from tuco_peft.io import fingerprint
from tuco_peft.io.checkpoints import Source, safetensors_header
from tuco_peft.io.locking import lock_path, results_lock

DECOMPOSE_MODULE = importlib.import_module("tuco_peft.core.decompose")
PROMPTS = ["the quick brown fox", "how can I help you today?", "a small model reads", "the lazy dog", "a river"]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 6000)  # 264 KB: only its end is tokenized


def _argv(base, adapter, prompts, out):
    return ["analyze", "--base", str(base), "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(out)]


@pytest.fixture
def computed(monkeypatch):
    """The batch sizes decompose was called with: what a run computed rather than resumed."""
    sizes = []
    monkeypatch.setattr(
        DECOMPOSE_MODULE, "decompose", lambda m, ids, *a, **k: sizes.append(len(ids)) or decompose(m, ids, *a, **k)
    )
    return sizes


@pytest.mark.slow  # processes of their own
def test_a_second_process_on_the_same_out_is_refused_or_waits(checkpoints, tmp_path, capsys):
    n = 300
    prompts = write_lines(tmp_path / "p.txt", [f"the quick brown fox {i}" for i in range(n)])
    out = tmp_path / "rows.jsonl"
    argv = [*_argv(checkpoints.base, checkpoints.adapter, prompts, out), "--batch-size", "1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "tuco_peft.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could start"
        fails(argv, capsys, f"is being written by another tuco-peft run (pid {first.pid})", "--wait", status=2)
        assert main([*argv, "--wait"]) == 0  # starts when the first run is done, and finds every row there
    finally:
        first.wait(timeout=120)
    assert first.returncode == 0, first.stderr.read()
    err = capsys.readouterr().err
    assert f"waiting for pid {first.pid} to finish writing" in err and f"resuming: {n} of {n} prompts" in err
    ids = [row["id"] for row in read_rows(out)]
    assert sorted(ids) == list(range(1, n + 1))  # each row once
    assert not lock_path(out).exists()


@pytest.mark.usefixtures("loading_forbidden")
def test_a_held_lock_refuses_before_any_model_loads(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    with results_lock(out):
        fails(_argv(checkpoints.base, checkpoints.adapter, prompts, out), capsys, f"(pid {os.getpid()})", status=2)
        chat = write_lines(tmp_path / "chat.txt", PROMPTS[:2])
        compare = ["compare", "--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
        fails([*compare, str(chat), str(prompts), "--out", str(out)], capsys, "being written by another", status=2)
    assert not out.exists()


def test_the_stale_lock_of_a_dead_process_is_taken_over(checkpoints, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    gone = subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True, check=True)
    lock_path(out).write_bytes(gone.stdout.strip())  # what a killed run leaves
    assert main(_argv(checkpoints.base, checkpoints.adapter, prompts, out)) == 0
    assert len(read_rows(out)) == 2 and not lock_path(out).exists()


def test_an_adapter_retrained_in_place_is_not_mixed_in(pair, tmp_path, capsys):
    base, adapter = pair
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    assert main(_argv(base, adapter, prompts, out)) == 0
    rows = read_rows(out)
    assert rows[0]["fingerprint"]["command"] == "analyze" and set(rows[0]["fingerprint"]) == {
        "command",
        "base",
        "adapter",
        "tokenizer",
    }
    lora_model(AutoModelForCausalLM.from_pretrained(base), seed=7).save_pretrained(adapter)  # same folder
    more = write_lines(tmp_path / "more.txt", [*PROMPTS, "one more prompt"])
    fails(_argv(base, adapter, more, out), capsys, "(adapter files differ)", "pass a new --out", status=2)
    assert read_rows(out) == rows


def test_a_base_retrained_in_place_or_a_new_chat_template_is_refused(pair, tmp_path, capsys):
    base, adapter = pair
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    assert main(_argv(base, adapter, prompts, out)) == 0
    config_file = base / "tokenizer_config.json"
    original = config_file.read_text()
    config_file.write_text(json.dumps({**json.loads(original), "chat_template": "{{ messages[0]['content'] }}"}))
    fails(_argv(base, adapter, prompts, out), capsys, "(tokenizer files differ)", status=2)
    config_file.write_text(original)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(base)
    fails(_argv(base, adapter, prompts, out), capsys, "(base files differ)", status=2)


def test_large_weight_files_are_keyed_by_content_samples_not_by_time(pair, tmp_path, capsys, monkeypatch, computed):
    monkeypatch.setattr(fingerprint, "HASHED_IN_FULL_BYTES", 0)  # every weight file counts as large
    base, adapter = pair
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    assert main(_argv(base, adapter, prompts, out)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    weights = moved / "model.safetensors"
    before = weights.stat()
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # the same weights, touched
    computed.clear()
    assert main(_argv(moved, adapter, prompts, out)) == 0 and computed == []
    # Other weights written over it at the same size, its time put back (cp -p, rsync -a of another file).
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert weights.stat().st_size == before.st_size and safetensors_header(weights) == safetensors_header(
        base / weights.name
    )
    fails(_argv(moved, adapter, prompts, out), capsys, "(base files differ)", status=2)


def test_a_large_file_is_sampled_in_every_tensor_and_read_in_part_only(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "HASHED_IN_FULL_BYTES", 0)
    tensors = {f"t{i}": torch.arange(i * 10_000, (i + 1) * 10_000, dtype=torch.float32) for i in range(3)}
    weights = tmp_path / "model.safetensors"
    save_file(tensors, weights)
    digest = fingerprint.file_digest(weights)
    for name in tensors:  # a change in the middle of any one tensor (the middle block) changes the digest
        changed = dict(tensors)
        changed[name] = changed[name].clone()
        changed[name][5_000] += 1
        save_file(changed, weights)
        assert fingerprint.file_digest(weights) != digest
    save_file(tensors, weights)
    assert fingerprint.file_digest(weights) == digest
    read = []
    original_read = fingerprint._read
    monkeypatch.setattr(
        fingerprint, "_read", lambda handle, start, end: read.append(end - start) or original_read(handle, start, end)
    )
    fingerprint.file_digest(weights)
    assert sum(read) <= len(safetensors_header(weights)) + 8 + 3 * 3 * fingerprint.SAMPLE_BYTES < weights.stat().st_size


def test_a_hub_id_is_fingerprinted_by_its_id():
    source = Source("--base", "tuco-test-org/no-such-model", None)
    assert fingerprint.checkpoint_fingerprint(source) == "hub:tuco-test-org/no-such-model"
    assert fingerprint.tokenizer_fingerprint(source) == "hub:tuco-test-org/no-such-model"


@pytest.mark.usefixtures("loading_forbidden")
def test_analyze_and_compare_do_not_share_a_results_file(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    analyze_out, compare_out = tmp_path / "analyze.jsonl", tmp_path / "compare.jsonl"
    row = {"id": 1, "prompt": "x", "tuco": 0.5, "ptc_l1": [1.0], "settings": {}}
    write_lines(analyze_out, [json.dumps({**row, "fingerprint": {"command": "analyze"}})])
    write_lines(compare_out, [json.dumps({"set": "p", **row, "fingerprint": {"command": "compare"}})])
    model = ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
    other = write_lines(tmp_path / "q.txt", PROMPTS[2:])
    fails(["compare", *model, str(prompts), str(other), "--out", str(analyze_out)], capsys, "rows of tuco-peft analyze")
    fails(_argv(checkpoints.base, checkpoints.adapter, prompts, compare_out), capsys, "rows of tuco-peft compare")
    earlier = write_lines(tmp_path / "earlier.jsonl", [json.dumps(row)])  # no fingerprint
    fails(_argv(checkpoints.base, checkpoints.adapter, prompts, earlier), capsys, "rows of an earlier tuco-peft")


@pytest.mark.usefixtures("loading_forbidden")
def test_an_unwritable_out_is_refused_before_any_model_loads(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, prompts / "rows.jsonl")  # under a file
    fails(argv, capsys, "p.txt/rows.jsonl is not writable", "pass another --out", status=2)
    fails(_argv(checkpoints.base, checkpoints.adapter, prompts, tmp_path), capsys, "is a folder", status=2)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        fails(_argv(checkpoints.base, checkpoints.adapter, prompts, locked / "r.jsonl"), capsys, "not writable")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.txt"] + (["read-only"] if os.geteuid() else [])


def test_a_damaged_row_is_repaired_keeping_every_good_row(checkpoints, tmp_path, capsys, computed):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, out)
    assert main(argv) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join([*lines[:2], lines[2][:30] + "\n", *lines[3:], lines[0]]))  # line 3 cut, line 1 twice
    message = fails(argv, capsys, "rows.jsonl:3 is not a tuco-peft result row (and 1 more lines)", status=2)
    assert "--repair to keep its 4 good rows" in message and "delete" not in message
    computed.clear()
    assert main([*argv, "--repair"]) == 0
    assert sum(computed) == 1  # only the damaged row is computed again
    assert "--repair dropped line(s) 3, 6" in capsys.readouterr().err
    assert sorted(row["id"] for row in read_rows(out)) == [1, 2, 3, 4, 5]
    one_line = write_lines(tmp_path / "notes.jsonl", ["not a row"])
    message = fails([*argv[:-1], str(one_line), "--repair"], capsys, "notes.jsonl:1 is not a tuco-peft result row")
    assert "holds none, so tuco-peft did not write it" in message and "--force" in message
    assert one_line.read_text() == "not a row\n"


@pytest.mark.parametrize(
    "content",
    [
        "a note to self",
        '{"model": "llama", "layers": 32}',
        "{% for message in messages %}{{ message['content'] }}{% endfor %}",  # a chat_template.jinja
        json.dumps({"id": 1, "prompt": "the quick brown fox"}),  # a prompt, not a row
    ],
)
def test_a_one_line_file_that_is_not_ours_is_never_cut(checkpoints, tmp_path, capsys, content, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "notes.txt"
    out.write_text(content)  # no newline: it is not a row cut short
    monkeypatch.setattr(importlib.import_module("tuco_peft.io.loaders"), "load_pair", None)  # refused before loading
    fails(_argv(checkpoints.base, checkpoints.adapter, prompts, out), capsys, "did not write it", "--force", status=2)
    assert out.read_text() == content
    monkeypatch.undo()
    assert main([*_argv(checkpoints.base, checkpoints.adapter, prompts, out), "--force"]) == 0
    assert [row["id"] for row in read_rows(out)] == [1, 2]


def test_a_last_row_without_its_newline_is_kept(checkpoints, tmp_path, computed):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "rows.jsonl"
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, out)
    assert main(argv) == 0
    rows = read_rows(out)
    out.write_text(out.read_text().removesuffix("\n"))
    computed.clear()
    assert main(argv) == 0 and computed == []
    assert read_rows(out) == rows and out.read_text().endswith("}\n")


def test_repair_drops_edited_and_repeated_rows_and_computes_them_again(checkpoints, tmp_path, capsys, computed):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "rows.jsonl"
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, out)
    assert main(argv) == 0
    rows = read_rows(out)
    edited = [dict(row) for row in rows]
    edited[1]["prompt"] = "a prompt edited by hand"  # still a valid row, of another prompt
    edited[3]["tuco"] = "0.5"  # still valid JSON, but not a row tuco-peft writes
    damaged = [json.dumps(row) + "\n" for row in edited] + [json.dumps(rows[0]) + "\n"]  # and line 1 again
    out.write_text("".join(damaged))
    fails(argv, capsys, "rows.jsonl:4 is not a tuco-peft result row (and 1 more lines)", "--repair", status=2)
    assert out.read_text() == "".join(damaged)  # refused: left as it was
    out.write_text("".join(damaged[:3] + damaged[4:5]))  # without the damaged lines: the edited row is named
    fails(argv, capsys, "already has a row for id 2 with another prompt, (line 2)", "--repair", status=2)
    out.write_text("".join(damaged))
    computed.clear()
    assert main([*argv, "--repair"]) == 0
    assert sum(computed) == 2  # ids 2 and 4, nothing else
    err = capsys.readouterr().err
    assert "--repair dropped line(s) 2, 4, 6" in err and "line 2 is a row of another prompt (id 2)" in err
    repaired = read_rows(out)
    assert [row["id"] for row in repaired] == [1, 2, 3, 4, 5]
    for row, expected in zip(repaired, rows):
        assert row["prompt"] == expected["prompt"] and row["tuco"] == pytest.approx(expected["tuco"], abs=1e-6)


def test_repair_never_fails_after_rewriting(checkpoints, tmp_path, capsys):
    """A check that fails (rows of other settings) fails before --repair has changed the file."""
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, out)
    assert main(argv) == 0
    damaged = out.read_text() + "not a row\n"
    out.write_text(damaged)
    fails([*argv, "--repair", "--positions", "all"], capsys, "(positions differ)", status=2)
    assert out.read_text() == damaged


@pytest.mark.usefixtures("loading_forbidden")
def test_a_lock_path_holding_a_file_of_the_user_is_not_taken(checkpoints, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "rows.jsonl"
    lock_path(out).write_text("my notes about the lock\n")
    fails(_argv(checkpoints.base, checkpoints.adapter, prompts, out), capsys, "is a file tuco-peft did not write")
    assert lock_path(out).read_text() == "my notes about the lock\n" and not out.exists()


def test_a_prompt_cut_to_fit_the_context_keeps_what_was_analysed_and_resumes_by_its_digest(
    checkpoints, tmp_path, capsys, computed
):
    prompts = write_lines(tmp_path / "p.txt", [PROMPTS[0], LONG])
    out = tmp_path / "rows.jsonl"
    argv = _argv(checkpoints.base, checkpoints.adapter, prompts, out)
    assert main(argv) == 0
    whole, cut = read_rows(out)
    assert list(whole)[:4] == ["id", "prompt", "n_tokens", "tuco"] and whole["prompt"] == PROMPTS[0]  # as before
    tokenizer = AutoTokenizer.from_pretrained(checkpoints.base)
    assert cut["prompt"] == tokenizer.decode(tokenizer(LONG)["input_ids"][-CONTEXT:]) and LONG.endswith(cut["prompt"])
    assert cut["n_tokens"] == CONTEXT and cut["prompt_chars"] == len(LONG) and len(cut["prompt_sha256"]) == 64
    assert out.stat().st_size < 5_000
    written = out.read_bytes()
    computed.clear()
    assert main(argv) == 0 and computed == [] and out.read_bytes() == written  # resumed, the file as it was

    middle = len(LONG) // 2
    edited = LONG[:middle] + LONG[middle:].replace("lazy", "hazy", 1)  # same length, same end: another prompt
    write_lines(prompts, [PROMPTS[0], edited])
    fails(argv, capsys, "already has a row for id 2 with another prompt, (line 2)", "--repair", status=2)
    assert out.read_bytes() == written
    assert main([*argv, "--repair"]) == 0 and computed == [1]
    assert "line 2 is a row of another prompt (id 2)" in capsys.readouterr().err
    repaired = read_rows(out)[1]
    assert repaired["prompt"] == cut["prompt"] and repaired["prompt_sha256"] != cut["prompt_sha256"]

    lines = out.read_text().splitlines(keepends=True)
    for damage, problem in [
        ({"prompt_chars": len(edited) - 1}, "with another prompt"),
        ({"prompt_chars": None}, "not a"),
    ]:
        out.write_text(lines[0] + json.dumps({**repaired, **damage}) + "\n")
        fails(argv, capsys, problem, "--repair", status=2)
    old_style = {key: value for key, value in repaired.items() if key not in ("prompt_chars", "prompt_sha256")}
    out.write_text(lines[0] + json.dumps({**old_style, "prompt": edited}, ensure_ascii=False) + "\n")
    written = out.read_bytes()  # a row of an earlier tuco-peft, which kept the whole prompt
    computed.clear()
    assert main(argv) == 0 and computed == [] and out.read_bytes() == written


def test_a_chat_prompt_cut_to_fit_the_context_counts_its_contents_and_resumes_by_its_digest(
    checkpoints, tmp_path, capsys, computed, monkeypatch
):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": LONG}]
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps({"id": "long", "messages": messages})])
    out, page = tmp_path / "rows.jsonl", tmp_path / "page.html"
    argv = [*_argv(checkpoints.base, checkpoints.adapter, prompts, out), "--chat-template", "--positions", "all"]
    assert main(argv) == 0
    (row,) = read_rows(out)
    assert row["prompt_chars"] == len("be brief") + len(LONG) and row["prompt"].endswith("dog<|end|><|assistant|>")
    assert len(row["prompt"]) < 1_000 and len(row["token_tuco"]) == row["n_tokens"] == CONTEXT
    tokenizer_class = type(AutoTokenizer.from_pretrained(checkpoints.base))
    tokenized, tokenize = [], tokenizer_class.__call__
    monkeypatch.setattr(
        tokenizer_class, "__call__", lambda self, t, **k: tokenized.append(len(t)) or tokenize(self, t, **k)
    )
    computed.clear()
    assert main([*argv, "--html", str(page)]) == 0 and computed == []  # resumed, its page drawn from its row
    assert "from its row in" in page.read_text() and max(tokenized) < len(LONG) // 4  # only the end tokenized again
    messages[0]["role"] = "developer"  # the same contents under another role: another prompt
    write_lines(prompts, [json.dumps({"id": "long", "messages": messages})])
    fails(argv, capsys, "already has a row for id 'long' with another prompt", status=2)
