"""Rows of an analysis: one JSON line per prompt, written as computed, resumable, and summarised.

Each row records what produced it: ``settings`` (where each checkpoint was, the dtype, how prompts were
formatted) and ``fingerprint`` (the command, and the content of each checkpoint and of the tokenizer, see
``fingerprint``). A results file holds the rows of one computation: a rerun that would compute rows another
way is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from .adapter_series import AdapterCheckpoint
from .locking import write_text_atomically
from .prompts import EncodedPrompt, Prompt, PromptId, PromptJson

Settings = dict[str, Any]
Fingerprint = dict[str, str]
Provenance = dict[str, Any]  # {"settings": Settings, "fingerprint": Fingerprint}: what a row records of its making


@dataclass(frozen=True)
class ResultRow:
    """One prompt's analysis: TuCo, and per block ‖PTC_l‖₁, ‖FTC_l‖₁ and the cumulative TuCo at its last token.

    ``prompt`` is the prompt as the prompt file gives it, except for a prompt cut to fit the context: then it
    is the text analysed (its last ``n_tokens`` tokens, decoded), and ``prompt_chars`` and ``prompt_sha256``
    (``prompt_length``, ``prompt_digest``) stand for the whole prompt, so that a huge prompt does not make a
    huge row, yet a rerun still tells whether the row is its prompt's. ``set`` names the prompt set of
    ``compare``; ``adapter`` names the adapter of a run over several (``find_adapters``' name), and ``step`` and
    ``train_loss`` place a training checkpoint in its run; ``token_tuco`` is the TuCo at every token (``positions="all"``); ``settings`` and
    ``fingerprint`` record how it was computed. On disk it is one JSON object whose keys are these fields
    (those that are ``None`` left out) and any ``extra`` keys it was read with, kept as they were.
    """

    id: PromptId
    prompt: PromptJson
    tuco: float
    ptc_l1: list[float]
    prompt_chars: int | None = None
    prompt_sha256: str | None = None
    n_tokens: int | None = None
    ftc_l1: list[float] | None = None
    cumulative_tuco: list[float] | None = None
    token_tuco: list[float] | None = None
    set: str | None = None
    adapter: str | None = None
    step: int | None = None
    train_loss: float | None = None
    settings: Settings | None = None
    fingerprint: Fingerprint | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEY_ORDER = (
        "set",
        "adapter",
        "step",
        "train_loss",
        "id",
        "prompt",
        "prompt_chars",
        "prompt_sha256",
        "n_tokens",
        "tuco",
        "ptc_l1",
        "ftc_l1",
        "cumulative_tuco",
        "token_tuco",
    )

    @property
    def key(self) -> str:
        return result_key(self.set, self.id, self.adapter)

    @property
    def prompt_key(self) -> str:
        """The key of its prompt: its set and id, whichever adapter the row is of."""
        return result_key(self.set, self.id)

    def to_json(self) -> dict[str, Any]:
        """The row as written: the keys in the order earlier files have them, ``None`` fields left out."""
        values = {name: value for name, value in asdict(self).items() if name != "extra" and value is not None}
        ordered = {name: values.pop(name) for name in self._KEY_ORDER if name in values}
        return {**ordered, **values, **self.extra}

    @classmethod
    def from_json(cls, record: Any) -> ResultRow | None:
        """The row of a JSON value, or None when it is not one (a required field missing, or not an object, or
        the whole prompt's length without its digest or the other way round)."""
        names = {row_field.name for row_field in fields(cls)} - {"extra"}
        if not isinstance(record, dict) or any(record.get(name) is None for name in REQUIRED_FIELDS):
            return None
        if (record.get("prompt_chars") is None) != (record.get("prompt_sha256") is None):
            return None
        if not all(_has_its_type(name, record.get(name)) for name in names):
            return None
        known = {name: value for name, value in record.items() if name in names}
        return cls(**known, extra={name: value for name, value in record.items() if name not in names})

    def is_row_of(self, prompt: PromptJson) -> bool:
        """Whether this row was computed from ``prompt``: by the prompt it holds, or by the length and digest
        of the whole prompt when it holds only the text analysed."""
        if self.prompt_sha256 is None:
            return self.prompt == prompt
        return self.prompt_chars == prompt_length(prompt) and self.prompt_sha256 == prompt_digest(prompt)

    def made_with(
        self, provenance: Provenance, set_name: str | None = None, adapter: AdapterCheckpoint | None = None
    ) -> ResultRow:
        """The same row in prompt set ``set_name``, of ``adapter`` in a run over several, recording the settings
        and fingerprint it was computed with."""
        if adapter is None:
            return replace(self, set=set_name, **provenance)
        return replace(
            self, set=set_name, adapter=adapter.name, step=adapter.step, train_loss=adapter.train_loss, **provenance
        )


REQUIRED_FIELDS = ("id", "prompt", "tuco", "ptc_l1", "settings")
_NUMBER_LISTS = ("ptc_l1", "ftc_l1", "cumulative_tuco", "token_tuco")
# Each field's classes for isinstance, as type[Any]: a value that passes is then used as the JSON it is.
_FIELD_TYPES: dict[str, type[Any] | tuple[type[Any], ...]] = {"id": (int, str), "prompt": (str, list)}
_FIELD_TYPES.update({"tuco": (int, float), "n_tokens": int, "set": str, "adapter": str, "step": int})
_FIELD_TYPES.update({"train_loss": (int, float)})
_FIELD_TYPES.update({"prompt_chars": int, "prompt_sha256": str, "settings": dict, "fingerprint": dict})
_FIELD_TYPES.update(dict.fromkeys(_NUMBER_LISTS, list))


def _has_its_type(name: str, value: Any) -> bool:
    """Whether a row's field holds what tuco-peft writes there (None: left out), so that an edited row that
    is still JSON is not taken for a row and read later as numbers it does not hold."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, _FIELD_TYPES[name]):
        return False
    if name in _NUMBER_LISTS:
        return all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)
    return True


def prompt_length(prompt: PromptJson) -> int:
    """A prompt's length in characters: its text's, or the sum of its messages' contents' (what its author
    wrote, whatever a chat template adds)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(message["content"]) for message in prompt)


def prompt_digest(prompt: PromptJson) -> str:
    """The SHA-256 of a prompt as a row would store it whole, in canonical JSON (sorted keys, no spaces, ASCII
    escapes): what ties a row that keeps only the text analysed to its prompt."""
    canonical = json.dumps(prompt, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def result_key(set_name: str | None, prompt_id: PromptId, adapter: str | None = None) -> str:
    """What identifies a row across runs: its prompt set (``compare``), its prompt id and, in a run over several
    adapters, its adapter."""
    return json.dumps([set_name, prompt_id] if adapter is None else [set_name, prompt_id, adapter])


def _json_line(row: ResultRow) -> str:
    return json.dumps(row.to_json(), ensure_ascii=False) + "\n"


def _parse_row(line: bytes) -> ResultRow | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return ResultRow.from_json(record)


@dataclass(frozen=True)
class ParsedLines:
    """A results file's lines: its rows (line number, row), the lines that are not rows or repeat one (line
    number, why), and a last line cut short by an interrupted write (``cut``, empty when there is none;
    ``unended_row`` when the last line is a whole row whose newline is missing)."""

    rows: list[tuple[int, ResultRow]]
    problems: list[tuple[int, str]]
    cut: bytes
    unended_row: bool


def parse_lines(data: bytes) -> ParsedLines:
    """The rows and problems of a results file's bytes (``ParsedLines``)."""
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    unended_row = bool(tail) and _parse_row(tail) is not None
    if unended_row:
        complete, tail = lines, b""
    rows: list[tuple[int, ResultRow]] = []
    problems: list[tuple[int, str]] = []
    line_of: dict[str, int] = {}
    for number, line in enumerate(complete, start=1):
        row = _parse_row(line)
        if row is None:
            problems.append((number, "is not a tuco-peft result row"))
        elif row.key in line_of:
            problems.append((number, f"repeats the row of line {line_of[row.key]} (id {row.id!r})"))
        else:
            line_of[row.key] = number
            rows.append((number, row))
    return ParsedLines(rows, problems, tail, unended_row)


def _write_atomically(path: Path, rows: Iterable[ResultRow]) -> None:
    """Replace ``path`` by ``rows`` in one rename, so that an interruption leaves one file or the other whole."""
    write_text_atomically(path, "".join(_json_line(row) for row in rows))


def stored_prompt(tokens: EncodedPrompt, decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """The prompt fields of a row: the whole prompt, or for a prompt cut to fit the context the text analysed
    and the whole prompt's length and digest (see ``ResultRow``)."""
    whole = tokens.prompt.as_json()
    if not tokens.was_cut:
        return {"prompt": whole}
    return {"prompt": decode(tokens.ids), "prompt_chars": prompt_length(whole), "prompt_sha256": prompt_digest(whole)}


class ResultsFile:
    """A JSONL file of rows that a rerun extends instead of repeating.

    Each row is flushed as soon as it is written, so an interrupted run keeps every finished row; a last
    line cut short by the interruption is dropped when the file is next written. Any other line that is
    not a row, or repeats one, and any row whose prompt is not the prompt of its id in the prompt file
    (``check_prompts``), is an error that names it; with ``repair`` such lines are dropped instead (listed
    in ``dropped``), every good row is kept, and what was dropped is computed again.

    A file that holds no row at all was not written by tuco-peft: it is refused, unless ``force``, which
    starts it anew. Opening reads only: every change waits for ``settle`` (or the first ``append``), which
    the caller makes once every check has passed, so that a refused run leaves the file as it was. Only
    the holder of the file's lock settles it (see ``locking``).
    """

    def __init__(self, path: str | Path, *, repair: bool = False, force: bool = False):
        self.path = Path(path)
        self.repair = repair
        self.dropped: list[tuple[int, str]] = []  # (line, why), with repair
        self.rows: list[ResultRow] = []
        self._by_key: dict[str, ResultRow] = {}
        self._line_of: dict[str, int] = {}
        self._taken_in: list[ResultRow] = []  # rows of other files, appended when settled
        self._settled_size: int | None = None  # the file's length once settled, when it differs from now
        self._rewrite = False
        self._end_last_line = False
        self._load(force)

    def _load(self, force: bool) -> None:
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise InputError(f"--out {self.path} is not a file; pass a file for the rows.")
        data = self.path.read_bytes()
        lines = parse_lines(data)
        self._end_last_line = lines.unended_row
        for number, row in lines.rows:
            self._keep(row, number)
        problems, tail = lines.problems, lines.cut
        if not self.rows and (problems or tail):
            if not force:
                raise InputError(
                    f"{self.path}:{problems[0][0] if problems else 1} is not a tuco-peft result row, and the file "
                    "holds none, so tuco-peft did not write it; pass another --out, or --force to overwrite it."
                )
            self._settled_size, self._end_last_line = 0, False
            return
        if problems and not self.repair:
            number, problem = problems[0]
            more = f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else ""
            raise InputError(
                f"{self.path}:{number} {problem}{more}; rerun with --repair to keep its {len(self.rows)} good rows "
                "and compute the rest again."
            )
        self.dropped = problems
        self._rewrite = bool(problems)
        if tail:  # a row whose write was interrupted: dropped, so that it is computed again
            self._settled_size = len(data) - len(tail)

    def _keep(self, row: ResultRow, line: int) -> None:
        self.rows.append(row)
        self._by_key[row.key] = row
        self._line_of[row.key] = line

    def take_in(self, rows: Iterable[ResultRow]) -> None:
        """Add the rows of another file (a data-parallel run's part) that this one lacks; written when settled."""
        for row in rows:
            if row.key not in self._by_key:
                self._keep(row, 0)
                self._taken_in.append(row)

    def check_made_like(self, expected: Mapping[str | None, Provenance]) -> None:
        """Refuse a file whose rows were computed otherwise than this run would: by another command, from other
        checkpoint or tokenizer content, or with other settings. ``expected`` is the provenance of each adapter
        of a run over several, by name, or ``{None: provenance}`` for one fine-tune.

        Checkpoints are compared by content alone, so a folder that moved still resumes. The rows of an adapter
        this run leaves out are kept, if they were computed like this run's rows in all but their adapter.
        """
        several = None not in expected
        for row in self.rows:
            if row.fingerprint is None:
                raise InputError(
                    f"{self.path} holds rows of an earlier tuco-peft, which do not record their checkpoints' "
                    "content; pass a new --out to start a new file."
                )
            if (row.adapter is not None) != several:
                held, given = ("several adapters", "one") if row.adapter is not None else ("one adapter", "several")
                raise InputError(
                    f"{self.path} holds the rows of a run over {held}, and this run is over {given}; pass another "
                    "--out."
                )
            assert row.settings is not None, "settings is a required field of a stored row"
            own = expected.get(row.adapter)
            other_adapter = own is None
            if own is None:
                own = next(iter(expected.values()))
            wanted = {**own["settings"], **own["fingerprint"]}
            found = {**row.settings, **row.fingerprint}
            if other_adapter:  # its adapter is its own; all else must be this run's
                found["adapter"] = wanted["adapter"] = row.fingerprint.get("adapter")
            if found == wanted:
                continue
            if found.get("command") != wanted["command"]:
                raise InputError(
                    f"{self.path} holds rows of tuco-peft {found.get('command')}, not of {wanted['command']}; "
                    "pass another --out."
                )
            changed = sorted(key for key in {*found, *wanted} if found.get(key) != wanted.get(key))
            names = [f"{key} files" if key in own["fingerprint"] or key in row.fingerprint else key for key in changed]
            raise InputError(
                f"{self.path} has rows computed with other settings ({', '.join(names)} differ); rerun with the "
                "settings and files they were computed with, or pass a new --out to start a new file."
            )

    def check_prompts(self, prompts: Mapping[str, PromptJson]) -> None:
        """Refuse rows that are not of ``prompts[key]``, keyed by ``prompt_key`` (``ResultRow.is_row_of``: an
        edited row, or another prompt file's), whatever adapter they are of; with ``repair``, drop them instead
        (their prompts are computed again). Rows of other prompts are kept."""
        stale = [row for row in self.rows if row.prompt_key in prompts and not row.is_row_of(prompts[row.prompt_key])]
        if not stale:
            return
        if not self.repair:
            row = stale[0]
            if len(stale) == sum(row.prompt_key in prompts for row in self.rows):
                way_out = "so it belongs to another prompt file; pass another --out"
            else:
                way_out = f"(line {self._line_of[row.key]}); rerun with --repair to compute it again"
            raise InputError(f"{self.path} already has a row for id {row.id!r} with another prompt, {way_out}.")
        for row in stale:
            self.dropped.append((self._line_of[row.key], f"is a row of another prompt (id {row.id!r})"))
            del self._by_key[row.key]
        self.rows = [row for row in self.rows if row.key in self._by_key]
        self._taken_in = [row for row in self._taken_in if row.key in self._by_key]
        self._rewrite = True

    def settle(self) -> None:
        """Make the file hold exactly ``rows``: drop what ``repair`` or ``force`` dropped and a cut last line,
        end the last line, append the rows taken in. Call it once every check has passed."""
        if self._rewrite:
            _write_atomically(self.path, self.rows)
        elif self._settled_size is not None or self._end_last_line or self._taken_in:
            with open(self.path, "ab") as handle:  # appends, at the end left by the truncation
                if self._settled_size is not None:
                    handle.truncate(self._settled_size)
                if self._end_last_line:
                    handle.write(b"\n")
                handle.writelines(_json_line(row).encode() for row in self._taken_in)
                handle.flush()
                os.fsync(handle.fileno())
        self._rewrite, self._settled_size, self._end_last_line, self._taken_in = False, None, False, []

    def done(self, set_name: str | None, prompt: Prompt, adapter: str | None = None) -> bool:
        """Whether ``prompt`` (of ``adapter``) already has its row (``check_prompts`` has checked that it is its
        prompt's)."""
        return result_key(set_name, prompt.id, adapter) in self._by_key

    def has_row(self, row: ResultRow) -> bool:
        """Whether a row for the same prompt set and id is already stored."""
        return row.key in self._by_key

    def append(self, rows: Iterable[ResultRow]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.settle()
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(_json_line(row))
                self._keep(row, 0)
            handle.flush()
            os.fsync(handle.fileno())

    def sort_by(self, keys: Sequence[str]) -> None:
        """Rewrite the file with the rows of ``keys`` in that order, after any other rows (kept as they were)."""
        if not self.path.exists():
            return
        self.settle()
        rank = {key: index for index, key in enumerate(keys)}
        others = [row for row in self.rows if row.key not in rank]
        ordered = sorted((row for row in self.rows if row.key in rank), key=lambda row: rank[row.key])
        if [*others, *ordered] != self.rows:  # in order already: the file is left as it is
            self.rows = [*others, *ordered]
            _write_atomically(self.path, self.rows)


def prompt_keys(
    prompts: Sequence[Prompt], set_name: str | None = None, adapters: Sequence[str | None] = (None,)
) -> list[str]:
    """The row key of each prompt (in prompt set ``set_name``) for each of ``adapters``, adapter by adapter in
    the prompts' order."""
    return [result_key(set_name, prompt.id, adapter) for adapter in adapters for prompt in prompts]


def prompts_by_key(prompts: Sequence[Prompt], set_name: str | None = None) -> dict[str, PromptJson]:
    """Each prompt as its rows store it, by ``ResultRow.prompt_key`` (in prompt set ``set_name``)."""
    return {result_key(set_name, prompt.id): prompt.as_json() for prompt in prompts}


def rows_for(
    rows: Iterable[ResultRow],
    prompts: Sequence[Prompt],
    set_name: str | None = None,
    adapters: Sequence[str | None] = (None,),
) -> list[ResultRow]:
    """The row of each of ``prompts`` (in prompt set ``set_name``) that has one, in ``prompt_keys``' order."""
    by_key = {row.key: row for row in rows}
    return [by_key[key] for key in prompt_keys(prompts, set_name, adapters) if key in by_key]
