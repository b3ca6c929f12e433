"""``tuco-peft trajectory``: TuCo over training, from the rows of a run over several adapters (``analyze`` with
several ``--adapter`` or a training run's folder): a table per checkpoint, a figure against the step, the
prompts whose TuCo moved most between two checkpoints, and an HTML page of them with their token views.

It reads rows only: no model loads, and torch is imported only to read a tokenizer for the page's token views.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apps.runner import warn
from ..apps.trajectory import (
    RUN_MORE,
    Move,
    default_between,
    figure_png,
    moved_columns,
    moved_most,
    moved_token_views,
    plot_trajectory,
    row_token_ids,
    text_table,
    trajectory,
    trajectory_columns,
    trajectory_page,
)
from ..errors import InputError, TuCoError, first_line
from ..io.locking import write_text_atomically
from ..io.results import ResultRow, parse_lines
from .outputs import add_force_argument, check_outputs, figure, page


@dataclass(frozen=True)
class TrajectoryOptions:
    results: str
    plot: str | None
    html: str | None
    between: tuple[str, str] | None
    top: int
    force: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrajectoryOptions:
        between = None if args.between is None else (args.between[0], args.between[1])
        return cls(args.results, args.plot, args.html, between, args.top, args.force)


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "trajectory",
        parents=[common],
        help="TuCo over training, from the rows of a run over several adapters",
        description="TuCo over training: a table per checkpoint (median, 25-75 %% band, per prompt set and their "
        "ROC-AUC), the prompts whose TuCo moved most between two checkpoints, a figure and an HTML page, from the "
        "rows of analyze or compare over several --adapter or a training run's folder.",
    )
    command.add_argument("results", metavar="RESULTS", help="JSONL of rows of a run over several adapters")
    command.add_argument("--plot", help="figure of TuCo against the training step (.png, .svg, .pdf …)")
    command.add_argument(
        "--html",
        metavar="FILE",
        help="one self-contained page: the figure, both tables, and the moved prompts' tokens coloured by their "
        "TuCo at both checkpoints (rows of --positions all, base tokenizer in a local folder)",
    )
    command.add_argument(
        "--between",
        nargs=2,
        metavar=("A", "B"),
        help="the two adapters (by name, as in the table) whose TuCo is compared prompt by prompt (default: the "
        "first and the last)",
    )
    command.add_argument(
        "--top", type=int, default=10, metavar="N", help="prompts in the moved-most table (default 10)"
    )
    add_force_argument(command)
    command.set_defaults(run=lambda args: show_trajectory(TrajectoryOptions.from_args(args)))


def show_trajectory(options: TrajectoryOptions) -> int:
    if options.top < 1:
        raise InputError(f"--top must be at least 1, got {options.top}.")
    if options.plot:
        from ..apps.plotting import check_plot_path

        check_plot_path(options.plot)
    check_outputs(
        [*figure("--plot", options.plot), *page("--html", options.html)],
        {"the results file": options.results},
        force=options.force,
    )
    rows = read_rows(options.results)
    run = trajectory(rows, options.results)
    if len(run.checkpoints) < 2:
        raise InputError(f"{options.results} holds the rows of one adapter only ({run.names[0]}); {RUN_MORE}.")
    counts = {checkpoint.adapter: checkpoint.overall.prompts for checkpoint in run.checkpoints}
    if len(set(counts.values())) > 1:
        fewest = min(counts, key=counts.__getitem__)
        warn(
            f"the adapters hold rows of different numbers of prompts ({fewest}: {counts[fewest]}, up to "
            f"{max(counts.values())}), so their medians are of different prompts; rerun the analyze that wrote "
            f"{options.results} to complete it."
        )
    between = options.between or default_between(run)
    moves = moved_most(rows, *between, top=options.top)
    print(text_table(*trajectory_columns(run)))
    print(f"\nTuCo moved most, {between[0]} -> {between[1]} ({len(moves)} prompts):")
    print(text_table(*moved_columns(moves, *between)))
    if options.plot:
        print(f"plot: {plot_trajectory(run, options.plot)}")
    if options.html:
        views, notes = _token_views(moves)
        document = trajectory_page(
            run,
            moves,
            between,
            title=f"TuCo over training: {Path(options.results).name}",
            png=figure_png(run),
            views=views,
            notes=notes,
        )
        print(f"html: {write_text_atomically(options.html, document)}")
    return 0


def read_rows(path: str) -> list[ResultRow]:
    """The rows of a results file, in its order. A last line cut short by an interrupted run is dropped (the
    run's rerun computes it again); any other line that is not a row, or repeats one, is refused."""
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: no such file; pass the JSONL that tuco-peft analyze --out wrote.")
    if file.is_dir():
        raise InputError(f"{path} is a folder; pass the JSONL file that tuco-peft analyze --out wrote.")
    try:
        data = file.read_bytes()
    except OSError as error:
        raise InputError(f"{path} could not be read ({error.strerror}); pass a readable results file.") from None
    lines = parse_lines(data)
    if lines.problems:
        number, problem = lines.problems[0]
        raise InputError(
            f"{path}:{number} {problem}; pass the JSONL that analyze wrote (analyze --repair drops such lines)."
        )
    rows = [row for _, row in lines.rows]  # a last line cut short by an interrupted run is left out
    if not rows:
        raise InputError(f"{path} holds no result rows; pass the JSONL that tuco-peft analyze --out wrote.")
    return rows


def _token_views(moves: Sequence[Move]) -> tuple[list[Any], list[str]]:
    """The moved prompts' token views when their rows hold ``token_tuco`` and the tokenizer they were computed
    with can be read here; otherwise none, and a note that says why."""
    shown = [row for move in moves for row in (move.before, move.after) if row.token_tuco is not None]
    if not shown:
        return [], ["No token views: the rows hold no TuCo per token; run analyze with --positions all for them."]
    tokenizer, fingerprint, why = _tokenizer(shown[0])
    if tokenizer is None:
        return [], [f"No token views: {why}"]

    def ids_of(row: ResultRow) -> list[int] | None:
        if fingerprint is not None and (row.fingerprint or {}).get("tokenizer", fingerprint) != fingerprint:
            return None  # computed with another tokenizer: its tokens cannot be told again here
        return row_token_ids(tokenizer, row)

    views, skipped = moved_token_views(moves, ids_of, tokenizer)
    return views, [f"Not shown: {note}." for note in skipped]


def _tokenizer(row: ResultRow) -> tuple[Any | None, str | None, str]:
    """The tokenizer ``row`` was computed with, read as analyze reads it (the adapter's folder when it ships
    one, else the base's), only from local folders; with its fingerprint, or None and why not."""
    from ..io.checkpoints import LoadOptions, Source, tokenizer_source
    from ..io.fingerprint import tokenizer_fingerprint

    settings = row.settings or {}
    base, adapter = settings.get("base"), settings.get("adapter")
    if not isinstance(base, str) or not Path(base).is_dir():
        return (
            None,
            None,
            (
                f"the tokenizer is read from the rows' base model in a local folder, and {base!r} is not one here; "
                "download it (hf download ID --local-dir DIR) and analyze with --base DIR for token views."
            ),
        )
    base_source = Source("--base", base, Path(base))
    adapter_source = None
    if isinstance(adapter, str) and Path(adapter).is_dir():
        adapter_source = Source("--adapter", adapter, Path(adapter))
    expected = (row.fingerprint or {}).get("tokenizer")
    candidates = [tokenizer_source(base_source, adapter_source), base_source]
    matching = [source for source in candidates if expected is None or tokenizer_fingerprint(source) == expected]
    if not matching:
        return None, None, f"the tokenizer files at {base} are not those the rows were computed with."
    from ..apps.runner import quiet_libraries
    from ..io import loaders

    quiet_libraries()
    source = matching[0]
    try:
        tokenizer = loaders.load_tokenizer(source, None, LoadOptions())
    except TuCoError as error:
        return None, None, f"the tokenizer could not be read ({first_line(error)})."
    return tokenizer, tokenizer_fingerprint(source), ""
