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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .prompts import Prompt, PromptId

if TYPE_CHECKING:
    import torch

    from .decomposition import Decomposition, DecompositionSums

Settings = dict[str, Any]
Fingerprint = dict[str, str]


@dataclass(frozen=True)
class ResultRow:
    """One prompt's analysis: TuCo, and per block ‖PTC_l‖₁, ‖FTC_l‖₁ and the cumulative TuCo at its last token.

    ``set`` names the prompt set of ``compare``; ``token_tuco`` is the TuCo at every token (``positions="all"``);
    ``settings`` and ``fingerprint`` record how it was computed. On disk it is one JSON object whose keys are
    these fields (those that are ``None`` left out) and any ``extra`` keys it was read with, kept as they were.
    """

    id: PromptId
    prompt: str | list[dict[str, str]]
    tuco: float
    ptc_l1: list[float]
    n_tokens: int | None = None
    ftc_l1: list[float] | None = None
    cumulative_tuco: list[float] | None = None
    token_tuco: list[float] | None = None
    set: str | None = None
    settings: Settings | None = None
    fingerprint: Fingerprint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEY_ORDER = ("set", "id", "prompt", "n_tokens", "tuco", "ptc_l1", "ftc_l1", "cumulative_tuco", "token_tuco")

    @property
    def key(self) -> str:
        return result_key(self.set, self.id)

    def to_json(self) -> dict[str, Any]:
        """The row as written: the keys in the order earlier files have them, ``None`` fields left out."""
        values = {name: value for name, value in asdict(self).items() if name != "extra" and value is not None}
        ordered = {name: values.pop(name) for name in self._KEY_ORDER if name in values}
        return {**ordered, **values, **self.extra}

    @classmethod
    def from_json(cls, record: Any) -> ResultRow | None:
        """The row of a JSON value, or None when it is not one (a required field missing, or not an object)."""
        names = {row_field.name for row_field in fields(cls)} - {"extra"}
        if not isinstance(record, dict) or any(name not in record for name in REQUIRED_FIELDS):
            return None
        known = {name: value for name, value in record.items() if name in names}
        return cls(**known, extra={name: value for name, value in record.items() if name not in names})

    def made_with(self, provenance: dict[str, Any], set_name: str | None = None) -> ResultRow:
        """The same row in prompt set ``set_name``, recording the settings and fingerprint it was computed with."""
        return replace(self, set=set_name, **provenance)


REQUIRED_FIELDS = ("id", "prompt", "tuco", "ptc_l1", "settings")


def result_key(set_name: str | None, prompt_id: PromptId) -> str:
    """What identifies a row across runs: its prompt set (``compare``) and its prompt id."""
    return json.dumps([set_name, prompt_id])


def _json_line(row: ResultRow) -> str:
    return json.dumps(row.to_json(), ensure_ascii=False) + "\n"


def _parse_row(line: bytes) -> ResultRow | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return ResultRow.from_json(record)


def _write_atomically(path: Path, rows: Iterable[ResultRow]) -> None:
    """Replace ``path`` by ``rows`` in one rename, so that an interruption leaves one file or the other whole."""
    staging = path.with_name(path.name + ".writing")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(_json_line(row) for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def decomposition_rows(
    decomposition: Decomposition | DecompositionSums,
    prompts: Sequence[Prompt],
    n_tokens: Sequence[int],
    attention_mask: torch.Tensor,
) -> list[ResultRow]:
    """One row per prompt: TuCo, per-layer ‖PTC_l‖₁ and ‖FTC_l‖₁ and the cumulative TuCo, at the last token.

    With ``positions="all"`` the row also gets ``token_tuco``, the TuCo at every token of the prompt.
    """
    from .inputs import last_real_index

    per_position = decomposition.positions.ndim == 2
    if per_position:
        at_last = decomposition.at(last_real_index(attention_mask.to(decomposition.x0.device)))
        token_tuco = decomposition.tuco
    else:
        at_last = decomposition
    ptc_norm, ftc_norm = at_last.layer_norms()
    cumulative = at_last.cumulative_tuco()
    tuco = at_last.tuco.tolist()
    return [
        ResultRow(
            id=prompt.id,
            prompt=prompt.as_json(),
            n_tokens=n_tokens[b],
            tuco=tuco[b],
            ptc_l1=ptc_norm[b].tolist(),
            ftc_l1=ftc_norm[b].tolist(),
            cumulative_tuco=cumulative[b].tolist(),
            token_tuco=token_tuco[b][attention_mask[b].bool().to(token_tuco.device)].tolist() if per_position else None,
        )
        for b, prompt in enumerate(prompts)
    ]


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
        self.rows: list[ResultRow] = self._load(repair)
        self._by_key = {row.key: row for row in self.rows}

    def _load(self, repair: bool) -> list[ResultRow]:
        if not self.path.exists():
            return []
        if not self.path.is_file():
            raise InputError(f"--out {self.path} is not a file; pass a file for the rows.")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        rows: list[ResultRow] = []
        first_line_of: dict[str, int] = {}
        problems: list[tuple[int, str]] = []
        for number, line in enumerate(complete, start=1):
            row = _parse_row(line)
            if row is None:
                problems.append((number, "is not a tuco-peft result row"))
            elif row.key in first_line_of:
                problems.append((number, f"repeats the row of line {first_line_of[row.key]} (id {row.id!r})"))
            else:
                first_line_of[row.key] = number
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
            if row.fingerprint is None:
                raise InputError(
                    f"{self.path} holds rows of an earlier tuco-peft, which do not record their checkpoints' "
                    "content; pass a new --out to start a new file."
                )
            found = {**row.settings, **row.fingerprint}
            if found == expected:
                continue
            if found.get("command") != expected["command"]:
                raise InputError(
                    f"{self.path} holds rows of tuco-peft {found.get('command')}, not of {expected['command']}; "
                    "pass another --out."
                )
            changed = sorted(key for key in {*found, *expected} if found.get(key) != expected.get(key))
            names = [f"{key} files" if key in fingerprint or key in row.fingerprint else key for key in changed]
            raise InputError(
                f"{self.path} has rows computed with other settings ({', '.join(names)} differ); rerun with the "
                "settings and files they were computed with, or pass a new --out to start a new file."
            )

    def done(self, set_name: str | None, prompt: Prompt) -> bool:
        """Whether ``prompt`` already has its row; a stored row for the same id but another prompt is an error."""
        row = self._by_key.get(result_key(set_name, prompt.id))
        if row is None:
            return False
        if row.prompt != prompt.as_json():
            raise InputError(
                f"{self.path} already has a row for id {prompt.id!r} with another prompt, so it belongs to another "
                "prompt file; pass another --out."
            )
        return True

    def has_row(self, row: ResultRow) -> bool:
        """Whether a row for the same prompt set and id is already stored."""
        return row.key in self._by_key

    def append(self, rows: Iterable[ResultRow]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(_json_line(row))
                self.rows.append(row)
                self._by_key[row.key] = row
            handle.flush()
            os.fsync(handle.fileno())

    def sort_by(self, keys: Sequence[str]) -> None:
        """Rewrite the file with the rows of ``keys`` in that order, after any other rows (kept as they were)."""
        if not self.path.exists():
            return
        rank = {key: index for index, key in enumerate(keys)}
        others = [row for row in self.rows if row.key not in rank]
        ordered = sorted((row for row in self.rows if row.key in rank), key=lambda row: rank[row.key])
        if [*others, *ordered] != self.rows:  # in order already: the file is left as it is
            self.rows = [*others, *ordered]
            _write_atomically(self.path, self.rows)


def prompt_keys(prompts: Sequence[Prompt], set_name: str | None = None) -> list[str]:
    """The row key of each prompt (in prompt set ``set_name``), in the prompts' order."""
    return [result_key(set_name, prompt.id) for prompt in prompts]


def rows_for(rows: Iterable[ResultRow], prompts: Sequence[Prompt], set_name: str | None = None) -> list[ResultRow]:
    """The row of each of ``prompts`` (in prompt set ``set_name``) that has one, in the prompts' order."""
    by_key = {row.key: row for row in rows}
    return [by_key[key] for key in prompt_keys(prompts, set_name) if key in by_key]


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the ROC-AUC."""
    if not positive or not negative:
        raise InputError("ROC-AUC needs at least one prompt in each set.")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def mean_per_layer(rows: Sequence[ResultRow], name: str) -> list[float]:
    """The mean over ``rows`` of a per-layer field (``ptc_l1``, ``ftc_l1``, ``cumulative_tuco``), layer by layer."""
    return [statistics.fmean(values) for values in zip(*(getattr(row, name) for row in rows))]


def summary_table(rows: Sequence[ResultRow]) -> str:
    """Count, mean and median TuCo, then the mean per-layer norms and cumulative TuCo."""
    values = [row.tuco for row in rows]
    lines = [
        f"prompts: {len(values)}   TuCo mean {statistics.fmean(values):.4f}   median {statistics.median(values):.4f}"
    ]
    lines.append(f"{'layer':>5}  {'mean |PTC|_1':>13}  {'mean |FTC|_1':>13}  {'cumulative TuCo':>15}")
    columns = (mean_per_layer(rows, field) for field in ("ptc_l1", "ftc_l1", "cumulative_tuco"))
    for layer, (ptc, ftc, share) in enumerate(zip(*columns)):
        lines.append(f"{layer:>5}  {ptc:>13.4f}  {ftc:>13.4f}  {share:>15.4f}")
    return "\n".join(lines)
