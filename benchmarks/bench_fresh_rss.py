"""Peak resident memory as a user sees it: each method in a fresh process, its peak RSS (``ru_maxrss``) above
what was resident once the model was loaded, with the C allocator left as it is (no trimming, no mmap
threshold: fragmentation counts).

Issue 24 target: ``decompose(positions="all", keep="sums")`` at 2 × 2048 tokens on SmolLM-135M's shapes
(sdpa, fp32) ≤ 1.3× the decoder-only forward.

    python benchmarks/bench_fresh_rss.py --out benchmarks/results/cpu-fresh-rss.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

from bench_overhead import MODELS

METHODS = ("decoder", "decompose_all_sums", "decompose_last")


def measure(method: str, batch: int, seq: int, threads: int) -> dict[str, float]:
    """Run in the child process: load the model, run ``method`` once, report its memory and time."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    import tuco_peft
    from tuco_peft.model.parts import model_parts

    torch.set_num_threads(threads)
    config = LlamaConfig(**MODELS["135m"], max_position_embeddings=max(2048, seq))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()  # sdpa, as from_pretrained loads it
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * resource.getpagesize() / 2**20
    start = time.perf_counter()
    with torch.no_grad():
        if method == "decoder":
            model_parts(model).decoder(input_ids=ids, use_cache=False)
        elif method == "decompose_all_sums":
            tuco_peft.decompose(model, ids, positions="all", keep="sums")
        else:
            tuco_peft.decompose(model, ids)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"resident_mib": resident, "peak_mib": peak, "extra_mib": peak - resident, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="fresh processes per method (the median is kept)")
    parser.add_argument("--out", default="bench-fresh-rss.json")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seq, args.threads)))
        return

    report = {"machine": platform.processor() or platform.machine(), "batch": args.batch, "seq": args.seq}
    for method in METHODS:
        runs = []
        for _ in range(args.runs):
            child = [sys.executable, __file__, "--child", method, "--batch", str(args.batch), "--seq", str(args.seq),
                     "--threads", str(args.threads)]
            output = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
        runs.sort(key=lambda run: run["extra_mib"])
        report[method] = {"runs": runs, "median_extra_mib": runs[len(runs) // 2]["extra_mib"]}
        print(f"{method}: extra MiB {[round(run['extra_mib']) for run in runs]}", flush=True)
    decoder = report["decoder"]["median_extra_mib"]
    for method in METHODS[1:]:
        report[method]["to_decoder"] = report[method]["median_extra_mib"] / decoder
        print(f"{method}: {report[method]['to_decoder']:.2f}× the decoder-only forward")
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
