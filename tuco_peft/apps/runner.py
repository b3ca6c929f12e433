"""Run ``decompose`` over many prompts: load the model, encode the prompts, batch them by length, make rows.

The command line (``analyze``, ``compare``, ``generate``, ``eval``, ``bench``), its data-parallel ``analyze``
and the demo all go through a ``Runner``, so prompts are formatted, fitted to the context and batched the
same way everywhere. Batches are made of prompts of similar length (cut from the prompts sorted by token
count, under a token budget), so that a file mixing short and long prompts is not mostly padding; the
caller puts the rows back in the prompt file's order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import TuCoError
from ..io import checkpoints, loaders
from ..io.adapter_series import AdapterCheckpoint, adapter_series
from ..io.checkpoints import Checkpoints, LoadOptions
from ..io.prompts import EncodedPrompt, Prompt, PromptId, encode_prompt
from ..io.results import Provenance, ResultRow, stored_prompt

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..core.contributions import Decomposition, DecompositionSums
    from ..views import ScoredText


def warn(message: str) -> None:
    """A warning that does not break the progress bar."""
    from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

    tqdm.write(f"tuco-peft: warning: {message}", file=sys.stderr)


def quiet_libraries() -> None:
    """Keep transformers' notices about loading off the terminal; errors still come through as one line."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


@dataclass(frozen=True)
class PromptFormat:
    """How prompts become text: as given, or through the tokenizer's chat template with a system prompt."""

    chat_template: bool = False
    system: str | None = None


@dataclass(frozen=True)
class Batching:
    """At most ``batch_size`` prompts per forward pass, and with ``max_batch_tokens`` at most that many
    positions (prompts × the longest one's tokens, padding included).

    ``overhead_tokens`` is what one more forward pass costs, in positions: every forward reads all the
    weights once and launches the same kernels whatever its size, and on current GPUs reading a model's
    weights takes as long as the arithmetic of 150 to 300 tokens (FLOP/s over bytes/s, as a token costs
    2 FLOP per 2-byte weight: about 150 on an A100, 200 on an H200, 300 on an H100). So the planner splits
    a batch only where that saves more padding than a forward pass costs.
    """

    batch_size: int = 8
    max_batch_tokens: int | None = None
    overhead_tokens: int = 256


def plan_batches(lengths: Sequence[int], batching: Batching) -> list[list[int]]:
    """Indices into ``lengths``, grouped into batches of similar length, the largest first.

    The batches are runs of the prompts sorted by length, cut where they cost least: the positions
    computed (each batch's size × its longest prompt) plus ``overhead_tokens`` per batch, which a dynamic
    programme over where each batch ends finds exactly in O(n × batch_size). Runs lose nothing: sort any
    grouping's batches by their longest prompt, refill them in that order with the prompts sorted by
    length, and no batch changes size or gets a longer longest prompt.

    The largest first (the most positions, then the longest prompt), so that a batch too large for the
    device fails at once rather than at the end. A prompt longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    count = len(order)
    # cost[start]: the least cost of batching order[start:]; end[start]: where its first batch then ends.
    cost = [0] * (count + 1)
    end = [count] * (count + 1)
    for start in reversed(range(count)):
        longest = lengths[order[start]]
        cost[start], end[start] = longest + batching.overhead_tokens + cost[start + 1], start + 1  # alone
        for stop in range(start + 2, min(start + batching.batch_size, count) + 1):
            positions = (stop - start) * longest
            if batching.max_batch_tokens is not None and positions > batching.max_batch_tokens:
                break
            candidate = positions + batching.overhead_tokens + cost[stop]
            if candidate <= cost[start]:  # on a tie, the larger batch
                cost[start], end[start] = candidate, stop
    batches: list[list[int]] = []
    start = 0
    while start < count:
        batches.append(order[start : end[start]])
        start = end[start]
    batches.sort(key=lambda batch: (-len(batch) * lengths[batch[0]], -lengths[batch[0]]))
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of the positions computed that are padding, when ``batches`` are left-padded."""
    computed = sum(len(batch) * max(lengths[index] for index in batch) for batch in batches)
    return 1 - sum(lengths) / computed if computed else 0.0


def decomposition_rows(
    decomposition: Decomposition | DecompositionSums,
    batch: Sequence[EncodedPrompt],
    attention_mask: torch.Tensor,
    decode: Callable[[list[int]], str],
) -> list[ResultRow]:
    """One row per prompt of ``batch``: TuCo, per-layer ‖PTC_l‖₁ and ‖FTC_l‖₁ and the cumulative TuCo, at the
    last token. ``decode`` (the tokenizer's) gives the text analysed of a prompt that was cut.

    With ``positions="all"`` the row also gets ``token_tuco``, the TuCo at every token of the prompt.
    """
    from ..model.inputs import last_real_index

    per_position = decomposition.positions.ndim == 2
    if per_position:
        at_last = decomposition.at(last_real_index(attention_mask.to(decomposition.x0.device)))
        token_tuco = decomposition.tuco
    else:
        at_last = decomposition
    ptc_norm, ftc_norm = at_last.layer_norms()
    cumulative = at_last.cumulative_tuco()
    tuco = at_last.tuco.tolist()
    return [
        ResultRow(
            id=tokens.prompt.id,
            **stored_prompt(tokens, decode),
            n_tokens=len(tokens.ids),
            tuco=tuco[b],
            ptc_l1=ptc_norm[b].tolist(),
            ftc_l1=ftc_norm[b].tolist(),
            cumulative_tuco=cumulative[b].tolist(),
            token_tuco=token_tuco[b][attention_mask[b].bool().to(token_tuco.device)].tolist() if per_position else None,
        )
        for b, tokens in enumerate(batch)
    ]


@dataclass(frozen=True)
class ModelChoice:
    """The model to analyse: a LoRA fine-tune (``base`` and ``adapters``, the locations of its ``--adapter``
    flags) or a full fine-tune (``model`` beside its pre-trained ``base_model``, streamed from its safetensors
    unless ``resident_base``)."""

    base: str | None = None
    adapters: tuple[str, ...] = ()
    model: str | None = None
    base_model: str | None = None
    resident_base: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)

    @property
    def adapter(self) -> str | None:
        """The first ``--adapter`` (the only one, for every command but analyze), or None."""
        return self.adapters[0] if self.adapters else None

    def series(self) -> list[AdapterCheckpoint] | None:
        """The adapters of a run over several (``adapter_series``: checked, before anything loads), or None for
        one fine-tune."""
        return adapter_series(self.adapters, self.base) if self.adapters else None

    def full_finetune(self) -> tuple[str, str] | None:
        """(``model``, ``base_model``) of a full fine-tune, or None when the choice is a LoRA fine-tune."""
        if self.model is None:
            return None
        assert self.base_model is not None, "cli.options.check_model_choice gives --model its --base-model"
        return self.model, self.base_model

    def lora_finetune(self) -> tuple[str, str]:
        """(``base``, ``adapter``) of a LoRA fine-tune, the choice when no full fine-tune was given."""
        assert self.base is not None and self.adapter is not None, "check_model_choice gives --base its --adapter"
        return self.base, self.adapter

    def check(self) -> Checkpoints:
        """The checkpoints, each checked as far as it can be without loading it."""
        full_finetune = self.full_finetune()
        if full_finetune is not None:
            finetuned, pretrained = full_finetune
            return checkpoints.check_full_finetune(finetuned, pretrained, self.load, resident=self.resident_base)
        base, adapter = self.lora_finetune()
        return checkpoints.check_pair(base, adapter, self.load)


@dataclass
class Runner:
    """A loaded model and tokenizer, and how prompts are formatted and batched for ``decompose``.

    ``base_model`` is decompose's: the pre-trained model of a full fine-tune (loaded, or the directory of
    its safetensors to stream), ``None`` for a LoRA fine-tune. ``provenance`` (settings and fingerprint)
    goes into every row, so that a rerun resumes only rows computed the same way: one entry, under ``None``,
    for one fine-tune, one per adapter name in a run over several adapters. ``views`` collects each
    decomposed prompt's tokens, by id, when given (``analyze --html``).
    """

    model: nn.Module
    tokenizer: Any
    prompt_format: PromptFormat = PromptFormat()
    batching: Batching = Batching()
    positions: Literal["last", "all"] = "last"
    base_model: nn.Module | Path | None = None
    provenance: Mapping[str | None, Provenance] = field(default_factory=dict)
    views: dict[PromptId, ScoredText] | None = None

    @classmethod
    def load(cls, choice: ModelChoice, adapters: Sequence[AdapterCheckpoint] = (), **settings: Any) -> Runner:
        """Load ``choice``'s model and tokenizer; ``settings`` are the other fields of the runner.

        With ``adapters`` (a run over several), the base loads once and holds each of them under its
        ``adapter_name``, which ``run`` switches between.
        """
        quiet_libraries()
        base_model = None
        full_finetune = choice.full_finetune()
        if full_finetune is not None:
            finetuned, pretrained = full_finetune
            model, base_model, tokenizer = loaders.load_full_finetune(
                finetuned, pretrained, choice.load, resident=choice.resident_base
            )
        elif adapters:
            assert choice.base is not None, "check_model_choice gives --adapter its --base"
            model, tokenizer = loaders.load_adapters(choice.base, adapters, choice.load)
        else:
            base, adapter = choice.lora_finetune()
            model, tokenizer = loaders.load_pair(base, adapter, choice.load)
        return cls(model, tokenizer, base_model=base_model, **settings)

    def context_length(self) -> int | None:
        from ..model.parts import model_parts

        config = model_parts(self.model).config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def encode(self, prompts: Sequence[Prompt], room: int = 0) -> list[EncodedPrompt]:
        """Each (non-empty) prompt's token ids. Over-long ones keep their last tokens, with a warning;
        ``room`` is how many positions of the context to leave free (for generated tokens)."""
        context = self.context_length()
        limit = None if context is None else context - room
        encoded = []
        for prompt in prompts:
            tokens = encode_prompt(
                self.tokenizer,
                prompt,
                chat_template=self.prompt_format.chat_template,
                system=self.prompt_format.system,
                context_length=limit,
            )
            if not tokens.ids:
                warn(f"prompt {prompt.id!r} (line {prompt.line}) has no tokens; skipped.")
                continue
            if tokens.was_cut:
                room_note = f" less {room} new tokens" if room else ""
                size = (
                    "far more tokens than"
                    if tokens.n_cut is None
                    else f"{tokens.n_cut + len(tokens.ids)} tokens, more than"
                )
                warn(
                    f"prompt {prompt.id!r} (line {prompt.line}) has {size} the model's context of "
                    f"{context}{room_note}; analysing its last {limit} tokens."
                )
            encoded.append(tokens)
        return encoded

    def run(
        self,
        prompts: Sequence[Prompt],
        write: Callable[[list[ResultRow]], None],
        set_name: str | None = None,
        label: str | None = None,
        adapters: Sequence[AdapterCheckpoint] | None = None,
    ) -> None:
        """Decompose ``prompts`` batch by batch, handing each batch's rows to ``write`` as soon as they exist.

        In a run over several adapters, ``adapters[i]`` is the adapter ``prompts[i]`` is decomposed with (a
        prompt may come once per adapter); see ``_planned`` for how their rows are batched. Batches follow
        ``plan_batches``, so rows come by batches of similar length, not in the order of ``prompts``. ``label``
        names the progress bar (default: the set name, else "analyze").
        """
        from tqdm import tqdm

        encoded, owners = self._encoded(prompts, adapters)
        lengths = [len(tokens.ids) for tokens in encoded]
        budget = self.batching.max_batch_tokens
        if budget is not None and lengths and max(lengths) > budget:
            over = sum(length > budget for length in lengths)
            warn(
                f"{over} prompt(s) have more tokens than --max-batch-tokens {budget} (the longest {max(lengths)}); "
                "each runs in a batch of its own, over the budget. Raise --max-batch-tokens if that is too much."
            )
        with tqdm(
            total=len(encoded), unit="prompt", desc=label or set_name or "analyze", file=sys.stderr, dynamic_ncols=True
        ) as bar:
            for active, batch, adapter_names in self._planned(owners, lengths):
                with active:
                    rows = self._batch_rows([encoded[index] for index in batch], adapter_names)
                write(
                    [
                        row.made_with(self._provenance_of(owners[index]), set_name, owners[index])
                        for row, index in zip(rows, batch)
                    ]
                )
                bar.update(len(batch))

    def _encoded(
        self, prompts: Sequence[Prompt], adapters: Sequence[AdapterCheckpoint] | None
    ) -> tuple[list[EncodedPrompt], list[AdapterCheckpoint | None]]:
        """The prompts that have tokens, each encoded once however many adapters it comes with, and the
        adapter of each."""
        owners: Sequence[AdapterCheckpoint | None] = [None] * len(prompts) if adapters is None else adapters
        assert len(owners) == len(prompts), "one adapter per prompt"
        unique = {prompt.id: prompt for prompt in prompts}
        by_id = {tokens.prompt.id: tokens for tokens in self.encode(list(unique.values()))}
        kept = [(by_id[prompt.id], owner) for prompt, owner in zip(prompts, owners) if prompt.id in by_id]
        return [tokens for tokens, _ in kept], [owner for _, owner in kept]

    def _planned(
        self, owners: Sequence[AdapterCheckpoint | None], lengths: Sequence[int]
    ) -> Iterator[tuple[AbstractContextManager[None], list[int], list[str] | None]]:
        """The batches (indices into ``owners``), each with what makes its adapter active and, for a batch
        that mixes adapters, the adapter of each row (``decompose``'s ``adapter_names``).

        Each adapter's rows are batched on their own, with that adapter active: the plain forward, fastest per
        row. The batches left short of ``batch_size`` (a few prompts, or the last of many) are pooled across
        adapters into mixed batches where PEFT can mix them, so that a handful of prompts over many adapters
        takes a handful of forwards, each reading the base's weights once for all of them.
        """

        def plan(indices: Sequence[int]) -> list[list[int]]:
            batches = plan_batches([lengths[index] for index in indices], self.batching)
            return [[indices[position] for position in batch] for batch in batches]

        if all(owner is None for owner in owners):
            for batch in plan(range(len(owners))):
                yield nullcontext(), batch, None
            return
        from ..lora.adapters import adapter_active, why_not_mixable
        from ..model.parts import model_parts

        names = [_peft_name(owner) for owner in owners]
        modules = model_parts(self.model).modules
        mixable = why_not_mixable(modules, set(names)) is None
        pooled: list[int] = []
        for name in dict.fromkeys(names):
            for batch in plan([index for index, own in enumerate(names) if own == name]):
                if mixable and len(batch) < self.batching.batch_size:
                    pooled += batch
                else:
                    yield adapter_active(modules, name), batch, None
        for batch in plan(pooled):
            held = list(dict.fromkeys(names[index] for index in batch))
            if len(held) == 1:
                yield adapter_active(modules, held[0]), batch, None
            else:
                yield nullcontext(), batch, [names[index] for index in batch]

    def _provenance_of(self, adapter: AdapterCheckpoint | None) -> Provenance:
        return self.provenance.get(None if adapter is None else adapter.name, {})

    def _batch_rows(self, batch: Sequence[EncodedPrompt], adapter_names: Sequence[str] | None = None) -> list[ResultRow]:
        import torch

        from ..core.decompose import decompose
        from ..model.inputs import left_pad

        input_ids, attention_mask = left_pad([tokens.ids for tokens in batch])
        try:
            with torch.no_grad():
                # Rows and views need TuCo and per-block norms only: running sums keep memory linear in length.
                decomposition = decompose(
                    self.model,
                    input_ids,
                    attention_mask,
                    positions=self.positions,
                    base_model=self.base_model,
                    keep="sums",
                    adapter_names=adapter_names,
                )
        except (torch.OutOfMemoryError, RuntimeError) as error:
            message = str(error)
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message:
                raise TuCoError(
                    f"out of memory on a batch of {len(batch)} prompts of up to {input_ids.shape[1]} tokens; rerun "
                    "with a smaller --batch-size or --max-batch-tokens (finished rows are kept and the rerun resumes)."
                ) from error
            raise
        if self.views is not None:
            from ..views import texts_from_decomposition

            prompts = [tokens.prompt for tokens in batch]
            titles = [view_title(prompt) for prompt in prompts]
            texts = texts_from_decomposition(decomposition, input_ids, attention_mask, self.tokenizer, titles)
            self.views.update((prompt.id, text) for prompt, text in zip(prompts, texts))
        return decomposition_rows(decomposition, batch, attention_mask, self.tokenizer.decode)


def _peft_name(adapter: AdapterCheckpoint | None) -> str:
    """The name PEFT knows an adapter by, in ``adapter_names`` (``BASE``: the base model alone)."""
    from ..lora.adapters import BASE

    return BASE if adapter is None else adapter.adapter_name


def view_title(prompt: Prompt) -> str:
    """The heading of a prompt's tokens in an HTML page."""
    return f"prompt {prompt.id} (line {prompt.line})"
