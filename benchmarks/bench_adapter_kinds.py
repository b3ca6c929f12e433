"""decompose(positions="last") against the decoder-only forward, by decoder family and adapter kind (issue 19).

SmolLM-135M's shapes (30 blocks of width 576, attention 9/3) as Llama, as Gemma 3 (local and global layers)
and as Qwen3-MoE (8 experts, 2 active, each half the dense MLP's width), random weights, fp32, the default
attention (sdpa); LoRA, DoRA and LoHa of rank 16 on every linear (PEFT's "all-linear", which on Qwen3-MoE
takes the fused experts through target_parameters for LoRA; LoHa finds no expert linear there, and DoRA takes the
attention projections). The yardstick is the decoder-only forward (the blocks and the final norm, no LM head:
decompose does not run the head), timed in the same rounds, alternating, on the same batch. Qwen3-MoE has no registered family: its blocks' one-pass path is read from their
parts and proved against the generic replay on the first batch (the warm-up call), then trusted.

    python benchmarks/bench_adapter_kinds.py --repeats 5 --out benchmarks/results/cpu-adapter-kinds.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from bench_overhead import MODELS
from peft import LoHaConfig, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import tuco_peft
from tuco_peft.apps.benchmark import keep_freed_memory, timed

SHAPES = {**MODELS["135m"], "head_dim": 64}  # Gemma 3 and Qwen3-MoE would take other head widths by default
FAMILIES = {
    "llama": {},
    "gemma3_text": {"sliding_window": 512},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 768},
}
ADAPTERS = {
    "lora": lambda targets: LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False),
    "dora": lambda targets: LoraConfig(
        r=16, lora_alpha=32, target_modules=targets, use_dora=True, init_lora_weights=False
    ),
    "loha": lambda targets: LoHaConfig(r=16, alpha=32, target_modules=targets, init_weights=False),
}
# PEFT's "all-linear" takes a MoE block's fused 3-D experts too, through target_parameters, which DoRA cannot.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapted_model(family: str, adapter: str, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **{**SHAPES, "num_hidden_layers": layers}, **FAMILIES[family])
    base = AutoModelForCausalLM.from_config(config).eval()
    targets = ATTENTION if (family, adapter) == ("qwen3_moe", "dora") else "all-linear"
    return get_peft_model(base, ADAPTERS[adapter](targets)).eval()


def measure(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> dict:
    """Median seconds of the decoder-only forward and of decompose, alternating round by round, and the median of
    the rounds' ratios: the two calls of a round run back to back, so a machine that slows down for a while (a
    shared virtual machine's neighbours) slows both, and their ratio holds where either median alone moves."""
    decoder = model.get_base_model().model
    device = ids.device
    calls = {
        "decoder_forward": lambda: decoder(input_ids=ids),
        "decompose_last": lambda: tuco_peft.decompose(model, ids, positions="last"),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                times[name].append(timed(call, device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = [ours / forward for ours, forward in zip(times["decompose_last"], times["decoder_forward"], strict=True)]
    return {**medians, "ratio": statistics.median(ratios), "ratio_quartiles": quartiles(ratios), "times": times}


def source_commit() -> str | None:
    """The checkout's commit, marked where the tree holds changes beside it; None outside a git checkout."""

    def git(*args: str) -> str:
        where = Path(__file__).parent
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=False).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git
        return None
    return (commit + (" with changes" if changed else "")) or None


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile: how far this machine's noise spreads the rounds' ratios around their median."""
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4)
    return first, third


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=list(ADAPTERS))
    parser.add_argument("--layers", type=int, default=SHAPES["num_hidden_layers"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    ids = torch.randint(1, SHAPES["vocab_size"], (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    results = []
    print(f"{'family':<12} {'adapter':<6} {'decoder ms':>11} {'decompose ms':>13} {'ratio':>6} {'quartiles':>11}")
    for family in args.families:
        for adapter in args.adapters:
            model = adapted_model(family, adapter, args.layers)
            measured = measure(model, ids, args.repeats)
            results.append({"family": family, "adapter": adapter, **measured})
            print(
                f"{family:<12} {adapter:<6} {measured['decoder_forward'] * 1e3:>11.1f} "
                f"{measured['decompose_last'] * 1e3:>13.1f} {measured['ratio']:>5.2f}× "
                f"{measured['ratio_quartiles'][0]:>5.2f}–{measured['ratio_quartiles'][1]:.2f}",
                flush=True,
            )
            del model
            gc.collect()
    if args.out:
        environment = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "commit": source_commit(),
            "layers": args.layers,
            "batch": [args.batch, args.tokens],
            "repeats": args.repeats,
            "allocator": "glibc keeps freed blocks of up to 32 MB (tuco_peft.apps.benchmark.keep_freed_memory)",
        }
        with open(args.out, "w") as file:
            json.dump({"environment": environment, "results": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
