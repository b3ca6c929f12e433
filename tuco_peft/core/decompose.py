"""One-pass TuCo decomposition of a LoRA/QLoRA model: ``decompose`` and ``tuco``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import InputError
from ..io.block_sources import PretrainedBlocks, analysis_states, checked_pretrained_blocks
from ..lora.adapters import adapters_per_row, check_adapters_per_row
from ..lora.backend import Backend, LoraLinearBackend, make_backend, resolve_backend
from ..model.block_args import hidden_states
from ..model.inputs import Batch, Positions, prepare_batch
from ..model.interception import hooked
from ..model.parts import ModelParts, model_parts
from ..model.shared_keys_values import PretrainedStore
from .accumulators import AllComponents, Components, RunningSums
from .contributions import Decomposition, DecompositionSums
from .paired import PairedBlock, StackedArguments, paired_block
from .pretrained_path import PretrainedPath, SharedReads, block_output, pretrained_path


class _BlockProbe:
    """Hooks on one decoder block: records its input, then hands its rows and PTC to ``components``."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        path: PretrainedPath,
        source: PretrainedBlocks,
        components: Components,
        lora_backend: LoraLinearBackend,
        store: PretrainedStore | None,
    ):
        self.index = index
        self.components = components
        self.batch = components.batch
        self.lora_backend = lora_backend
        self.layer = layer
        self.path = path
        self.source = source
        self.store = store
        self._input: tuple[torch.Tensor, tuple, dict[str, Any]] | None = None

    @contextmanager
    def attached(self) -> Iterator[None]:
        with (
            hooked(self.layer, before=self._before, after=self._after, with_kwargs=True),
            self.path.capturing(self.lora_backend, self.batch),
        ):
            yield

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._input = (hidden_states(args, kwargs), args, kwargs)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        assert self._input is not None, "the pre-hook ran first and recorded the block's input"
        x, args, kwargs = self._input
        self._input = None
        out = block_output(output)
        # With a multi-device device_map, accelerate moves a block's inputs inside its forward (after our
        # pre-hook): work where the block ran, keep the results where the batch lives.
        if x.device != out.device:
            x, args, kwargs = _to_device((x, args, kwargs), out.device)
        batch = self.batch.to(out.device)
        x_rows = self.components.rows_of(x, batch)
        out_rows = self.components.rows_of(out, batch)
        block = self.source.block(self.index) if self.path.needs_pretrained_block else nullcontext(self.layer)
        if self.store is not None:
            kwargs = self.store.call_arguments(kwargs)
        with block as pretrained:
            ptc = self.path.pretrained_update(pretrained, x, args, kwargs, batch)
        home = self.batch.input_ids.device
        if out.device != home:
            x_rows, out_rows, ptc = x_rows.to(home), out_rows.to(home), ptc.to(home)
        self.components.add(self.index, x_rows, out_rows, ptc)


class _PairedProbe:
    """One decoder block run paired (``core.paired.PairedBlock``): its pre-trained and fine-tuned outputs at every
    position from one forward, so each weight is read once for both, and the block's every operation serves
    both. Used for all-position decompositions on a backend that ``pairs_prefill``, where the pre-trained path
    is needed at every row anyway, and for small batches of narrow models, where a call costs its count of
    operations rather than their arithmetic."""

    def __init__(
        self,
        index: int,
        paired: PairedBlock,
        components: Components,
        backend: LoraLinearBackend,
        arguments: StackedArguments,
    ):
        self.index = index
        self.paired = paired
        self.components = components
        self.backend = backend
        self.arguments = arguments

    def attached(self) -> AbstractContextManager[None]:
        return self.paired.attached(self.backend, self.arguments, self._split)

    def _split(self, x: torch.Tensor, pretrained: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        self.components.add_outputs(self.index, x, pretrained, finetuned)
        return finetuned


Probe = _BlockProbe | _PairedProbe

# Batches of up to SHARED_READS_MAX_TOKENS tokens (padding included) of a model at least SHARED_READS_MIN_WIDTH
# wide compute the pre-trained rows inside the fine-tuned forward's calls (``pretrained_path.SharedReadBlock``): there
# a block's cost is reading its weights, which the rows then share. Larger batches are bound by arithmetic,
# where appending the rows costs copies and a second read of a few rows' weights costs little; narrower
# models' weights are read in no time, and the extra calls of the shared path cost more than they save.
# Measured on a CPU, one thread (benchmarks/bench_overhead.py, benchmarks/README.md): on a 135M-shaped
# model, one prompt of 16 tokens costs 1.16× a plain forward with shared reads against 1.29× without, and
# from 64 tokens on the two are within 1%; on the demo's width 64 the shared path costs more. A GPU is
# bound by weight reads further on, so these are conservative there. A mixture of experts without adapters
# shares its reads at any size and width (``SharedReadBlock.pays``): a few rows route to most of its experts.
SHARED_READS_MAX_TOKENS = 256
SHARED_READS_MIN_WIDTH = 256
# Narrower models' batches of up to PAIRED_MAX_TOKENS tokens run their blocks paired (``_PairedProbe``) at any
# positions: every operation of the block serves both paths at once, where the pre-trained rows alone cost
# about 50 more operations a block, each a few microseconds whatever its size, and every block's components
# are computed together after the forward (``Components.hold_blocks``). Larger batches pay for the doubled
# arithmetic. Measured on a CPU, one thread, the demo's shapes (width 64; benchmarks/bench_overhead.py): one
# prompt of 16 tokens costs about 1.25× a plain forward paired against 1.6× with the rows after the block;
# the two are level at 128 tokens, and at 256 the rows after the block cost 1.37× against 1.5× paired.
PAIRED_MAX_TOKENS = 128


def _probe(
    index: int,
    layer: nn.Module,
    parts: ModelParts,
    source: PretrainedBlocks,
    components: Components,
    lora_backend: LoraLinearBackend,
    replay: bool,
    arguments: StackedArguments,
    store: PretrainedStore | None,
) -> Probe:
    """The cheapest exact probe: paired where every row is wanted on a backend that ``pairs_prefill``, else the
    block's pre-trained path (rows only, inside the fine-tuned forward's calls on a small batch, or a replay).
    A batch of mixed adapters calls its LoRA layers only as the model does (with each row's adapter), not
    stacked or with rows appended; blocks that share keys/values replay (``model.shared_keys_values``)."""
    batch = components.batch
    replay = replay or parts.shares_keys_values
    mixed_adapters = batch.adapter_names is not None
    every_row = batch.rows.shape[1] == batch.input_ids.shape[1]
    # A paired block reports its outputs inside its forward, before the block's forward hooks run: a hook that
    # returns another output would then read as a gap between blocks, so a hooked block pairs only where it
    # must to save weight reads (a prefill on a backend that ``pairs_prefill``).
    small = _op_bound(batch, parts) and not layer._forward_hooks
    paired = None
    if (every_row or small) and not replay and not mixed_adapters:
        paired = paired_block(parts, index, lora_backend, source.separate_model, prefill=not small)
    if paired is not None:
        return _PairedProbe(index, paired, components, lora_backend, arguments)
    read_bound = batch.input_ids.numel() <= SHARED_READS_MAX_TOKENS and parts.d_model >= SHARED_READS_MIN_WIDTH
    shared_reads: SharedReads = "never" if mixed_adapters else "always" if read_bound else "experts"
    path = parts.derived(
        ("pretrained path", index, source.separate_model, replay, shared_reads),
        lambda: pretrained_path(
            layer, parts.config, separate_model=source.separate_model, replay_only=replay, shared_reads=shared_reads
        ),
    )
    return _BlockProbe(index, layer, path, source, components, lora_backend, store)


def _op_bound(batch: Batch, parts: ModelParts) -> bool:
    """A batch of at most PAIRED_MAX_TOKENS tokens of a model narrower than SHARED_READS_MIN_WIDTH: a call
    that costs its count of tensor operations, not their arithmetic or weight reads."""
    return parts.d_model < SHARED_READS_MIN_WIDTH and batch.input_ids.numel() <= PAIRED_MAX_TOKENS


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


# The token ids a multimodal model's config reserves for the media it puts in their place.
_MEDIA_PLACEHOLDERS = ("image_token_id", "video_token_id", "audio_token_id")


def _check_text_only(batch: Batch, parts: ModelParts) -> None:
    """No media placeholders in the prompts of a multimodal model: ``decompose`` runs its text decoder alone, where
    the model's own forward would put media in their place (Gemma 4 puts padding there when none is given)."""
    config = parts.causal_lm.config
    if parts.config is config:
        return
    reserved = [value for name in _MEDIA_PLACEHOLDERS if isinstance(value := getattr(config, name, None), int)]
    found = batch.input_ids[torch.isin(batch.input_ids, batch.input_ids.new_tensor(reserved))]
    if found.numel():
        raise InputError(
            f"input_ids holds the media placeholder token {int(found[0])}: tuco-peft decomposes the text decoder of "
            f"{type(parts.causal_lm).__name__}, on text prompts. Leave images, video and audio out of the prompt "
            "(a chat template without them)."
        )


def _checked_adapter_names(
    adapter_names: Sequence[str], batch: Batch, parts: ModelParts, source: PretrainedBlocks
) -> tuple[str, ...]:
    if source.separate_model:
        raise InputError("adapter_names selects adapters of a PeftModel; a full fine-tune (base_model=...) has none.")
    names = () if isinstance(adapter_names, str) else tuple(adapter_names)
    if len(names) != len(batch.input_ids) or not all(isinstance(name, str) for name in names):
        raise InputError(
            f"adapter_names must be a list naming one adapter per row of input_ids ({len(batch.input_ids)} names), "
            f"got {adapter_names!r}."
        )
    check_adapters_per_row(parts.modules, names)
    return names


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
    adapter_names: Sequence[str] | None = None,
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
            paired (``core.paired.PairedBlock``), every weight read once for both paths.
        keep: ``"all"`` returns every block's PTC and FTC (a ``Decomposition``); ``"sums"`` reduces each
            block's components as soon as they are computed and returns a ``DecompositionSums`` (TuCo,
            per-block L1 norms and cumulative TuCo at every position; no per-block vectors), so that
            memory grows with the sequence only: use it for TuCo per token over long prompts.
        adapter_names: the adapter of each row, for a batch that mixes the adapters a model holds, as PEFT's
            ``adapter_names`` (``"__base__"``: none): each row is decomposed as if its adapter alone were
            active, and every weight is read once for all of them. LoRA adapters only (no DoRA).
    """
    if keep not in ("all", "sums"):
        raise InputError(f"keep must be 'all' or 'sums', got {keep!r}.")
    parts = model_parts(model)
    source = checked_pretrained_blocks(parts, base_model)
    batch = prepare_batch(input_ids, attention_mask, positions, parts.input_device)
    _check_vocabulary(batch, parts)
    _check_text_only(batch, parts)
    if adapter_names is not None:
        batch = replace(batch, adapter_names=_checked_adapter_names(adapter_names, batch, parts, source))
    lora_backend = make_backend(resolve_backend(backend, batch.input_ids.device))
    components = (AllComponents if keep == "all" else RunningSums)(len(parts.layers), batch)
    arguments, store = StackedArguments(), PretrainedStore() if parts.shares_keys_values else None
    probes = [
        _probe(i, layer, parts, source, components, lora_backend, replay, arguments, store)
        for i, layer in enumerate(parts.layers)
    ]
    if _op_bound(batch, parts) and all(isinstance(probe, _PairedProbe) for probe in probes):
        components.hold_blocks()  # their states are small; wide models' would not be
    with ExitStack() as stack:
        stack.enter_context(analysis_states(parts, source))
        if batch.adapter_names is not None:
            stack.enter_context(adapters_per_row(parts.modules, list(batch.adapter_names)))
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
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """TuCo of each prompt, in [0, 1], float32: at its last real token (``[batch]``), or at ``positions`` as
    in ``decompose`` (``[batch, k]``, 0 at padding). Only running sums over blocks are kept (``keep="sums"``).
    """
    return decompose(
        model,
        input_ids,
        attention_mask,
        positions=positions,
        base_model=base_model,
        backend=backend,
        keep="sums",
        adapter_names=adapter_names,
    ).tuco
