"""Tokens/s and KV-cache bytes of FTC_α-steered generation against plain ``generate``.

Issue targets: α-steered generation ≥ 0.85× the tokens/s of plain generate at batch 4 (its blocks run
paired, every base weight read once per step for both streams), KV memory ≤ 1.3× plain for r ≤ 64. Three
runs of the same LoRA model, greedy, fixed length:

- plain:            model.generate
- plain, batch ×2:  model.generate on the batch twice over, tokens counted once: a paired step's floor
- steered α=1.1:    with ftc_scale(model, 1.1): model.generate
- generate+TuCo:    tuco_peft.generate(model, ..., alpha=1.0)  (TuCo of every new token)

Tokens/s count the prefill, which steering doubles (both blocks over the prompt); decode/s leave it out, for
the steady state of a long generation.

    python benchmarks/bench_steering.py                 # CPU defaults
    python benchmarks/bench_steering.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from bench_decompose import build_base, lora_finetune  # the same model builder and LoRA
from transformers import DynamicCache

from tuco_peft.steering.forward import ftc_scale
from tuco_peft.steering.generation import generate


def cache_bytes(cache: DynamicCache) -> int:
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed_runs(runs: dict, model, args, input_ids) -> dict:
    """Per run: best and median seconds over ``args.repeats`` rounds of a full generation and of the prefill
    alone (one new token), and the KV bytes the cache holds at the end, each also as a ratio to the first
    run (plain generate). Decode tokens/s leave the prefill out: (new − 1) steps in best(full) − best(prefill).
    Runs are interleaved so that load from other processes hits all of them; on a shared machine the best
    time is the steadier measure of a run's own cost."""
    seconds = {(name, new): [] for name in runs for new in (args.new, 1)}
    kv_bytes = {}
    for _ in range(args.repeats):
        for (name, new), times in seconds.items():
            kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            cache = DynamicCache(config=model.config)
            start = time.perf_counter()
            with torch.no_grad():
                runs[name](model, input_ids, past_key_values=cache, **kwargs)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if new == args.new:
                kv_bytes[name] = cache_bytes(cache)
    results = {}
    batch = input_ids.shape[0]
    for name in runs:
        full, prefill = seconds[(name, args.new)], seconds[(name, 1)]
        best = min(full)
        results[name] = {
            "best_s": best,
            "median_s": statistics.median(full),
            "prefill_best_s": min(prefill),
            "tokens_per_s": batch * args.new / best,
            "decode_tokens_per_s": batch * (args.new - 1) / (best - min(prefill)),
            "kv_bytes": kv_bytes[name],
        }
    baseline = results[next(iter(runs))]
    for row in results.values():
        row["speed_ratio"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["decode_speed_ratio"] = row["decode_tokens_per_s"] / baseline["decode_tokens_per_s"]
        row["kv_ratio"] = row["kv_bytes"] / baseline["kv_bytes"]
    return results


def plain(model, input_ids, **kwargs):
    return model.generate(input_ids=input_ids, **kwargs)


def plain_doubled(model, input_ids, **kwargs):
    """Plain generate of the batch twice over: the arithmetic a paired step cannot avoid (both streams' rows),
    without any steering machinery; its tokens are counted once, like a steered run's."""
    return model.generate(input_ids=torch.cat([input_ids, input_ids]), **kwargs)


def steered(model, input_ids, **kwargs):
    with ftc_scale(model, 1.1):
        return model.generate(input_ids=input_ids, **kwargs)


def with_tuco(model, input_ids, **kwargs):
    return generate(model, input_ids, alpha=1.0, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--family", default="llama", choices=["llama", "qwen3"], help="qwen3: k-norm lean slots")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="bench-steering.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    args.seq = args.prompt + args.new
    model = lora_finetune(build_base(args), args)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=generator).to(args.device)
    runs = {
        "plain": plain,
        "plain, batch ×2": plain_doubled,
        "steered α=1.1": steered,
        "generate+TuCo α=1": with_tuco,
    }
    results = timed_runs(runs, model, args, input_ids)
    report = {
        "results": results,
        "settings": vars(args),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
    }
    print(f"{args.family} LoRA r={args.rank}, {args.layers}×{args.hidden}, {args.dtype}, {args.device}, "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens")
    header = ("tokens/s", "× plain", "decode/s", "× plain", "KV MiB", "× plain")
    print(f"{'run (best of ' + str(args.repeats) + ')':<22}" + "".join(f"{h:>10}" for h in header))
    for name, row in results.items():
        values = (
            f"{row['tokens_per_s']:.1f}", f"{row['speed_ratio']:.2f}",
            f"{row['decode_tokens_per_s']:.1f}", f"{row['decode_speed_ratio']:.2f}",
            f"{row['kv_bytes'] / 2**20:.2f}", f"{row['kv_ratio']:.2f}",
        )
        print(f"{name:<22}" + "".join(f"{v:>10}" for v in values))
    with open(args.out, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
