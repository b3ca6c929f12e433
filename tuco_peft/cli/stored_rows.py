"""The results file of ``analyze`` and ``compare --out``: opened under its lock, resumed, put in order.

Rows are appended as batches finish, longest prompts first (see ``runner``); once a run is complete the
file is rewritten in the prompt file's order in one rename, so a run killed at any moment leaves every
finished row, once, and the rerun computes only the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..apps.distributed import fold_parts
from ..apps.runner import warn
from ..io.adapter_series import AdapterCheckpoint
from ..io.locking import results_lock
from ..io.prompts import Prompt, PromptJson
from ..io.results import Provenance, ResultRow, ResultsFile, prompt_keys, prompts_by_key, rows_for
from .options import ResultsOptions


@dataclass(frozen=True)
class RowsOfRun:
    """The rows a run computes: one per prompt (of prompt set ``set_name``), or in a run over several adapters
    (``series``) one per adapter and prompt."""

    prompts: Sequence[Prompt]
    series: Sequence[AdapterCheckpoint] | None = None
    set_name: str | None = None

    @property
    def names(self) -> list[str | None]:
        """The ``adapter`` of the rows, adapter by adapter (None for one fine-tune)."""
        return [None] if self.series is None else [adapter.name for adapter in self.series]

    def row_keys(self) -> list[str]:
        """The rows' keys in the order of the results file: adapter by adapter, in the prompt file's order."""
        return prompt_keys(self.prompts, self.set_name, self.names)

    def prompts_by_key(self) -> dict[str, PromptJson]:
        """Each prompt by the key of its prompt (``ResultRow.prompt_key``), to check stored rows against."""
        return prompts_by_key(self.prompts, self.set_name)

    def rows(self, stored: Iterable[ResultRow]) -> list[ResultRow]:
        """This run's rows among ``stored``, in ``row_keys``' order."""
        return rows_for(stored, self.prompts, self.set_name, self.names)

    def missing(
        self, results: ResultsFile | None, announce: bool
    ) -> tuple[list[Prompt], list[AdapterCheckpoint] | None]:
        """The prompts without a row in ``results`` (all of them without a results file) and, in a run over
        several adapters, the adapter of each."""
        if self.series is None:
            return self._missing(results, announce, None), None
        todo: list[Prompt] = []
        owners: list[AdapterCheckpoint] = []
        for adapter in self.series:
            missing = self._missing(results, announce, adapter.name)
            todo += missing
            owners += [adapter] * len(missing)
        return todo, owners

    def _missing(self, results: ResultsFile | None, announce: bool, adapter: str | None) -> list[Prompt]:
        if results is None:
            return list(self.prompts)
        return missing_prompts(results, self.prompts, announce, self.set_name, adapter)

    def by_adapter(self, rows: Sequence[ResultRow]) -> dict[str, list[ResultRow]]:
        return {name: [row for row in rows if row.adapter == name] for name in self.names if name is not None}


def missing_prompts(
    results: ResultsFile,
    prompts: Sequence[Prompt],
    announce: bool,
    set_name: str | None = None,
    adapter: str | None = None,
) -> list[Prompt]:
    """The prompts (of ``adapter``) without a row in ``results``; with ``announce``, say so when some have one."""
    todo = [prompt for prompt in prompts if not results.done(set_name, prompt, adapter)]
    if announce and len(todo) < len(prompts):
        of_set = "" if set_name is None else f" of set {set_name!r}"
        of_adapter = "" if adapter is None else f" of adapter {adapter!r}"
        print(
            f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts{of_set}{of_adapter} are already in "
            f"{results.path}",
            file=sys.stderr,
        )
    return todo


def open_results(
    out: str, options: ResultsOptions, expected: Mapping[str | None, Provenance], prompts: Mapping[str, PromptJson]
) -> ResultsFile:
    """--out (``out``, given) with the rows of any interrupted data-parallel run folded in, once its rows are
    known to be computed as this run would compute them (``expected``: ``ResultsFile.check_made_like``), each
    from its prompt in ``prompts`` (by row key).
    With --repair, the lines that are not such rows are dropped and reported. The caller holds its lock."""
    results = ResultsFile(out, repair=options.repair, force=options.force)

    def check() -> None:
        results.check_made_like(expected)
        results.check_prompts(prompts)

    fold_parts(results, repair=options.repair, check=check)
    if results.dropped:
        lines = ", ".join(str(line) for line, _ in sorted(results.dropped))
        reasons = "; ".join(f"line {line} {why}" for line, why in sorted(results.dropped)[:3])
        warn(f"--repair dropped line(s) {lines} of {out} ({reasons}); kept every other row.")
    return results


@contextmanager
def locked_out(
    out: str, options: ResultsOptions, expected: Mapping[str | None, Provenance], prompts: Mapping[str, PromptJson]
) -> Iterator[ResultsFile]:
    """--out (``out``, given), opened under its lock (see ``open_results``), which is held until the block ends."""
    with results_lock(Path(out), wait=options.wait):
        yield open_results(out, options, expected, prompts)


@contextmanager
def locked_results(
    options: ResultsOptions, expected: Mapping[str | None, Provenance], prompts: Mapping[str, PromptJson]
) -> Iterator[ResultsFile | None]:
    """``locked_out`` of --out, or None when there is no --out."""
    if options.out is None:
        yield None
        return
    with locked_out(options.out, options, expected, prompts) as results:
        yield results
