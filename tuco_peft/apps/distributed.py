"""Data-parallel ``tuco-peft analyze`` under ``accelerate launch`` or ``torchrun``.

Each rank analyses every ``world_size``-th prompt still missing from ``--out`` and writes its rows to its own
part file as they are computed; at the end rank 0 folds the parts into ``--out``, in the prompt file's order.
Rows travel through files, never through collectives: the process group (gloo, which runs on CPU and so
beside CUDA ranks too) only lets the ranks agree on when each step is over and whether every rank succeeded.

One lock guards ``--out`` and its parts (see ``locking``): rank 0 takes it in the first step, before any
rank reads or writes a row, and holds it until the last merge. Every other rank writes only its own part
file, and only in the steps between, so the ranks of one run act as its single writer; a second run on the
same ``--out`` is refused by rank 0, and with it every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from ..errors import InputError, TuCoError
from ..io.results import ResultsFile

T = TypeVar("T")

# A rank that finishes its share waits at the next step for the slowest one, which may analyse for hours;
# gloo's default of 30 minutes would stop a long run that is going well.
STEP_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones (rank 0 of 1 when not launched by a distributed runner)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, as ``torchrun`` and ``accelerate launch`` set them."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            text = os.environ.get(name, "").strip()
            try:
                values[name] = int(text) if text else default
            except ValueError:
                raise InputError(
                    f"the environment variable {name}={text!r} is not an integer; launch with torchrun "
                    "or accelerate launch, or unset it."
                ) from None
        if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
            raise InputError(
                f"RANK={values['RANK']} is not below WORLD_SIZE={values['WORLD_SIZE']}; launch with torchrun or "
                "accelerate launch, or unset both."
            )
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list[T]) -> list[T]:
        """Every ``world_size``-th item from this rank's index: shards differ in size by at most one."""
        return items[self.rank :: self.world_size]


@contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group over the launched ranks (``MASTER_ADDR``/``MASTER_PORT`` from the launcher)."""
    import torch.distributed as dist

    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise InputError(
                f"WORLD_SIZE is {ranks.world_size} but {name} is not set; launch with torchrun or accelerate launch."
            )
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=STEP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _all_succeeded(succeeded: bool) -> bool:
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(succeeded)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def together(step: Callable[[], T]) -> T:
    """Run ``step`` on this rank, then wait for every rank to finish its own; if any failed, every rank stops.

    The rank that failed raises its own error; the others raise one that points to it.
    """
    try:
        result = step()
    except BaseException:
        with suppress(Exception):  # the others may be gone already; the error that matters is this one
            _all_succeeded(False)
        raise
    if not _all_succeeded(True):
        raise TuCoError(
            "another rank failed (see its error); the rows written so far are kept, rerun the same command to resume."
        )
    return result


def parts_directory(out: Path) -> Path:
    """Where the ranks of a data-parallel run write their rows before they are folded into ``out``."""
    return out.with_name(out.name + ".parts")


def part_file(out: Path, ranks: Ranks) -> Path:
    return parts_directory(out) / f"rank{ranks.rank}-of-{ranks.world_size}.jsonl"


def fold_parts(results: ResultsFile, *, repair: bool = False, check: Callable[[], None] | None = None) -> None:
    """Move the rows of part files (a finished or an interrupted data-parallel run) into ``results``.

    Rows already in ``results`` are not repeated; a part's last row cut short by an interruption is dropped
    (and with ``repair``, any line that is not a row). ``check`` runs once the parts' rows are among
    ``results.rows`` and before anything is written, so that a refused run changes no file. Then the part
    files are removed, so a rerun with any number of ranks starts from ``results`` alone. The caller holds
    ``results``'s lock.
    """
    directory = parts_directory(results.path)
    parts = sorted(directory.glob("rank*-of-*.jsonl")) if directory.is_dir() else []
    for part in parts:
        results.take_in(ResultsFile(part, repair=repair).rows)
    if check is not None:
        check()
    results.settle()
    for part in parts:
        part.unlink()
    with suppress(OSError):  # missing, or something else was put there: leave the directory to its owner
        directory.rmdir()
