"""``tuco-peft compare``: TuCo on two prompt sets and the ROC-AUC of TuCo separating them (the paper's
main analysis)."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..apps.runner import Runner
from ..apps.statistics import roc_auc
from ..errors import InputError
from ..io.results import ResultRow, prompt_keys, prompts_by_key, rows_for
from .checks import analysable_prompts
from .options import (
    CommandOptions,
    ResultsOptions,
    add_model_arguments,
    add_prompt_arguments,
    add_results_arguments,
    check_common,
    provenance,
)
from .outputs import check_outputs, figure, results_outputs
from .stored_rows import locked_results, missing_prompts


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
    check_common(options.model, options.prompts, options.results, options.plot)
    check_outputs(
        [*results_outputs(options.results.out), *figure("--plot", options.plot)],
        {"the prompt file A": options.set_a, "the prompt file B": options.set_b},
        force=options.results.force,
    )
    names = options.set_names()
    sets = {
        name: analysable_prompts(path, options.prompts.chat_template)
        for name, path in zip(names, (options.set_a, options.set_b))
    }
    made_with = provenance(options.model, options.prompts.format, "last", "compare")
    expected = {key: prompt for name, prompts in sets.items() for key, prompt in prompts_by_key(prompts, name).items()}
    with locked_results(options.results, made_with, expected) as results:
        memory: list[ResultRow] = []
        todo = {
            name: prompts if results is None else missing_prompts(results, prompts, announce=True, set_name=name)
            for name, prompts in sets.items()
        }
        if any(todo.values()):
            runner = Runner.load(
                options.model,
                prompt_format=options.prompts.format,
                batching=options.prompts.batching,
                provenance=made_with,
            )
            for name, prompts in todo.items():
                runner.run(prompts, results.append if results is not None else memory.extend, set_name=name)
        if results is not None:  # rows were appended by length: back to the files' order, set A first
            results.sort_by([key for name, prompts in sets.items() for key in prompt_keys(prompts, name)])
    stored = results.rows if results is not None else memory
    groups = {name: rows_for(stored, prompts, name) for name, prompts in sets.items()}
    for name, rows in groups.items():
        if not rows:
            raise InputError(f"no prompt of set {name!r} could be analysed (none has a token).")
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
