"""benchmarks/bench_kernels.py --smoke: the GPU benchmark's every code path, on CPU under the interpreter.

A GPU session gets one or two runs of that script; this keeps it from breaking unnoticed in between.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]


def test_the_gpu_benchmark_runs_every_part_and_agrees_with_the_torch_path(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_kernels.py"), "--smoke", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["gpu"] is False
    assert set(report["elapsed_s"]) == {"build_models", "decompose", "steering", "kernels"}
    # Kernels: every row measured, against the torch path; times blank off the GPU (never estimated).
    assert len(report["kernels"]) == 8
    assert max(max(row["max_relative_error"].values()) for row in report["kernels"]) < 1e-5
    assert all(ms is None for row in report["kernels"] for name, ms in row["ms"].items())
    # decompose on both backends and weight kinds gives one TuCo, whatever the method.
    for weight in ("dense", "nf4"):
        for backend in ("torch", "triton"):
            result = report["decompose"][weight][backend]
            assert {"plain_forward", "decompose_last", "decompose_all"} <= set(result["methods"])
            assert result["max_tuco_disagreement"] < 1e-3
    assert set(report["steering"]) == {"plain_generate", "generate_alpha_1.1_torch", "generate_alpha_1.1_triton"}
    assert all(target["met"] is None for target in report["targets"].values())  # no verdicts off the GPU
