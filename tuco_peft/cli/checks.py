"""Checks of the command line's input files and values, each a one-line error before any model loads."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..prompts import Prompt, check_formats, read_prompts
from ..runner import warn


def analysable_prompts(path: str, chat_template: bool, announce: bool = True) -> list[Prompt]:
    """The non-empty prompts of the file ``path``, once their format fits the flags; with ``announce``, one
    warning names the empty ones."""
    prompts = read_prompts(path)
    check_formats(prompts, chat_template=chat_template)
    empty = [prompt for prompt in prompts if prompt.is_empty]
    if empty and announce:
        named = ", ".join(f"{prompt.id!r} (line {prompt.line})" for prompt in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        warn(f"prompt {named} is empty; skipped." if len(empty) == 1 else f"prompts {named}{more} are empty; skipped.")
    kept = [prompt for prompt in prompts if not prompt.is_empty]
    if not kept:
        raise InputError(f"no prompt of {path} can be analysed (all empty).")
    return kept


def check_alpha(value: float, flag: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{flag} must be a finite number ≥ 0, got {value:g}.")


def check_html(path: str, *other_files: str) -> None:
    """--html: a file in an existing folder, and none of the files the command reads or writes besides."""
    from ..views import check_html_path

    check_html_path(path)
    for other in other_files:
        if Path(path).resolve() == Path(other).resolve():
            raise InputError(f"--html {path} is also {other}; pass another file name for the page.")


def check_out(out: str | None, prompt_files: Sequence[str]) -> None:
    for prompt_file in prompt_files:
        if out is not None and Path(out).resolve() == Path(prompt_file).resolve():
            raise InputError(f"--out {out} is the prompt file {prompt_file}; pass another --out for the rows.")


def check_output_file(path: str, flag: str) -> None:
    """A file written once the work is done: refused now if it cannot be, not after the model has run."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path} is a folder; pass a file name.")
    if not target.parent.is_dir():
        raise InputError(f"{flag} {path}: the folder {target.parent} does not exist.")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise InputError(f"{flag} {path} is not writable; pass another {flag}.")
