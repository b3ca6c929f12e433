"""Rows of an analysis: one JSON line per prompt, written as computed, resumable, and summarised."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .decomposition import Decomposition
from .errors import InputError
from .inputs import last_real_index
from .prompts import Prompt, PromptId

Row = dict[str, Any]
Settings = dict[str, Any]
REQUIRED_FIELDS = ("id", "prompt", "tuco", "ptc_l1", "settings")


def result_key(set_name: str | None, prompt_id: PromptId) -> str:
    """What identifies a row across runs: its prompt set (``compare``) and its prompt id."""
    return json.dumps([set_name, prompt_id])


def row_key(row: Row) -> str:
    return result_key(row.get("set"), row["id"])


def _json_line(row: Row) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def decomposition_rows(
    decomposition: Decomposition,
    prompts: Sequence[Prompt],
    n_tokens: Sequence[int],
    attention_mask: torch.Tensor,
) -> list[Row]:
    """One row per prompt: TuCo, per-layer ‖PTC_l‖₁ and ‖FTC_l‖₁ and the cumulative TuCo, at the last token.

    With ``positions="all"`` the row also gets ``token_tuco``, the TuCo at every token of the prompt.
    """
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

    Each row is flushed as soon as it is written, so an interrupted run keeps every finished row. A last
    line cut short by the interruption is dropped when the file is reopened.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[Row] = self._load()
        self._by_key = {row_key(row): row for row in self.rows}

    def _load(self) -> list[Row]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise InputError(f"--out {self.path} is not a file.")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        rows = []
        for number, line in enumerate(complete, start=1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or any(field not in row for field in REQUIRED_FIELDS):
                raise InputError(
                    f"{self.path}:{number} is not a tuco-peft result row; pass another --out, or delete the file "
                    "to start over."
                )
            rows.append(row)
        if tail:  # a row whose write was interrupted: drop it so that it is computed again
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data) - len(tail))
        return rows

    def done(self, set_name: str | None, prompt: Prompt, settings: Settings) -> bool:
        """Whether ``prompt`` already has its row, computed with the same ``settings`` (model, formatting,
        positions); a stored row for the same id but another prompt or other settings is an error."""
        row = self._by_key.get(result_key(set_name, prompt.id))
        if row is None:
            return False
        if row["prompt"] != prompt.as_json():
            raise InputError(
                f"{self.path} already has a row for id {prompt.id!r} with another prompt, so it belongs to another "
                "prompt file; pass another --out, or delete the file to start over."
            )
        if row["settings"] != settings:
            changed = sorted(
                key for key in {*settings, *row["settings"]} if settings.get(key) != row["settings"].get(key)
            )
            raise InputError(
                f"{self.path} has rows computed with other settings ({', '.join(changed)} differ); pass another "
                "--out, rerun with the same settings, or delete the file to start over."
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
        """Rewrite the file with the rows of ``keys`` in that order, after any other rows (kept as they were).

        The new file replaces the old one in one rename, so an interruption leaves one or the other whole.
        """
        if not self.path.exists():
            return
        rank = {key: index for index, key in enumerate(keys)}
        others = [row for row in self.rows if row_key(row) not in rank]
        ordered = sorted((row for row in self.rows if row_key(row) in rank), key=lambda row: rank[row_key(row)])
        staging = self.path.with_name(self.path.name + ".sorting")
        with open(staging, "w", encoding="utf-8") as handle:
            handle.writelines(_json_line(row) for row in [*others, *ordered])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.path)
        self.rows = [*others, *ordered]


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
