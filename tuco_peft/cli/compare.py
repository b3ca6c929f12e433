"""``tuco-peft compare``: TuCo on two prompt sets and the ROC-AUC of TuCo separating them (the paper's
main analysis)."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..apps.runner import Runner
from ..apps.statistics import roc_auc
from ..apps.trajectory import trajectory_table
from ..errors import InputError
from ..io.results import ResultRow
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
from .outputs import check_outputs, figure, results_outputs
from .stored_rows import RowsOfRun, locked_results


@dataclass(frozen=True)
class CompareOptions(CommandOptions):
    results: ResultsOptions
    set_a: str
    set_b: str
    plot: str | None

    def set_names(self) -> tuple[str, str]:
        a, b = Path(self.set_a).stem, Path(self.set_b).stem
        return (a, b) if a != b else ("A", "B")


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    compare = commands.add_parser("compare", parents=[common], help="TuCo on two prompt sets and its ROC-AUC")
    add_model_arguments(compare)
    compare.add_argument("set_a", metavar="A", help="prompt file of the positive set (e.g. chat prompts)")
    compare.add_argument("set_b", metavar="B", help="prompt file of the other set (e.g. pre-training text)")
    compare.add_argument("--out", help="JSONL of rows (with a 'set' field); rerunning with the same file resumes")
    add_results_arguments(compare)
    add_prompt_arguments(compare, token_budget=True)
    compare.add_argument("--plot", help="PNG with both TuCo histograms and per-layer profiles")
    compare.set_defaults(run=lambda args: compare_sets(CompareOptions.from_args(args)))


def compare_sets(options: CompareOptions) -> int:
    check_common(options.model, options.prompts, options.results, options.plot, several_adapters=True)
    series = options.model.series()
    if series is not None and options.plot:
        raise InputError(
            "--plot draws one fine-tune's TuCo; for a run over several adapters, pass --out and plot the ROC-AUC "
            "across them with tuco-peft trajectory OUT --plot FILE."
        )
    check_outputs(
        [*results_outputs(options.results.out), *figure("--plot", options.plot)],
        {"the prompt file A": options.set_a, "the prompt file B": options.set_b},
        force=options.results.force,
    )
    names = options.set_names()
    sets = {
        name: RowsOfRun(analysable_prompts(path, options.prompts.chat_template), series, name)
        for name, path in zip(names, (options.set_a, options.set_b))
    }
    expected = provenances(options.model, series, options.prompts.format, "last", "compare")
    by_key = {key: prompt for rows in sets.values() for key, prompt in rows.prompts_by_key().items()}
    with locked_results(options.results, expected, by_key) as results:
        memory: list[ResultRow] = []
        todo = {name: rows.missing(results, announce=True) for name, rows in sets.items()}
        if any(prompts for prompts, _ in todo.values()):
            runner = Runner.load(
                options.model,
                series or (),
                prompt_format=options.prompts.format,
                batching=options.prompts.batching,
                provenance=expected,
            )
            for name, (prompts, owners) in todo.items():
                write = results.append if results is not None else memory.extend
                runner.run(prompts, write, set_name=name, adapters=owners)
        if results is not None:  # rows were appended by length: back to the files' order, set A first
            results.sort_by([key for rows in sets.values() for key in rows.row_keys()])
    stored = results.rows if results is not None else memory
    groups = {name: rows.rows(stored) for name, rows in sets.items()}
    for name, rows in groups.items():
        if not rows:
            raise InputError(f"no prompt of set {name!r} could be analysed (none has a token).")
    if series is not None:
        print(trajectory_table([row for rows in groups.values() for row in rows]))
        return 0
    for name, rows in groups.items():
        values = [row.tuco for row in rows]
        print(
            f"{name}: {len(values)} prompts, TuCo mean {statistics.fmean(values):.4f}, "
            f"median {statistics.median(values):.4f}"
        )
    auc = roc_auc(*([row.tuco for row in rows] for rows in groups.values()))
    print(f"ROC-AUC of TuCo, {names[0]} (positive) vs {names[1]}: {auc:.4f}")
    if options.plot:
        from ..apps.plotting import plot_analysis

        print(f"plot: {plot_analysis(groups, options.plot, title=f'TuCo ROC-AUC {auc:.3f}')}")
    return 0
