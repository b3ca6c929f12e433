"""Length-bucketed batching in analyze and compare: batches of similar length under a token budget, rows
in the prompt file's order, and an interrupted run resumed without a row lost or repeated."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.cli_fixtures import read_rows, write_lines

from tuco_peft.apps.runner import Batching, padding_fraction, plan_batches
from tuco_peft.cli import main
from tuco_peft.core.decompose import decompose

DECOMPOSE_MODULE = importlib.import_module("tuco_peft.core.decompose")  # the package re-exports a function of that name
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "near", "the", "river", "bank"]
MIXED = [" ".join(WORDS[: 1 + (7 * i) % 12]) for i in range(24)]  # 1 to 12 words, shuffled by the stride


def _argv(checkpoints, prompts, out, *extra):
    model = ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
    return ["analyze", *model, "--prompts", str(prompts), "--out", str(out), *extra]


@pytest.fixture
def batches(monkeypatch):
    """The [batch, length] shape of every batch decompose was called with."""
    shapes = []
    monkeypatch.setattr(
        DECOMPOSE_MODULE,
        "decompose",
        lambda m, ids, *a, **k: shapes.append(tuple(ids.shape)) or decompose(m, ids, *a, **k),
    )
    return shapes


def _cost(lengths, batches, batching):
    """Positions computed plus the overhead of each forward pass; None where a batch breaks a cap."""
    total = batching.overhead_tokens * len(batches)
    for batch in batches:
        positions = len(batch) * max(lengths[i] for i in batch)
        over_budget = batching.max_batch_tokens is not None and positions > batching.max_batch_tokens
        if len(batch) > batching.batch_size or (len(batch) > 1 and over_budget):
            return None
        total += positions
    return total


def _groupings(items):
    """Every way to split ``items`` into groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for grouping in _groupings(rest):
        yield [[first], *grouping]
        for i in range(len(grouping)):
            yield [*grouping[:i], [first, *grouping[i]], *grouping[i + 1 :]]


def _runs(items):
    """Every way to cut ``items`` into runs of consecutive items."""
    for cuts in itertools.product((False, True), repeat=len(items) - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), len(items)]
        yield [items[start:stop] for start, stop in itertools.pairwise(bounds)]


def _random_cases(rng, count, max_prompts):
    for _ in range(count):
        lengths = [rng.choice([1, 2, 3, 5, 8, 13, 21, 40]) for _ in range(rng.randint(1, max_prompts))]
        budget = rng.choice([None, 10, 30, 64])
        yield lengths, Batching(rng.randint(1, 5), budget, overhead_tokens=rng.choice([0, 3, 12, 256]))


def _check_plan(lengths, batching, plan):
    assert sorted(index for batch in plan for index in batch) == list(range(len(lengths)))
    assert _cost(lengths, plan, batching) is not None
    largest = [(len(batch) * max(lengths[i] for i in batch), max(lengths[i] for i in batch)) for batch in plan]
    assert largest == sorted(largest, reverse=True)  # the most positions first, then the longest prompt


def test_plan_batches_costs_least_of_every_grouping():
    for lengths, batching in _random_cases(random.Random(0), 150, 7):
        plan = plan_batches(lengths, batching)
        _check_plan(lengths, batching, plan)
        costs = [_cost(lengths, grouping, batching) for grouping in _groupings(list(range(len(lengths))))]
        assert _cost(lengths, plan, batching) == min(cost for cost in costs if cost is not None)


def test_plan_batches_costs_least_of_every_cut_of_the_sorted_prompts():
    for lengths, batching in _random_cases(random.Random(1), 150, 12):
        plan = plan_batches(lengths, batching)
        _check_plan(lengths, batching, plan)
        by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        costs = [_cost(lengths, runs, batching) for runs in _runs(by_length)]
        assert _cost(lengths, plan, batching) == min(cost for cost in costs if cost is not None)


def test_plan_batches_respects_the_token_budget_and_the_batch_size_cap():
    lengths = [3, 17, 5, 9, 9, 2, 30, 4, 16, 8]
    plan = plan_batches(lengths, Batching(batch_size=3, max_batch_tokens=40))
    _check_plan(lengths, Batching(batch_size=3, max_batch_tokens=40), plan)
    assert [30] in [[lengths[i] for i in batch] for batch in plan]  # over half the budget: a batch of its own
    # (30 17 16) (9 9 8) (5 4 3 2): 137 positions, the fewest of any three batches; a fourth costs 256 more
    assert [len(batch) for batch in plan_batches(lengths, Batching(batch_size=4))] == [3, 3, 4]
    assert plan_batches([50], Batching(batch_size=8, max_batch_tokens=10)) == [[0]]  # over the budget alone
    assert plan_batches([50, 9, 50], Batching(batch_size=8, max_batch_tokens=10)) == [[0], [2], [1]]
    # 100 positions, then the longest prompt alone: the batch that needs the most memory comes first
    assert plan_batches([30, 25, 24, 23, 22], Batching(batch_size=4)) == [[1, 2, 3, 4], [0]]
    assert plan_batches([], Batching()) == []


def test_plan_batches_is_deterministic_and_blind_to_the_file_order():
    rng = random.Random(2)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    batching = Batching(batch_size=16, max_batch_tokens=2048)
    plan = plan_batches(lengths, batching)
    _check_plan(lengths, batching, plan)
    assert plan_batches(lengths, batching) == plan
    shuffled = rng.sample(range(len(lengths)), len(lengths))
    replan = plan_batches([lengths[i] for i in shuffled], batching)
    assert [sorted(lengths[shuffled[i]] for i in batch) for batch in replan] == [
        sorted(lengths[i] for i in batch) for batch in plan
    ]


@pytest.mark.parametrize("max_batch_tokens", [None, 2048])
def test_a_long_tailed_prompt_file_is_at_most_15_percent_padding(max_batch_tokens):
    """As in benchmarks/bench_batching.py: most prompts short, a few up to 500 tokens."""
    rng = random.Random(0)
    lengths = [min(500, int(rng.paretovariate(1.2) * 6)) for _ in range(256)]
    plan = plan_batches(lengths, Batching(batch_size=16, max_batch_tokens=max_batch_tokens))
    assert padding_fraction(lengths, plan) <= 0.15
    assert len(plan) <= 1.25 * len(lengths) / 16  # not bought with many small forward passes


def test_bucketing_pads_less_than_the_file_order():
    lengths = [len(text.split()) for text in MIXED] * 4
    in_file_order = [list(range(start, min(start + 8, len(lengths)))) for start in range(0, len(lengths), 8)]
    bucketed = plan_batches(lengths, Batching(batch_size=8))
    assert padding_fraction(lengths, bucketed) < 0.15 < padding_fraction(lengths, in_file_order)


def test_rows_come_in_file_order_and_batches_keep_to_the_budget(checkpoints, tmp_path, batches):
    prompts = write_lines(tmp_path / "p.txt", MIXED)
    out = tmp_path / "rows.jsonl"
    assert main(_argv(checkpoints, prompts, out, "--batch-size", "4", "--max-batch-tokens", "40")) == 0
    assert all(size <= 4 and (size == 1 or size * length <= 40) for size, length in batches)
    assert sum(size for size, _ in batches) == len(MIXED)
    rows = read_rows(out)
    assert [row["id"] for row in rows] == list(range(1, len(MIXED) + 1))
    alone = tmp_path / "alone.jsonl"
    assert main(_argv(checkpoints, prompts, alone, "--batch-size", "1")) == 0
    for row, single in zip(rows, read_rows(alone)):
        assert row["tuco"] == pytest.approx(single["tuco"], abs=1e-5)


def test_compare_rows_come_in_each_files_order(checkpoints, tmp_path):
    chat, web = write_lines(tmp_path / "chat.txt", MIXED[:7]), write_lines(tmp_path / "web.txt", MIXED[7:15])
    out = tmp_path / "rows.jsonl"
    model = ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
    assert main(["compare", *model, str(chat), str(web), "--out", str(out), "--max-batch-tokens", "30"]) == 0
    assert [(row["set"], row["id"]) for row in read_rows(out)] == [
        *(("chat", i) for i in range(1, 8)),
        *(("web", i) for i in range(1, 9)),
    ]


def test_an_interrupted_run_resumes_without_loss_or_duplicates(checkpoints, tmp_path, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", MIXED)
    out = tmp_path / "rows.jsonl"
    calls = []

    def fails_on_the_third_batch(model, ids, *args, **kwargs):
        calls.append(len(ids))
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return decompose(model, ids, *args, **kwargs)

    monkeypatch.setattr(DECOMPOSE_MODULE, "decompose", fails_on_the_third_batch)
    assert main(_argv(checkpoints, prompts, out, "--batch-size", "5")) == 1
    kept = [row["id"] for row in read_rows(out)]
    assert len(kept) == len(set(kept)) == calls[0] + calls[1] > 0  # the first two batches' rows
    monkeypatch.setattr(DECOMPOSE_MODULE, "decompose", decompose)
    assert main(_argv(checkpoints, prompts, out, "--batch-size", "5")) == 0
    assert [row["id"] for row in read_rows(out)] == list(range(1, len(MIXED) + 1))


@pytest.mark.slow  # a process of its own
def test_a_killed_run_resumes_without_loss_or_duplicates(checkpoints, tmp_path):
    n = 200
    prompts = write_lines(tmp_path / "p.txt", [" ".join(WORDS[: 1 + i % 12]) + f" {i}" for i in range(n)])
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tuco_peft.cli", *_argv(checkpoints, prompts, out, "--batch-size", "2")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    complete_lines = out.read_text().split("\n")[:-1]  # a last line cut by the kill is dropped on resume
    kept = [json.loads(line)["id"] for line in complete_lines]
    assert len(kept) == len(set(kept)) and 6 <= len(kept) < n
    assert main(_argv(checkpoints, prompts, out, "--batch-size", "16", "--max-batch-tokens", "128")) == 0
    assert [row["id"] for row in read_rows(out)] == list(range(1, n + 1))
    assert torch.isfinite(torch.tensor([row["tuco"] for row in read_rows(out)])).all()


def test_a_prompt_over_the_token_budget_is_named_in_a_warning(checkpoints, tmp_path, capsys, batches):
    prompts = write_lines(tmp_path / "p.txt", [" ".join(WORDS), "the fox"])
    assert main(_argv(checkpoints, prompts, tmp_path / "rows.jsonl", "--max-batch-tokens", "6")) == 0
    err = capsys.readouterr().err
    longest = max(shape[1] for shape in batches)
    assert longest > 6 and f"1 prompt(s) have more tokens than --max-batch-tokens 6 (the longest {longest})" in err


def test_a_huge_prompt_is_tokenized_by_its_end_only(checkpoints, monkeypatch):
    from transformers import AutoTokenizer

    from tuco_peft.io.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(checkpoints.base)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(200_000))  # about a million characters
    expected = tokenizer(text)["input_ids"][-40:]  # the oracle: the whole text tokenized, then cut
    tokenized = []
    original_call = type(tokenizer).__call__
    monkeypatch.setattr(
        type(tokenizer), "__call__", lambda self, t, **k: tokenized.append(len(t)) or original_call(self, t, **k)
    )
    encoded = encode_prompt(tokenizer, text, context_length=40)
    assert encoded.ids == expected and encoded.n_cut is None
    assert max(tokenized) < 40 * 64 * 4 < len(text)  # a window of its end, a few thousand characters
    short = " ".join(WORDS * 3)
    assert encode_prompt(tokenizer, short, context_length=40).ids == tokenizer(short)["input_ids"][-40:]
