"""Time and peak memory of TuCo computations: tuco-peft's one pass against the paper's two passes, on the
same inputs for every method, and on workloads labelled by the regime they are in (``compare_workloads``)."""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.baselines import disable_adapter_tuco, two_model_tuco
from ..core.decompose import decompose
from ..lora.backend import Backend
from ..model.inputs import last_real_index
from ..model.parts import model_parts

_PAGE_SIZE = 4096
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator keeps its own ways
        return None


def _return_freed_memory_to_the_os() -> None:
    """Make glibc hand large freed blocks back at once, so resident memory tracks live tensors."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default, undoing ``keep_freed_memory``
        libc.malloc_trim(0)


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MB (its largest threshold) for reuse, so that a timed call does not
    fault its memory in page by page.

    By default glibc hands a freed block above a threshold back to the OS and moves the threshold as blocks come
    and go; the next call takes the memory back a page at a time. A decoder forward of SmolLM-135M's shape on 4 ×
    128 tokens faulted in 150,000 pages (0.6 GB) on one call and none on another, and the time of a call moved
    with it. For timings only: ``peak_extra_memory`` sets the opposite (resident memory must track live tensors).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)


@contextmanager
def _peak_resident_sampler(interval_s: float = 2e-4):
    """Peak resident memory of this process while the block runs (CPU), sampled by a thread."""
    peak = {"bytes": _resident_bytes()}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["bytes"] = max(peak["bytes"], _resident_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak["bytes"] = max(peak["bytes"], _resident_bytes())


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _return_freed_memory_to_the_os()
    before = _resident_bytes()
    with _peak_resident_sampler() as peak:
        fn()
    return peak["bytes"] - before


# A timed sample runs a method this long at least (several calls of a fast one, averaged), so that a call of a
# millisecond is not timed alone against the scheduler's and the clock's noise.
_MIN_SAMPLE_S = 0.02
OVERHEAD_BOUND, COMPUTE_BOUND = "per-call-overhead-bound", "compute-bound"


def timed(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Seconds per call over ``calls`` calls, each waited for (a caller needs one result before the next)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # work left queued by an untimed call is not billed to this one
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


@contextmanager
def _garbage_collector_paused():
    """No collection lands inside a timed round and is billed to whichever method it interrupted."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _measure(
    methods: dict[str, Callable[[], torch.Tensor | Any]],
    resident_weights: dict[str, int],
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Time and peak memory of every method on the same inputs.

    After the call that checks the methods agree, ``warmup`` (at least 1) untimed rounds of every method pay
    the one-off costs (lazy initialisation, allocator growth, kernel autotuning); the last of them sets how
    many calls of each method one sample averages (``_MIN_SAMPLE_S``). Then ``repeats`` rounds time every
    method once, in an order rotated each round, so that drift and cache effects hit every method alike;
    ``time_ratio`` is the median over rounds of the method's time over the plain forward's in the same
    round. ``methods["plain_forward"]`` is that yardstick; the methods named ``*_forward`` are plain passes,
    every other method returns TuCo [batch], and ``max_tuco_disagreement`` checks they all agree.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1, got {warmup}.")
    names = list(methods)
    rounds: list[dict[str, float]] = []
    with torch.no_grad():
        tucos = [fn() for name, fn in methods.items() if not name.endswith("_forward")]
        disagreement = max(float((t - tucos[0]).abs().max()) for t in tucos)
        for _ in range(warmup - 1):
            for fn in methods.values():
                fn()
        last_call = {name: timed(fn, device) for name, fn in methods.items()}
        calls = {name: max(1, math.ceil(_MIN_SAMPLE_S / seconds)) for name, seconds in last_call.items()}
        for index in range(repeats):
            order = names[index % len(names) :] + names[: index % len(names)]
            with _garbage_collector_paused():
                rounds.append({name: timed(methods[name], device, calls[name]) for name in order})
        memory = {name: peak_extra_memory(fn, device) for name, fn in methods.items()}
    plain_total = resident_weights["plain_forward"] + memory["plain_forward"]
    report: dict[str, Any] = {}
    for name in names:
        samples = [timings[name] for timings in rounds]
        q1, median, q3 = _quartiles(samples)
        ratio_q1, ratio, ratio_q3 = _quartiles([timings[name] / timings["plain_forward"] for timings in rounds])
        report[name] = {
            "median_s": median,
            "q1_s": q1,
            "q3_s": q3,
            "samples_s": samples,
            "calls_per_sample": calls[name],
            "time_ratio": ratio,
            "time_ratio_q1": ratio_q1,
            "time_ratio_q3": ratio_q3,
            "peak_extra_bytes": memory[name],
            "peak_total_bytes": resident_weights[name] + memory[name],
            "peak_total_ratio": (resident_weights[name] + memory[name]) / plain_total,
        }
    return {
        "device": str(device),
        "repeats": repeats,
        "warmup": warmup,
        "max_tuco_disagreement": disagreement,
        "methods": report,
    }


def compare_methods(
    model: nn.Module,
    pretrained: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    repeats: int = 10,
    warmup: int = 2,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """An adapter fine-tune: time and peak memory of each way to get TuCo, against a plain forward.

    Methods: ``plain_forward`` (the PeftModel's own forward, logits included: the yardstick),
    ``decoder_forward`` (the blocks alone, without the LM head, which TuCo does not need),
    ``decompose_last`` and ``decompose_all`` (tuco-peft, on ``backend``), ``disable_adapter_two_pass`` (two
    passes over one copy via PEFT) and, given ``pretrained`` (a second copy of the base model),
    ``two_model_two_pass`` (the paper's Algorithm 1). Each is called ``warmup`` times untimed, then timed
    over ``repeats`` rounds in rotating order (see ``_measure``).
    """
    last = last_real_index(attention_mask)[:, None]
    decoder = model_parts(model).decoder

    def decompose_all() -> torch.Tensor:
        return decompose(model, input_ids, attention_mask, positions="all", backend=backend).tuco.gather(1, last)[:, 0]

    methods: dict[str, Callable[[], Any]] = {
        "plain_forward": lambda: model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
        "decoder_forward": lambda: decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
        "decompose_last": lambda: decompose(model, input_ids, attention_mask, backend=backend).tuco,
        "decompose_all": decompose_all,
        "disable_adapter_two_pass": lambda: disable_adapter_tuco(model, input_ids, attention_mask),
    }
    weights = dict.fromkeys(methods, _weight_bytes(model))
    if pretrained is not None:
        methods["two_model_two_pass"] = lambda: two_model_tuco(model, pretrained, input_ids, attention_mask)
        weights["two_model_two_pass"] = _weight_bytes(model) + _weight_bytes(pretrained)
    report = _measure(methods, weights, input_ids.device, repeats, warmup)
    return {"batch": list(input_ids.shape), "model_weight_bytes": _weight_bytes(model), **report}


def compare_full_finetune_methods(
    finetuned: nn.Module,
    pretrained: nn.Module,
    checkpoint: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, Any]:
    """A full fine-tune: decompose with the base model resident or streamed from ``checkpoint`` (the
    safetensors of ``pretrained``) against the paper's two-model method and a plain forward, timed as
    ``compare_methods`` times them."""
    methods: dict[str, Callable[[], Any]] = {
        "plain_forward": lambda: finetuned(input_ids=input_ids, attention_mask=attention_mask, use_cache=False),
        "decompose_resident_base": lambda: decompose(finetuned, input_ids, attention_mask, base_model=pretrained).tuco,
        "decompose_streamed_base": lambda: decompose(finetuned, input_ids, attention_mask, base_model=checkpoint).tuco,
        "two_model_two_pass": lambda: two_model_tuco(finetuned, pretrained, input_ids, attention_mask),
    }
    one, two = _weight_bytes(finetuned), _weight_bytes(finetuned) + _weight_bytes(pretrained)
    weights = {
        "plain_forward": one, "decompose_resident_base": two, "decompose_streamed_base": one, "two_model_two_pass": two
    }
    report = _measure(methods, weights, input_ids.device, repeats, warmup)
    return {"batch": list(input_ids.shape), "model_weight_bytes": one, **report}


def token_windows(token_ids: Sequence[int], batch_size: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` prompts of exactly ``n_tokens`` tokens, consecutive windows of ``token_ids`` (read again
    from the start when they run out), unpadded: a workload of exactly the shape asked for, whatever the
    lengths of the texts it is cut from."""
    if not token_ids:
        raise ValueError("no tokens to cut a workload from.")
    needed = batch_size * n_tokens
    stream = torch.tensor(list(token_ids), dtype=torch.long)
    input_ids = stream.repeat(math.ceil(needed / len(stream)))[:needed].view(batch_size, n_tokens)
    return input_ids, torch.ones_like(input_ids)


def compare_workloads(
    measure: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]],
    workloads: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, Any]:
    """``measure(input_ids, attention_mask)`` (``compare_methods`` or ``compare_full_finetune_methods`` with
    the models bound) on each workload, each labelled with the regime it is in.

    Which method is cheaper depends on the regime: a method that adds a few small operations per block costs
    little on a large batch and much on a single short prompt, where the fixed cost of each call dominates.
    So a plain forward's median time is fitted, over the workloads, as a fixed cost per call plus a cost per
    token (least squares; the fixed cost kept between 0 and the fastest plain forward), and a workload is
    ``OVERHEAD_BOUND`` where that fixed cost is at least half of its plain forward, ``COMPUTE_BOUND``
    otherwise. Needs workloads of at least two sizes.
    """
    reports = {name: measure(input_ids, attention_mask) for name, (input_ids, attention_mask) in workloads.items()}
    tokens = [workload[0].numel() for workload in workloads.values()]
    seconds = [report["methods"]["plain_forward"]["median_s"] for report in reports.values()]
    if len(set(tokens)) < 2:
        raise ValueError(f"the workloads must have at least two sizes to tell the regimes apart, got {tokens} tokens.")
    mean_tokens, mean_seconds = statistics.fmean(tokens), statistics.fmean(seconds)
    per_token = sum((n - mean_tokens) * (t - mean_seconds) for n, t in zip(tokens, seconds)) / sum(
        (n - mean_tokens) ** 2 for n in tokens
    )
    per_call = min(max(mean_seconds - per_token * mean_tokens, 0.0), min(seconds))
    for report, n_tokens, plain in zip(reports.values(), tokens, seconds):
        share = per_call / plain
        report.update(tokens=n_tokens, per_call_share=share, regime=OVERHEAD_BOUND if share >= 0.5 else COMPUTE_BOUND)
    return {"plain_forward_per_call_s": per_call, "plain_forward_per_token_s": per_token, "workloads": reports}


def _weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
