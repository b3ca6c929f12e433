"""Tiny checkpoints saved to disk for the command-line tests, with a tokenizer trained offline."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers.models import base_model, lora_model
from tuco_peft.cli import main
from tuco_peft.demo.build import build_tokenizer

CONTEXT = 40  # small, so that an over-long prompt is easy to write
_TEXT = [
    "the quick brown fox jumps over the lazy dog near the river bank",
    "a small model reads a short prompt and writes a shorter answer",
    "how can I help you today? tell me about the old mill by the water",
] * 20


@dataclass(frozen=True)
class Checkpoints:
    base: Path
    adapter: Path
    other_base: Path  # another architecture size: the adapter does not fit it
    pickle_base: Path  # the base saved as a pickle (pytorch_model.bin) only
    remote_code_base: Path  # the base with an auto_map entry that asks for custom code


def _save_base(directory: Path, hidden_size: int, tokenizer, seed: int) -> torch.nn.Module:
    model = base_model(
        "llama", seed=seed, hidden_size=hidden_size, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def save_checkpoints(root: Path) -> Checkpoints:
    tokenizer = build_tokenizer(_TEXT, vocab_size=300)
    paths = Checkpoints(
        root / "base", root / "adapter", root / "other_base", root / "pickle_base", root / "remote_base"
    )
    base = _save_base(paths.base, 64, tokenizer, seed=0)
    _save_base(paths.other_base, 32, tokenizer, seed=0)
    lora_model(base).save_pretrained(paths.adapter)

    shutil.copytree(paths.base, paths.pickle_base)
    weights = paths.pickle_base / "model.safetensors"
    torch.save(load_file(weights), paths.pickle_base / "pytorch_model.bin")
    weights.unlink()

    shutil.copytree(paths.base, paths.remote_code_base)
    config_file = paths.remote_code_base / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    config_file.write_text(json.dumps(config))
    return paths


def save_run(base: Path, run: Path, losses: dict[int, float], **lora_kwargs) -> Path:
    """A Trainer-like run folder of adapters of the model saved at ``base``: a ``checkpoint-N`` for each step
    of ``losses`` (different random LoRA weights), with a trainer_state.json logging the losses so far."""
    from transformers import AutoModelForCausalLM

    for index, step in enumerate(sorted(losses)):
        folder = run / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(base)
        lora_model(model, seed=10 + index, **lora_kwargs).save_pretrained(folder)
        log = [{"loss": loss, "step": logged} for logged, loss in sorted(losses.items()) if logged <= step]
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
    return run


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fails(argv: list[str], capsys, *fragments: str, status: int | None = None) -> str:
    """Run the CLI expecting a one-line error that contains ``fragments`` (and exit ``status``, if given)."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 if status is None else code == status, err
    assert lines[-1].startswith("tuco-peft: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]
