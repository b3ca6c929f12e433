"""The GPU benchmark of the Triton backend in one run: decompose end to end, steered generation, kernels.

1. ``decompose`` end to end on a random Llama-style model of about 1B parameters (``bench_decompose``'s),
   dense bf16 and NF4 (quantized by transformers from a checkpoint of the same model), LoRA r = 16 on every
   linear, batch 4 × 512: ``tuco_peft.apps.benchmark.compare_methods`` once per backend (torch, triton), so
   every method is timed against a plain forward of the same PeftModel, interleaved round-robin.
2. ``tuco_peft.generate(alpha=1.1)`` tokens/s on each backend against plain ``generate`` (bf16, batch 4,
   64-token prompts, 32 greedy new tokens), with ``bench_steering``'s timing.
3. Kernels, on Llama-7B/8B projection shapes at M = 1, 16, 128, 2048 rows (smallest first), for a base
   weight dense in the activation dtype and NF4 with nested absmax:

   - ``torch dual``: ``W = dequantize_4bit(W4)`` (NF4 only), ``Y_base = X·Wᵀ``, ``Y_ft = addmm(Y_base, X·Aᵀ, Bᵀ, s)``;
   - ``torch two-stream``: the same dequantization once, ``X_pt·Wᵀ``, ``X_ft·Wᵀ`` and the LoRA addmm;
   - ``kernel dual`` / ``kernel two-stream``: ``dual_lora_linear`` / ``two_stream_lora_linear``;
   - ``cuBLAS bf16``: ``X·Wᵀ`` on a dense bf16 weight, the floor for one stream without LoRA.

It prints the ratios side by side and writes everything to one JSON file as it goes, so a run cut short
keeps what it measured (what it loses first is the kernels at M = 2048, which no target needs). It ends
with the targets: two-stream NF4 ≥ 1.5× faster than the torch path at M ≤ 128; ``decompose(positions=
"last")`` ≤ 1.05× the time and the peak memory of the decoder-only forward (the blocks without the LM head,
which TuCo does not need); steered generation on the Triton backend ≥ 0.85× the tokens/s of plain generate.

Autotuning is the cost to watch: each kernel launch with a new (row bucket, N, K, weight kind, streams) key
times every config of its kind once. The sweep makes 4 row counts × 6 weight shapes × 2 weight kinds × 2
stream layouts = 96 keys × 6 configs ≈ 576 timed tuning launches (about 0.1 s each) plus one compile per
config and kernel variant. ``--max-seconds`` caps the whole run: past it no new measurement starts, and what
was skipped is listed in the JSON (``benchmarks/gpu_check.sh`` passes 270).

    python benchmarks/bench_kernels.py                       # CUDA GPU; meant to take under 5 minutes on an
                                                             # H200, autotuning included (not yet measured)
    python benchmarks/bench_kernels.py --parts decompose     # a subset of: decompose steering kernels
    python benchmarks/bench_kernels.py --smoke               # CPU, Triton interpreter, tiny shapes and model:
                                                             # every code path; kernel times blank, the rest CPU times
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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

PARTS = ("decompose", "steering", "kernels")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes and model")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/bench_kernels.json")
    parser.add_argument(
        "--max-seconds", type=float, help="start no new measurement after this many seconds (skipped ones are listed)"
    )
    return parser.parse_args()


ARGS = parse_args()
if ARGS.smoke:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import bitsandbytes as bnb
import torch
from bench_decompose import build_base, lora_finetune
from bench_steering import plain, timed_runs
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tuco_peft.apps.benchmark import compare_methods
from tuco_peft.lora.fused import dual_lora_linear, two_stream_lora_linear
from tuco_peft.steering.generation import generate

BACKENDS = ("torch", "triton")
STEERING_ALPHA = 1.1
# Targets: kernel speed-up over the torch path; decompose(positions="last") over the decoder-only forward;
# steered generation on the Triton backend over plain generate.
TWO_STREAM_NF4_SPEEDUP, TWO_STREAM_MAX_ROWS = 1.5, 128
DECOMPOSE_TIME_RATIO, DECOMPOSE_MEMORY_RATIO = 1.05, 1.05
STEERING_SPEED_RATIO = 0.85
STARTED = time.perf_counter()


def over_budget(report: dict[str, Any], what: str) -> bool:
    """Past ``--max-seconds``: record ``what`` as skipped and say so."""
    if ARGS.max_seconds is None or time.perf_counter() - STARTED < ARGS.max_seconds:
        return False
    report["skipped"].append(what)
    return True


@dataclass(frozen=True)
class Setting:
    """The sizes of a run: the GPU benchmark, or the CPU smoke test of the same code paths."""

    shapes: dict[str, list[tuple[str, int, int]]]  # model → (projection, in_features, out_features)
    kernel_rows: tuple[int, ...]
    hidden: int
    layers: int
    vocab: int
    batch: int
    seq: int  # decompose
    prompt: int  # steering
    new_tokens: int
    decompose_repeats: int
    steering_repeats: int  # best of


GPU = Setting(
    # Llama-2-7B and Llama-3-8B projections (Llama-3-8B's q/o_proj are Llama-2-7B's).
    shapes={
        "llama2-7b": [("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 4096, 11008), ("down_proj", 11008, 4096)],
        "llama3-8b": [("k/v_proj", 4096, 1024), ("gate/up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
    },
    kernel_rows=(1, 16, 128, 2048),
    hidden=2048, layers=16, vocab=32000,  # 1.0B parameters (intermediate size 3 × hidden)
    batch=4, seq=512, prompt=64, new_tokens=32, decompose_repeats=10, steering_repeats=3,
)
SMOKE = Setting(
    shapes={"tiny": [("proj", 72, 40), ("proj_wide", 64, 136)]},
    kernel_rows=(1, 17),
    hidden=64, layers=2, vocab=97,
    batch=2, seq=8, prompt=6, new_tokens=3, decompose_repeats=1, steering_repeats=1,
)


@dataclass
class Row:
    model: str
    projection: str
    in_features: int
    out_features: int
    rows: int
    weight: str
    ms: dict[str, float | None]
    max_relative_error: dict[str, float]

    def ratio(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.ms.get(numerator), self.ms.get(denominator)
        return None if top is None or bottom is None else top / bottom


def lora_layer(
    in_features: int, out_features: int, weight: str, rank: int, device: str, dtype: torch.dtype
) -> nn.Module:
    """A PEFT LoRA layer on a random base: dense in ``dtype``, or bitsandbytes NF4 with nested absmax."""
    dense = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    if weight == "nf4":
        base = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
        )
        base.load_state_dict(dense.state_dict())
        base = base.to(device)
        base.support_avx512bf16_for_cpu = False
    else:
        base = dense
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"], init_lora_weights=False)
    layer = get_peft_model(nn.Sequential(base), config).base_model.model[0]
    for module in (layer.lora_A["default"], layer.lora_B["default"]):
        module.to(device=device, dtype=dtype)
    return layer.eval()


def torch_paths(layer: nn.Module) -> tuple[Callable, Callable]:
    """The reference implementations: dequantize (NF4), matmul, LoRA addmm."""
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]

    def dense_weight() -> torch.Tensor:
        if isinstance(base, bnb.nn.Linear4bit):
            return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        return base.weight

    def dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_base = x @ dense_weight().t()
        return y_base, torch.addmm(y_base, x @ a.t(), b.t(), alpha=scaling)

    def two_stream(x_pt: torch.Tensor, x_ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = dense_weight()
        return x_pt @ w.t(), torch.addmm(x_ft @ w.t(), x_ft @ a.t(), b.t(), alpha=scaling)

    return dual, two_stream


def time_ms(fn: Callable[[], object], on_gpu: bool) -> float | None:
    """Median milliseconds on a GPU (Triton's do_bench, after autotuning); None on CPU (interpreter).

    Short windows (hundreds of launches even at M = 2048) keep the whole sweep within a few minutes.
    """
    if not on_gpu:
        fn()
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def max_relative_error(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    return max(
        ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()
        for got, want in zip(actual, expected)
    )


def measure(model: str, name: str, n_in: int, n_out: int, rows: int, weight: str, on_gpu: bool) -> Row:
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    torch.manual_seed(0)
    layer = lora_layer(n_in, n_out, weight, ARGS.rank, device, dtype)
    x_pt = torch.randn(rows, n_in, device=device, dtype=dtype)
    x_ft = torch.randn(rows, n_in, device=device, dtype=dtype)
    torch_dual, torch_two_stream = torch_paths(layer)
    dense = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16)
    x_bf16 = x_pt.to(torch.bfloat16)
    with torch.no_grad():
        errors = {
            "dual": max_relative_error(dual_lora_linear(x_ft, layer), torch_dual(x_ft)),
            "two_stream": max_relative_error(two_stream_lora_linear(x_pt, x_ft, layer), torch_two_stream(x_pt, x_ft)),
        }
        ms = {
            "torch_dual": time_ms(lambda: torch_dual(x_ft), on_gpu),
            "kernel_dual": time_ms(lambda: dual_lora_linear(x_ft, layer), on_gpu),
            "torch_two_stream": time_ms(lambda: torch_two_stream(x_pt, x_ft), on_gpu),
            "kernel_two_stream": time_ms(lambda: two_stream_lora_linear(x_pt, x_ft, layer), on_gpu),
            "cublas_bf16": time_ms(lambda: x_bf16 @ dense.t(), on_gpu),
        }
    return Row(model, name, n_in, n_out, rows, weight, ms, errors)


def _cell(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:.3f}{unit}"


def save(report: dict[str, Any]) -> None:
    """Rewrite the JSON, targets included, after every measurement: a run cut short keeps what it measured."""
    report["targets"] = check_targets(report)
    with open(ARGS.out, "w") as handle:
        json.dump(report, handle, indent=1)


def run_kernels(report: dict[str, Any], setting: Setting, on_gpu: bool) -> None:
    """The kernel sweep, smallest M first: a run cut short loses the prefill rows, not the targets' M ≤ 128."""
    print(f"{'model':10} {'projection':13} {'M':>5} {'W':5} | {'dual ×torch':>11} {'2-str ×torch':>12} | "
          f"{'dual/cuBLAS':>11} {'2-str/cuBLAS':>12} | {'max rel err':>11}")
    for rows in setting.kernel_rows:
        for model, projections in setting.shapes.items():
            for name, n_in, n_out in projections:
                for weight in ("dense", "nf4"):
                    if over_budget(report, f"kernels {model} {name} M={rows} {weight}"):
                        continue
                    row = measure(model, name, n_in, n_out, rows, weight, on_gpu)
                    report["kernels"].append(asdict(row))
                    save(report)
                    print(
                        f"{model:10} {name:13} {rows:5} {weight:5} | "
                        f"{_cell(row.ratio('torch_dual', 'kernel_dual'), '×'):>11} "
                        f"{_cell(row.ratio('torch_two_stream', 'kernel_two_stream'), '×'):>12} | "
                        f"{_cell(row.ratio('kernel_dual', 'cublas_bf16')):>11} "
                        f"{_cell(row.ratio('kernel_two_stream', 'cublas_bf16')):>12} | "
                        f"{max(row.max_relative_error.values()):11.2e}",
                        flush=True,
                    )


def model_args(setting: Setting, on_gpu: bool) -> argparse.Namespace:
    """The settings ``bench_decompose.build_base``, ``lora_finetune`` and ``bench_steering.timed_runs`` read."""
    return argparse.Namespace(
        vocab=setting.vocab, hidden=setting.hidden, layers=setting.layers,
        seq=max(setting.seq, setting.prompt + setting.new_tokens), rank=ARGS.rank,
        device="cuda" if on_gpu else "cpu", dtype="bfloat16",
        new=setting.new_tokens, repeats=setting.steering_repeats,
    )


def lora_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """The random Llama-style model with LoRA on every linear: dense, and its NF4 (nested absmax) quantization,
    loaded by transformers from a checkpoint as a QLoRA fine-tune loads its base."""
    with torch.device(args.device):  # initialized where it runs: 1B parameters are slow to initialize on a CPU
        base = build_base(args)
    dtype = getattr(torch, args.dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    with tempfile.TemporaryDirectory() as checkpoint:
        base.save_pretrained(checkpoint)
        nf4 = AutoModelForCausalLM.from_pretrained(
            checkpoint, quantization_config=quantization, dtype=dtype, device_map=args.device,
            attn_implementation="sdpa",
        )
    return {"dense": lora_finetune(base, args), "nf4": lora_finetune(nf4, args)}


def run_decompose(
    report: dict[str, Any], models: dict[str, nn.Module], setting: Setting, args: argparse.Namespace
) -> None:
    """Every ``compare_methods`` method on each model and backend, with the backends side by side."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, setting.vocab, (setting.batch, setting.seq), generator=generator).to(args.device)
    attention_mask = torch.ones_like(input_ids)
    for weight, model in models.items():
        results = report["decompose"][weight] = {}
        for backend in BACKENDS:
            if over_budget(report, f"decompose {weight} {backend}"):
                continue
            results[backend] = compare_methods(
                model, None, input_ids, attention_mask, repeats=setting.decompose_repeats, backend=backend
            )
            save(report)
        done = list(results)
        print(f"\ndecompose end to end, {weight} base, batch {setting.batch}×{setting.seq}: median ms, "
              f"× plain_forward in time and in peak memory (weights included)")
        print(f"{'method':26}" + "".join(f" | {b + ' ms':>10} {'× time':>7} {'× mem':>6}" for b in done))
        for method in results[done[0]]["methods"] if done else ():
            cells = (results[backend]["methods"][method] for backend in done)
            print(f"{method:26}" + "".join(
                f" | {1e3 * c['median_s']:10.1f} {c['time_ratio']:7.2f} {c['peak_total_ratio']:6.2f}" for c in cells
            ))
        print("max TuCo disagreement between methods: "
              + ", ".join(f"{b} {results[b]['max_tuco_disagreement']:.1e}" for b in done), flush=True)


def run_steering(report: dict[str, Any], model: nn.Module, setting: Setting, args: argparse.Namespace) -> None:
    """Tokens/s and KV bytes of ``tuco_peft.generate`` on each backend against plain ``generate``."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, setting.vocab, (setting.batch, setting.prompt), generator=generator).to(args.device)
    runs = {"plain_generate": plain}
    runs.update(
        (f"generate_alpha_{STEERING_ALPHA}_{backend}", partial(generate, alpha=STEERING_ALPHA, backend=backend))
        for backend in BACKENDS
    )
    results = report["steering"] = timed_runs(runs, model, args, input_ids)
    save(report)
    print(f"\nsteered generation, dense base, batch {setting.batch}, {setting.prompt}-token prompts, "
          f"{setting.new_tokens} greedy new tokens, best of {setting.steering_repeats}")
    print(f"{'run':28} {'tokens/s':>9} {'× plain':>8} {'decode/s':>9} {'× plain':>8} {'KV × plain':>10}")
    for name, row in results.items():
        print(
            f"{name:28} {row['tokens_per_s']:9.1f} {row['speed_ratio']:8.2f} {row['decode_tokens_per_s']:9.1f} "
            f"{row['decode_speed_ratio']:8.2f} {row['kv_ratio']:10.2f}",
            flush=True,
        )


def check_targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against what this run measured; ``met`` is None off the GPU (not the target's setting)."""
    on_gpu = report["gpu"]
    speedups = [
        row["ms"]["torch_two_stream"] / row["ms"]["kernel_two_stream"]
        for row in report["kernels"]
        if row["weight"] == "nf4" and row["rows"] <= TWO_STREAM_MAX_ROWS and row["ms"]["kernel_two_stream"] is not None
    ]
    targets: dict[str, Any] = {
        "two_stream_nf4_speedup": {
            "target": f">= {TWO_STREAM_NF4_SPEEDUP}x at M <= {TWO_STREAM_MAX_ROWS}",
            "worst": min(speedups, default=None),
            "median": statistics.median(speedups) if speedups else None,
            "met": min(speedups) >= TWO_STREAM_NF4_SPEEDUP if speedups and on_gpu else None,
        },
    }
    for weight, results in report["decompose"].items():
        for backend, result in results.items():
            last, decoder = result["methods"]["decompose_last"], result["methods"]["decoder_forward"]
            time_ratio = last["median_s"] / decoder["median_s"]
            memory_ratio = last["peak_total_bytes"] / decoder["peak_total_bytes"]
            met = time_ratio <= DECOMPOSE_TIME_RATIO and memory_ratio <= DECOMPOSE_MEMORY_RATIO
            targets[f"decompose_last_{weight}_{backend}"] = {
                "target": f"<= {DECOMPOSE_TIME_RATIO}x time and {DECOMPOSE_MEMORY_RATIO}x peak memory of decoder_forward",
                "time_ratio": time_ratio,
                "memory_ratio": memory_ratio,
                "met": met if on_gpu else None,
            }
    steered = report["steering"].get(f"generate_alpha_{STEERING_ALPHA}_triton")
    if steered is not None:
        targets["steering_triton"] = {
            "target": f">= {STEERING_SPEED_RATIO}x plain generate tokens/s",
            "speed_ratio": steered["speed_ratio"],
            "met": steered["speed_ratio"] >= STEERING_SPEED_RATIO if on_gpu else None,
        }
    return targets


def print_targets(report: dict[str, Any]) -> None:
    verdicts = {True: "met", False: "NOT met", None: "no verdict: not a GPU run"}
    print(f"\nissue targets, measured on {report['device']}")
    for name, target in report["targets"].items():
        if "worst" in target:
            measured = f"worst {_cell(target['worst'], '×')}, median {_cell(target['median'], '×')}"
        elif "speed_ratio" in target:
            measured = f"{target['speed_ratio']:.2f}× tokens/s"
        else:
            measured = f"{target['time_ratio']:.2f}× time, {target['memory_ratio']:.2f}× memory"
        print(f"{name:30} {target['target']:44} {measured}: {verdicts[target['met']]}")
    errors = [error for row in report["kernels"] for error in row["max_relative_error"].values()]
    if errors:
        print(f"{'kernels: largest error':30} {'vs the torch path, relative to its max':44} {max(errors):.2e}")


def timed_part(report: dict[str, Any], part: str, run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)`` with its seconds in the report (what each part costs a GPU session's budget).

    A part that raises is reported and the run goes on (returning None): a GPU session may get one run.
    """
    start = time.perf_counter()
    try:
        return run(*args)
    except Exception:  # noqa: BLE001 - recorded in the JSON, printed, and the other parts still run
        report["errors"][part] = traceback.format_exc()
        print(f"\n{part} FAILED:\n{report['errors'][part]}", file=sys.stderr, flush=True)
        return None
    finally:
        report["elapsed_s"][part] = round(time.perf_counter() - start, 1)
        save(report)
        print(f"[{part}: {report['elapsed_s'][part]:.0f} s]", flush=True)


def main() -> None:
    on_gpu = torch.cuda.is_available() and not ARGS.smoke
    if not on_gpu and not ARGS.smoke:
        sys.exit("No CUDA device: run with --smoke for the CPU check.")
    setting = GPU if on_gpu else SMOKE
    args = model_args(setting, on_gpu)
    device = torch.cuda.get_device_name() if on_gpu else f"cpu, Triton interpreter ({platform.processor()})"
    report: dict[str, Any] = {
        "device": device,
        "gpu": on_gpu,
        "setting": asdict(setting),
        "rank": ARGS.rank,
        "kernel_activations": "bfloat16" if on_gpu else "float32",
        "model_dtype": args.dtype,
        "torch": torch.__version__,
        "elapsed_s": {},
        "errors": {},
        "decompose": {},
        "steering": {},
        "kernels": [],
        "skipped": [],
    }
    print(device if on_gpu else f"{device}: no GPU figures (kernel times blank, the rest CPU times, no verdicts)")
    models = None
    if {"decompose", "steering"} & set(ARGS.parts):
        models = timed_part(report, "build_models", lora_models, args)
    if models is not None:
        trainable, total = models["dense"].get_nb_trainable_parameters()
        report["base_parameters"] = total - trainable
        print(f"Llama-style model, {(total - trainable) / 1e6:.1f}M parameters, {args.dtype}, "
              f"LoRA r={ARGS.rank} on every linear (built in {report['elapsed_s']['build_models']:.0f} s)")
        if "decompose" in ARGS.parts:
            timed_part(report, "decompose", run_decompose, report, models, setting, args)
        if "steering" in ARGS.parts and not over_budget(report, "steering"):
            timed_part(report, "steering", run_steering, report, models["dense"], setting, args)
        del models
    if "kernels" in ARGS.parts:
        print()
        timed_part(report, "kernels", run_kernels, report, setting, on_gpu)
    print_targets(report)
    parts = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in report["elapsed_s"].items())
    print(f"done in {time.perf_counter() - STARTED:.0f} s ({parts}) → {ARGS.out}")
    if report["skipped"]:
        print(f"skipped past --max-seconds {ARGS.max_seconds:g}: {len(report['skipped'])} measurements "
              f"(first: {report['skipped'][0]}; all listed in the JSON)")
    if report["errors"]:
        sys.exit(f"failed: {', '.join(report['errors'])} (tracebacks above and in the JSON)")


if __name__ == "__main__":
    main()
