"""``tuco-peft analyze``: the TuCo of every prompt of a file, one JSON row each, resumable; data-parallel
under ``torchrun`` or ``accelerate launch`` (see ``distributed``)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..apps.distributed import Ranks, fold_parts, part_file, process_group, together
from ..apps.runner import Runner, quiet_libraries, view_title
from ..apps.statistics import summary_table
from ..apps.trajectory import trajectory_table
from ..errors import InputError
from ..io import loaders
from ..io.prompts import Prompt, encode_prompt
from ..io.results import Provenance, ResultRow, ResultsFile
from .checks import analysable_prompts
from .options import (
    CommandOptions,
    ResultsOptions,
    add_model_arguments,
    add_prompt_arguments,
    add_results_arguments,
    check_common,
    provenances,
)
from .outputs import check_outputs, figure, page, results_outputs
from .stored_rows import RowsOfRun, locked_out


@dataclass(frozen=True)
class AnalyzeOptions(CommandOptions):
    results: ResultsOptions
    prompt_file: str
    positions: Literal["last", "all"]
    plot: str | None
    html: str | None

    @property
    def out(self) -> str:
        assert self.results.out is not None, "analyze's --out is required"
        return self.results.out

    def runner_settings(self, expected: Mapping[str | None, Provenance]) -> dict[str, Any]:
        return dict(
            prompt_format=self.prompts.format,
            batching=self.prompts.batching,
            positions=self.positions,
            provenance=expected,
        )


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    analyze = commands.add_parser(
        "analyze",
        parents=[common],
        help="TuCo of every prompt of a file, to JSONL",
        description="TuCo of every prompt of a file, to JSONL. Launched by torchrun or accelerate launch, it runs "
        "data-parallel: each rank analyses a share of the prompts into --out.parts/, and rank 0 merges them into "
        "--out in the prompt file's order (a rerun resumes, with any number of ranks).",
    )
    add_model_arguments(analyze)
    analyze.add_argument(
        "--prompts",
        dest="prompt_file",
        metavar="PROMPTS",
        required=True,
        help=".txt (one prompt per line) or .jsonl ({id, prompt|messages})",
    )
    analyze.add_argument("--out", required=True, help="JSONL of rows; rerunning with the same file resumes")
    add_results_arguments(analyze)
    add_prompt_arguments(analyze, token_budget=True)
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
    analyze.set_defaults(run=lambda args: analyze_prompts(AnalyzeOptions.from_args(args)))


def analyze_prompts(options: AnalyzeOptions) -> int:
    check_common(options.model, options.prompts, options.results, options.plot, several_adapters=True)
    if options.html and options.positions != "all":
        raise InputError("--html colours every prompt token by its TuCo; add --positions all.")
    series = options.model.series()
    if series is not None and options.html:
        raise InputError(
            "--html shows the tokens of one fine-tune; pass one --adapter, or see a run over several with "
            "tuco-peft trajectory --html."
        )
    check_outputs(
        [*results_outputs(options.out), *figure("--plot", options.plot), *page("--html", options.html)],
        {"the prompt file": options.prompt_file},
        force=options.results.force,
    )
    ranks = Ranks.from_environment()
    prompts = analysable_prompts(options.prompt_file, options.prompts.chat_template, announce=ranks.is_main)
    expected = provenances(options.model, series, options.prompts.format, options.positions, "analyze")
    work = RowsOfRun(prompts, series)
    runner = None
    if ranks.world_size > 1:
        with process_group(ranks):
            results = _analyze_shard(options, work, ranks, expected)
        if results is None:  # not rank 0
            return 0
    else:
        with locked_out(options.out, options.results, expected, work.prompts_by_key()) as results:
            todo, owners = work.missing(results, announce=True)
            if todo:
                runner = Runner.load(options.model, series or (), **options.runner_settings(expected))
                if options.html:
                    runner.views = {}
                runner.run(todo, results.append, adapters=owners)
            results.sort_by(work.row_keys())  # rows were appended by length: back to the file's order
    rows = work.rows(results.rows)
    if not rows:
        raise InputError(f"no prompt of {options.prompt_file} could be analysed (none has a token).")
    print(summary_table(rows) if series is None else trajectory_table(rows))
    print(f"rows: {options.out}")
    if options.plot:
        from ..apps.plotting import plot_analysis

        groups = {Path(options.prompt_file).name: rows} if series is None else work.by_adapter(rows)
        print(f"plot: {plot_analysis(groups, options.plot)}")
    if options.html:
        print(f"html: {_write_token_page(options, prompts, rows, runner)}")
    return 0


def _analyze_shard(
    options: AnalyzeOptions, work: RowsOfRun, ranks: Ranks, expected: Mapping[str | None, Provenance]
) -> ResultsFile | None:
    """This rank's share of a data-parallel analyze, between two merges of every rank's part into --out by
    rank 0: the first takes in the rows of an interrupted run, the last this run's (returned on rank 0).
    Rank 0 holds --out's lock from the first step to the last (see ``distributed``)."""
    with ExitStack() as held:

        def lock_and_merge() -> None:
            if ranks.is_main:
                opened = locked_out(options.out, options.results, expected, work.prompts_by_key())
                held.enter_context(opened).sort_by(work.row_keys())

        def analyze_own_share() -> None:
            todo, owners = work.missing(ResultsFile(options.out), announce=ranks.is_main)
            share = ranks.shard(list(range(len(todo))))
            if share:
                part = ResultsFile(part_file(Path(options.out), ranks))
                runner = Runner.load(options.model, work.series or (), **options.runner_settings(expected))
                runner.run(
                    [todo[index] for index in share],
                    part.append,
                    label=f"rank {ranks.rank}/{ranks.world_size}",
                    adapters=None if owners is None else [owners[index] for index in share],
                )

        def merge_parts() -> ResultsFile | None:
            if not ranks.is_main:
                return None
            results = ResultsFile(options.out)
            fold_parts(results)
            results.sort_by(work.row_keys())
            return results

        together(lock_and_merge)
        together(analyze_own_share)
        return together(merge_parts)


def _write_token_page(
    options: AnalyzeOptions, prompts: Sequence[Prompt], rows: Sequence[ResultRow], runner: Runner | None
) -> Path:
    """analyze --html: every prompt's tokens coloured by their TuCo, in the prompt file's order.

    Prompts decomposed by this process show the per-block norms at every token. The others (rows resumed
    from --out, or computed by other ranks) are drawn from their rows: TuCo at every token (``token_tuco``),
    per-block norms at the last token only, which is all a row keeps; a note on each says so.
    """
    from ..views import text_from_row, write_html

    views = runner.views if runner is not None and runner.views is not None else {}
    tokenizer = runner.tokenizer if runner is not None else None
    by_id = {prompt.id: prompt for prompt in prompts}
    texts = []
    for row in rows:
        prompt = by_id[row.id]
        if prompt.id in views:
            texts.append(views[prompt.id])
            continue
        if tokenizer is None:
            quiet_libraries()
            tokenizer = loaders.load_tokenizer(options.model.check().tokenizer, None, options.model.load)
        chat = options.prompts.format
        # Its last n_tokens tokens, as analysed: of a huge prompt only the end is tokenized again.
        ids = encode_prompt(
            tokenizer, prompt, chat_template=chat.chat_template, system=chat.system, context_length=row.n_tokens
        ).ids
        note = f"from its row in {options.out}: per-block norms at the last token only"
        texts.append(text_from_row(row, ids, tokenizer, view_title(prompt), note))
    assert options.html is not None, "the page is written for --html"
    return write_html(texts, options.html, title=f"TuCo per token: {Path(options.prompt_file).name}")
