"""`tuco-peft` on a full fine-tune: --model FINETUNED --base-model PRETRAINED, streamed or resident."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli_fixtures import fails, read_rows, write_lines
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuco_peft.cli import main
from tuco_peft.core.decompose import tuco

PROMPTS = ["the quick brown fox", "how can I help you today?", "tell me about the old mill by the water", "dog"]


@pytest.fixture(scope="module")
def finetuned_dir(checkpoints, tmp_path_factory):
    """The base with every weight moved a little: a full fine-tune, saved with the base's tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints.base).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * param.std() * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("finetuned")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(checkpoints.base).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(checkpoints, finetuned_dir):
    """Both models loaded independently of tuco_peft.loading."""
    finetuned = AutoModelForCausalLM.from_pretrained(finetuned_dir).eval()
    pretrained = AutoModelForCausalLM.from_pretrained(checkpoints.base).eval()
    return finetuned, pretrained, AutoTokenizer.from_pretrained(finetuned_dir)


def _full_args(finetuned_dir, pretrained_dir):
    return ["--model", str(finetuned_dir), "--base-model", str(pretrained_dir)]


def test_analyze_rows_equal_tuco_with_base_model_and_the_two_model_oracle(checkpoints, finetuned_dir, loaded, tmp_path):
    finetuned, pretrained, tokenizer = loaded
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    streamed, resident = tmp_path / "streamed.jsonl", tmp_path / "resident.jsonl"
    argv = ["analyze", *_full_args(finetuned_dir, checkpoints.base), "--prompts", str(prompts), "--batch-size", "3"]
    assert main([*argv, "--out", str(streamed)]) == 0
    assert main([*argv, "--out", str(resident), "--resident-base"]) == 0
    rows = read_rows(streamed)
    assert [row["id"] for row in rows] == [1, 2, 3, 4]
    for row, text in zip(rows, PROMPTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        ones = torch.ones_like(ids)
        with torch.no_grad():
            expected = float(tuco(finetuned, ids, base_model=pretrained))
            ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, ones)
        assert row["n_tokens"] == ids.shape[1]
        assert abs(row["tuco"] - expected) < 1e-5
        assert abs(row["tuco"] - float(tuco_at_last(ptc, ftc, ones))) < 1e-5
        torch.testing.assert_close(torch.tensor(row["ftc_l1"]), ftc[0, :, -1].abs().sum(-1), rtol=1e-4, atol=1e-5)
    assert expected > 0.01  # the fine-tune does contribute: a zero FTC would make the comparison vacuous
    for got, want in zip(read_rows(resident), rows):
        assert got["tuco"] == pytest.approx(want["tuco"], abs=1e-6)
        assert got["ptc_l1"] == pytest.approx(want["ptc_l1"], abs=1e-6)


def test_generate_and_compare_take_a_full_finetune(checkpoints, finetuned_dir, loaded, tmp_path, capsys):
    finetuned, pretrained, tokenizer = loaded
    model_args = _full_args(finetuned_dir, checkpoints.base)
    assert main(["generate", *model_args, "the quick brown", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    ids = torch.tensor([tokenizer("the quick brown")["input_ids"]])
    with torch.no_grad():
        greedy = finetuned.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        first = float(tuco(finetuned, ids, base_model=pretrained))
    assert printed.startswith(tokenizer.decode(greedy[0]))
    step_zero = next(line for line in printed.splitlines() if line.strip().startswith("0 "))
    assert float(step_zero.split()[1]) == pytest.approx(first, abs=1e-3)

    chat = write_lines(tmp_path / "chat.txt", PROMPTS[1:3])
    web = write_lines(tmp_path / "web.txt", [PROMPTS[0], PROMPTS[3]])
    assert main(["compare", *model_args, str(chat), str(web), "--resident-base"]) == 0
    assert "ROC-AUC of TuCo, chat (positive) vs web" in capsys.readouterr().out


def test_base_model_of_another_architecture_or_size_is_refused(checkpoints, finetuned_dir, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    for extra in ([], ["--resident-base"]):
        argv = ["analyze", *_full_args(finetuned_dir, checkpoints.other_base), "--prompts", str(prompts)]
        out = ["--out", str(tmp_path / "o.jsonl")]
        fails([*argv, *out, *extra], capsys, "width 32", "architecture and size", status=2)
    assert not (tmp_path / "o.jsonl").exists()


def test_pickle_only_base_model_cannot_be_streamed(checkpoints, finetuned_dir, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    argv = ["analyze", *_full_args(finetuned_dir, checkpoints.pickle_base), "--prompts", str(prompts)]
    argv += ["--out", str(tmp_path / "o.jsonl")]
    fails(argv, capsys, "no .safetensors weights to stream", "--resident-base", status=2)
    fails([*argv, "--resident-base"], capsys, "pytorch_model.bin", "--trust-pickle", status=2)
    assert main([*argv, "--resident-base", "--trust-pickle"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--base", "B", "--base-model", "P"], "--base and --base-model mix a LoRA fine-tune with a full fine-tune"),
        (["--adapter", "A", "--model", "M", "--base-model", "P"], "mix a LoRA fine-tune with a full fine-tune"),
        (["--model", "M"], "--model needs --base-model"),
        (["--base-model", "P"], "--base-model needs --model"),
        (["--base", "B"], "--base needs --adapter"),
        ([], "no model given; pass --base BASE --adapter ADAPTER for a LoRA fine-tune, or --model FINETUNED"),
        (["--base", "B", "--adapter", "A", "--resident-base"], "--resident-base goes with --base-model"),
    ],
)
def test_ambiguous_or_incomplete_model_flags_are_refused(flags, message, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS[:1])
    fails(["analyze", *flags, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")], capsys, message, status=2)


def test_bench_measures_streamed_and_resident_base(checkpoints, finetuned_dir, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    report = tmp_path / "bench.json"
    argv = ["bench", *_full_args(finetuned_dir, checkpoints.base), "--prompts", str(prompts), "--batch-size", "2"]
    assert main([*argv, "--repeats", "1", "--json", str(report)]) == 0
    figures = json.loads(report.read_text())["workloads"]["large"]
    assert {"decompose_resident_base", "decompose_streamed_base", "two_model_two_pass"} <= set(figures["methods"])
    assert figures["batch"][0] == 2 and figures["max_tuco_disagreement"] < 1e-4
