"""One-pass TuCo decomposition of a LoRA/QLoRA model: ``decompose`` and ``tuco``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InputError, TuCoError, UnsupportedModelError
from ..io.block_sources import PretrainedBlocks, analysis_states, checked_pretrained_blocks
from ..lora.backend import Backend, LoraLinearBackend, make_backend, resolve_backend
from ..model.block_args import hidden_states
from ..model.inputs import Batch, Positions, prepare_batch
from ..model.interception import hooked
from ..model.parts import ModelParts, model_parts
from .contributions import Decomposition, DecompositionSums, tuco_from_sums
from .paired import PairedBlock, StackedArguments
from .pairing import paired_block
from .pretrained_path import PretrainedPath, block_output, gather_rows, pretrained_path


class _Components:
    """Receives each block's rows as the forward reaches it, splits its update into PTC and FTC, and checks
    that the residual stream runs unchanged from one block into the next. Subclasses decide what is kept."""

    def __init__(self, n_layers: int, batch: Batch):
        self.n_layers = n_layers
        self.batch = batch
        # Padding rows are zeroed block by block, so the reductions see the same values as ``keep="all"``.
        real = batch.row_is_real
        self.real: torch.Tensor | None = None if bool(real.all()) else real[..., None]
        all_positions = torch.arange(batch.input_ids.shape[1], device=batch.rows.device)
        self.every_position = batch.rows.shape[1] == len(all_positions) and bool((batch.rows == all_positions).all())
        self.x0: torch.Tensor | None = None
        self.xL: torch.Tensor | None = None
        self.blocks_seen = 0
        # Whether each block's input was the previous block's output, and whether its output is finite, kept
        # on the device (a Python bool would make the host wait for every block) and read once, after the
        # forward. Everything kept per block is allocated before the forward and written in place: small
        # allocations that outlive each block would sit between its large temporaries and fragment the heap,
        # which then grows by several blocks' activations (as resident memory, on glibc).
        home = batch.input_ids.device
        self._continues = torch.ones(n_layers, dtype=torch.bool, device=home)
        self._finite = torch.ones(n_layers, dtype=torch.bool, device=home)

    def rows_of(self, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``states`` [b, seq, ...] at the decomposed ``rows``, in float32; with every position in order, the
        states themselves (no copy of a float32 model's activations)."""
        return states.float() if self.every_position else gather_rows(states, rows).float()

    def add(self, index: int, x_rows: torch.Tensor, out_rows: torch.Tensor, ptc: torch.Tensor) -> None:
        if index != self.blocks_seen or (self.xL is not None and self.xL.shape != x_rows.shape):
            self._discontinuity(index)
        if self.xL is not None:
            self._continues[index] = (self.xL == x_rows).all()
        self._finite[index] = torch.isfinite(out_rows).all()
        ftc = (out_rows - x_rows) - ptc
        if self.real is not None:
            ptc, ftc = ptc * self.real, ftc * self.real
        if self.x0 is None:
            self.x0 = x_rows
        self.xL = out_rows
        self._keep(ptc, ftc)
        self.blocks_seen += 1

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        raise NotImplementedError

    def _discontinuity(self, index: int) -> None:
        raise UnsupportedModelError(
            f"the residual stream changes between blocks {index - 1} and {index} (or a block was skipped), so "
            "x_L ≠ x_0 + ΣPTC + ΣFTC for this architecture."
        )

    def _ends(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x0, xL and the positions, after checking that every block ran, on finite hidden states."""
        if self.blocks_seen != self.n_layers:
            self._discontinuity(self.blocks_seen)
        finite = self._finite
        if not bool(finite.all()):
            block = int((~finite).nonzero()[0])
            raise TuCoError(
                f"the hidden states hold NaN or infinity from block {block} on (NaN or infinite weights, or an "
                "overflow in float16), so TuCo is undefined; check the checkpoint's weights, or load it in "
                "float32 or bfloat16."
            )
        if not bool(self._continues.all()):  # on finite states, a difference is a real discontinuity
            self._discontinuity(int((~self._continues).nonzero()[0]))
        x0, xL = self.x0, self.xL
        if self.real is not None:
            x0, xL = x0 * self.real, xL * self.real
        return self._squeezed(x0, 1), self._squeezed(xL, 1), self._squeezed(self.batch.rows, 1)

    def _squeezed(self, tensor: torch.Tensor, positions_axis: int) -> torch.Tensor:
        """Without the positions axis where ``positions="last"`` asked for one row per prompt."""
        return tensor.select(positions_axis, 0) if self.batch.squeeze_positions else tensor


class _AllComponents(_Components):
    """Keeps every block's PTC and FTC at every requested row (``keep="all"``), each written into its slot of
    the [batch, n_layers, rows, d] result as it comes, so the result is never held twice (list and stack)."""

    def __init__(self, n_layers: int, batch: Batch):
        super().__init__(n_layers, batch)
        self.ptc: torch.Tensor | None = None
        self.ftc: torch.Tensor | None = None

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        if self.ptc is None:
            shape = (ptc.shape[0], self.n_layers, *ptc.shape[1:])
            self.ptc, self.ftc = ptc.new_empty(shape), ftc.new_empty(shape)
        self.ptc[:, self.blocks_seen] = ptc
        self.ftc[:, self.blocks_seen] = ftc

    def result(self) -> Decomposition:
        x0, xL, positions = self._ends()
        ptc, ftc = self._squeezed(self.ptc, 2), self._squeezed(self.ftc, 2)
        return Decomposition(ptc=ptc, ftc=ftc, x0=x0, xL=xL, positions=positions)


class _RunningSums(_Components):
    """Reduces each block's PTC and FTC as soon as they exist (``keep="sums"``): running ΣPTC and ΣFTC in
    block order, and per block their L1 norms and the cumulative TuCo, so memory does not grow with depth."""

    def __init__(self, n_layers: int, batch: Batch):
        super().__init__(n_layers, batch)
        self.ptc_sum: torch.Tensor | None = None
        self.ftc_sum: torch.Tensor | None = None
        self.per_block: torch.Tensor | None = None  # [3, batch, n_layers, rows]: ‖PTC_l‖₁, ‖FTC_l‖₁, cumulative

    def _keep(self, ptc: torch.Tensor, ftc: torch.Tensor) -> None:
        self.ptc_sum = ptc if self.ptc_sum is None else self.ptc_sum + ptc
        self.ftc_sum = ftc if self.ftc_sum is None else self.ftc_sum + ftc
        if self.per_block is None:
            self.per_block = ptc.new_empty((3, ptc.shape[0], self.n_layers, *ptc.shape[1:-1]))
        self.per_block[0, :, self.blocks_seen] = ptc.abs().sum(-1)
        self.per_block[1, :, self.blocks_seen] = ftc.abs().sum(-1)
        self.per_block[2, :, self.blocks_seen] = tuco_from_sums(self.ptc_sum, self.ftc_sum)

    def result(self) -> DecompositionSums:
        x0, xL, positions = self._ends()
        ptc_l1, ftc_l1, cumulative = (self._squeezed(values, 2) for values in self.per_block)
        return DecompositionSums(
            ptc_sum=self._squeezed(self.ptc_sum, 1),
            ftc_sum=self._squeezed(self.ftc_sum, 1),
            ptc_l1=ptc_l1,
            ftc_l1=ftc_l1,
            cumulative=cumulative,
            x0=x0,
            xL=xL,
            positions=positions,
        )


class _BlockProbe:
    """Hooks on one decoder block: records its input, then hands its rows and PTC to ``components``."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        path: PretrainedPath,
        source: PretrainedBlocks,
        components: _Components,
        lora_backend: LoraLinearBackend,
    ):
        self.index = index
        self.components = components
        self.batch = components.batch
        self.lora_backend = lora_backend
        self.layer = layer
        self.path = path
        self.source = source
        self._input: tuple[torch.Tensor, tuple, dict[str, Any]] | None = None

    @contextmanager
    def attached(self) -> Iterator[None]:
        with hooked(self.layer, before=self._before, after=self._after, with_kwargs=True):
            with self.path.capturing(self.lora_backend, self.batch):
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
        x_rows = self.components.rows_of(x, batch.rows)
        out_rows = self.components.rows_of(out, batch.rows)
        with self.source.block(self.index) as pretrained:
            ptc = self.path.pretrained_update(pretrained, x, args, kwargs, batch)
        self.components.add(self.index, x_rows.to(home), out_rows.to(home), ptc.to(home))


class _PairedProbe:
    """One decoder block run paired (``paired.PairedBlock``): its pre-trained and fine-tuned outputs at every
    position from one forward, so each weight is read once for both. Used for all-position decompositions
    on a backend that ``pairs_prefill``, where the pre-trained path is needed at every row anyway."""

    def __init__(self, index: int, paired: PairedBlock, components: _Components):
        self.index = index
        self.paired = paired
        self.components = components

    def attached(self) -> AbstractContextManager[None]:
        return self.paired.attached(self._split)

    def _split(self, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        rows = self.components.batch.rows
        x_rows = self.components.rows_of(x, rows)
        ptc = self.components.rows_of(pretrained, rows) - x_rows
        self.components.add(self.index, x_rows, self.components.rows_of(finetuned, rows), ptc)
        return finetuned


Probe = _BlockProbe | _PairedProbe

# Batches of up to SHARED_READS_MAX_TOKENS tokens (padding included) of a model at least SHARED_READS_MIN_WIDTH
# wide compute the pre-trained rows inside the fine-tuned forward's calls (``blocks.SharedReadBlock``): there
# a block's cost is reading its weights, which the rows then share. Larger batches are bound by arithmetic,
# where appending the rows costs copies and a second read of a few rows' weights costs little; narrower
# models' weights are read in no time, and the extra calls of the shared path cost more than they save.
# Measured on a CPU, one thread (benchmarks/bench_overhead.py, benchmarks/README.md): on a 135M-shaped
# model, one prompt of 16 tokens costs 1.16× a plain forward with shared reads against 1.29× without, and
# from 64 tokens on the two are within 1%; on the demo's width 64 the shared path costs more. A GPU is
# bound by weight reads further on, so these are conservative there.
SHARED_READS_MAX_TOKENS = 256
SHARED_READS_MIN_WIDTH = 256


def _probe(
    index: int,
    layer: nn.Module,
    parts: ModelParts,
    source: PretrainedBlocks,
    components: _Components,
    lora_backend: LoraLinearBackend,
    replay: bool,
    arguments: StackedArguments,
) -> Probe:
    """The cheapest exact probe: paired where every row is wanted on a backend that ``pairs_prefill``, else the
    block's pre-trained path (rows only, inside the fine-tuned forward's calls on a small batch, or a replay)."""
    batch = components.batch
    every_row = batch.rows.shape[1] == batch.input_ids.shape[1]
    paired = None
    if every_row and not replay:
        paired = paired_block(layer, parts.config, lora_backend, source.separate_model, arguments, prefill=True)
    if paired is not None:
        return _PairedProbe(index, paired, components)
    shared_reads = batch.input_ids.numel() <= SHARED_READS_MAX_TOKENS and parts.d_model >= SHARED_READS_MIN_WIDTH
    path = pretrained_path(
        layer, parts.config, separate_model=source.separate_model, replay_only=replay, shared_reads=shared_reads
    )
    return _BlockProbe(index, layer, path, source, components, lora_backend)


def _check_vocabulary(batch: Batch, parts: ModelParts) -> None:
    """Token ids the embedding has rows for: one outside it would fail deep in the forward (an IndexError on
    a CPU, a device-side assert on a GPU) without saying which id."""
    embedding = parts.causal_lm.get_input_embeddings()
    size = getattr(embedding, "num_embeddings", None)
    if size is None:
        return
    low, high = torch.stack(torch.aminmax(batch.input_ids)).tolist()  # one device-to-host copy for both
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise InputError(
            f"input_ids holds token id {bad}, outside the model's vocabulary of {size} (ids 0 to {size - 1}); "
            "tokenize with this model's tokenizer (padding too: pass a pad id below the vocabulary size)."
        )


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def decompose(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    positions: Positions = "last",
    base_model: nn.Module | str | Path | None = None,
    replay: bool = False,
    backend: Backend | None = None,
    keep: Literal["all", "sums"] = "all",
) -> Decomposition | DecompositionSums:
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
        keep: ``"all"`` returns every block's PTC and FTC (a ``Decomposition``); ``"sums"`` reduces each
            block's components as soon as they are computed and returns a ``DecompositionSums`` (TuCo,
            per-block L1 norms and cumulative TuCo at every position; no per-block vectors), so that
            memory grows with the sequence only: use it for TuCo per token over long prompts.
    """
    if keep not in ("all", "sums"):
        raise InputError(f"keep must be 'all' or 'sums', got {keep!r}.")
    parts = model_parts(model)
    source = checked_pretrained_blocks(parts, base_model)
    batch = prepare_batch(input_ids, attention_mask, positions, parts.input_device)
    _check_vocabulary(batch, parts)
    lora_backend = make_backend(resolve_backend(backend, batch.input_ids.device))
    components = (_AllComponents if keep == "all" else _RunningSums)(len(parts.layers), batch)
    arguments = StackedArguments()
    probes = [
        _probe(i, layer, parts, source, components, lora_backend, replay, arguments)
        for i, layer in enumerate(parts.layers)
    ]
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
    return components.result()


def tuco(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    positions: Positions = "last",
    base_model: nn.Module | str | Path | None = None,
    backend: Backend | None = None,
) -> torch.Tensor:
    """TuCo of each prompt, in [0, 1], float32: at its last real token (``[batch]``), or at ``positions`` as
    in ``decompose`` (``[batch, k]``, 0 at padding). Only running sums over blocks are kept (``keep="sums"``).
    """
    return decompose(
        model, input_ids, attention_mask, positions=positions, base_model=base_model, backend=backend, keep="sums"
    ).tuco
