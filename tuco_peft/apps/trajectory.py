"""TuCo over training: the rows of a run over several adapters (``analyze`` with several ``--adapter`` or a
training run's folder) as a table per checkpoint, a figure against the training step, the prompts whose TuCo
moved most between two checkpoints, and one self-contained HTML page of all three.

Pure functions on rows, so that a notebook gets the same numbers as ``tuco-peft trajectory``: the command
reads the file, loads a tokenizer only when the page shows token views, and writes what these return.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..io.locking import WRITTEN_BY
from ..io.prompts import Prompt, PromptId, PromptJson, encode_prompt
from ..io.results import ResultRow
from .plotting import pyplot, save_figure, write_figure
from .statistics import roc_auc

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..views import ScoredText

RUN_MORE = "run analyze with several --adapter or a run folder"
_PROMPT_WIDTH = 60  # characters of a prompt shown in a table
_STEP_TICKS = 12  # up to this many checkpoints, the figure has a tick at each one's step


@dataclass(frozen=True)
class Spread:
    """The TuCo of some prompts at one adapter: how many, the median and the 25 % and 75 % quantiles."""

    prompts: int
    median: float
    q25: float
    q75: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Quantiles by linear interpolation between the sorted values (numpy's default), so that the band of
        a handful of prompts stays inside them."""
        if len(values) == 1:  # statistics.quantiles needs two values
            return cls(1, values[0], values[0], values[0])
        q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(len(values), statistics.median(values), q25, q75)


@dataclass(frozen=True)
class Checkpoint:
    """One adapter of the run: where it sits in training, its TuCo over every prompt and per prompt set, and
    the ROC-AUC of TuCo separating the first set (positive) from the second, when the rows hold two."""

    adapter: str
    step: int | None
    train_loss: float | None
    overall: Spread
    by_set: dict[str, Spread]  # prompt set -> spread, when the rows hold two sets or more
    auc: float | None


@dataclass(frozen=True)
class Trajectory:
    """The adapters of a run in training order (by step when every one has its own step, else the file's
    order), with the prompt sets their rows hold (in file order; the first is the positive set of the AUC)."""

    checkpoints: list[Checkpoint]
    sets: list[str]

    @property
    def by_step(self) -> bool:
        """Whether the checkpoints are placed by training step (each has one, and no two share one)."""
        steps = [checkpoint.step for checkpoint in self.checkpoints]
        return None not in steps and len(set(steps)) == len(steps)

    @property
    def names(self) -> list[str]:
        return [checkpoint.adapter for checkpoint in self.checkpoints]

    @property
    def auc_sets(self) -> tuple[str, str] | None:
        """(positive, negative) when the rows hold exactly two prompt sets."""
        return (self.sets[0], self.sets[1]) if len(self.sets) == 2 else None


def _set_name(row: ResultRow) -> str:
    return "(no set)" if row.set is None else row.set


def trajectory(rows: Sequence[ResultRow], where: str = "the rows") -> Trajectory:
    """The trajectory of ``rows`` (all of one run over several adapters), refusing rows of a single fine-tune:
    ``where`` names them in the message, with the way out."""
    if not any(row.adapter is not None for row in rows):
        raise InputError(f"{where} was written by a run over one adapter; {RUN_MORE}.")
    lacking = sum(row.adapter is None for row in rows)
    if lacking:
        raise InputError(
            f"{where} holds {lacking} row{'s' if lacking > 1 else ''} without an adapter beside rows of several "
            "adapters; keep the rows of one run per file."
        )
    by_adapter: dict[str, list[ResultRow]] = {}
    for row in rows:
        assert row.adapter is not None, "rows without an adapter are refused above"
        by_adapter.setdefault(row.adapter, []).append(row)
    sets = list(dict.fromkeys(_set_name(row) for row in rows))
    checkpoints = [_checkpoint(name, group, sets) for name, group in by_adapter.items()]
    result = Trajectory(checkpoints, sets)
    if result.by_step:
        result = Trajectory(sorted(checkpoints, key=lambda checkpoint: checkpoint.step or 0), sets)
    return result


def _first(values: Sequence[Any]) -> Any:
    return next((value for value in values if value is not None), None)


def _checkpoint(name: str, rows: Sequence[ResultRow], sets: Sequence[str]) -> Checkpoint:
    by_set = {each: [row.tuco for row in rows if _set_name(row) == each] for each in sets} if len(sets) > 1 else {}
    auc = None
    if len(sets) == 2 and all(by_set.values()):  # a set without a row at this adapter has no AUC here
        auc = roc_auc(by_set[sets[0]], by_set[sets[1]])
    return Checkpoint(
        adapter=name,
        step=_first([row.step for row in rows]),
        train_loss=_first([row.train_loss for row in rows]),
        overall=Spread.of([row.tuco for row in rows]),
        by_set={each: Spread.of(values) for each, values in by_set.items() if values},
        auc=auc,
    )


@dataclass(frozen=True)
class Move:
    """One prompt's TuCo at two adapters (``before`` and ``after``: their rows)."""

    before: ResultRow
    after: ResultRow

    @property
    def id(self) -> PromptId:
        return self.before.id

    @property
    def set(self) -> str | None:
        return self.before.set

    @property
    def change(self) -> float:
        return self.after.tuco - self.before.tuco


def default_between(run: Trajectory) -> tuple[str, str]:
    """The first and last adapter in training order: what moved over the whole run."""
    return run.names[0], run.names[-1]


def moved_most(rows: Sequence[ResultRow], before: str, after: str, top: int = 10) -> list[Move]:
    """The ``top`` prompts whose TuCo changed most (in absolute value) from adapter ``before`` to ``after``,
    largest first, ties in the file's order; prompts are matched by prompt set and id."""
    names = list(dict.fromkeys(row.adapter for row in rows if row.adapter is not None))
    for name in (before, after):
        if name not in names:
            shown = ", ".join(names[:8]) + (f" … ({len(names)} in all)" if len(names) > 8 else "")
            raise InputError(f"--between {name}: no such adapter in the rows; pass two of {shown}.")
    if before == after:
        raise InputError(f"--between {before} {after} names one adapter twice; pass two different adapters.")
    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}.")
    later = {(row.set, row.id): row for row in rows if row.adapter == after}
    moves = [
        Move(row, later[(row.set, row.id)]) for row in rows if row.adapter == before and (row.set, row.id) in later
    ]
    if not moves:
        raise InputError(f"adapters {before} and {after} have no prompt in common; pass two adapters of one run.")
    return sorted(moves, key=lambda move: -abs(move.change))[:top]


def short_prompt(prompt: PromptJson, width: int = _PROMPT_WIDTH) -> str:
    """A prompt on one line of at most ``width`` characters: its text, or its messages' contents joined."""
    text = prompt if isinstance(prompt, str) else " / ".join(message["content"] for message in prompt)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _band(spread: Spread) -> str:
    return f"{spread.q25:.4f}-{spread.q75:.4f}"


def trajectory_columns(run: Trajectory) -> tuple[list[str], list[list[str]]]:
    """The trajectory table as a header and rows of text, for the terminal and the page alike."""
    header = ["adapter", "step", "train_loss", "prompts", "median TuCo", "IQR (25-75 %)"]
    many_sets = len(run.sets) > 1
    if many_sets:
        header += [f"median {name}" for name in run.sets]
    if run.auc_sets is not None:
        header.append(f"ROC-AUC {run.auc_sets[0]} vs {run.auc_sets[1]}")
    table = []
    for checkpoint in run.checkpoints:
        cells = [
            checkpoint.adapter,
            "-" if checkpoint.step is None else str(checkpoint.step),
            _loss(checkpoint.train_loss),
            str(checkpoint.overall.prompts),
            _number(checkpoint.overall.median),
            _band(checkpoint.overall),
        ]
        if many_sets:
            cells += [
                _number(checkpoint.by_set[name].median if name in checkpoint.by_set else None) for name in run.sets
            ]
        if run.auc_sets is not None:
            cells.append(_number(checkpoint.auc))
        table.append(cells)
    return header, table


def moved_columns(moves: Sequence[Move], before: str, after: str) -> tuple[list[str], list[list[str]]]:
    """The moved-most table as a header and rows of text (the set column only for rows of prompt sets)."""
    with_sets = any(move.set is not None for move in moves)
    header = [*(["set"] if with_sets else []), "id", "prompt", f"TuCo at {before}", f"TuCo at {after}", "change"]
    table = [
        [
            *([move.set or "-"] if with_sets else []),
            str(move.id),
            short_prompt(move.before.prompt),
            _number(move.before.tuco),
            _number(move.after.tuco),
            f"{move.change:+.4f}",
        ]
        for move in moves
    ]
    return header, table


def trajectory_table(rows: Sequence[ResultRow]) -> str:
    """``trajectory_columns`` of ``rows`` as ``text_table``: what a run over several adapters prints."""
    return text_table(*trajectory_columns(trajectory(rows)))


def text_table(header: Sequence[str], table: Sequence[Sequence[str]]) -> str:
    """Columns aligned for a terminal: text left, numbers right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *table)]
    numeric = [all(_is_number(row[k]) for row in table) for k in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        aligned = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, numeric)]
        return "  ".join(aligned).rstrip()

    return "\n".join([line(header), *(line(row) for row in table)])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def trajectory_figure(run: Trajectory) -> Figure:
    """TuCo against the training step (or the adapters in order, named, when steps are missing): the median of
    each prompt set with its 25-75 % band, the training loss on a second axis when known, and below, when the
    rows hold two sets, the ROC-AUC at each checkpoint. Close it with ``plt.close`` when done."""
    plt = pyplot()
    panels = 2 if run.auc_sets is not None else 1
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3.6 * panels + 0.6), sharex=True, squeeze=False)
    tuco_axis = axes[0][0]
    xs = [c.step if run.by_step and c.step is not None else k for k, c in enumerate(run.checkpoints)]
    if len(run.sets) > 1:
        series = {name: [c.by_set.get(name) for c in run.checkpoints] for name in run.sets}
    else:
        series = {"all prompts": [c.overall for c in run.checkpoints]}
    for name, spreads in series.items():
        medians, lows, highs = (
            [math.nan if spread is None else getattr(spread, part) for spread in spreads]
            for part in ("median", "q25", "q75")
        )
        (line,) = tuco_axis.plot(xs, medians, marker="o", label=f"{name}: median TuCo")
        tuco_axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, label=f"{name}: 25-75 %")
    tuco_axis.set_ylabel("TuCo at the last prompt token")
    handles, labels = tuco_axis.get_legend_handles_labels()
    losses = [(x, c.train_loss) for x, c in zip(xs, run.checkpoints) if c.train_loss is not None]
    loss_axis = tuco_axis.twinx() if losses else None
    if loss_axis is not None:
        loss_axis.plot(*zip(*losses), color="grey", linestyle=":", marker=".", label="training loss")
        loss_axis.set_ylabel("training loss")
        more_handles, more_labels = loss_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    # above the panel, where no line runs (a legend inside would cover one of the two axes' lines)
    tuco_axis.legend(
        handles, labels, fontsize="small", loc="lower left", bbox_to_anchor=(0, 1.02), ncol=3, frameon=False
    )
    bottom = axes[-1][0]
    if run.auc_sets is not None:
        aucs = [math.nan if c.auc is None else c.auc for c in run.checkpoints]
        bottom.plot(xs, aucs, marker="o", color="black")
        bottom.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        bottom.set_ylim(0, 1.02)
        bottom.set_ylabel(f"ROC-AUC, {run.auc_sets[0]} vs {run.auc_sets[1]}")
    if run.by_step:
        from matplotlib.ticker import MaxNLocator

        if len(xs) <= _STEP_TICKS:
            bottom.set_xticks(xs)  # a tick at each checkpoint
        else:
            bottom.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at step 12.5
        bottom.set_xlabel("training step")
    else:
        bottom.set_xticks(xs, run.names, rotation=30, ha="right")
        bottom.set_xlabel("adapter")
    figure.tight_layout()
    return figure


def plot_trajectory(run: Trajectory, out: str | Path) -> Path:
    """Write ``trajectory_figure`` in the format its suffix names (one rename: a failure leaves the old file)."""
    return write_figure(trajectory_figure(run), out)


def figure_png(run: Trajectory) -> bytes:
    """``trajectory_figure`` as PNG bytes, for a page that holds its figure."""
    figure = trajectory_figure(run)
    buffer = io.BytesIO()
    try:
        save_figure(figure, buffer, "png")
    finally:
        pyplot().close(figure)
    return buffer.getvalue()


def row_token_ids(tokenizer: Any, row: ResultRow) -> list[int] | None:
    """The tokens ``row`` was computed on, as the row's settings formatted them; None when they cannot be
    told from the row (a prompt cut to fit the context whose kept text tokenizes otherwise), so that no view
    puts a token's TuCo on another token."""
    settings = row.settings or {}
    if row.prompt_sha256 is None:
        prompt = (
            Prompt(row.id, 0, text=row.prompt)
            if isinstance(row.prompt, str)
            else Prompt(row.id, 0, messages=tuple(row.prompt))
        )
        ids = encode_prompt(
            tokenizer,
            prompt,
            chat_template=bool(settings.get("chat_template")),
            system=settings.get("system"),
            context_length=row.n_tokens,
        ).ids
    elif isinstance(row.prompt, str):  # the text analysed, decoded from the tokens kept
        ids = list(tokenizer(row.prompt, add_special_tokens=False)["input_ids"])
    else:
        return None
    return ids if row.token_tuco is not None and len(ids) == len(row.token_tuco) else None


def moved_token_views(
    moves: Sequence[Move], ids_of: Callable[[ResultRow], list[int] | None], tokenizer: Any
) -> tuple[list[ScoredText], list[str]]:
    """Each moved prompt's tokens coloured by their TuCo at both adapters (rows with ``token_tuco``), and a
    note for each row that could not be shown."""
    from ..views import text_from_row

    texts, skipped = [], []
    for move in moves:
        for row in (move.before, move.after):
            label = f"prompt {row.id}" + ("" if row.set is None else f" of {row.set}") + f" at {row.adapter}"
            ids = ids_of(row) if row.token_tuco is not None else None
            if ids is None:
                why = "no token_tuco (analyze --positions all)" if row.token_tuco is None else "its tokens differ"
                skipped.append(f"{label}: {why}")
                continue
            note = "from its row: TuCo at every token, per-block norms at the last token only"
            texts.append(text_from_row(row, ids, tokenizer, label, note))
    return texts, skipped


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; color: #222; max-width: 70rem; margin: 1rem auto; padding: 0 1rem; }
table.trajectory { border-collapse: collapse; margin: .5rem 0 1.5rem; }
table.trajectory td, table.trajectory th { border-bottom: 1px solid #ddd; padding: .2rem .6rem; text-align: left; }
table.trajectory td.number { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: .9rem; }
img.figure { max-width: 100%; }
"""


def html_table(header: Sequence[str], table: Sequence[Sequence[str]]) -> str:
    """A table of text cells, every cell escaped, numbers right-aligned."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="number">{html.escape(cell)}</td>' if _is_number(cell) else f"<td>{html.escape(cell)}</td>"
            for cell in row
        )
        + "</tr>"
        for row in table
    )
    return f'<table class="trajectory"><tr>{head}</tr>{body}</table>'


def trajectory_page(
    run: Trajectory,
    moves: Sequence[Move],
    between: tuple[str, str],
    *,
    title: str,
    png: bytes | None = None,
    views: Sequence[ScoredText] = (),
    notes: Sequence[str] = (),
) -> str:
    """One self-contained page (nothing fetched): the figure, the trajectory table, the moved-most table and
    the moved prompts' token views, with ``notes`` on what could not be shown."""
    from ..views import render_html

    before, after = between
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<img class="figure" alt="TuCo against training" src="data:image/png;base64,{data}">')
    parts += ["<h2>TuCo per checkpoint</h2>", html_table(*trajectory_columns(run))]
    parts += [
        f"<h2>Prompts whose TuCo moved most, {html.escape(before)} → {html.escape(after)}</h2>",
        html_table(*moved_columns(moves, before, after)),
    ]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    if views:
        parts.append(render_html(views, f"Tokens of the moved prompts at {before} and {after}", fragment=True))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{WRITTEN_BY}">'
        f"<title>{html.escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
