"""What one small call costs: ``tuco(model, ids)`` on one prompt of 16 tokens against a plain forward of the same
PeftModel (what a user would otherwise call), on the demo's shapes and on SmolLM-135M's, for each way of
computing the pre-trained rows.

Issue 24 targets (CPU, alone on the machine): ≤ 1.25× a plain forward on the demo model, ≤ 1.10× on a
135M-shaped model. A small call pays what larger batches amortise: the model survey (kept between calls, see
``model.parts``), the hooks, and, per block, the pre-trained rows: on a narrow model their count of tensor
operations, which a paired block shares with the fine-tuned forward; on a wide one their weight reads, which
``SharedReadBlock`` shares. Each timing is the median of ``--repeats`` calls, the methods
interleaved so that drift on a shared machine favours none of them.

    python benchmarks/bench_overhead.py                       # both models, 1 × 16 tokens
    python benchmarks/bench_overhead.py --shapes 1x16 1x64 4x64 --models 135m
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import tuco_peft

MODELS = {
    # The demo pair's shapes (tuco_peft.demo.build.DemoRecipe): 4 blocks of width 64.
    "demo": {
        "vocab_size": 768,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
    },
    # SmolLM-135M's shapes: 30 blocks of width 576, grouped-query attention 9/3.
    "135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
}
decompose_module = importlib.import_module("tuco_peft.core.decompose")


def lora_model(shapes: dict, rank: int, dora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**shapes)).eval()  # sdpa, as from_pretrained loads it
    lora = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=dora, init_lora_weights=False
    )
    return get_peft_model(base, lora).eval()


# What each way of computing the pre-trained rows sets in ``tuco_peft.core.decompose``, whatever the batch and
# the width: a paired block (``PairedBlock``), or the rows after the fine-tuned block (``SharedReadBlock`` with
# the fine-tuned forward's calls shared, ``SharedProjectionBlock`` without).
STRATEGIES = {
    "paired": {"PAIRED_MAX_TOKENS": 10**9, "SHARED_READS_MIN_WIDTH": 10**9},
    "shared reads": {"PAIRED_MAX_TOKENS": 0, "SHARED_READS_MAX_TOKENS": 10**9, "SHARED_READS_MIN_WIDTH": 0},
    "separate reads": {"PAIRED_MAX_TOKENS": 0, "SHARED_READS_MAX_TOKENS": 0, "SHARED_READS_MIN_WIDTH": 0},
}


def forced(strategy: str, call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the pre-trained rows computed by ``strategy`` (a key of ``STRATEGIES``)."""
    settings = STRATEGIES[strategy]

    def run() -> object:
        saved = {name: getattr(decompose_module, name) for name in settings}
        for name, value in settings.items():
            setattr(decompose_module, name, value)
        try:
            return call()
        finally:
            for name, value in saved.items():
                setattr(decompose_module, name, value)

    return run


def methods(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The plain forward and ``tuco`` by default and by each strategy, on the same ids."""

    def call_tuco() -> object:
        return tuco_peft.tuco(model, ids)

    by_strategy = {f"tuco, {strategy}": forced(strategy, call_tuco) for strategy in STRATEGIES}
    return {"forward": lambda: model(input_ids=ids), "tuco": call_tuco, **by_strategy}


def interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Median and quartiles in ms of each method, one call of each per round in an order that rotates from round
    to round (so that no method always follows the same one), after a warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for round_ in range(repeats + 1):
        for name, method in order[round_ % len(order) :] + order[: round_ % len(order)]:
            start = time.perf_counter()
            method()
            if round_:  # the first round warms up caches and allocators
                times[name].append((time.perf_counter() - start) * 1e3)
    summary = {}
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        summary[name] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=["1x16"], help="batch x tokens, e.g. 1x16 4x64")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dora", action="store_true", help="DoRA adapters instead of plain LoRA")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "adapter": "DoRA" if args.dora else "LoRA",
        "torch": torch.__version__,
        "shared_reads_max_tokens": decompose_module.SHARED_READS_MAX_TOKENS,
        "shared_reads_min_width": decompose_module.SHARED_READS_MIN_WIDTH,
        "paired_max_tokens": decompose_module.PAIRED_MAX_TOKENS,
        "results": [],
    }
    for model_name in args.models:
        model = lora_model(MODELS[model_name], args.rank, args.dora)
        vocab = MODELS[model_name]["vocab_size"]
        for shape in args.shapes:
            batch, tokens = map(int, shape.split("x"))
            ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                summary = interleaved_medians(methods(model, ids), args.repeats)
            forward = summary["forward"]["median_ms"]
            row = {"model": model_name, "batch": batch, "tokens": tokens, "ms": summary}
            row["ratio_to_forward"] = {name: s["median_ms"] / forward for name, s in summary.items()}
            report["results"].append(row)
            ratios = "  ".join(f"{name} {ratio:.3f}x" for name, ratio in row["ratio_to_forward"].items())
            print(f"{model_name} {batch}x{tokens}: forward {forward:.2f} ms   {ratios}", flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
