"""The demo pair: built offline, deterministic, cached; `tuco-peft demo` runs end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuco_peft.cli import main
from tuco_peft.demo import DemoRecipe, corpus, demo_prompts, ensure_demo_checkpoints, ensure_demo_run
from tuco_peft.demo.build import CACHE_ENV, SCALE_ENV, default_cache_dir
from tuco_peft.demo.run import run_demo

TINY = DemoRecipe(pretrain_steps=3, finetune_steps=2)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_build_is_deterministic_and_cached(tmp_path):
    base, adapter = ensure_demo_checkpoints(tmp_path / "a", TINY)
    weights = adapter / "adapter_model.safetensors"
    built_at = weights.stat().st_mtime_ns
    assert ensure_demo_checkpoints(tmp_path / "a", TINY) == (base, adapter)
    assert weights.stat().st_mtime_ns == built_at  # reused, not rebuilt
    other_base, other_adapter = ensure_demo_checkpoints(tmp_path / "b", TINY)
    assert (other_base / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    assert (other_adapter / "adapter_model.safetensors").read_bytes() == weights.read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == [base.parent.name]  # no staging folder left behind
    run = ensure_demo_run(tmp_path / "a", TINY)
    assert sorted(folder.name for folder in run.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # two steps
    assert (run / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == weights.read_bytes()  # the last
    state = json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and [entry["step"] for entry in state["log_history"]] == [1]

    tokenizer = AutoTokenizer.from_pretrained(base)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about the river."}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == corpus.chat_prompt("Tell me about the river.")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(corpus.USER) and ids[-1] == tokenizer.convert_tokens_to_ids(
        corpus.ASSISTANT
    )


def test_demo_prompts_are_two_distinct_kinds():
    groups = demo_prompts()
    assert set(groups) == {"chat", "web"} and len(groups["chat"]) == len(groups["web"]) == 40
    assert all(p.startswith(corpus.USER) and p.endswith(corpus.ASSISTANT) for p in groups["chat"])
    assert not any(marker in p for p in groups["web"] for marker in corpus.SPECIAL_TOKENS)
    assert demo_prompts() == groups


def test_demo_help_says_where_the_pair_is_cached(monkeypatch, capsys):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    default = str(default_cache_dir()).replace(str(Path.home()), "~", 1)
    assert f"else ${CACHE_ENV}, else {default}" in text
    assert "<hash>/base holds the model and its tokenizer, <hash>/adapter the LoRA adapter" in text


def test_example_chat_prompts_are_distinct_and_in_the_demos_chat_format():
    prompts = (EXAMPLES / "demo_chat.txt").read_text(encoding="utf-8").splitlines()
    assert len(prompts) >= 8 and len(set(prompts)) == len(prompts)
    assert all(p.startswith(corpus.USER) and p.endswith(corpus.END + corpus.ASSISTANT) for p in prompts)


def test_demo_command_runs_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(SCALE_ENV, "0.01")
    assert main(["demo", "--cache-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "ROC-AUC (chat vs web)" in printed and "padded" in printed and "α = 1.5" in printed
    assert "4. TuCo over training" in printed and "step    3:" in printed  # 1% of 300 fine-tuning steps


@pytest.mark.slow
def test_full_demo_separates_chat_from_web_and_steering_moves_refusals(tmp_path, monkeypatch, capsys):
    """The real recipe (about a CPU-minute to build): the figures the README quotes, and its picture's
    `tuco-peft compare` of the example prompt files."""
    monkeypatch.delenv(SCALE_ENV, raising=False)
    figures = run_demo(cache_dir=tmp_path)
    assert figures.auc >= 0.9
    assert figures.padding["padded"] < figures.padding["plain"]
    refusal = figures.refusal_probability
    assert refusal[0.0] < refusal[0.5] < refusal[1.0]
    steps = list(figures.over_training)
    assert steps == sorted(steps) and steps[-1] == DemoRecipe().finetune_steps
    first, last = figures.over_training[steps[0]], figures.over_training[steps[-1]]
    assert first["chat"] < last["chat"] and first["web"] < last["web"]  # the fine-tune's contribution grows
    assert last["chat"] == pytest.approx(figures.mean_tuco["chat"], abs=1e-6)  # the last checkpoint is the adapter

    base, adapter = ensure_demo_checkpoints(tmp_path)
    files = [str(EXAMPLES / "demo_chat.txt"), str(EXAMPLES / "demo_web.txt")]
    capsys.readouterr()
    assert main(["compare", "--base", str(base), "--adapter", str(adapter), *files]) == 0
    printed = capsys.readouterr().out
    means = dict(re.findall(r"^(demo_chat|demo_web): 40 prompts, TuCo mean ([0-9.]+)", printed, re.MULTILINE))
    assert float(means["demo_chat"]) > float(means["demo_web"])
    assert float(re.search(r"ROC-AUC of TuCo, demo_chat \(positive\) vs demo_web: ([0-9.]+)", printed)[1]) >= 0.9
