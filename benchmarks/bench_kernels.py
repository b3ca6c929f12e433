"""Fused Triton LoRA linears against the torch path and cuBLAS, on Llama-7B/8B projection shapes.

For each projection shape, row count M and base weight (dense in the activation dtype, or NF4 with nested
absmax), it times:

- ``torch dual``: ``W = dequantize_4bit(W4)`` (NF4 only), ``Y_base = X·Wᵀ``, ``Y_ft = addmm(Y_base, X·Aᵀ, Bᵀ, s)``;
- ``torch two-stream``: the same dequantization once, ``X_pt·Wᵀ``, ``X_ft·Wᵀ`` and the LoRA addmm;
- ``kernel dual`` / ``kernel two-stream``: ``dual_lora_linear`` / ``two_stream_lora_linear``;
- ``cuBLAS bf16``: ``X·Wᵀ`` on a dense bf16 weight, the floor for one stream without LoRA.

It prints each kernel's speed-up over its torch path and its time relative to cuBLAS, and writes every row
to JSON as soon as it is measured. The issue's target: two-stream NF4 ≥ 1.5× faster than torch at M ≤ 128.

    python benchmarks/bench_kernels.py                       # on a CUDA GPU, a few minutes
    python benchmarks/bench_kernels.py --smoke               # CPU, Triton interpreter, tiny shapes: checks
                                                             # the code path and the numbers; times blank
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# Llama-2-7B and Llama-3-8B projections as (name, in_features, out_features).
GPU_SHAPES = {
    "llama2-7b": [("q/k/v/o_proj", 4096, 4096), ("gate/up_proj", 4096, 11008), ("down_proj", 11008, 4096)],
    "llama3-8b": [("k/v_proj", 4096, 1024), ("gate/up_proj", 4096, 14336), ("down_proj", 14336, 4096)],
}
GPU_ROWS = (1, 16, 128, 2048)
SMOKE_SHAPES = {"tiny": [("proj", 72, 40), ("proj_wide", 64, 136)]}
SMOKE_ROWS = (1, 17)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timings")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/bench_kernels.json")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.smoke:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from tuco_peft.kernels import dual_lora_linear, two_stream_lora_linear  # noqa: E402


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
    """Median milliseconds on a GPU (Triton's do_bench, after autotuning); None on CPU (interpreter)."""
    if not on_gpu:
        fn()
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


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


def main() -> None:
    on_gpu = torch.cuda.is_available() and not ARGS.smoke
    if not on_gpu and not ARGS.smoke:
        sys.exit("No CUDA device: run with --smoke for the CPU check (times are left blank).")
    shapes, all_rows = (GPU_SHAPES, GPU_ROWS) if on_gpu else (SMOKE_SHAPES, SMOKE_ROWS)
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu, Triton interpreter ({platform.processor()})",
        "gpu_figures": "measured" if on_gpu else "blank: no GPU in this run",
        "rank": ARGS.rank,
        "activations": "bfloat16" if on_gpu else "float32",
        "rows": [],
    }
    print(f"{report['device']}; GPU figures {report['gpu_figures']}")
    header = f"{'model':10} {'projection':13} {'M':>5} {'W':5} | {'dual ×torch':>11} {'2-str ×torch':>12} | " \
             f"{'dual/cuBLAS':>11} {'2-str/cuBLAS':>12} | {'max rel err':>11}"
    print(header)
    started = time.perf_counter()
    for model, projections in shapes.items():
        for name, n_in, n_out in projections:
            for rows in all_rows:
                for weight in ("dense", "nf4"):
                    row = measure(model, name, n_in, n_out, rows, weight, on_gpu)
                    report["rows"].append(asdict(row))
                    with open(ARGS.out, "w") as handle:  # written as we go: a cut-short run keeps its rows
                        json.dump(report, handle, indent=1)
                    print(
                        f"{model:10} {name:13} {rows:5} {weight:5} | "
                        f"{_cell(row.ratio('torch_dual', 'kernel_dual'), '×'):>11} "
                        f"{_cell(row.ratio('torch_two_stream', 'kernel_two_stream'), '×'):>12} | "
                        f"{_cell(row.ratio('kernel_dual', 'cublas_bf16')):>11} "
                        f"{_cell(row.ratio('kernel_two_stream', 'cublas_bf16')):>12} | "
                        f"{max(row.max_relative_error.values()):11.2e}",
                        flush=True,
                    )
    print(f"{len(report['rows'])} rows in {time.perf_counter() - started:.0f} s → {ARGS.out}")


if __name__ == "__main__":
    main()
