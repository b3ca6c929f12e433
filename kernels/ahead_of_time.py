"""Compile the kernels for a GPU architecture without a GPU, and report what each autotune config needs.

Triton's NVIDIA backend (ptxas included) runs without a driver, so a CPU-only machine can check that
every kernel variant lowers to a cubin for, e.g., sm_90 (H100/H200) or sm_80 (A100), and read its
registers, spills and shared memory with the bundled cuobjdump. This catches what the interpreter
accepts but a GPU compile rejects (dot sides under 16, dtype mismatches) and configs that cannot launch.

Run as ``python -m tuco_peft.kernels.ahead_of_time --arch 90 80`` with TRITON_INTERPRET unset; it exits
non-zero when a config fails to compile, spills registers or needs more shared memory than a block gets.
Kernels are compiled as the launcher specializes them: a contiguous weight (``stride_wk == 1``), shapes and
row strides divisible by 16, 4-bit quantization blocks within rows, no fp fusion.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .bnb_4bit import dequantize_4bit_kernel
from .lora_linear_kernel import _lora_linear_kernel
from .settings import INTERPRETING, NO_FP_FUSION, configs_for

# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_ACTIVATIONS = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
_POINTER_TYPES = {tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float32: "*fp32"}


@dataclass(frozen=True)
class Variant:
    """One specialization of the fused LoRA linear: activation dtype, weight kind and stream layout."""

    dtype: str  # "fp16" | "bf16" | "fp32"
    weight_4bit: bool
    nested: bool
    two_streams: bool
    has_bias: bool
    rank_tile: int = 16
    blockwise: bool = True  # 4-bit: in_features a multiple of the quantization block (every real model)
    transposed_weight: bool = False  # dense: W stored as Wᵀ (GPT-2's Conv1D), contiguous along out_features
    fp32_lora: bool = False  # fp32 LoRA factors on a half-precision base (PEFT's default, and QLoRA's)

    @property
    def activation_type(self) -> tl.dtype:
        return _ACTIVATIONS[self.dtype]


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: int
    variant: dict
    config: str
    registers: int
    spilled_bytes: int
    shared_bytes: int
    fits: bool  # within the shared memory of one block
    error: str = ""  # the compile error, if it failed

    @property
    def ok(self) -> bool:
        return not self.error and self.fits and self.spilled_bytes == 0


def lora_linear_variants() -> list[Variant]:
    """Every dtype × weight kind × stream layout the analysis launches (with and without a bias)."""
    variants = [
        Variant(dtype, weight_4bit=False, nested=False, two_streams=two, has_bias=bias)
        for dtype, two, bias in itertools.product(("fp16", "bf16", "fp32"), (False, True), (False, True))
    ]
    variants += [  # GPT-2's Conv1D: W stored transposed, with a bias
        Variant(dtype, weight_4bit=False, nested=False, two_streams=two, has_bias=True, transposed_weight=True)
        for dtype, two in itertools.product(("fp16", "bf16", "fp32"), (False, True))
    ]
    variants += [  # blockwise=False: in_features not a multiple of the quantization block, element-wise decode
        Variant(dtype, weight_4bit=True, nested=nested, two_streams=two, has_bias=False, blockwise=blockwise)
        for blockwise, dtype, nested, two in itertools.product(
            (True, False), ("fp16", "bf16"), (False, True), (False, True)
        )
    ]
    variants += [
        Variant(dtype, weight_4bit=four_bit, nested=four_bit, two_streams=two, has_bias=False, fp32_lora=True)
        for dtype, four_bit, two in itertools.product(("fp16", "bf16"), (False, True), (False, True))
    ]
    return variants


def _signature(kernel: triton.JITFunction, pointers: dict[str, str], constants: dict) -> tuple[dict, dict]:
    """Argument types, with the 16-byte alignment the launcher would see on real tensors and shapes."""
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name in pointers or name in ("N", "K", "stride_wn", "stride_wk"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile(
    kernel: triton.JITFunction, pointers: dict, constants: dict, arch: int, warps: int, stages: int,
    maxnreg: int | None = None,
):
    signature, attrs = _signature(kernel, pointers, constants)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, **NO_FP_FUSION)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_lora_linear(variant: Variant, config: triton.Config, arch: int):
    """The compiled fused LoRA linear for ``variant`` under one autotune ``config``."""
    activation = variant.activation_type
    act_ptr = _POINTER_TYPES[activation]
    pointers = dict.fromkeys(("y_pt_ptr", "y_ft_ptr", "x_pt_ptr", "x_ft_ptr", "bias_ptr", "a_ptr", "b_ptr"), act_ptr)
    if variant.fp32_lora:
        pointers.update(a_ptr="*fp32", b_ptr="*fp32")
    pointers.update(scale_ptr="*fp32", code_ptr="*fp32", nested_code_ptr="*fp32", nested_offset_ptr="*fp32")
    pointers.update(w_ptr="*u8" if variant.weight_4bit else act_ptr)
    pointers.update(absmax_ptr="*u8" if variant.nested else "*fp32", nested_absmax_ptr="*fp32")
    constants = dict(
        QUANT_BLOCK=64, NESTED_BLOCK=256, WEIGHT_4BIT=variant.weight_4bit, NESTED=variant.nested,
        BLOCKWISE_4BIT=variant.weight_4bit and variant.blockwise, WEIGHT_DTYPE=activation,
        TWO_STREAMS=variant.two_streams, HAS_BIAS=variant.has_bias, DOT_DTYPE=activation,
        INPUT_PRECISION="ieee" if activation == tl.float32 else "tf32", OUT_DTYPE=activation,
        RANK_TILE=variant.rank_tile, **config.kwargs,
    )
    if not variant.weight_4bit:  # Triton specializes an integer argument equal to 1: the contiguous stride
        constants["stride_wn" if variant.transposed_weight else "stride_wk"] = 1
    return _compile(
        _lora_linear_kernel.fn, pointers, constants, arch, config.num_warps, config.num_stages, config.maxnreg
    )


def compile_dequantize_4bit(dtype: str, nested: bool, arch: int):
    activation = _ACTIVATIONS[dtype]
    pointers = dict(out_ptr=_POINTER_TYPES[activation], packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32")
    pointers.update(code_ptr="*fp32", nested_code_ptr="*fp32", nested_absmax_ptr="*fp32", nested_offset_ptr="*fp32")
    constants = dict(QUANT_BLOCK=64, NESTED=nested, NESTED_BLOCK=256, WEIGHT_DTYPE=activation, BLOCK=1024)
    return _compile(dequantize_4bit_kernel, pointers, constants, arch, warps=4, stages=1)


def resource_usage(compiled) -> tuple[int, int, int]:
    """(registers per thread, spilled bytes per thread, shared bytes per block) of a compiled kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    registers, spilled = _reported(r"REG:(\d+)", report), _reported(r"STACK:(\d+)", report)
    # Triton allocates shared memory dynamically: the static figure in the cubin is 0, the metadata has it.
    return registers, spilled, int(compiled.metadata.shared)


def _reported(pattern: str, report: str) -> int:
    match = re.search(pattern, report)
    if match is None:
        raise RuntimeError(f"cuobjdump's resource usage has no {pattern!r}: {report[:200]!r}")
    return int(match.group(1))


def _describe(config: triton.Config) -> str:
    sizes = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return f"{sizes} w{config.num_warps} s{config.num_stages}"


def variant_configs(variant: Variant) -> list[triton.Config]:
    """The autotune configs a launch of ``variant`` tries on a GPU (tl.dot operands in the activation dtype)."""
    return configs_for(variant.weight_4bit, variant.activation_type, variant.blockwise)


# (kind, arch, a LoRA linear variant and its config, or the dequantize kernel's (dtype, nested) and None)
Job = tuple[str, int, "Variant | tuple[str, bool]", "triton.Config | None"]


def _measure(job: Job) -> Resources:
    kind, arch, variant, config = job
    if isinstance(variant, Variant):
        assert config is not None, "a LoRA linear job carries its config"
        described, build = asdict(variant), partial(compile_lora_linear, variant, config, arch)
        name = _describe(config)
    else:
        dtype, nested = variant
        described, build = dict(dtype=dtype, nested=nested), partial(compile_dequantize_4bit, dtype, nested, arch)
        name = "1024 w4 s1"
    try:
        registers, spilled, shared = resource_usage(build())
    except Exception as error:  # noqa: BLE001 - a failed compile is a result to report
        return Resources(kind, arch, described, name, 0, 0, 0, False, f"{type(error).__name__}: {error}"[:500])
    return Resources(kind, arch, described, name, registers, spilled, shared, shared <= SHARED_MEMORY_LIMIT[arch])


def check(
    arch: int, variants: list[Variant], configs: list[triton.Config] | None = None, jobs: int = 1,
    dequantize: bool = True,
) -> list[Resources]:
    """Compile every variant × config (and the dequantize kernel) for ``arch``; their resource usage.

    ``configs=None``: the configs each variant autotunes over (``variant_configs``).
    """
    work: list[Job] = [
        ("lora_linear", arch, variant, config)
        for variant in variants for config in (variant_configs(variant) if configs is None else configs)
    ]
    if dequantize:
        work += [("dequantize_4bit", arch, key, None) for key in itertools.product(("fp16", "bf16"), (False, True))]
    if jobs <= 1:
        return [_measure(job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_measure, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--quick", action="store_true", help="each variant's smallest and largest config only")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if INTERPRETING:
        parser.error("TRITON_INTERPRET=1 is set: unset it, the kernels must be compiled, not interpreted.")
    results = []
    for arch in args.arch:
        if args.quick:
            for variant in lora_linear_variants():
                configs = variant_configs(variant)
                results += check(arch, [variant], [configs[0], configs[-1]], args.jobs, dequantize=False)
            results += check(arch, [], [], args.jobs)
        else:
            results += check(arch, lora_linear_variants(), None, args.jobs)
    for r in results:
        problems = [f"exceeds {SHARED_MEMORY_LIMIT[r.arch]} B shared"] if not r.fits and not r.error else []
        problems += [f"spills {r.spilled_bytes} B"] if r.spilled_bytes else []
        problems += [r.error] if r.error else []
        print(f"sm_{r.arch} {r.kernel:16} {json.dumps(r.variant):130} {r.config:18} reg {r.registers:3} "
              f"spill {r.spilled_bytes:4} shared {r.shared_bytes:6}  {'; '.join(problems) or 'ok'}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} compiles ok" + (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
