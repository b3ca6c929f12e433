"""Rows of an analysis: one JSON line per prompt, written as computed, resumable, and summarised.

Each row records what produced it: ``settings`` (where each checkpoint was, the dtype, how prompts were
formatted) and ``fingerprint`` (the command, and the content of each checkpoint and of the tokenizer, see
``fingerprint``). A results file holds the rows of one computation: a rerun that would compute rows another
way is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .prompts import Prompt, PromptId

if TYPE_CHECKING:
    import torch

    from .decomposition import Decomposition

Row = dict[str, Any]
Settings = dict[str, Any]
Fingerprint = dict[str, str]
REQUIRED_FIELDS = ("id", "prompt", "tuco", "ptc_l1", "settings")
_LOCATIONS = ("base", "adapter", "model", "base_model")  # settings that the fingerprint replaces by content


def result_key(set_name: str | None, prompt_id: PromptId) -> str:
    """What identifies a row across runs: its prompt set (``compare``) and its prompt id."""
    return json.dumps([set_name, prompt_id])


def row_key(row: Row) -> str:
    return result_key(row.get("set"), row["id"])


def _json_line(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def _parse_row(line: bytes) -> Row | None:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(row, dict) or any(field not in row for field in REQUIRED_FIELDS):
        return None
    return row


def _write_atomically(path: Path, rows: Iterable[Row]) -> None:
    """Replace ``path`` by ``rows`` in one rename, so that an interruption leaves one file or the other whole."""
    staging = path.with_name(path.name + ".writing")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(_json_line(row) for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def decomposition_rows(
    decomposition: Decomposition,
    prompts: Sequence[Prompt],
    n_tokens: Sequence[int],
    attention_mask: torch.Tensor,
) -> list[Row]:
    """One row per prompt: TuCo, per-layer ‖PTC_l‖₁ and ‖FTC_l‖₁ and the cumulative TuCo, at the last token.

    With ``positions="all"`` the row also gets ``token_tuco``, the TuCo at every token of the prompt.
    """
    import torch

    from .decomposition import Decomposition
    from .inputs import last_real_index

    per_position = decomposition.positions.ndim == 2
    if per_position:
        last = last_real_index(attention_mask.to(decomposition.ptc.device))
        prompt_index = torch.arange(len(last), device=last.device)
        at_last = Decomposition(
            ptc=decomposition.ptc[prompt_index, :, last],
            ftc=decomposition.ftc[prompt_index, :, last],
            x0=decomposition.x0[prompt_index, last],
            xL=decomposition.xL[prompt_index, last],
            positions=last,
        )
        token_tuco = decomposition.tuco
    else:
        at_last = decomposition
    ptc_norm, ftc_norm = at_last.layer_norms()
    cumulative = at_last.cumulative_tuco()
    tuco = at_last.tuco.tolist()
    rows = []
    for b, prompt in enumerate(prompts):
        row = {
            "id": prompt.id,
            "prompt": prompt.as_json(),
            "n_tokens": n_tokens[b],
            "tuco": tuco[b],
            "ptc_l1": ptc_norm[b].tolist(),
            "ftc_l1": ftc_norm[b].tolist(),
            "cumulative_tuco": cumulative[b].tolist(),
        }
        if per_position:
            real = attention_mask[b].bool().to(decomposition.ptc.device)
            row["token_tuco"] = token_tuco[b][real].tolist()
        rows.append(row)
    return rows


class ResultsFile:
    """A JSONL file of rows that a rerun extends instead of repeating.

    Each row is flushed as soon as it is written, so an interrupted run keeps every finished row; a last
    line cut short by the interruption is dropped when the file is reopened. Any other line that is not a
    row, or repeats one, is an error that names it; with ``repair`` such lines are dropped instead (listed
    in ``dropped_lines``), every good row is kept, and what was dropped is computed again.

    Opening may rewrite the file, so only the holder of its lock opens it (see ``locking``).
    """

    def __init__(self, path: str | Path, *, repair: bool = False):
        self.path = Path(path)
        self.dropped_lines: list[int] = []
        self.rows: list[Row] = self._load(repair)
        self._by_key = {row_key(row): row for row in self.rows}

    def _load(self, repair: bool) -> list[Row]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise InputError(f"--out {self.path} is not a file; pass a file for the rows.")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        rows: list[Row] = []
        first_line_of: dict[str, int] = {}
        problems: list[tuple[int, str]] = []
        for number, line in enumerate(complete, start=1):
            row = _parse_row(line)
            if row is None:
                problems.append((number, "is not a tuco-peft result row"))
            elif row_key(row) in first_line_of:
                problems.append((number, f"repeats the row of line {first_line_of[row_key(row)]} (id {row['id']!r})"))
            else:
                first_line_of[row_key(row)] = number
                rows.append(row)
        if problems and not rows:
            raise InputError(
                f"{self.path}:{problems[0][0]} is not a tuco-peft result row, and the file holds none; pass another "
                "--out."
            )
        if problems and not repair:
            number, problem = problems[0]
            more = f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else ""
            raise InputError(
                f"{self.path}:{number} {problem}{more}; rerun with --repair to keep its {len(rows)} good rows and "
                "compute the rest again."
            )
        if problems:
            _write_atomically(self.path, rows)
            self.dropped_lines = [number for number, _ in problems]
        elif tail:  # a row whose write was interrupted: drop it so that it is computed again
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data) - len(tail))
        return rows

    def check_made_like(self, settings: Settings, fingerprint: Fingerprint) -> None:
        """Refuse a file whose rows were computed otherwise than with ``settings`` and ``fingerprint``: by
        another command, from other checkpoint or tokenizer content, or with other settings.

        Checkpoints are compared by content alone, so a folder that moved still resumes.
        """
        expected = {**settings, **fingerprint}
        for row in self.rows:
            if "fingerprint" not in row:
                raise InputError(
                    f"{self.path} holds rows of an earlier tuco-peft, which do not record their checkpoints' "
                    "content; pass a new --out to start a new file."
                )
            found = {**row["settings"], **row["fingerprint"]}
            if found == expected:
                continue
            if found.get("command") != expected["command"]:
                raise InputError(
                    f"{self.path} holds rows of tuco-peft {found.get('command')}, not of {expected['command']}; "
                    "pass another --out."
                )
            changed = sorted(key for key in {*found, *expected} if found.get(key) != expected.get(key))
            names = [f"{key} files" if key in fingerprint or key in row["fingerprint"] else key for key in changed]
            raise InputError(
                f"{self.path} has rows computed with other settings ({', '.join(names)} differ); rerun with the "
                "settings and files they were computed with, or pass a new --out to start a new file."
            )

    def done(self, set_name: str | None, prompt: Prompt) -> bool:
        """Whether ``prompt`` already has its row; a stored row for the same id but another prompt is an error."""
        row = self._by_key.get(result_key(set_name, prompt.id))
        if row is None:
            return False
        if row["prompt"] != prompt.as_json():
            raise InputError(
                f"{self.path} already has a row for id {prompt.id!r} with another prompt, so it belongs to another "
                "prompt file; pass another --out."
            )
        return True

    def has_row(self, row: Row) -> bool:
        """Whether a row for the same prompt set and id is already stored."""
        return row_key(row) in self._by_key

    def append(self, rows: Iterable[Row]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(_json_line(row))
                self.rows.append(row)
                self._by_key[row_key(row)] = row
            handle.flush()
            os.fsync(handle.fileno())

    def sort_by(self, keys: Sequence[str]) -> None:
        """Rewrite the file with the rows of ``keys`` in that order, after any other rows (kept as they were)."""
        if not self.path.exists():
            return
        rank = {key: index for index, key in enumerate(keys)}
        others = [row for row in self.rows if row_key(row) not in rank]
        ordered = sorted((row for row in self.rows if row_key(row) in rank), key=lambda row: rank[row_key(row)])
        self.rows = [*others, *ordered]
        _write_atomically(self.path, self.rows)


def rows_for(rows: Iterable[Row], prompts: Sequence[Prompt], set_name: str | None = None) -> list[Row]:
    """The row of each of ``prompts`` (in prompt set ``set_name``) that has one, in the prompts' order."""
    by_key = {row_key(row): row for row in rows}
    keys = (result_key(set_name, prompt.id) for prompt in prompts)
    return [by_key[key] for key in keys if key in by_key]


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the ROC-AUC."""
    if not positive or not negative:
        raise InputError("ROC-AUC needs at least one prompt in each set.")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def mean_per_layer(rows: Sequence[Row], field: str) -> list[float]:
    """The mean over ``rows`` of a per-layer field (``ptc_l1``, ``ftc_l1``, ``cumulative_tuco``), layer by layer."""
    return [statistics.fmean(values) for values in zip(*(row[field] for row in rows))]


def summary_table(rows: Sequence[Row]) -> str:
    """Count, mean and median TuCo, then the mean per-layer norms and cumulative TuCo."""
    values = [row["tuco"] for row in rows]
    lines = [
        f"prompts: {len(values)}   TuCo mean {statistics.fmean(values):.4f}   median {statistics.median(values):.4f}"
    ]
    lines.append(f"{'layer':>5}  {'mean |PTC|_1':>13}  {'mean |FTC|_1':>13}  {'cumulative TuCo':>15}")
    columns = (mean_per_layer(rows, field) for field in ("ptc_l1", "ftc_l1", "cumulative_tuco"))
    for layer, (ptc, ftc, share) in enumerate(zip(*columns)):
        lines.append(f"{layer:>5}  {ptc:>13.4f}  {ftc:>13.4f}  {share:>15.4f}")
    return "\n".join(lines)
