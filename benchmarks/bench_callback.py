"""What ``TuCoCallback``'s probe costs a training run: ``TuCoCallback.measure()`` against a plain forward of the
same probe batches, timed where the callback runs, inside a real ``transformers.Trainer`` training a LoRA model.

The probe's yardstick is what it computes without tuco-peft: the model put in eval mode, a ``torch.no_grad()``
forward of each probe batch (the PeftModel's own forward, the LM head's logits of every position included),
and the model put back in training mode. Both see the very same tensors: the plain forwards reuse the
callback's own tokenized, left-padded batches (its ``_batches``).

What is built, for each model (``--models demo 135m``: the shapes of ``bench_overhead``, random weights, fp32,
LoRA r = ``--rank`` on every linear, ``init_lora_weights=False``): a byte-level BPE tokenizer trained offline
on the demo's corpus (as ``bench_checkpoints`` builds it), ``--prompts`` probe prompts of 16 to 64 tokens cut
from the demo's web text, and a ``Trainer`` (AdamW, lr 1e-4, batches of 4 × 64 random tokens) with a
``TuCoCallback`` (``--batch-size`` prompts per analysis forward) that is not added to the trainer: a timing
callback calls it instead, from ``on_step_end``, the hook the callback probes from. So every measurement
starts as a probe does in a run: right after an optimizer step (the weights changed, the gradients zeroed),
with the model in training mode, which the probe must switch to eval and back.

Each training step is followed by one measurement, the probe and the plain forward in turn: ``--warmup``
untimed rounds (the first step allocates the optimizer's state), then ``--repeats`` rounds of (step, probe,
step, plain forward). Reported, as medians in seconds: the probe (the callback's own ``tuco/probe_seconds``;
``measure_call`` is the ``measure()`` call by the wall clock around it), the plain forward, and the training
step (``on_step_begin`` to ``on_step_end``: forward, backward, clipping, optimizer step, zeroing). Ratios: the
probe / the plain forward (the overhead), and the probe / (``--every-n-steps`` × a step): what probing every
N steps adds to the training time.

    python benchmarks/bench_callback.py                          # demo and 135M, 8 and 32 prompts
    python benchmarks/bench_callback.py --models 135m --prompts 32 --repeats 9
    python benchmarks/bench_callback.py --quick                  # a smoke run: seconds, numbers meaningless

Run it alone on the machine; ``--quick`` writes JSON only to an ``--out`` given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from bench_checkpoints import demo_tokenizer, prompt_texts
from bench_overhead import MODELS, lora_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from tuco_peft import TuCoCallback

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-callback.json"
TRAIN_BATCH, TRAIN_TOKENS = 4, 64
PROMPT_TOKENS = (16, 64)
MEASURED = ("probe", "measure_call", "plain_forward", "train_step")


def plain_forward(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """What the probe computes without tuco-peft: eval mode, no autograd, the model's forward, training mode back."""
    model.eval()
    with torch.no_grad():
        for input_ids, attention_mask in batches:
            model(input_ids=input_ids, attention_mask=attention_mask)
    model.train()


class Timer(TrainerCallback):
    """Times each training step, then, from ``on_step_end``, the probe or the plain forward, in turn."""

    def __init__(self, probe: TuCoCallback, warmup: int):
        self.probe = probe
        self.warmup_steps = 2 * warmup
        self.times: dict[str, list[float]] = {name: [] for name in MEASURED}
        self.step_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step_seconds = time.perf_counter() - self.step_start
        model = self.probe.trainer.model
        assert model is not None and model.training, "the probe starts on a model in training mode"
        assert all(parameter.grad is None for parameter in model.parameters()), "the step zeroed the gradients"
        timed = state.global_step > self.warmup_steps
        start = time.perf_counter()
        if state.global_step % 2:
            metrics = self.probe.measure()
            if timed:
                self.times["measure_call"].append(time.perf_counter() - start)
                self.times["probe"].append(metrics["tuco/probe_seconds"])
        else:
            batches = [batch for group in self.probe._batches.values() for batch in group]
            plain_forward(model, batches)
            if timed:
                self.times["plain_forward"].append(time.perf_counter() - start)
        assert model.training, "the probe and the plain forward put training mode back"
        if timed:
            self.times["train_step"].append(step_seconds)


def measure(model: torch.nn.Module, tokenizer, prompts: list[str], args: argparse.Namespace, folder: str) -> dict:
    """``args.warmup`` + ``args.repeats`` rounds of (step, probe, step, plain forward) in one ``Trainer.train()``."""
    rows = torch.randint(0, len(tokenizer), (16, TRAIN_TOKENS), generator=torch.Generator().manual_seed(2))
    training_args = TrainingArguments(
        output_dir=folder,
        max_steps=2 * (args.warmup + args.repeats),
        per_device_train_batch_size=TRAIN_BATCH,
        learning_rate=1e-4,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    callback = TuCoCallback(trainer, prompts, every_n_steps=args.every_n_steps, batch_size=args.batch_size)
    timer = Timer(callback, args.warmup)
    trainer.add_callback(timer)
    trainer.train()
    seconds = {name: statistics.median(values) for name, values in timer.times.items()}
    return {
        "batches": sum(len(group) for group in callback._batches.values()),
        "seconds": seconds,
        "ratios": {
            "probe_to_plain_forward": seconds["probe"] / seconds["plain_forward"],
            "probe_every_n_to_training": seconds["probe"] / (args.every_n_steps * seconds["train_step"]),
        },
        "samples": timer.times,
    }


def table(results: list[dict], every_n_steps: int) -> str:
    """The results as a Markdown table."""
    header = (
        "| model | prompts (tokens) | probe s | plain forward s | probe / plain | train step s | "
        f"probe / ({every_n_steps} steps) |"
    )
    lines = [header, "|---|---|" + "---:|" * 5]
    for result in results:
        seconds, ratios, tokens = result["seconds"], result["ratios"], result["prompt_tokens"]
        lines.append(
            f"| {result['model']} | {result['prompts']} ({tokens['min']}–{tokens['max']}) | {seconds['probe']:.4f} | "
            f"{seconds['plain_forward']:.4f} | {ratios['probe_to_plain_forward']:.2f}× | "
            f"{seconds['train_step']:.4f} | {100 * ratios['probe_every_n_to_training']:.2f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: demo 135m (--quick: demo)")
    parser.add_argument("--prompts", nargs="+", type=int, help="probe prompt counts (default 8 32; --quick: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="TuCoCallback batch_size (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--every-n-steps", type=int, default=50, help="for the cost per training step (default 50)")
    parser.add_argument("--repeats", type=int, help="probes (and plain forwards) per median (default 7; --quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1; --quick: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step on tiny sizes")
    parser.add_argument("--out", help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; --quick: none)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["demo"] if quick else ["demo", "135m"])
    args.prompts = args.prompts or ([8] if quick else [8, 32])
    args.repeats = args.repeats or (1 if quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    out = Path(args.out) if args.out else (None if quick else DEFAULT_OUT)
    torch.set_num_threads(args.threads)

    report: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_start": os.getloadavg()[0],
        **{key: value for key, value in vars(args).items() if key != "out"},
        "train_batch": [TRAIN_BATCH, TRAIN_TOKENS],
        "results": [],
    }
    if quick:
        report["note"] = "--quick: a smoke run of every step; its numbers measure nothing"
    tokenizer = demo_tokenizer()
    for name in args.models:
        assert len(tokenizer) <= MODELS[name]["vocab_size"], "the tokenizer's ids must fit every model"
        model = lora_model(MODELS[name], args.rank, dora=False)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        for count in args.prompts:
            prompts = prompt_texts(tokenizer, count, seed=1, tokens=PROMPT_TOKENS)
            tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in prompts]
            with tempfile.TemporaryDirectory(prefix="bench-callback-") as folder:
                measured = measure(model, tokenizer, prompts, args, folder)
            result = {
                "model": name,
                "shapes": MODELS[name],
                "parameters": parameters,
                "prompts": count,
                "prompt_tokens": {"min": min(tokens), "max": max(tokens), "total": sum(tokens)},
                **measured,
            }
            report["results"].append(result)
            seconds = result["seconds"]
            print(
                f"{name}, {count} prompts: probe {seconds['probe']:.4f} s, plain forward "
                f"{seconds['plain_forward']:.4f} s, train step {seconds['train_step']:.4f} s",
                flush=True,
            )
    report["load_average_end"] = os.getloadavg()[0]
    print()
    print(table(report["results"], args.every_n_steps))
    print(
        "probe: TuCoCallback.measure()'s tuco/probe_seconds; plain forward: eval, no_grad forward of the same "
        f"batches, train mode back; medians of {args.repeats}, each right after an optimizer step"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
