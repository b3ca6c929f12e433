"""The ``tuco-peft`` command line: analyze, compare, generate, eval, bench, demo (a module per command).

The model analysed is a LoRA fine-tune (``--base BASE --adapter ADAPTER``) or a full fine-tune beside its
pre-trained checkpoint (``--model FINETUNED --base-model PRETRAINED``). ``analyze`` runs data-parallel when
launched by ``torchrun`` or ``accelerate launch`` (see ``distributed``).

Every command reports bad input as one line on stderr and a non-zero exit status (2 for input the user
can fix, 1 for anything unexpected, 130 when interrupted, at any moment); ``--debug`` shows the traceback
above that line, and the status stays the same. Other libraries' log warnings stay off stderr unless
``--debug`` or the caller's own logging configuration asks for them (``_other_libraries_quiet``).
Everything that can be checked without a model (flags, prompt files, checkpoint folders, the results file
and its lock) is checked before one loads, and torch, transformers and peft are imported only by a command
that needs them, so that ``--help`` and usage errors answer at once (lm-eval only by ``eval``).

``analyze`` and ``compare --out`` hold the results file's lock (``locking``) for the whole run, and resume
only rows computed from the same checkpoint content, tokenizer and settings (``fingerprint``, ``results``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import TuCoError, first_line
from . import analyze, bench, compare, demo, eval, generate, trajectory

if TYPE_CHECKING:
    from types import FrameType

    from typing_extensions import Self

EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130
# Flags whose value may start with a dash ("--alphas -1,1"), which argparse would take for an option: the
# value is joined to its flag ("--alphas=-1,1") so that the command's own check reports it.
_VALUES_MAY_START_WITH_A_DASH = ("--alphas",)
_DEBUG_HELP = "show the traceback of an error, and other libraries' log warnings"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuco-peft",
        description="Tuning Contribution (TuCo) of LoRA/QLoRA fine-tunes, prompt by prompt, in one forward pass.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # --debug is taken after the command too; with no default there, it leaves the one given before alone.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (analyze, compare, generate, eval, bench, demo, trajectory):
        command.add_parser(commands, common)
    return parser


class _ExitOnCtrlC:
    """While held, Ctrl-C prints one line and ends the process with exit status 130, whatever it was doing.

    Raising KeyboardInterrupt instead would reach code that cannot take it: inside torch's import it aborts
    the process from C++, and transformers reports it from a lazy import as a missing module. Nothing needs
    unwinding: rows are flushed as written and a row cut short is dropped on reload, a sorted or repaired
    results file replaces the old one in one rename, and the operating system releases the lock.
    ``note`` is added to the line (what happens to the rows).
    """

    def __init__(self) -> None:
        self.note = ""
        # What signal.signal returns: the previous handler, SIG_DFL or SIG_IGN (ints), None if not set from Python.
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self._previous = signal.signal(signal.SIGINT, self._exit)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _exit(self, signum: int, frame: object) -> None:
        with suppress(OSError, ValueError):  # a closed or broken stdout must not keep the process alive
            sys.stdout.flush()
        print(f"\ntuco-peft: interrupted{self.note}.", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """Run ``tuco-peft``; returns the exit status."""
    with _ExitOnCtrlC() as ctrl_c:
        try:
            args = build_parser().parse_args(_joined_dash_values(sys.argv[1:] if argv is None else argv))
        except SystemExit as exit_:  # --help, or a usage error argparse has reported
            return int(exit_.code or 0)
        if getattr(args, "out", None) and args.command in ("analyze", "compare"):
            ctrl_c.note = "; rows already written are kept, rerun the same command to resume"
        return _run(args)


def _joined_dash_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in _VALUES_MAY_START_WITH_A_DASH and arg.startswith("-") and arg[1:2].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


class _OnlyErrorsOfOtherLibraries(logging.Filter):
    """Passes tuco-peft's own records and other libraries' errors; drops other libraries' warnings and notes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.partition(".")[0] == "tuco_peft"


@contextmanager
def _other_libraries_quiet(debug: bool) -> Iterator[None]:
    """Unless --debug, keep other libraries' log records below ERROR off stderr while a command runs.

    Such notices (bitsandbytes, on every start, that it could not fetch an optional CPU kernel) tell a user
    of tuco-peft nothing they can act on. Only records that reach logging's last resort are filtered, that
    is those no handler of the user's took: a logging configuration of the user's (``main`` called from
    their code) still gets every record it asks for, and nothing is left changed when ``main`` returns.
    """
    handler = logging.lastResort
    if debug or handler is None:
        yield
        return
    quiet = _OnlyErrorsOfOtherLibraries()
    handler.addFilter(quiet)
    try:
        yield
    finally:
        handler.removeFilter(quiet)


def _run(args: argparse.Namespace) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations: nothing a CLI user can act on
    try:
        with _other_libraries_quiet(args.debug):
            return args.run(args)
    except TuCoError as error:
        return _report(error, f"tuco-peft: error: {first_line(error)}", EXIT_INPUT, args.debug)
    except Exception as error:  # noqa: BLE001 (the last line of defence: one line, not a traceback)
        line = f"tuco-peft: error: {type(error).__name__}: {first_line(error)}"
        return _report(error, line, EXIT_UNEXPECTED, args.debug, hint=" (rerun with --debug for the traceback)")


def _report(error: Exception, line: str, status: int, debug: bool, hint: str = "") -> int:
    """One line on stderr, under the traceback with --debug; the exit status is the same either way."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
        hint = ""
    print(f"{line}{hint}", file=sys.stderr)
    return status
