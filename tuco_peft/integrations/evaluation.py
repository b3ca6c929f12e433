"""FTC_α-steered models in lm-evaluation-harness (``pip install 'tuco-peft[eval]'``).

``FTCScaledLM`` is lm-eval's ``HFLM`` whose every forward and generation runs under ``ftc_scale``, so any
lm-eval task (log-likelihood, multiple choice, generation) scores the steered model exactly as it scores
a plain one. ``evaluate_alphas`` runs a list of tasks once per α and, on request, chooses α by k-fold
cross-validation over the task's items (the paper's protocol, §5) with ``alpha_sweep.cross_validate``.
``check_task_data`` loads each task's data set before a model is: where the Hugging Face Hub cannot be
reached, data sets come from the cache or local files only, so that a missing one fails at once instead of
after a minute of retries. Importing this module needs lm-eval; without it the import raises a ``TuCoError``
that names the extra.

Recipe::

    import lm_eval, tuco_peft
    from tuco_peft.evaluation import FTCScaledLM, evaluate_alphas

    lm = FTCScaledLM(peft_model, tokenizer, alpha=1.1, batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])            # one α, lm-eval's own output
    report = evaluate_alphas(peft_model, tokenizer, ["arc_easy"], [0.9, 1.0, 1.1], cv_folds=5)
    report["alphas"]["1.1"]["results"]                               # lm-eval's results at α = 1.1
    report["cross_validation"]["arc_easy"]["cv_gain"]                # held-out gain over α = 1
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, TuCoError, first_line
from ..io.checkpoints import hub_connection_failure
from ..lora.backend import Backend
from ..model.interception import hooked
from ..steering.forward import Alpha, ftc_scale, layer_alphas
from .alpha_sweep import _best_alpha, cross_validate

try:
    import datasets.config  # type: ignore[import-untyped]  # datasets ships no type information
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.loggers.utils import get_commit_from_path
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable
except ImportError:
    raise TuCoError("steered evaluation needs lm-evaluation-harness: pip install 'tuco-peft[eval]'.") from None

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _without_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return args, {**kwargs, "use_cache": False}


class FTCScaledLM(HFLM):
    """lm-eval's ``HFLM`` around an already loaded model, every forward under ``ftc_scale(model, alpha)``.

    ``alpha`` may be changed between evaluations (``lm.alpha = 0.9``); ``base_model`` and ``backend`` are
    those of ``ftc_scale``. Other keywords go to ``HFLM`` (e.g. ``batch_size``, ``max_length``).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        alpha: Alpha = 1.0,
        *,
        base_model: nn.Module | str | Path | None = None,
        backend: Backend | None = None,
        **hflm_kwargs: Any,
    ):
        # HFLM warns that a model passed as an object skips its loading options and distributed set-up: true,
        # and the point of this class, so its warnings are held back while it is built.
        with _lm_eval_logs(_errors_only):
            super().__init__(pretrained=model, tokenizer=tokenizer, **hflm_kwargs)
        self.alpha = alpha
        self.base_model = base_model
        self.ftc_backend = backend  # HFLM already has a ``backend`` attribute ("causal")

    @contextmanager
    def _steered(self) -> Iterator[None]:
        with ftc_scale(self.model, self.alpha, base_model=self.base_model, backend=self.ftc_backend):
            yield

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """lm-eval's scoring forward, steered and without a cache (one forward reuses none, and on older
        transformers releases a hybrid decoder's cache cannot be steered)."""
        with self._steered(), hooked(self.model, before=_without_cache, with_kwargs=True):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        with self._steered():
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def alpha_key(alpha: float) -> str:
    """How an α names its entry in ``evaluate_alphas``' output: ``str(float(alpha))``, e.g. "1.0", "0.75"."""
    return str(float(alpha))


def checked_alphas(alphas: Sequence[float], cv_folds: int | None = None) -> tuple[float, ...]:
    """``alphas`` as floats, once each is finite and ≥ 0, none repeats and (with ``cv_folds``) 1.0 is there."""
    if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Sequence) or not alphas:
        raise InputError("alphas must be a non-empty list of numbers, e.g. [0.75, 1.0, 1.25].")
    checked = layer_alphas(list(alphas), len(alphas))  # each one finite and ≥ 0, with the index in the message
    if len(set(checked)) != len(checked):
        raise InputError(f"alphas {list(alphas)} repeat a value; list each α once.")
    if cv_folds is not None:
        # A stand-in score matrix with one item per fold: checks that 1.0 is there and folds ≥ 2, before any run.
        cross_validate(torch.zeros(max(cv_folds, 2), len(checked), dtype=torch.bool), checked, cv_folds)
    return checked


def check_tasks(
    tasks: Sequence[str], include_path: str | Path | None = None, task_manager: TaskManager | None = None
) -> TaskManager:
    """lm-eval's task index (``task_manager``, else its own tasks plus ``include_path``), having checked that
    every task is in it: a misspelt task fails here, before a model is loaded or a single α is run."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise InputError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}.")
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"include path {include_path} is not a folder of lm-eval task YAML files.")
    manager = task_manager or TaskManager(include_path=str(include_path) if include_path is not None else None)
    for task in tasks:
        if not manager.match_tasks([task]) and not Path(task).is_file():
            where = f" (nor in {include_path})" if include_path is not None else ""
            raise InputError(
                f"unknown lm-eval task {task!r}{where}; `lm-eval ls tasks` lists them, and --include-path adds a "
                "folder of your own task YAML files."
            )
    return manager


def _hub_unavailable() -> str | None:
    """Why data sets cannot come from the Hugging Face Hub now, or None where they can: offline mode is on,
    or the Hub's host does not answer one connection (probed once per process, and not behind a proxy)."""
    from huggingface_hub import constants

    offline_by_environment = any(
        os.environ.get(name, "").upper() in datasets.config.ENV_VARS_TRUE_VALUES for name in _OFFLINE_VARIABLES
    )
    if offline_by_environment or datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    reason = hub_connection_failure()
    return None if reason is None else f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason})"


@contextmanager
def _hub_data_sets(unavailable: str | None) -> Iterator[None]:
    """While held, datasets runs in offline mode if the Hub is ``unavailable``: it then takes a Hub data set
    from its cache at once, where it would otherwise retry the Hub for most of a minute first. datasets reads
    its offline flag from the environment when imported, so the flag is set here and put back after."""
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or unavailable is not None
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def check_task_data(tasks: Sequence[str], task_manager: TaskManager) -> None:
    """Load every task's data set now, before a model is loaded, so that one that cannot be had fails in one
    line that names the task and the way out. Where the Hub cannot be reached, data sets come from the cache
    or local files only, at once."""
    unavailable = _hub_unavailable()
    # lm-eval's warnings about the tasks are held back here: the run that follows gives them, once.
    with _hub_data_sets(unavailable), _lm_eval_logs(_errors_only):
        for task in tasks:
            try:
                task_manager.load([task])
            except OSError as error:  # datasets' ConnectionError, FileNotFoundError, DatasetNotFoundError
                if unavailable is not None and isinstance(error, ConnectionError):
                    raise InputError(
                        f"lm-eval task {task!r}: its data set must be cached or given locally, as it is not in the "
                        f"Hugging Face cache and {unavailable}; run the task once where the Hub can be reached, or "
                        "give its data in a task YAML of your own (dataset_path: json with data_files, like "
                        "examples/lm_eval_tasks in the tuco-peft repository) and pass the YAML's folder with "
                        f"--include-path (datasets: {first_line(error)})."
                    ) from None
                raise InputError(
                    f"lm-eval task {task!r}: its data set could not be loaded ({first_line(error)})."
                ) from None


def _git_hash() -> str | None:
    """The ``git_hash`` that lm-eval records with its results, found as lm-eval finds it (``git describe
    --always`` in the working folder, else the commit its .git folder names) but with git's complaints
    ("fatal: not a git repository") captured rather than printed on the terminal."""
    try:
        described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # git is not installed
        return get_commit_from_path(os.getcwd())
    return described.stdout.strip() if described.returncode == 0 else get_commit_from_path(os.getcwd())


@contextmanager
def _quiet_git_hash() -> Iterator[None]:
    """While held, lm-eval's evaluator records the hash ``_git_hash`` found once, instead of running git
    again for every α with git's stderr on the terminal."""
    git_hash = _git_hash()
    own = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = own


class _FirstOfEach(logging.Filter):
    """Lets the first record of each message through: lm-eval builds its tasks again for every α, and would
    repeat each warning about them (the same at every α) as often."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


@contextmanager
def _lm_eval_logs(keep: logging.Filter | Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """While held, lm-eval's loggers pass only the records ``keep`` keeps, whatever handles them."""
    loggers = [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.partition(".")[0] == "lm_eval" and isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _per_item_scores(samples: list[dict[str, Any]], metric: str | None, task: str) -> tuple[str, dict[int, float]]:
    """``(metric key "name,filter", {doc_id: score})`` from one task's logged samples at one α.

    The metric defaults to "acc" where the task reports it, else its first metric; the filter to the
    first one the samples carry. Only 0/1 per-item scores (accuracy, exact match) can be cross-validated.
    """
    name, _, wanted_filter = (metric or "").partition(",")
    filter_name = wanted_filter or samples[0]["filter"]
    chosen = [s for s in samples if s["filter"] == filter_name]
    reported = chosen[0]["metrics"] if chosen else []
    name = name or ("acc" if "acc" in reported else (reported[0] if reported else ""))
    if not chosen or name not in reported:
        raise InputError(
            f"task {task!r} has no per-item metric {metric!r}; it reports {reported} under filter "
            f"{samples[0]['filter']!r}."
        )
    scores = {int(s["doc_id"]): float(s[name]) for s in chosen}
    if any(value not in (0.0, 1.0) for value in scores.values()):
        raise InputError(
            f"task {task!r}: metric {name!r} is not a 0/1 per-item score, so α cannot be cross-validated on it; "
            "pick an accuracy or exact-match metric."
        )
    return f"{name},{filter_name}", scores


def _cross_validation(
    per_alpha_samples: list[dict[str, list[dict[str, Any]]]],
    alphas: tuple[float, ...],
    folds: int,
    metric: str | None,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """The paper's α selection for every task evaluated: α chosen on k − 1 folds, scored on the held-out fold."""
    report = {}
    for task in per_alpha_samples[0]:
        columns = [_per_item_scores(samples[task], metric, task) for samples in per_alpha_samples]
        key, first = columns[0]
        doc_ids = sorted(first)
        if any(set(scores) != set(doc_ids) for _, scores in columns):
            raise TuCoError(f"task {task!r} scored different items at different α; cannot cross-validate.")
        correct = torch.tensor([[scores[d] for _, scores in columns] for d in doc_ids]).bool()
        result = cross_validate(correct, alphas, folds, seed)
        report[task] = {
            "metric": key,
            "n_items": len(doc_ids),
            "score": {alpha_key(a): s for a, s in result.accuracy.items()},
            "alpha": alphas[_best_alpha(correct.double().mean(0), alphas)],
            "fold_alphas": result.chosen_alphas,
            "cv_score": result.cv_accuracy,
            "baseline_score": result.baseline_accuracy,
            "cv_gain": result.cv_gain,
        }
    return report


def evaluate_alphas(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    alphas: Sequence[float],
    include_path: str | Path | None = None,
    limit: float | None = None,
    cv_folds: int | None = None,
    progress: bool = True,
    *,
    batch_size: int = 8,
    cv_metric: str | None = None,
    cv_seed: int = 0,
    base_model: nn.Module | str | Path | None = None,
    task_manager: TaskManager | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``model`` under ``ftc_scale(model, α)``, once for each α.

    Returns ``{"alphas": {alpha_key(α): lm-eval's results dict, ...}}`` (``simple_evaluate``'s output
    without the per-item samples) and, with ``cv_folds``, ``"cross_validation"``: for each task the
    per-α score on ``cv_metric`` (default "acc" where reported, else the task's first metric; "name" or
    "name,filter"), the α that scores best on all items, the α chosen on each fold, and the held-out score
    against α = 1 (``cv_gain``). ``alphas`` must then include 1.0.

    ``include_path`` adds a folder of task YAML files, ``limit`` caps the items per task (lm-eval's
    meaning); ``task_manager`` is one ``check_tasks`` already built, so its index is not built twice.
    Where the Hugging Face Hub cannot be reached, data sets come from the cache or local files only
    (``check_task_data``); lm-eval's log messages, repeated at every α, are passed once. ``base_model`` is
    ``ftc_scale``'s (full fine-tunes). Other keywords go to ``lm_eval.simple_evaluate`` (e.g.
    ``num_fewshot``, ``apply_chat_template``); its seeds are fixed, so every α sees the same few-shot examples.
    """
    from tqdm.auto import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

    alphas = checked_alphas(alphas, cv_folds)
    manager = check_tasks(tasks, include_path, task_manager)
    lm = FTCScaledLM(model, tokenizer, alphas[0], base_model=base_model, batch_size=batch_size)
    by_alpha, samples = {}, []
    with _hub_data_sets(_hub_unavailable()), _quiet_git_hash(), _lm_eval_logs(_FirstOfEach()):
        for alpha in tqdm(alphas, desc="α", unit="α", disable=not progress):
            lm.alpha = alpha
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                log_samples=cv_folds is not None,
                **simple_evaluate_kwargs,
            )
            if output is None:  # lm-eval returns nothing on the non-zero ranks of a distributed run
                continue
            samples.append(output.pop("samples", None))
            by_alpha[alpha_key(alpha)] = output
    report: dict[str, Any] = {"alphas": by_alpha}
    if cv_folds is not None and by_alpha:
        report["cross_validation"] = _cross_validation(samples, alphas, cv_folds, cv_metric, cv_seed)
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """``evaluate_alphas``' output as JSON; numpy scalars and other non-JSON values as lm-eval writes them."""
    path = Path(path)
    path.write_text(json.dumps(report, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
    return path
