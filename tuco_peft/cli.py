"""The ``tuco-peft`` command line: analyze, compare, generate, eval, bench, demo.

The model analysed is a LoRA fine-tune (``--base BASE --adapter ADAPTER``) or a full fine-tune beside its
pre-trained checkpoint (``--model FINETUNED --base-model PRETRAINED``). ``analyze`` runs data-parallel when
launched by ``torchrun`` or ``accelerate launch`` (see ``distributed``).

Every command reports bad input as one line on stderr and a non-zero exit status (2 for input the user
can fix, 1 for anything unexpected, 130 when interrupted, at any moment); ``--debug`` shows the traceback
instead. Everything that can be checked without a model (flags, prompt files, checkpoint folders, the
results file and its lock) is checked before one loads, and torch, transformers and peft are imported only
by a command that needs them, so that ``--help`` and usage errors answer at once (lm-eval only by ``eval``).

``analyze`` and ``compare --out`` hold the results file's lock (``locking``) for the whole run, and resume
only rows computed from the same checkpoint content, tokenizer and settings (``fingerprint``, ``results``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import Ranks, fold_parts, part_file, process_group, together
from .errors import InputError, TuCoError, first_line
from .fingerprint import checkpoint_fingerprint, tokenizer_fingerprint
from .loading import (
    Checkpoints,
    LoadOptions,
    check_full_finetune,
    check_pair,
    load_base,
    load_full_finetune,
    load_pair,
    load_tokenizer,
    resolve,
)
from .locking import results_lock
from .prompts import Prompt, PromptId, check_formats, encode_prompt, fit_context, format_prompt, read_prompts
from .results import ResultsFile, Row, decomposition_rows, result_key, roc_auc, rows_for, summary_table

if TYPE_CHECKING:
    from torch import nn
    from typing_extensions import Self

    from .views import ScoredText

EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130


def warn(message: str) -> None:
    """A warning that does not break the progress bar."""
    from tqdm import tqdm

    tqdm.write(f"tuco-peft: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- analysis


@dataclass
class Analyzer:
    """A loaded model and tokenizer, and how prompts are formatted and batched for ``decompose``.

    ``base_model`` is decompose's: the pre-trained model of a full fine-tune (loaded, or the directory of
    its safetensors to stream), ``None`` for a LoRA fine-tune. ``provenance`` (settings and fingerprint)
    goes into every row, so that a rerun resumes only rows computed the same way.
    """

    model: nn.Module
    tokenizer: object
    chat_template: bool = False
    system: str | None = None
    batch_size: int = 8
    positions: str = "last"
    base_model: nn.Module | Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    views: dict[PromptId, ScoredText] | None = None  # analyze --html: each decomposed prompt's tokens, by id

    def context_length(self) -> int | None:
        from .introspection import model_parts

        config = model_parts(self.model).config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def encode(self, prompts: Sequence[Prompt], room: int = 0) -> list[tuple[Prompt, list[int]]]:
        """Token ids of each (non-empty) prompt. Over-long ones keep their last tokens, with a warning;
        ``room`` is how many positions of the context to leave free (for generated tokens)."""
        context = self.context_length()
        limit = None if context is None else context - room
        encoded = []
        for prompt in prompts:
            ids = _prompt_ids(self.tokenizer, prompt, self.chat_template, self.system)
            if not ids:
                warn(f"prompt {prompt.id!r} (line {prompt.line}) has no tokens; skipped.")
                continue
            kept = fit_context(ids, limit)
            if len(kept) < len(ids):
                room_note = f" less {room} new tokens" if room else ""
                warn(
                    f"prompt {prompt.id!r} (line {prompt.line}) has {len(ids)} tokens, more than the model's context "
                    f"of {context}{room_note}; analysing its last {limit} tokens."
                )
            encoded.append((prompt, kept))
        return encoded

    def _batch_rows(self, batch: Sequence[tuple[Prompt, list[int]]]) -> list[Row]:
        import torch

        from .decompose import decompose
        from .inputs import left_pad

        input_ids, attention_mask = left_pad([ids for _, ids in batch])
        try:
            with torch.no_grad():
                decomposition = decompose(
                    self.model, input_ids, attention_mask, positions=self.positions, base_model=self.base_model
                )
        except (torch.OutOfMemoryError, RuntimeError) as error:
            message = str(error)
            if isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "can't allocate" in message:
                raise TuCoError(
                    f"out of memory on a batch of {len(batch)} prompts of up to {input_ids.shape[1]} tokens; rerun "
                    "with a smaller --batch-size (finished rows are kept and the rerun resumes)."
                ) from error
            raise
        if self.views is not None:
            from .views import texts_from_decomposition

            prompts = [prompt for prompt, _ in batch]
            titles = [_view_title(prompt) for prompt in prompts]
            texts = texts_from_decomposition(decomposition, input_ids, attention_mask, self.tokenizer, titles)
            self.views.update((prompt.id, text) for prompt, text in zip(prompts, texts))
        return decomposition_rows(decomposition, [p for p, _ in batch], [len(ids) for _, ids in batch], attention_mask)

    def run(
        self,
        prompts: Sequence[Prompt],
        write: Callable[[list[Row]], None],
        set_name: str | None = None,
        label: str | None = None,
    ) -> None:
        """Decompose ``prompts`` batch by batch, handing each batch's rows to ``write`` as soon as they exist.

        ``label`` names the progress bar (default: the set name, else "analyze").
        """
        from tqdm import tqdm

        encoded = self.encode(prompts)
        with tqdm(
            total=len(encoded), unit="prompt", desc=label or set_name or "analyze", file=sys.stderr, dynamic_ncols=True
        ) as bar:
            for start in range(0, len(encoded), self.batch_size):
                batch = encoded[start : start + self.batch_size]
                rows = [{**row, **self.provenance} for row in self._batch_rows(batch)]
                if set_name is not None:
                    rows = [{"set": set_name, **row} for row in rows]
                write(rows)
                bar.update(len(batch))


def _prompt_ids(tokenizer: Any, prompt: Prompt, chat_template: bool, system: str | None) -> list[int]:
    """Every token id of ``prompt``, formatted as the flags say (before fitting it to the context)."""
    text = format_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
    return encode_prompt(tokenizer, text, templated=chat_template)


def _view_title(prompt: Prompt) -> str:
    return f"prompt {prompt.id} (line {prompt.line})"


def _quiet_libraries() -> None:
    """Keep transformers' notices about loading off the terminal; errors still come through as one line."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def _load_analyzer(args: argparse.Namespace, provenance: dict[str, Any] | None = None) -> Analyzer:
    _quiet_libraries()
    options = _load_options(args)
    base_model = None
    if args.model is not None:
        model, base_model, tokenizer = load_full_finetune(
            args.model, args.base_model, options, resident=args.resident_base
        )
    else:
        model, tokenizer = load_pair(args.base, args.adapter, options)
    return Analyzer(
        model,
        tokenizer,
        args.chat_template,
        args.system,
        args.batch_size,
        getattr(args, "positions", "last"),
        base_model,
        provenance or {},
    )


def _checked_sources(args: argparse.Namespace) -> Checkpoints:
    """The checkpoints the model flags name, each checked as far as it can be without loading it."""
    options = _load_options(args)
    if args.model is not None:
        return check_full_finetune(args.model, args.base_model, options, resident=args.resident_base)
    return check_pair(args.base, args.adapter, options)


def _provenance(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """What each row records of how it was computed, once every checkpoint has been checked: the settings,
    and the fingerprint of the command, the checkpoints' content and the tokenizer."""
    checkpoints = _checked_sources(args)
    fingerprint = {name: checkpoint_fingerprint(source) for name, source in checkpoints.by_flag.items()}
    fingerprint.update(command=command, tokenizer=tokenizer_fingerprint(checkpoints.tokenizer))
    return {"settings": _settings(args), "fingerprint": fingerprint}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a row's values depend on besides its prompt: the model, the dtype and how prompts are formatted."""

    def where(location: str | None) -> str | None:
        return location if location is None or not Path(location).exists() else str(Path(location).resolve())

    return {
        "base": where(args.base),
        "adapter": where(args.adapter),
        "model": where(args.model),
        "base_model": where(args.base_model),
        "dtype": str(_load_options(args).torch_dtype()).removeprefix("torch."),
        "load_in_4bit": args.load_in_4bit,
        "chat_template": args.chat_template,
        "system": args.system,
        "positions": getattr(args, "positions", "last"),
    }


def _load_options(args: argparse.Namespace) -> LoadOptions:
    device, ranks = args.device, Ranks.from_environment()
    if device == "auto" and ranks.world_size > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"  # ranks spread over the GPUs
    return LoadOptions(
        dtype=args.dtype,
        device=device,
        load_in_4bit=args.load_in_4bit,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
    )


_PARTNERS = {"--base": "--adapter", "--adapter": "--base", "--model": "--base-model", "--base-model": "--model"}
_MODEL_CHOICE = (
    "pass --base BASE --adapter ADAPTER for a LoRA fine-tune, or --model FINETUNED --base-model PRETRAINED for "
    "a full fine-tune"
)


def _check_model_flags(args: argparse.Namespace, required: bool = True) -> None:
    """One model to analyse: a base and its adapter, or a fine-tuned model and its pre-trained checkpoint."""
    given = [flag for flag in _PARTNERS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if {"--base", "--adapter"} & set(given) and {"--model", "--base-model"} & set(given):
        raise InputError(f"{' and '.join(given)} mix a LoRA fine-tune with a full fine-tune; {_MODEL_CHOICE}.")
    for flag in given:
        if _PARTNERS[flag] not in given:
            raise InputError(f"{flag} needs {_PARTNERS[flag]}; {_MODEL_CHOICE}.")
    if required and not given:
        raise InputError(f"no model given; {_MODEL_CHOICE}.")
    if args.resident_base and args.base_model is None:
        raise InputError("--resident-base goes with --base-model (the pre-trained model of a full fine-tune).")


def _check_flags(args: argparse.Namespace, model_required: bool = True) -> None:
    """Every check of the flags alone, before anything is read or loaded."""
    _check_model_flags(args, model_required)
    if args.system is not None and not args.chat_template:
        raise InputError("--system needs --chat-template (the system prompt is part of the chat format).")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.device != "auto":
        _load_options(args).torch_device()  # a device that does not exist here
    if getattr(args, "out", None) is None and (getattr(args, "wait", False) or getattr(args, "repair", False)):
        raise InputError("--wait and --repair go with --out (the results file they are about).")
    if getattr(args, "plot", None):
        from .plotting import check_plot_path

        check_plot_path(args.plot)


def _analysable(prompts: Sequence[Prompt], chat_template: bool, source: str, announce: bool = True) -> list[Prompt]:
    """The non-empty prompts, once their format fits the flags; with ``announce``, one warning names the
    empty ones."""
    check_formats(prompts, chat_template=chat_template)
    empty = [prompt for prompt in prompts if prompt.is_empty]
    if empty and announce:
        named = ", ".join(f"{prompt.id!r} (line {prompt.line})" for prompt in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        warn(f"prompt {named} is empty; skipped." if len(empty) == 1 else f"prompts {named}{more} are empty; skipped.")
    kept = [prompt for prompt in prompts if not prompt.is_empty]
    if not kept:
        raise InputError(f"no prompt of {source} can be analysed (all empty).")
    return kept


def _check_alpha(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{flag} must be a finite number ≥ 0, got {value:g}.")


def _check_html(path: str, *other_files: str) -> None:
    """--html: a file in an existing folder, and none of the files the command reads or writes besides."""
    from .views import check_html_path

    check_html_path(path)
    for other in other_files:
        if Path(path).resolve() == Path(other).resolve():
            raise InputError(f"--html {path} is also {other}; pass another file name for the page.")


def _check_out(out: str | None, *prompt_files: str) -> None:
    for prompt_file in prompt_files:
        if out is not None and Path(out).resolve() == Path(prompt_file).resolve():
            raise InputError(f"--out {out} is the prompt file {prompt_file}; pass another --out for the rows.")


# ----------------------------------------------------------------------------------------------- commands


def _missing(
    results: ResultsFile, prompts: Sequence[Prompt], announce: bool, set_name: str | None = None
) -> list[Prompt]:
    """The prompts without a row in ``results``; with ``announce``, say so when some have one."""
    todo = [prompt for prompt in prompts if not results.done(set_name, prompt)]
    if announce and len(todo) < len(prompts):
        of_set = "" if set_name is None else f" of set {set_name!r}"
        print(
            f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts{of_set} are already in {results.path}",
            file=sys.stderr,
        )
    return todo


def _open_results(args: argparse.Namespace, provenance: dict[str, Any]) -> ResultsFile:
    """--out with the rows of any interrupted data-parallel run folded in, once its rows are known to be
    computed as this run would compute them. The caller holds its lock."""
    results = ResultsFile(args.out, repair=args.repair)
    fold_parts(results, repair=args.repair)
    if results.dropped_lines:
        lines = ", ".join(map(str, results.dropped_lines))
        warn(f"--repair dropped line(s) {lines} of {args.out} (not rows, or repeated ones); kept every other row.")
    results.check_made_like(**provenance)
    return results


@contextmanager
def _locked_results(args: argparse.Namespace, provenance: dict[str, Any]) -> Iterator[ResultsFile | None]:
    """--out, opened under its lock, which is held until the block ends; None when there is no --out."""
    if args.out is None:
        yield None
        return
    with results_lock(Path(args.out), wait=args.wait):
        yield _open_results(args, provenance)


def _analyze_shard(
    args: argparse.Namespace, prompts: Sequence[Prompt], ranks: Ranks, provenance: dict[str, Any]
) -> ResultsFile | None:
    """This rank's share of a data-parallel analyze, between two merges of every rank's part into --out by
    rank 0: the first takes in the rows of an interrupted run, the last this run's (returned on rank 0).
    Rank 0 holds --out's lock from the first step to the last (see ``distributed``)."""
    keys = [result_key(None, prompt.id) for prompt in prompts]

    with ExitStack() as held:

        def lock_and_merge() -> None:
            if ranks.is_main:
                held.enter_context(_locked_results(args, provenance)).sort_by(keys)

        def analyze_own_share() -> None:
            share = ranks.shard(_missing(ResultsFile(args.out), prompts, announce=ranks.is_main))
            if share:
                part = ResultsFile(part_file(Path(args.out), ranks))
                analyzer = _load_analyzer(args, provenance)
                analyzer.run(share, part.append, label=f"rank {ranks.rank}/{ranks.world_size}")

        def merge_parts() -> ResultsFile | None:
            if not ranks.is_main:
                return None
            results = ResultsFile(args.out)
            fold_parts(results)
            results.sort_by(keys)
            return results

        together(lock_and_merge)
        together(analyze_own_share)
        return together(merge_parts)


def _analyze(args: argparse.Namespace) -> int:
    _check_flags(args)
    _check_out(args.out, args.prompts)
    if args.html:
        if args.positions != "all":
            raise InputError("--html colours every prompt token by its TuCo; add --positions all.")
        _check_html(args.html, args.out, args.prompts)
    ranks = Ranks.from_environment()
    prompts = _analysable(read_prompts(args.prompts), args.chat_template, args.prompts, announce=ranks.is_main)
    provenance = _provenance(args, "analyze")
    analyzer = None
    if ranks.world_size > 1:
        with process_group(ranks):
            results = _analyze_shard(args, prompts, ranks, provenance)
        if results is None:  # not rank 0
            return 0
    else:
        with _locked_results(args, provenance) as results:
            todo = _missing(results, prompts, announce=True)
            if todo:
                analyzer = _load_analyzer(args, provenance)
                if args.html:
                    analyzer.views = {}
                analyzer.run(todo, results.append)
    rows = rows_for(results.rows, prompts)
    if not rows:
        raise InputError(f"no prompt of {args.prompts} could be analysed (none has a token).")
    print(summary_table(rows))
    print(f"rows: {args.out}")
    if args.plot:
        from .plotting import plot_analysis

        print(f"plot: {plot_analysis({Path(args.prompts).name: rows}, args.plot)}")
    if args.html:
        print(f"html: {_write_token_page(args, prompts, rows, analyzer)}")
    return 0


def _write_token_page(
    args: argparse.Namespace, prompts: Sequence[Prompt], rows: Sequence[Row], analyzer: Analyzer | None
) -> Path:
    """analyze --html: every prompt's tokens coloured by their TuCo, in the prompt file's order.

    Prompts decomposed by this process show the per-block norms at every token. The others (rows resumed
    from --out, or computed by other ranks) are drawn from their rows: TuCo at every token (``token_tuco``),
    per-block norms at the last token only, which is all a row keeps; a note on each says so.
    """
    from .views import text_from_row, write_html

    views = analyzer.views if analyzer is not None else {}
    tokenizer = analyzer.tokenizer if analyzer is not None else None
    by_id = {prompt.id: prompt for prompt in prompts}
    texts = []
    for row in rows:
        prompt = by_id[row["id"]]
        if prompt.id in views:
            texts.append(views[prompt.id])
            continue
        if tokenizer is None:
            _quiet_libraries()
            tokenizer = load_tokenizer(_checked_sources(args).tokenizer, None, _load_options(args))
        ids = _prompt_ids(tokenizer, prompt, args.chat_template, args.system)[-row["n_tokens"] :]
        note = f"from its row in {args.out}: per-block norms at the last token only"
        texts.append(text_from_row(row, ids, tokenizer, _view_title(prompt), note))
    return write_html(texts, args.html, title=f"TuCo per token: {Path(args.prompts).name}")


def _set_names(path_a: str, path_b: str) -> tuple[str, str]:
    a, b = Path(path_a).stem, Path(path_b).stem
    return (a, b) if a != b else ("A", "B")


def _compare(args: argparse.Namespace) -> int:
    _check_flags(args)
    _check_out(args.out, args.set_a, args.set_b)
    names = _set_names(args.set_a, args.set_b)
    sets = {
        name: _analysable(read_prompts(path), args.chat_template, path)
        for name, path in zip(names, (args.set_a, args.set_b))
    }
    provenance = _provenance(args, "compare")
    with _locked_results(args, provenance) as results:
        memory: list[Row] = []
        todo = {
            name: prompts if results is None else _missing(results, prompts, announce=True, set_name=name)
            for name, prompts in sets.items()
        }
        if any(todo.values()):
            analyzer = _load_analyzer(args, provenance)
            for name, prompts in todo.items():
                analyzer.run(prompts, results.append if results is not None else memory.extend, set_name=name)
    stored = results.rows if results is not None else memory
    groups = {name: rows_for(stored, prompts, name) for name, prompts in sets.items()}
    for name, rows in groups.items():
        if not rows:
            raise InputError(f"no prompt of set {name!r} could be analysed (none has a token).")
        values = [row["tuco"] for row in rows]
        print(
            f"{name}: {len(values)} prompts, TuCo mean {statistics.fmean(values):.4f}, "
            f"median {statistics.median(values):.4f}"
        )
    auc = roc_auc(*([row["tuco"] for row in rows] for rows in groups.values()))
    print(f"ROC-AUC of TuCo, {names[0]} (positive) vs {names[1]}: {auc:.4f}")
    if args.plot:
        from .plotting import plot_analysis

        print(f"plot: {plot_analysis(groups, args.plot, title=f'TuCo ROC-AUC {auc:.3f}')}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    _check_flags(args)
    _check_alpha(args.alpha, "--alpha")
    if args.html:
        _check_html(args.html)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    prompt = Prompt(id="prompt", line=1, text=args.prompt)
    if prompt.is_empty:
        raise InputError("the prompt is empty; pass the text to continue.")
    _checked_sources(args)
    import torch

    from .generation import generate
    from .views import print_tokens, texts_from_generation, write_html

    analyzer = _load_analyzer(args)
    model, tokenizer = analyzer.model, analyzer.tokenizer
    context = analyzer.context_length()
    if context is not None and args.max_new_tokens >= context:
        raise InputError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in the model's context of "
            f"{context}; pass fewer."
        )
    encoded = analyzer.encode([prompt], room=args.max_new_tokens)
    if not encoded:
        raise InputError("the prompt has no tokens; pass other text.")
    input_ids = torch.tensor([encoded[0][1]])
    with torch.no_grad():
        out = generate(
            model,
            input_ids,
            alpha=args.alpha,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            base_model=analyzer.base_model,
        )
    new_tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    title = f"α = {args.alpha:g}"
    # The prompt's mask, so that a leading token that doubles as padding (pad = bos) is kept.
    text = texts_from_generation(out, tokenizer, torch.ones_like(input_ids), titles=[title])[0]
    print_tokens(text)  # new tokens coloured by TuCo on a terminal; plain text when piped or NO_COLOR is set
    print(f"\n{'step':>4}  {'TuCo':>6}  token (α = {args.alpha:g}; TuCo at the position that chose it)")
    for step, (token, value) in enumerate(zip(new_tokens, out.tuco[0].tolist())):
        if math.isnan(value):  # the row has finished
            break
        print(f"{step:>4}  {value:>6.3f}  {tokenizer.decode([token])!r}")
    if args.html:
        print(f"html: {write_html([text], args.html, title=f'TuCo per generated token, {title}')}")
    return 0


def _comma_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise InputError(f"{flag} {text!r} has an empty entry; pass names separated by commas, e.g. arc_easy,piqa.")
    return items


def _alphas(text: str) -> list[float]:
    """--alphas as numbers, each finite and ≥ 0."""
    alphas = []
    for item in text.split(","):
        try:
            alpha = float(item)
        except ValueError:
            raise InputError(f"--alphas {text!r}: {item.strip()!r} is not a number; pass e.g. 0.75,1,1.25.") from None
        _check_alpha(alpha, "--alphas: each α")
        alphas.append(alpha)
    return alphas


def _limit(value: float | None) -> int | float | None:
    """--limit as lm-eval takes it: a number of items per task, or below 1 a fraction of them."""
    if value is None or 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise InputError(f"--limit must be a whole number of items ≥ 1 or a fraction between 0 and 1, got {value:g}.")


def _check_output_file(path: str, flag: str) -> None:
    """A file written once the work is done: refused now if it cannot be, not after the model has run."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path} is a folder; pass a file name.")
    if not target.parent.is_dir():
        raise InputError(f"{flag} {path}: the folder {target.parent} does not exist.")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise InputError(f"{flag} {path} is not writable; pass another {flag}.")


def _eval(args: argparse.Namespace) -> int:
    _check_flags(args)
    tasks = _comma_list(args.tasks, "--tasks")
    alphas = _alphas(args.alphas)
    limit = _limit(args.limit)
    if args.cv is not None and args.cv < 2:
        raise InputError(f"--cv must be at least 2 folds, got {args.cv}.")
    if args.cv_metric is not None and args.cv is None:
        raise InputError("--cv-metric goes with --cv (the metric α is cross-validated on).")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be at least 0, got {args.num_fewshot}.")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise InputError(f"--include-path {args.include_path} is not a folder of lm-eval task YAML files.")
    _check_output_file(args.out, "--out")
    _checked_sources(args)
    from .evaluation import check_tasks, checked_alphas, evaluate_alphas, write_report  # names the [eval] extra

    alphas = list(checked_alphas(alphas, args.cv))  # repeats, and 1.0 among them for --cv
    task_manager = check_tasks(tasks, args.include_path)
    analyzer = _load_analyzer(args)
    lm_eval_options: dict[str, Any] = {"num_fewshot": args.num_fewshot}
    if args.chat_template:
        lm_eval_options.update(apply_chat_template=True, system_instruction=args.system)
    report = evaluate_alphas(
        analyzer.model,
        analyzer.tokenizer,
        tasks,
        alphas,
        include_path=args.include_path,
        limit=limit,
        cv_folds=args.cv,
        batch_size=args.batch_size,
        cv_metric=args.cv_metric,
        base_model=analyzer.base_model,
        task_manager=task_manager,
        **lm_eval_options,
    )
    write_report(report, args.out)
    _print_evaluation(report)
    print(f"results: {args.out}")
    return 0


def _print_evaluation(report: dict[str, Any]) -> None:
    """Each α's task metrics (lm-eval's "metric,filter" keys, without their stderr) and, with --cv, the gain."""
    for alpha, output in report["alphas"].items():
        scores = [
            f"{task} {metric} {value:.4f}"
            for task, metrics in output["results"].items()
            for metric, value in metrics.items()
            if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))
        ]
        print(f"α = {float(alpha):g}: {'; '.join(scores)}")
    for task, cv in report.get("cross_validation", {}).items():
        print(
            f"{task}: α by {len(cv['fold_alphas'])}-fold CV on {cv['metric']} scores {cv['cv_score']:.4f} on held-out "
            f"items, against {cv['baseline_score']:.4f} at α = 1: CV gain {cv['cv_gain']:+.4f} (best α on all "
            f"{cv['n_items']} items: {cv['alpha']:g})"
        )


_OVERHEAD_BOUND_TOKENS = 4096  # below this, a forward pass of a small model is dominated by Python overhead


def _bench(args: argparse.Namespace) -> int:
    _check_flags(args, model_required=False)
    if args.resident_base:
        raise InputError("bench measures the --base-model both resident and streamed; drop --resident-base.")
    if args.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {args.repeats}.")
    own_model = args.base is not None or args.model is not None
    if own_model and args.cache_dir is not None:
        raise InputError("--cache-dir is where the demo pair is cached; drop it when you pass a model.")
    if args.prompts is not None:
        prompts = _analysable(read_prompts(args.prompts), args.chat_template, args.prompts)
    elif own_model:
        raise InputError("bench with a model of your own needs --prompts FILE.")
    else:
        from .demo import demo_prompts

        texts = itertools.chain(*demo_prompts().values())
        prompts = [Prompt(id=i, line=i, text=text) for i, text in enumerate(texts, start=1)]
    base, adapter = args.base, args.adapter
    if own_model:
        _checked_sources(args)
    else:
        from .demo import ensure_demo_checkpoints

        base, adapter = (str(path) for path in ensure_demo_checkpoints(args.cache_dir))
    from .benchmark import compare_full_finetune_methods, compare_methods
    from .inputs import left_pad

    _quiet_libraries()
    options = _load_options(args)
    if args.model is not None:
        model, checkpoint, tokenizer = load_full_finetune(args.model, args.base_model, options)
        pretrained = load_base(resolve(args.base_model, "--base-model"), options)
        measure = partial(compare_full_finetune_methods, model, pretrained, checkpoint)
    else:
        model, tokenizer = load_pair(base, adapter, options)
        pretrained = load_base(resolve(base, "--base"), options)  # the paper's method needs a second model
        measure = partial(compare_methods, model, pretrained)
    encoded = Analyzer(model, tokenizer, args.chat_template, args.system, args.batch_size).encode(prompts)
    if not encoded:
        raise InputError("bench needs at least one non-empty prompt.")
    input_ids, attention_mask = left_pad([ids for _, ids in encoded[: args.batch_size]])
    input_ids, attention_mask = input_ids.to(options.torch_device()), attention_mask.to(options.torch_device())
    report = measure(input_ids, attention_mask, repeats=args.repeats)
    print(
        f"batch {report['batch'][0]} × {report['batch'][1]} tokens on {report['device']}, median of {report['repeats']}"
    )
    print(f"{'method':<26} {'time':>10} {'× plain':>8} {'peak memory':>12} {'× plain':>8}")
    for name, figures in report["methods"].items():
        print(
            f"{name:<26} {figures['median_s'] * 1e3:>8.2f}ms {figures['time_ratio']:>8.2f} "
            f"{figures['peak_total_bytes'] / 2**20:>10.1f}MB {figures['peak_total_ratio']:>8.2f}"
        )
    print(f"largest TuCo disagreement between methods: {report['max_tuco_disagreement']:.2e}")
    if report["batch"][0] * report["batch"][1] < _OVERHEAD_BOUND_TOKENS:
        print(
            f"note: {report['batch'][0] * report['batch'][1]} tokens is little work per forward pass, so these "
            "times are mostly per-call overhead; pass --prompts with longer prompts and a larger --batch-size to "
            "measure compute."
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    _quiet_libraries()
    run_demo(cache_dir=args.cache_dir)
    return 0


# ----------------------------------------------------------------------------------------------- parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model",
        "a LoRA fine-tune (--base BASE --adapter ADAPTER) or a full fine-tune (--model FINETUNED --base-model "
        "PRETRAINED); each a local directory or a hub id",
    )
    group.add_argument("--base", help="the pre-trained model the adapter was trained on")
    group.add_argument("--adapter", help="the LoRA adapter")
    group.add_argument("--model", metavar="FINETUNED", help="a fully fine-tuned model (instead of --base/--adapter)")
    group.add_argument(
        "--base-model",
        metavar="PRETRAINED",
        help="the pre-trained model --model was fine-tuned from (same architecture and size); its safetensors "
        "are streamed one block at a time, so only one model is resident",
    )
    group.add_argument(
        "--resident-base",
        action="store_true",
        help="load --base-model as a second model in memory instead of streaming it (faster; twice the weights)",
    )
    group.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda if available)")
    group.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the weights in 4-bit NF4 (QLoRA; bitsandbytes): --base, or --model and a --resident-base",
    )
    group.add_argument("--trust-pickle", action="store_true", help="allow pickle (.bin) weights; safetensors otherwise")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the checkpoint")


def _add_results_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("results file (--out)")
    group.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing --out, wait for it to finish, then resume (default: refuse at once)",
    )
    group.add_argument(
        "--repair",
        action="store_true",
        help="drop the lines of --out that are not rows, or repeat one, keeping every good row; their prompts "
        "are computed again",
    )


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--chat-template",
        action="store_true",
        help="format each prompt with the tokenizer's chat template (TuCo at the last template token)",
    )
    group.add_argument("--system", help="system prompt (with --chat-template)")
    group.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuco-peft",
        description="Tuning Contribution (TuCo) of LoRA/QLoRA fine-tunes, prompt by prompt, in one forward pass.",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug is taken after the command too; with no default there, it leaves the one given before alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser(
        "analyze",
        parents=[common],
        help="TuCo of every prompt of a file, to JSONL",
        description="TuCo of every prompt of a file, to JSONL. Launched by torchrun or accelerate launch, it runs "
        "data-parallel: each rank analyses a share of the prompts into --out.parts/, and rank 0 merges them into "
        "--out in the prompt file's order (a rerun resumes, with any number of ranks).",
    )
    _add_model_arguments(analyze)
    analyze.add_argument(
        "--prompts", required=True, help=".txt (one prompt per line) or .jsonl ({id, prompt|messages})"
    )
    analyze.add_argument("--out", required=True, help="JSONL of rows; rerunning with the same file resumes")
    _add_results_arguments(analyze)
    _add_prompt_arguments(analyze)
    analyze.add_argument(
        "--positions",
        choices=["last", "all"],
        default="last",
        help="all: also store the TuCo at every prompt token (token_tuco)",
    )
    analyze.add_argument("--plot", help="PNG of the per-layer PTC/FTC profile and the TuCo histogram")
    analyze.add_argument(
        "--html",
        metavar="FILE",
        help="one self-contained HTML page: each prompt's tokens coloured by their TuCo, per-block norms on "
        "click (needs --positions all)",
    )
    analyze.set_defaults(run=_analyze)

    compare = commands.add_parser("compare", parents=[common], help="TuCo on two prompt sets and its ROC-AUC")
    _add_model_arguments(compare)
    compare.add_argument("set_a", metavar="A", help="prompt file of the positive set (e.g. chat prompts)")
    compare.add_argument("set_b", metavar="B", help="prompt file of the other set (e.g. pre-training text)")
    compare.add_argument("--out", help="JSONL of rows (with a 'set' field); rerunning with the same file resumes")
    _add_results_arguments(compare)
    _add_prompt_arguments(compare)
    compare.add_argument("--plot", help="PNG with both TuCo histograms and per-layer profiles")
    compare.set_defaults(run=_compare)

    generate = commands.add_parser("generate", parents=[common], help="FTC_α-steered generation with per-token TuCo")
    _add_model_arguments(generate)
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument(
        "--alpha", type=float, default=1.0, help="scale of the fine-tuning component (1 = fine-tuned)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--html", metavar="FILE", help="the text as an HTML page, new tokens coloured by their TuCo")
    _add_prompt_arguments(generate)
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser(
        "eval",
        parents=[common],
        help="lm-evaluation-harness tasks on the FTC_α-steered model, once per α (pip install 'tuco-peft[eval]')",
        description="Run lm-evaluation-harness tasks (log-likelihood or generation) on the FTC_α-steered model, "
        "once per α, and write lm-eval's results dict for each α to --out, keyed by α. --cv K adds the paper's "
        "protocol: α chosen by K-fold cross-validation over each task's items, and its gain over α = 1. Needs "
        "pip install 'tuco-peft[eval]'.",
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument("--tasks", required=True, help="lm-eval task or group names, comma-separated")
    evaluate.add_argument(
        "--alphas", required=True, help="α values, comma-separated, each finite and ≥ 0 (e.g. 0.75,1,1.25)"
    )
    evaluate.add_argument("--out", required=True, help="JSON file of the results, keyed by α")
    evaluate.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAML files")
    evaluate.add_argument(
        "--limit", type=float, help="items per task (for a quick look; below 1: a fraction of each task)"
    )
    evaluate.add_argument("--num-fewshot", type=int, help="few-shot examples per item (default: each task's own)")
    evaluate.add_argument(
        "--cv",
        type=int,
        metavar="K",
        help="choose α by K-fold cross-validation over each task's items and report its gain over α = 1 "
        "(--alphas must include 1)",
    )
    evaluate.add_argument(
        "--cv-metric",
        metavar="METRIC",
        help='the 0/1 per-item metric α is chosen on, "name" or "name,filter" (default: acc where the task '
        "reports it, else its first metric)",
    )
    _add_prompt_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="time and memory of decompose against the paper's two-model method (demo pair by default)",
    )
    _add_model_arguments(bench)
    bench.add_argument("--prompts", help="prompt file (default: the demo prompts)")
    bench.add_argument(
        "--cache-dir",
        help="where the demo pair is built and cached when no model is given (default ~/.cache/tuco-peft/demo)",
    )
    _add_prompt_arguments(bench)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--json", help="write the figures to this JSON file")
    bench.set_defaults(run=_bench)

    demo = commands.add_parser(
        "demo", parents=[common], help="the offline demo: a small LM and its LoRA chat fine-tune"
    )
    demo.add_argument("--cache-dir", help="where the demo pair is built and cached (default ~/.cache/tuco-peft/demo)")
    demo.set_defaults(run=_demo)
    return parser


class _ExitOnCtrlC:
    """While held, Ctrl-C prints one line and ends the process with exit status 130, whatever it was doing.

    Raising KeyboardInterrupt instead would reach code that cannot take it: inside torch's import it aborts
    the process from C++, and transformers reports it from a lazy import as a missing module. Nothing needs
    unwinding: rows are flushed as written and a row cut short is dropped on reload, a sorted or repaired
    results file replaces the old one in one rename, and the operating system releases the lock.
    ``note`` is added to the line (what happens to the rows).
    """

    def __init__(self) -> None:
        self.note = ""
        self._previous = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = signal.signal(signal.SIGINT, self._exit)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _exit(self, signum: int, frame: object) -> None:
        with suppress(OSError, ValueError):  # a closed or broken stdout must not keep the process alive
            sys.stdout.flush()
        print(f"\ntuco-peft: interrupted{self.note}.", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """Run ``tuco-peft``; returns the exit status."""
    with _ExitOnCtrlC() as ctrl_c:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help, or a usage error argparse has reported
            return int(exit_.code or 0)
        if getattr(args, "out", None) and args.command in ("analyze", "compare"):
            ctrl_c.note = "; rows already written are kept, rerun the same command to resume"
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations: nothing a CLI user can act on
    try:
        return args.run(args)
    except TuCoError as error:
        if args.debug:
            raise
        print(f"tuco-peft: error: {first_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as error:  # the last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(
            f"tuco-peft: error: {type(error).__name__}: {first_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
