"""The results file of ``analyze`` and ``compare --out``: opened under its lock, resumed, put in order.

Rows are appended as batches finish, longest prompts first (see ``runner``); once a run is complete the
file is rewritten in the prompt file's order in one rename, so a run killed at any moment leaves every
finished row, once, and the rerun computes only the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..apps.distributed import fold_parts
from ..apps.runner import warn
from ..io.locking import results_lock
from ..io.prompts import Prompt, PromptJson
from ..io.results import ResultsFile
from .options import ResultsOptions


def missing_prompts(
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


def open_results(
    out: str, options: ResultsOptions, provenance: dict[str, Any], prompts: Mapping[str, PromptJson]
) -> ResultsFile:
    """--out (``out``, given) with the rows of any interrupted data-parallel run folded in, once its rows are
    known to be computed as this run would compute them, each from its prompt in ``prompts`` (by row key).
    With --repair, the lines that are not such rows are dropped and reported. The caller holds its lock."""
    results = ResultsFile(out, repair=options.repair, force=options.force)

    def check() -> None:
        results.check_made_like(**provenance)
        results.check_prompts(prompts)

    fold_parts(results, repair=options.repair, check=check)
    if results.dropped:
        lines = ", ".join(str(line) for line, _ in sorted(results.dropped))
        reasons = "; ".join(f"line {line} {why}" for line, why in sorted(results.dropped)[:3])
        warn(f"--repair dropped line(s) {lines} of {out} ({reasons}); kept every other row.")
    return results


@contextmanager
def locked_out(
    out: str, options: ResultsOptions, provenance: dict[str, Any], prompts: Mapping[str, PromptJson]
) -> Iterator[ResultsFile]:
    """--out (``out``, given), opened under its lock (see ``open_results``), which is held until the block ends."""
    with results_lock(Path(out), wait=options.wait):
        yield open_results(out, options, provenance, prompts)


@contextmanager
def locked_results(
    options: ResultsOptions, provenance: dict[str, Any], prompts: Mapping[str, PromptJson]
) -> Iterator[ResultsFile | None]:
    """``locked_out`` of --out, or None when there is no --out."""
    if options.out is None:
        yield None
        return
    with locked_out(options.out, options, provenance, prompts) as results:
        yield results
