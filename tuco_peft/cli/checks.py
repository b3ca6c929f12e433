"""Checks of the command line's input files and values, each a one-line error before any model loads."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..apps.runner import warn
from ..errors import InputError
from ..io.prompts import Prompt, check_formats, read_prompts


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


def check_cache_dir(path: str | None) -> None:
    """--cache-dir: a folder that exists or can be made, and written to (the demo pair is built there)."""
    if path is None:
        return
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--cache-dir {path} is a file; pass a folder for the demo pair.")
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--cache-dir {path} cannot be written ({existing} is not a writable folder); pass another.")
