"""Time and peak memory of TuCo computations: tuco-peft's one pass against the paper's two passes."""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backend import Backend
from .baselines import disable_adapter_tuco, two_model_tuco
from .decompose import decompose
from .inputs import last_real_index
from .introspection import model_parts

_PAGE_SIZE = 4096


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def _return_freed_memory_to_the_os() -> None:
    """Make glibc hand large freed blocks back at once, so resident memory tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


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


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _measure(
    methods: dict[str, Callable[[], torch.Tensor | Any]],
    resident_weights: dict[str, int],
    device: torch.device,
    repeats: int,
) -> dict[str, Any]:
    """Time (median over round-robin runs, so machine noise hits every method alike) and peak memory.

    ``methods["plain_forward"]`` is the yardstick; the methods named ``*_forward`` are plain passes, every
    other method returns TuCo [batch], and ``max_tuco_disagreement`` checks they all agree.
    """
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        tucos = [fn() for name, fn in methods.items() if not name.endswith("_forward")]
        disagreement = max(float((t - tucos[0]).abs().max()) for t in tucos)
        for _ in range(repeats):
            for name, fn in methods.items():
                times[name].append(_timed(fn, device))
        memory = {name: peak_extra_memory(fn, device) for name, fn in methods.items()}
    plain_time = statistics.median(times["plain_forward"])
    plain_total = resident_weights["plain_forward"] + memory["plain_forward"]
    return {
        "device": str(device),
        "repeats": repeats,
        "max_tuco_disagreement": disagreement,
        "methods": {
            name: {
                "median_s": statistics.median(times[name]),
                "time_ratio": statistics.median(times[name]) / plain_time,
                "peak_extra_bytes": memory[name],
                "peak_total_bytes": resident_weights[name] + memory[name],
                "peak_total_ratio": (resident_weights[name] + memory[name]) / plain_total,
            }
            for name in methods
        },
    }


def compare_methods(
    model: nn.Module,
    pretrained: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    repeats: int = 3,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """An adapter fine-tune: time and peak memory of each way to get TuCo, against a plain forward.

    Methods: ``plain_forward`` (the PeftModel's own forward, logits included: the yardstick),
    ``decoder_forward`` (the blocks alone, without the LM head, which TuCo does not need),
    ``decompose_last`` and ``decompose_all`` (tuco-peft, on ``backend``), ``disable_adapter_two_pass`` (two
    passes over one copy via PEFT) and, given ``pretrained`` (a second copy of the base model),
    ``two_model_two_pass`` (the paper's Algorithm 1).
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
    report = _measure(methods, weights, input_ids.device, repeats)
    return {"batch": list(input_ids.shape), "model_weight_bytes": _weight_bytes(model), **report}


def compare_full_finetune_methods(
    finetuned: nn.Module,
    pretrained: nn.Module,
    checkpoint: str | Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    repeats: int = 3,
) -> dict[str, Any]:
    """A full fine-tune: decompose with the base model resident or streamed from ``checkpoint`` (the
    safetensors of ``pretrained``) against the paper's two-model method and a plain forward."""
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
    report = _measure(methods, weights, input_ids.device, repeats)
    return {"batch": list(input_ids.shape), "model_weight_bytes": one, **report}


def _weight_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
