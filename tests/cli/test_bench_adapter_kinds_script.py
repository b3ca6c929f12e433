"""benchmarks/bench_adapter_kinds.py on two blocks: every family and adapter kind it times builds, decomposes and
is written, so that the script a quiet machine is needed for does not break unnoticed in between."""

from __future__ import annotations

import json
import subprocess
import warnings

import pytest
import torch
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_the_adapter_kinds_benchmark_times_every_family_and_kind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from bench_adapter_kinds import ADAPTERS, FAMILIES, main

    out = tmp_path / "kinds.json"
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(["--layers", "2", "--batch", "2", "--tokens", "16", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    written = json.loads(out.read_text())
    results = written["results"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert written["environment"]["commit"].startswith(head.stdout.strip())  # which code the figures are of
    assert [(r["family"], r["adapter"]) for r in results] == [(f, a) for f in FAMILIES for a in ADAPTERS]
    assert all(r["decoder_forward"] > 0 and r["decompose_last"] > 0 and len(r["times"]["decompose_last"]) == 1
               for r in results)
    assert all(r["ratio_quartiles"] == [r["ratio"], r["ratio"]] for r in results)  # one round: no spread
    # every block of every family takes a one-pass path: none replayed with a warning
    assert not [w for w in caught if "no one-pass rule" in str(w.message)]
    assert not [w for w in caught if "read the layout" in str(w.message)]
