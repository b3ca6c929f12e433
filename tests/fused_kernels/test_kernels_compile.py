"""The fused kernels compile for a GPU (sm_90) on a CPU-only machine, without spills, within shared memory.

The interpreter tests (test_kernels.py) check the numbers; they cannot see what a GPU compile rejects
(dot sides under 16, dtype mismatches) or what makes a config unlaunchable or slow (shared memory over
the limit, register spills). Triton reads TRITON_INTERPRET at import and conftest.py sets it, so the
compiles run in a subprocess without it, with an empty Triton cache (a cold compile, as in CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("triton.backends.nvidia")

# Each kernel kind with its smallest and largest autotune config, and the dequantize kernel; then the
# checker itself on configs that must fail (so that a broken checker cannot pass everything).
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from tuco_peft.kernels import ahead_of_time as aot

    V = aot.Variant
    kinds = [
        V("fp16", weight_4bit=False, nested=False, two_streams=False, has_bias=True),
        V("bf16", weight_4bit=False, nested=False, two_streams=True, has_bias=True),
        V("fp32", weight_4bit=False, nested=False, two_streams=True, has_bias=False),
        V("fp16", weight_4bit=True, nested=True, two_streams=False, has_bias=False),
        V("bf16", weight_4bit=True, nested=False, two_streams=True, has_bias=False),
        V("fp16", weight_4bit=False, nested=False, two_streams=True, has_bias=True, transposed_weight=True),
        V("bf16", weight_4bit=True, nested=True, two_streams=True, has_bias=False, blockwise=False),
        V("bf16", weight_4bit=True, nested=True, two_streams=True, has_bias=False, fp32_lora=True),
    ]
    rows = []
    for variant in kinds:
        configs = sorted(aot.variant_configs(variant), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        for r in aot.check(90, [variant], [configs[0], configs[-1]], jobs=2, dequantize=False):
            rows.append(dict(kind="lora_linear", variant=r.variant, config=r.config, ok=r.ok, error=r.error,
                             registers=r.registers, spilled=r.spilled_bytes, shared=r.shared_bytes))
    dequant = aot.compile_dequantize_4bit("fp16", True, 90)
    registers, spilled, shared = aot.resource_usage(dequant)
    rows.append(dict(kind="dequantize_4bit", ok=spilled == 0 and shared <= aot.SHARED_MEMORY_LIMIT[90],
                     fma=dequant.asm["ptx"].count("fma.rn.f32"), registers=registers, spilled=spilled))
    # The checker itself, on configs that must fail: a register cap forces spills; six stages of a
    # 16x64x256 fp16 tile need more shared memory than an sm_90 block gets.
    spilling = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2, maxnreg=32)
    too_deep = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=6)
    for name, config in (("spilling", spilling), ("too_deep", too_deep)):
        r = aot.check(90, [kinds[0]], [config], dequantize=False)[0]
        rows.append(dict(kind=name, ok=r.ok, spilled=r.spilled_bytes, shared=r.shared_bytes, fits=r.fits))
    print(json.dumps(rows))
    """
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(workdir / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_kernel_kind_compiles_for_sm90_without_spills_within_shared_memory(compiled):
    linears = [row for row in compiled if row["kind"] == "lora_linear"]
    assert len(linears) == 16
    assert len({json.dumps(row["variant"], sort_keys=True) for row in linears}) == 8
    failures = [row for row in linears if not row["ok"]]
    assert not failures, json.dumps(failures, indent=1)
    assert all(row["registers"] > 0 and row["shared"] > 0 for row in linears)


def test_dequantize_kernel_compiles_and_rounds_products_and_sums_separately(compiled):
    (row,) = [row for row in compiled if row["kind"] == "dequantize_4bit"]
    assert row["ok"], row
    # nested absmax = code·scale + offset: a fused multiply-add would round once, unlike bitsandbytes.
    assert row["fma"] == 0


def test_the_checker_flags_spills_and_shared_memory_over_the_limit(compiled):
    (spilling,) = [row for row in compiled if row["kind"] == "spilling"]
    assert not spilling["ok"] and spilling["spilled"] > 0
    (too_deep,) = [row for row in compiled if row["kind"] == "too_deep"]
    assert not too_deep["ok"] and not too_deep["fits"] and too_deep["shared"] > 232448
