"""Many adapters on one base (issue 20): ``decompose_adapters`` with the adapters' prompts in one mixed batch
(each base weight read once for all adapters) against one adapter after another, and against one adapter's
time × the number of adapters.

The model is loaded once for all of them. Every method sees the same prompts, batch by batch; the mixed batch
holds each batch's prompts once per adapter. Times are medians of ``--repeats`` runs of the whole series.

    python benchmarks/bench_adapters.py --models demo 135m --adapters 8 --prompts 64 --batch-size 8
    python benchmarks/bench_adapters.py --models 135m --device cuda --dtype bfloat16 --batch-size 1   # a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable

import torch
from bench_overhead import MODELS, lora_model
from peft import LoraConfig

import tuco_peft
from tuco_peft.apps.benchmark import timed


def with_adapters(shapes: dict, n_adapters: int, rank: int) -> torch.nn.Module:
    """A LoRA model holding ``n_adapters`` random adapters ("default" and "a1", "a2", ...)."""
    model = lora_model(shapes, rank, dora=False)
    for index in range(1, n_adapters):
        torch.manual_seed(index)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        model.add_adapter(f"a{index}", config)
    return model.eval()


def series(model: torch.nn.Module, batches: list[torch.Tensor], mixed: bool | None) -> Callable[[], object]:
    """Every batch through every adapter; ``mixed`` None: one adapter's batches only (the yardstick)."""

    def run() -> object:
        for ids in batches:
            if mixed is None:
                tuco_peft.decompose(model, ids, keep="sums")
            else:
                tuco_peft.decompose_adapters(model, ids, keep="sums", mixed_batches=mixed)
        return None

    return run


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    run()  # warm-up
    return statistics.median(timed(run, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo"], choices=list(MODELS))
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, …")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="bench-adapters.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, **vars(args)}
    report["results"] = []
    for name in args.models:
        device = torch.device(args.device)
        model = with_adapters(MODELS[name], args.adapters, args.rank).to(device, getattr(torch, args.dtype))
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, MODELS[name]["vocab_size"], (args.prompts, args.tokens), generator=generator)
        batches = list(ids.to(device).split(args.batch_size))
        with torch.no_grad():
            one = median_seconds(series(model, batches, None), args.repeats, device)
            timings = {
                "one adapter × n": one * args.adapters,
                "mixed batches": median_seconds(series(model, batches, True), args.repeats, device),
                "one adapter at a time": median_seconds(series(model, batches, False), args.repeats, device),
            }
        row = {
            "model": name,
            "seconds": timings,
            "to_one_adapter_times_n": {k: v / timings["one adapter × n"] for k, v in timings.items()},
        }
        report["results"].append(row)
        shown = "  ".join(
            f"{method} {seconds:.2f} s ({row['to_one_adapter_times_n'][method]:.2f}×)"
            for method, seconds in timings.items()
        )
        print(f"{name}, {args.adapters} adapters × {args.prompts} prompts of {args.tokens} tokens: {shown}", flush=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
