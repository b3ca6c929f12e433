"""Checkpoint folders that cannot work are named, with the way out, before any model loads: truncated
safetensors, an adapter where a model is wanted (and the reverse), and no tokenizer."""

from __future__ import annotations

import pytest
from helpers.cli_fixtures import fails, write_lines

from tuco_peft.io.checkpoints import LoadOptions, Source
from tuco_peft.io.loaders import load_adapter, load_base


def _argv(base, adapter, tmp_path, command="analyze"):
    prompts = write_lines(tmp_path / "p.txt", ["the lazy dog"])
    models = ["--base", str(base), "--adapter", str(adapter)]
    if command == "generate":
        return ["generate", *models, "the lazy dog"]
    return ["analyze", *models, "--prompts", str(prompts), "--out", str(tmp_path / "rows.jsonl")]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("command", ["analyze", "generate"])
@pytest.mark.usefixtures("loading_forbidden")
def test_truncated_safetensors_are_named(pair, tmp_path, capsys, command):
    base, adapter = pair
    _truncate(adapter / "adapter_model.safetensors")
    message = fails(_argv(base, adapter, tmp_path, command), capsys, "--adapter", "truncated or corrupt", status=2)
    assert str(adapter / "adapter_model.safetensors") in message and "download it again" in message
    _truncate(base / "model.safetensors")
    message = fails(_argv(base, adapter, tmp_path, command), capsys, "--base", "truncated or corrupt", status=2)
    assert str(base / "model.safetensors") in message


@pytest.mark.usefixtures("loading_forbidden")
def test_a_header_that_is_not_safetensors_is_named(pair, tmp_path, capsys):
    base, adapter = pair
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes((8).to_bytes(8, "little") + b"not json" + weights.read_bytes()[16:])
    fails(_argv(base, adapter, tmp_path), capsys, "adapter_model.safetensors is truncated or corrupt", status=2)


def test_the_loaders_name_corrupt_weights_too(pair):
    base, _ = pair
    _truncate(base / "model.safetensors", keep=0.9)
    with pytest.raises(Exception, match="model.safetensors is truncated or corrupt"):
        load_base(Source("--base", str(base), base), LoadOptions(device="cpu"))
    with pytest.raises(Exception, match="is a full model"):
        load_adapter(None, Source("--adapter", str(base), base), LoadOptions(device="cpu"))


@pytest.mark.usefixtures("loading_forbidden")
def test_an_adapter_as_base_or_a_model_as_adapter_is_named(pair, tmp_path, capsys):
    base, adapter = pair
    fails(
        _argv(adapter, adapter, tmp_path),
        capsys,
        f"--base {adapter} is a PEFT adapter (adapter_config.json), not a model",
        "as --base and this folder as --adapter",
        status=2,
    )
    fails(_argv(base, base, tmp_path), capsys, f"--adapter {base} is a full model (config.json)", status=2)


@pytest.mark.usefixtures("loading_forbidden")
def test_no_tokenizer_is_named(pair, tmp_path, capsys):
    base, adapter = pair
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    fails(_argv(base, adapter, tmp_path), capsys, f"--base {base} holds no tokenizer", "save_pretrained", status=2)
