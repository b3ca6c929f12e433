"""The files a command writes, checked together before any model loads, by one rule for every command.

A file tuco-peft did not write is never overwritten without ``--force``: a file it wrote carries its mark
(a results row, the page's generator tag, the JSON's ``written_by``, the figure's metadata), and an empty
file holds nothing to lose. No two outputs of one command, nor an output and an input, are the same file.
Each output lies in an existing folder (results files create theirs) that can be written. Files written
whole go through ``io.locking.replaced_atomically``, so that a failure leaves the old file as it was.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apps.plotting import FIGURE_MARK
from ..errors import InputError
from ..io.locking import WRITER, WRITTEN_BY, lock_path, replaced_atomically
from ..views.html import PAGE_MARK

JSON_MARK = f'"written_by": "{WRITER}'.encode()
# Where the mark lies: a page's, a report's and most figures' near the start, a PDF's info near the end.
_MARK_WITHIN_BYTES = 64 * 2**10


def figure(flag: str, path: str | None) -> list[Output]:
    return [] if path is None else [Output(flag, path, FIGURE_MARK)]


def page(flag: str, path: str | None) -> list[Output]:
    return [] if path is None else [Output(flag, path, PAGE_MARK)]


def json_report(flag: str, path: str | None) -> list[Output]:
    return [] if path is None else [Output(flag, path, JSON_MARK)]


def write_json(report: dict[str, Any], path: str | Path, write: Callable[[dict[str, Any], Path], Any]) -> None:
    """``report`` with its ``written_by`` mark first, written by ``write(report, file)`` in one rename."""
    with replaced_atomically(path) as staging:
        write({"written_by": WRITTEN_BY, **report}, staging)


def add_force_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite output files that tuco-peft did not write (refused otherwise, so that no file is lost)",
    )


@dataclass(frozen=True)
class Output:
    """One file a command writes: the flag that names it, and the mark every such file of tuco-peft holds.

    ``mark`` is None where the file's reader checks it (a results file's rows, a lock file's pid); those
    files also create their folder.
    """

    flag: str
    path: str | Path
    mark: bytes | None

    @property
    def creates_folder(self) -> bool:
        return self.mark is None


def results_outputs(out: str | None) -> list[Output]:
    """A results file (``--out`` of analyze and compare) and the lock file beside it."""
    if out is None:
        return []
    return [Output("--out", out, None), Output("the lock file of --out", lock_path(Path(out)), None)]


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: the same path once links are followed, or hard links to one file."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def _is_ours(path: Path, mark: bytes) -> bool:
    """Whether ``path`` holds ``mark`` near its start or its end, or nothing at all (nothing to lose)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_MARK_WITHIN_BYTES)
            handle.seek(max(len(head), handle.seek(0, os.SEEK_END) - _MARK_WITHIN_BYTES))
            tail = handle.read()
    except OSError:
        return False
    return not head or mark in head or mark in tail


def check_may_write(output: Output, force: bool = False) -> None:
    """Whether ``output`` may be written: a file (not a folder) in a writable folder, and not a file
    tuco-peft did not write unless ``force``."""
    path = Path(output.path)
    if path.is_dir():
        raise InputError(f"{output.flag} {path} is a folder; pass a file name.")
    folder = path.parent
    if not folder.is_dir():
        if not output.creates_folder:
            raise InputError(f"{output.flag} {path}: the folder {folder} does not exist; create it or pass another.")
        return  # created, or refused as not writable, when the results file is opened
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{output.flag} {path} is not writable; pass another {output.flag}.")
    if output.mark is not None and path.exists() and not force and not _is_ours(path, output.mark):
        raise InputError(
            f"{output.flag} {path} is a file tuco-peft did not write; pass --force to overwrite it, or another "
            f"{output.flag}."
        )


def check_outputs(outputs: Sequence[Output], inputs: Mapping[str, str | None] | None = None, *, force: bool) -> None:
    """Every output of a command may be written (``check_may_write``), and no two of its outputs and inputs
    are one file. ``inputs`` names each file the command reads (e.g. "the prompt file") by its path; of two
    outputs on one file, the later one in ``outputs`` is the one to change."""
    read = [(name, Path(path)) for name, path in (inputs or {}).items() if path is not None]
    for index, output in enumerate(outputs):
        for other_name, other_path in [*((other.flag, Path(other.path)) for other in outputs[:index]), *read]:
            if _same_file(Path(output.path), other_path):
                raise InputError(
                    f"{output.flag} {output.path} is also {other_name} {other_path}; pass another {output.flag}."
                )
    for output in outputs:
        check_may_write(output, force)
