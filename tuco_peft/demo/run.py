"""``tuco-peft demo``: TuCo on the demo pair, in three short experiments that mirror the paper.

1. TuCo separates prompts in the fine-tune's chat format from pre-training-style text (ROC-AUC).
2. Padding a request with pre-training-style text lowers its TuCo (the paper's jailbreak finding).
3. FTC_α steering moves the fine-tuned behaviour: the probability that the reply starts as a refusal.
4. TuCo over training: the fine-tune's checkpoints, on the base loaded once.
"""

from __future__ import annotations

import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ..apps.runner import Batching, Runner
from ..apps.statistics import roc_auc
from ..io.adapter_series import find_adapters
from ..io.checkpoints import LoadOptions
from ..io.loaders import load_adapters, load_pair
from ..io.prompts import Prompt, encode_prompt
from ..io.results import ResultRow
from ..steering.forward import ftc_scale
from . import corpus
from .build import ensure_demo_checkpoints, ensure_demo_run, is_built, single_thread
from .prompts import demo_prompts

STEERING_ALPHAS = (0.0, 0.5, 1.0, 1.5)
_PADDING_SEED = 99


@dataclass
class DemoFigures:
    """What the demo printed, for tests and notebooks."""

    mean_tuco: dict[str, float]
    auc: float
    padding: dict[str, float]  # mean TuCo of the same requests: "plain" and "padded"
    refusal_probability: dict[float, float] = field(default_factory=dict)  # α → P(reply starts with a refusal)
    over_training: dict[int, dict[str, float]] = field(default_factory=dict)  # step → chat, web (mean TuCo), auc


def _tuco(runner: Runner, texts: list[str], name: str) -> list[float]:
    """The TuCo of each text, in the order of ``texts``."""
    rows: list[ResultRow] = []
    runner.run([Prompt(id=i, line=i + 1, text=text) for i, text in enumerate(texts)], rows.extend, set_name=name)
    return [row.tuco for row in sorted(rows, key=lambda row: row.id)]


def _chat_ids(tokenizer, request: str) -> torch.Tensor:
    """A request in the demo's chat format, as a batch of one."""
    return torch.tensor([encode_prompt(tokenizer, corpus.chat_prompt(request)).ids])


def _refusal_probability(model, tokenizer, requests: list[str], alphas: tuple[float, ...]) -> dict[float, float]:
    """Mean next-token probability of the refusal's first token after the assistant marker, for each α."""
    refusal_start = tokenizer(corpus.REFUSAL, add_special_tokens=False)["input_ids"][0]
    encoded = [_chat_ids(tokenizer, request) for request in requests]
    figures = {}
    for alpha in alphas:
        with torch.no_grad(), ftc_scale(model, alpha):
            probabilities = [float(model(input_ids=ids).logits[0, -1].softmax(-1)[refusal_start]) for ids in encoded]
        figures[alpha] = statistics.fmean(probabilities)
    return figures


def run_demo(cache_dir: str | Path | None = None, out: TextIO | None = None) -> DemoFigures:
    """Build (or reuse) the demo pair, run the three experiments and print what they show."""
    with single_thread():
        return _run(cache_dir, out)


def _run(cache_dir: str | Path | None, out: TextIO | None) -> DemoFigures:
    def say(text: str = "") -> None:
        print(text, file=out or sys.stdout, flush=True)

    say("tuco-peft demo: a 4-block Llama-style LM pre-trained here on generated encyclopedia text, and a LoRA")
    say("fine-tune of it that teaches a chat format and refuses harmful requests (built once, then cached).")
    if not is_built(cache_dir):
        say("building the demo pair: first run only, about a minute on two CPU cores ...")
    base_dir, adapter_dir = ensure_demo_checkpoints(cache_dir)
    say(f"base: {base_dir}\nadapter: {adapter_dir}\n")
    model, tokenizer = load_pair(str(base_dir), str(adapter_dir), LoadOptions(dtype="float32", device="cpu"))
    runner = Runner(model, tokenizer, batching=Batching(batch_size=16))

    groups = demo_prompts()
    scores = {name: _tuco(runner, texts, name) for name, texts in groups.items()}
    auc = roc_auc(scores["chat"], scores["web"])
    say("1. TuCo separates fine-tune-style prompts from pre-training-style text")
    say(f"   example chat prompt: {groups['chat'][1]!r}")
    say(f"   example web text:    {groups['web'][0]!r}")
    for name, values in scores.items():
        say(
            f"   {name:<5} n={len(values)}  mean TuCo {statistics.fmean(values):.3f}  "
            f"range [{min(values):.3f}, {max(values):.3f}]"
        )
    say(f"   ROC-AUC (chat vs web): {auc:.3f}   (the paper: 0.89-1.0 on real chat models)\n")

    rng = random.Random(_PADDING_SEED)
    requests = [corpus.harmful_request(rng) for _ in range(20)]
    plain = [corpus.chat_prompt(r) for r in requests]
    padded = [corpus.chat_prompt(f"{r} {corpus.web_text(rng, 2)}") for r in requests]
    plain_tuco, padded_tuco = _tuco(runner, plain, "plain"), _tuco(runner, padded, "padded")
    padding = {"plain": statistics.fmean(plain_tuco), "padded": statistics.fmean(padded_tuco)}
    lowered = sum(after < before for before, after in zip(plain_tuco, padded_tuco))
    say("2. Padding a request with pre-training-style text lowers TuCo (as jailbreak suffixes do in the paper)")
    say(f"   plain:  {plain[0]!r}\n   padded: {padded[0]!r}")
    say(
        f"   mean TuCo of {len(requests)} harmful requests: plain {padding['plain']:.3f}, "
        f"padded {padding['padded']:.3f} "
        f"(lower for {lowered} of {len(requests)})\n"
    )

    figures = DemoFigures({name: statistics.fmean(v) for name, v in scores.items()}, auc, padding)
    figures.refusal_probability = _refusal_probability(model, tokenizer, requests, STEERING_ALPHAS)
    say("3. FTC_α steering moves the fine-tuned behaviour (α = 0: base model, 1: fine-tune)")
    say(f"   probability that the reply to a harmful request starts with {corpus.REFUSAL!r}:")
    for alpha, probability in figures.refusal_probability.items():
        say(f"   α = {alpha:<4g} {probability:.3f}")
    say(f"   greedy replies to {requests[0]!r}:")
    for alpha, reply in _steered_replies(model, tokenizer, requests[0], (0.0, 1.0)).items():
        say(f"   α = {alpha:<4g} {reply!r}\n")

    run_dir = ensure_demo_run(cache_dir)
    figures.over_training = _over_training(base_dir, run_dir, groups)
    say(f"4. TuCo over training: the fine-tune's checkpoints in {run_dir}, on the base loaded once")
    for step, at_step in figures.over_training.items():
        say(
            f"   step {step:>4}: mean TuCo chat {at_step['chat']:.3f}, web {at_step['web']:.3f}, "
            f"ROC-AUC {at_step['auc']:.3f}"
        )
    say(f"   (tuco-peft analyze --base {base_dir} --adapter {run_dir} ... and tuco-peft trajectory draw it)")
    return figures


def _over_training(base_dir: Path, run_dir: Path, groups: dict[str, list[str]]) -> dict[int, dict[str, float]]:
    """Mean TuCo of the chat and web prompts at each checkpoint of the run, and the ROC-AUC separating them;
    the rows of every checkpoint are batched together, each through its own adapter."""
    adapters = find_adapters([run_dir])
    model, tokenizer = load_adapters(str(base_dir), adapters, LoadOptions(dtype="float32", device="cpu"))
    runner = Runner(model, tokenizer, batching=Batching(batch_size=32))
    scores: dict[str, dict[str, list[float]]] = {adapter.name: {} for adapter in adapters}
    for name, texts in groups.items():
        rows: list[ResultRow] = []
        prompts = [Prompt(id=i, line=i + 1, text=text) for i, text in enumerate(texts)]
        runner.run(prompts * len(adapters), rows.extend, name, adapters=[a for a in adapters for _ in prompts])
        for adapter in adapters:
            scores[adapter.name][name] = [row.tuco for row in rows if row.adapter == adapter.name]
    figures = {}
    for adapter in adapters:
        assert adapter.step is not None, "a run folder's checkpoints have steps"
        own = scores[adapter.name]
        figures[adapter.step] = {name: statistics.fmean(values) for name, values in own.items()}
        figures[adapter.step]["auc"] = roc_auc(own["chat"], own["web"])
    return figures


def _steered_replies(model, tokenizer, request: str, alphas: tuple[float, ...]) -> dict[float, str]:
    input_ids = _chat_ids(tokenizer, request)
    replies = {}
    for alpha in alphas:
        with torch.no_grad(), ftc_scale(model, alpha):
            output = model.generate(input_ids=input_ids, max_new_tokens=12, do_sample=False)
        replies[alpha] = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return replies
