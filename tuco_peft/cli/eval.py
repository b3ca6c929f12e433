"""``tuco-peft eval``: lm-evaluation-harness tasks on the FTC_α-steered model, once per α, and with ``--cv``
α chosen by cross-validation as in the paper (lm-eval is imported by this command only)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apps.runner import Runner
from ..errors import InputError
from .checks import check_alpha
from .options import (
    CommandOptions,
    add_model_arguments,
    add_prompt_arguments,
    check_common,
    checked_adapters,
)
from .outputs import add_force_argument, check_outputs, json_report, write_json


@dataclass(frozen=True)
class EvalOptions(CommandOptions):
    tasks: str
    alphas: str
    out: str
    include_path: str | None
    limit: float | None
    num_fewshot: int | None
    cv: int | None
    cv_metric: str | None
    force: bool


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    evaluate = commands.add_parser(
        "eval",
        parents=[common],
        help="lm-evaluation-harness tasks on the FTC_α-steered model, once per α (pip install 'tuco-peft[eval]')",
        description="Run lm-evaluation-harness tasks (log-likelihood or generation) on the FTC_α-steered model, "
        "once per α, and write lm-eval's results dict for each α to --out, keyed by α. --cv K adds the paper's "
        "protocol: α chosen by K-fold cross-validation over each task's items, and its gain over α = 1. Needs "
        "pip install 'tuco-peft[eval]'.",
    )
    add_model_arguments(evaluate)
    evaluate.add_argument(
        "--tasks",
        required=True,
        help="lm-eval task or group names, comma-separated; without network each task's data set must be in the "
        "Hugging Face cache or given locally (--include-path)",
    )
    evaluate.add_argument(
        "--alphas", required=True, help="α values, comma-separated, each finite and ≥ 0 (e.g. 0.75,1,1.25)"
    )
    evaluate.add_argument(
        "--out",
        required=True,
        help="JSON file of the results, keyed by α (over several adapters: by adapter, then α, each adapter's "
        "written as it finishes)",
    )
    add_force_argument(evaluate)
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
    add_prompt_arguments(evaluate)
    evaluate.set_defaults(run=lambda args: evaluate_tasks(EvalOptions.from_args(args)))


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
        check_alpha(alpha, "--alphas: each α")
        alphas.append(alpha)
    return alphas


def _limit(value: float | None) -> int | float | None:
    """--limit as lm-eval takes it: a number of items per task, or below 1 a fraction of them."""
    if value is None or 0 < value < 1:
        return value
    if value >= 1 and value.is_integer():
        return int(value)
    raise InputError(f"--limit must be a whole number of items ≥ 1 or a fraction between 0 and 1, got {value:g}.")


def evaluate_tasks(options: EvalOptions) -> int:
    check_common(options.model, options.prompts, several_adapters=True)
    tasks = _comma_list(options.tasks, "--tasks")
    alphas = _alphas(options.alphas)
    limit = _limit(options.limit)
    if options.cv is not None and options.cv < 2:
        raise InputError(f"--cv must be at least 2 folds, got {options.cv}.")
    if options.cv_metric is not None and options.cv is None:
        raise InputError("--cv-metric goes with --cv (the metric α is cross-validated on).")
    if options.num_fewshot is not None and options.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be at least 0, got {options.num_fewshot}.")
    if options.include_path is not None and not Path(options.include_path).is_dir():
        raise InputError(f"--include-path {options.include_path} is not a folder of lm-eval task YAML files.")
    series = options.model.series()
    check_outputs(json_report("--out", options.out), force=options.force)
    if series is None:
        options.model.check()
    else:
        checked_adapters(options.model, series)
    from ..integrations.evaluation import check_task_data, check_tasks, checked_alphas, evaluate_alphas, write_report

    alphas = list(checked_alphas(alphas, options.cv))  # repeats, and 1.0 among them for --cv
    task_manager = check_tasks(tasks, options.include_path)
    check_task_data(tasks, task_manager)
    runner = Runner.load(options.model, series or ())
    lm_eval_options: dict[str, Any] = {"num_fewshot": options.num_fewshot}
    if options.prompts.chat_template:
        lm_eval_options.update(apply_chat_template=True, system_instruction=options.prompts.system)

    def evaluate() -> dict[str, Any]:
        return evaluate_alphas(
            runner.model,
            runner.tokenizer,
            tasks,
            alphas,
            include_path=options.include_path,
            limit=limit,
            cv_folds=options.cv,
            batch_size=options.prompts.batch_size,
            cv_metric=options.cv_metric,
            base_model=runner.base_model,
            task_manager=task_manager,
            **lm_eval_options,
        )

    if series is None:
        report = evaluate()
        write_json(report, options.out, write_report)
        _print_evaluation(report)
    else:
        from ..lora.adapters import adapter_active
        from ..model.parts import model_parts

        modules = model_parts(runner.model).modules
        report = {"adapters": {}}
        for adapter in series:
            with adapter_active(modules, adapter.adapter_name):
                own = evaluate()
            report["adapters"][adapter.name] = {"step": adapter.step, "train_loss": adapter.train_loss, **own}
            write_json(report, options.out, write_report)  # each adapter's results as soon as they exist
            print(f"adapter {adapter.name}" + ("" if adapter.step is None else f" (step {adapter.step})") + ":")
            _print_evaluation(own, indent="  ")
    print(f"results: {options.out}")
    return 0


def _print_evaluation(report: dict[str, Any], indent: str = "") -> None:
    """Each α's task metrics (lm-eval's "metric,filter" keys, without their stderr) and, with --cv, the gain."""
    for alpha, output in report["alphas"].items():
        scores = [
            f"{task} {metric} {value:.4f}"
            for task, metrics in output["results"].items()
            for metric, value in metrics.items()
            if "," in metric and "_stderr" not in metric and isinstance(value, (int, float))
        ]
        print(f"{indent}α = {float(alpha):g}: {'; '.join(scores)}")
    for task, cv in report.get("cross_validation", {}).items():
        print(
            f"{indent}{task}: α by {len(cv['fold_alphas'])}-fold CV on {cv['metric']} scores {cv['cv_score']:.4f} on held-out "
            f"items, against {cv['baseline_score']:.4f} at α = 1: CV gain {cv['cv_gain']:+.4f} (best α on all "
            f"{cv['n_items']} items: {cv['alpha']:g})"
        )
