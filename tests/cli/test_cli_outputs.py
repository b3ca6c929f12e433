"""Every file a command writes, by one rule: never a file tuco-peft did not write (without --force), never one
file for two outputs or for an output and an input, refused before any model loads, and replaced in one
rename so that a failure leaves the old file whole. And the errors of the API and the command line that
must be one line naming the way out (exit 2), before any work."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch
from helpers.cli_fixtures import fails, write_lines
from helpers.models import base_model, lora_model

import tuco_peft
from tuco_peft.cli import main
from tuco_peft.io.locking import lock_path, replaced_atomically

PROMPTS = ["the quick brown fox", "how can I help you today?"]


def _model(checkpoints) -> list[str]:
    return ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture
def files(tmp_path):
    """A prompt file, a results file, and a file of the user's at every other name a test passes."""
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    chat = write_lines(tmp_path / "chat.txt", PROMPTS[1:])
    return prompts, chat, tmp_path / "rows.jsonl"


def _same_path_cases(checkpoints, prompts: Path, chat: Path, out: Path) -> list[tuple[list[str], str, str]]:
    """(argv, the flag to change, the other name): every pair of outputs, and of an output and an input."""
    analyze = ["analyze", *_model(checkpoints), "--prompts", str(prompts), "--out", str(out)]
    compare = ["compare", *_model(checkpoints), str(chat), str(prompts), "--out", str(out)]
    bench = ["bench", *_model(checkpoints), "--prompts", str(prompts)]
    page, figure = str(out.with_name("page.html")), str(out.with_name("plot.png"))
    return [
        ([*analyze, "--out", figure, "--plot", figure], "--plot", "--out"),
        ([*compare, "--out", figure, "--plot", figure], "--plot", "--out"),
        ([*analyze, "--positions", "all", "--html", figure, "--plot", figure], "--html", "--plot"),
        ([*analyze, "--positions", "all", "--html", str(out)], "--html", "--out"),
        ([*analyze, "--positions", "all", "--html", str(lock_path(out))], "--html", "the lock file of --out"),
        ([*analyze, "--plot", str(prompts.with_suffix(".png")), "--out", str(prompts)], "--out", "the prompt file"),
        ([*compare[:-1], str(chat)], "--out", "the prompt file A"),
        ([*analyze, "--positions", "all", "--html", page, "--prompts", page], "--html", "the prompt file"),
        ([*bench, "--json", str(prompts)], "--json", "the prompt file"),
    ]


@pytest.mark.usefixtures("loading_forbidden")
def test_two_outputs_or_an_output_and_an_input_on_one_file_are_refused_first(checkpoints, files, capsys):
    prompts, chat, out = files
    for argv, flag, other in _same_path_cases(checkpoints, prompts, chat, out):
        before = _snapshot(out.parent)
        line = fails(argv, capsys, flag, f"is also {other}", f"pass another {flag}", status=2)
        assert line.count(str(out.parent)) == 2, line  # both paths named
        assert _snapshot(out.parent) == before, argv


@pytest.mark.usefixtures("loading_forbidden")
def test_a_hard_link_is_one_file_under_two_names(checkpoints, files, capsys):
    prompts, _, out = files
    linked = out.with_name("linked.txt")
    os.link(prompts, linked)
    argv = ["analyze", *_model(checkpoints), "--prompts", str(prompts), "--out", str(linked)]
    fails(argv, capsys, "--out", "is also the prompt file", status=2)


@pytest.mark.usefixtures("loading_forbidden")
@pytest.mark.parametrize("flag, name", [("--plot", "plot.png"), ("--html", "page.html"), ("--json", "bench.json")])
def test_a_file_tuco_peft_did_not_write_is_not_overwritten(checkpoints, files, capsys, flag, name):
    prompts, _, out = files
    theirs = out.with_name(name)
    theirs.write_bytes(b"\x89PNG\r\n\x1a\n their own picture" if name.endswith(".png") else b"{}")
    if flag == "--json":
        argv = ["bench", *_model(checkpoints), "--prompts", str(prompts), "--json", str(theirs)]
    else:
        argv = ["analyze", *_model(checkpoints), "--prompts", str(prompts), "--out", str(out), "--positions", "all"]
        argv += [flag, str(theirs)]
    before = _snapshot(out.parent)
    fails(argv, capsys, f"{flag} {theirs} is a file tuco-peft did not write", "--force", status=2)
    assert _snapshot(out.parent) == before


@pytest.mark.usefixtures("loading_forbidden")
def test_eval_out_that_tuco_peft_did_not_write_is_not_overwritten(checkpoints, files, capsys):
    _, _, out = files
    theirs = write_lines(out.with_name("results.json"), ['{"mine": true}'])
    argv = ["eval", *_model(checkpoints), "--tasks", "arc_easy", "--alphas", "1", "--out", str(theirs)]
    fails(argv, capsys, "is a file tuco-peft did not write", status=2)
    assert theirs.read_text() == '{"mine": true}\n'


def test_outputs_of_a_run_are_overwritten_by_the_next_and_a_failed_write_leaves_the_old(
    checkpoints, files, capsys, monkeypatch
):
    prompts, _, out = files
    plot, page = out.with_name("plot.png"), out.with_name("page.html")
    argv = ["analyze", *_model(checkpoints), "--prompts", str(prompts), "--out", str(out), "--positions", "all"]
    argv += ["--plot", str(plot), "--html", str(page)]
    assert main(argv) == 0
    assert b"tuco-peft" in plot.read_bytes() and b'name="generator" content="tuco-peft' in page.read_bytes()
    previous = _snapshot(out.parent)

    def fails_half_way(figure, path, **kwargs):
        Path(path).write_bytes(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fails_half_way)
    assert main(argv) == 1
    assert "disk full" in capsys.readouterr().err
    assert _snapshot(out.parent) == previous  # the old plot whole, no staging file left
    monkeypatch.undo()
    page.write_text("my own notes")
    assert main([*argv, "--force"]) == 0 and page.read_text().startswith("<!DOCTYPE html>")


def test_replaced_atomically_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(target) as staging:
        staging.write_text("new, half")
        raise RuntimeError
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with replaced_atomically(target) as staging:
        assert staging.parent == tmp_path and staging.suffix == ".json"
        staging.write_text("new")
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.usefixtures("loading_forbidden")
def test_bench_json_and_demo_cache_dir_are_checked_before_any_work(checkpoints, files, capsys, monkeypatch):
    prompts, _, out = files
    demo = pytest.importorskip("tuco_peft.demo")
    monkeypatch.setattr(demo, "ensure_demo_checkpoints", lambda *a, **k: pytest.fail("the demo pair was built"))
    bench = ["bench", *_model(checkpoints), "--prompts", str(prompts)]
    fails([*bench, "--json", str(out.parent)], capsys, "--json", "is a folder", status=2)
    fails([*bench, "--json", str(out.parent / "no" / "b.json")], capsys, "does not exist", status=2)
    fails(["demo", "--cache-dir", str(prompts)], capsys, f"--cache-dir {prompts} is a file", status=2)
    fails(["bench", "--cache-dir", str(prompts / "sub")], capsys, "--cache-dir", "not a writable folder", status=2)
    if os.geteuid() != 0:  # root writes anywhere
        locked = out.parent / "locked"
        locked.mkdir(mode=0o500)
        fails(["demo", "--cache-dir", str(locked / "demo")], capsys, "not a writable folder", status=2)


@pytest.mark.usefixtures("loading_forbidden")
def test_eval_takes_a_negative_alpha_list_as_a_value(checkpoints, tmp_path, capsys):
    argv = ["eval", *_model(checkpoints), "--tasks", "arc_easy", "--out", str(tmp_path / "r.json")]
    fails([*argv, "--alphas", "-1,1"], capsys, "--alphas", "finite number ≥ 0, got -1", status=2)


@pytest.mark.usefixtures("loading_forbidden")
def test_an_adapter_config_that_is_not_json_is_named(pair, tmp_path, capsys):
    base, adapter = pair
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text()[:-5])
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    argv = ["analyze", "--base", str(base), "--adapter", str(adapter), "--prompts", str(prompts), "--out", "o.jsonl"]
    fails(argv, capsys, f"{config} is not valid JSON", status=2)


@pytest.fixture(scope="module")
def tiny_lora():
    return lora_model(base_model("llama", seed=0)).eval()


def test_token_ids_outside_the_vocabulary_are_named(tiny_lora):
    size = tiny_lora.get_input_embeddings().num_embeddings
    for bad in (size, -1):
        with pytest.raises(tuco_peft.InputError, match=f"token id {bad}, outside the model's vocabulary of {size}"):
            tuco_peft.tuco(tiny_lora, torch.tensor([[1, 2, bad, 3]]))


def test_ragged_positions_are_an_input_error(tiny_lora):
    with pytest.raises(tuco_peft.InputError, match="positions must be token indices"):
        tuco_peft.decompose(tiny_lora, torch.tensor([[1, 2, 3], [4, 5, 6]]), positions=[[0, 1], [2]])


def test_nan_weights_are_named_as_such(tiny_lora):
    broken = lora_model(base_model("llama", seed=0)).eval()
    layer = next(module for name, module in broken.named_modules() if name.endswith("layers.1.mlp.down_proj"))
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = float("nan")
    with pytest.raises(tuco_peft.TuCoError, match="NaN or infinity from block 1 on") as raised:
        tuco_peft.tuco(broken, torch.tensor([[1, 2, 3, 4]]))
    assert "residual stream" not in str(raised.value)


@pytest.mark.usefixtures("loading_forbidden")
def test_a_hub_id_without_network_fails_at_once(checkpoints, tmp_path, capsys, monkeypatch):
    import time

    from huggingface_hub import constants

    from tuco_peft.io import checkpoints as loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: the connection is refused
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    loading._hub_unreachable.cache_clear()
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    argv = ["analyze", "--base", "tuco-test-org/no-such-model", "--adapter", str(checkpoints.adapter)]
    started = time.monotonic()
    fails(
        [*argv, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")],
        capsys,
        "cannot be reached",
        "HF_HUB_OFFLINE=1",
        status=2,
    )
    assert time.monotonic() - started < loading.HUB_PROBE_SECONDS + 2
    loading._hub_unreachable.cache_clear()
