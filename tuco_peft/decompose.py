"""One-pass TuCo decomposition of a LoRA/QLoRA model: ``decompose`` and ``tuco``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backend import Backend, LoraLinearBackend, make_backend, resolve_backend
from .block_calls import hidden_states
from .blocks import PretrainedPath, block_output, gather_rows, pretrained_path
from .decomposition import Decomposition
from .errors import UnsupportedModelError
from .inputs import Batch, Positions, prepare_batch
from .interception import hooked
from .introspection import ModelParts, model_parts
from .paired import PairedBlock
from .pairing import paired_block
from .pretrained import PretrainedBlocks, analysis_states, checked_pretrained_blocks


class _BlockRecord:
    """What a probe keeps of one block, at the requested rows: its input and output, and PTC and FTC."""

    def __init__(self, index: int):
        self.index = index
        self.x_rows: torch.Tensor | None = None
        self.out_rows: torch.Tensor | None = None
        self.ptc: torch.Tensor | None = None
        self.ftc: torch.Tensor | None = None

    def _record(self, x_rows: torch.Tensor, out_rows: torch.Tensor, ptc: torch.Tensor) -> None:
        self.x_rows, self.out_rows, self.ptc = x_rows, out_rows, ptc
        self.ftc = (out_rows - x_rows) - ptc


class _BlockProbe(_BlockRecord):
    """Hooks on one decoder block: records its input, then splits its update into PTC and FTC."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        path: PretrainedPath,
        source: PretrainedBlocks,
        batch: Batch,
        router: LoraLinearBackend,
    ):
        super().__init__(index)
        self.router = router
        self.layer = layer
        self.path = path
        self.source = source
        self.batch = batch
        self._input: tuple[torch.Tensor, tuple, dict[str, Any]] | None = None

    @contextmanager
    def attached(self) -> Iterator[None]:
        with hooked(self.layer, before=self._before, after=self._after, with_kwargs=True):
            with self.path.capturing(self.router):
                yield

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._input = (hidden_states(args, kwargs), args, kwargs)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        x, args, kwargs = self._input
        self._input = None
        out = block_output(output)
        # With a multi-device device_map, accelerate moves a block's inputs inside its forward (after our
        # pre-hook): work where the block ran, keep the results where the batch lives.
        if x.device != out.device:
            x, args, kwargs = _to_device((x, args, kwargs), out.device)
        batch, home = self.batch.to(out.device), self.batch.input_ids.device
        x_rows = gather_rows(x, batch.rows).float()
        out_rows = gather_rows(out, batch.rows).float()
        with self.source.block(self.index) as pretrained:
            ptc = self.path.pretrained_update(pretrained, x, args, kwargs, batch)
        self._record(x_rows.to(home), out_rows.to(home), ptc.to(home))


class _PairedProbe(_BlockRecord):
    """One decoder block run paired (``paired.PairedBlock``): its pre-trained and fine-tuned outputs at every
    position from one forward, so each weight is read once for both. Used for all-position decompositions
    on the Triton backend, where the pre-trained path is needed at every row anyway."""

    def __init__(self, index: int, paired: PairedBlock, batch: Batch):
        super().__init__(index)
        self.paired = paired
        self.batch = batch

    def attached(self) -> AbstractContextManager[None]:
        return self.paired.attached(self._split)

    def _split(self, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        rows = self.batch.rows
        x_rows = gather_rows(x, rows).float()
        self._record(x_rows, gather_rows(finetuned, rows).float(), gather_rows(pretrained, rows).float() - x_rows)
        return finetuned


Probe = _BlockProbe | _PairedProbe


def _probe(
    index: int,
    layer: nn.Module,
    parts: ModelParts,
    source: PretrainedBlocks,
    batch: Batch,
    router: LoraLinearBackend,
    replay: bool,
) -> Probe:
    """The cheapest exact probe: paired where every row is wanted on the Triton backend, else the block's
    pre-trained path (rows only, or a replay)."""
    every_row = batch.rows.shape[1] == batch.input_ids.shape[1]
    paired = paired_block(layer, parts.config, router, source.separate_model) if every_row and not replay else None
    if paired is not None:
        return _PairedProbe(index, paired, batch)
    path = pretrained_path(layer, parts.config, separate_model=source.separate_model, replay_only=replay)
    return _BlockProbe(index, layer, path, source, batch, router)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _assemble(probes: list[Probe], batch: Batch) -> Decomposition:
    for previous, probe in zip(probes, probes[1:]):
        if probe.x_rows is None or not torch.equal(previous.out_rows, probe.x_rows):
            raise UnsupportedModelError(
                f"the residual stream changes between blocks {previous.index} and {probe.index} (or a block "
                "was skipped), so x_L ≠ x_0 + ΣPTC + ΣFTC for this architecture."
            )
    ptc = torch.stack([p.ptc for p in probes], dim=1)
    ftc = torch.stack([p.ftc for p in probes], dim=1)
    x0, xL = probes[0].x_rows, probes[-1].out_rows
    real = batch.row_is_real
    if not bool(real.all()):
        ptc, ftc = ptc * real[:, None, :, None], ftc * real[:, None, :, None]
        x0, xL = x0 * real[..., None], xL * real[..., None]
    positions = batch.rows
    if batch.squeeze_positions:
        ptc, ftc, x0, xL, positions = ptc[:, :, 0], ftc[:, :, 0], x0[:, 0], xL[:, 0], positions[:, 0]
    return Decomposition(ptc=ptc, ftc=ftc, x0=x0, xL=xL, positions=positions)


def decompose(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    positions: Positions = "last",
    base_model: nn.Module | str | Path | None = None,
    replay: bool = False,
    backend: Backend | None = None,
) -> Decomposition:
    """Split every block's update of a LoRA/QLoRA model into pre-trained and fine-tuning components.

    One forward pass of the fine-tuned model and one copy of the weights: the pre-trained block is the
    same block with its adapters off, evaluated on the fine-tuned hidden states. Under ``torch.no_grad()``
    this is an analysis; with grad mode on, the outputs are differentiable w.r.t. the adapter weights.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapters on a transformers causal LM (4-bit/8-bit base too);
            or, with ``base_model``, any fine-tuned causal LM.
        input_ids: ``[batch, seq]`` token ids, left- or right-padded.
        attention_mask: ``[batch, seq]`` 1 for tokens, 0 for padding; all ones if omitted.
        positions: ``"last"`` (the last real token of each row, TuCo's definition), ``"all"``, or token
            indices (a list for every row, or a ``[batch, k]`` tensor).
        base_model: for a full fine-tune, the pre-trained model: loaded (same architecture and size), or
            the path of its safetensors checkpoint, streamed one block at a time (peak memory about one
            model plus one block). Omit it for adapter fine-tunes.
        replay: run every block's pre-trained path as a second pass through the block (the generic path),
            even where the one-pass path applies; for cross-checks.
        backend: ``"auto"`` (default: fused Triton kernels on CUDA when Triton is importable), ``"torch"``
            or ``"triton"``; ``None`` reads the ``TUCO_PEFT_BACKEND`` environment variable. On Triton, the
            q/k/v projections give both paths from one kernel; with ``positions="all"`` each block runs
            paired (``paired.PairedBlock``), every weight read once for both paths.
    """
    parts = model_parts(model)
    source = checked_pretrained_blocks(parts, base_model)
    batch = prepare_batch(input_ids, attention_mask, positions, parts.input_device)
    router = make_backend(resolve_backend(backend, batch.input_ids.device))
    probes = [_probe(i, layer, parts, source, batch, router, replay) for i, layer in enumerate(parts.layers)]
    with ExitStack() as stack:
        stack.enter_context(analysis_states(parts, source))
        for probe in probes:
            stack.enter_context(probe.attached())
        parts.decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    return _assemble(probes, batch)


def tuco(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    base_model: nn.Module | str | Path | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """TuCo of each prompt at its last real token: float32 ``[batch]``, in [0, 1]."""
    return decompose(model, input_ids, attention_mask, base_model=base_model, backend=backend).tuco
