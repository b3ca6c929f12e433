"""Fuzzed prompt files and flag combinations of `analyze` and `compare` on the tiny checkpoints: whatever the
input, the exit status is 0 or 2, there is no traceback without --debug, a refused run (2) leaves every
file that existed before it exactly as it was, and any run leaves the prompt files and, without --force,
the files of the user's as they were."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tuco_peft.cli import main

_VALID = st.sampled_from(["the quick brown fox", "how can I help you today?", "", "   ", "a " * 100])
_LINE = st.one_of(
    _VALID,
    _VALID,
    st.text(max_size=30),
    st.builds(lambda text, ident: json.dumps({"id": ident, "prompt": text}), st.text(max_size=20), st.integers(0, 3)),
    st.builds(lambda text: json.dumps({"messages": [{"role": "user", "content": text}]}), st.text(max_size=20)),
    st.sampled_from(['{"id": true, "prompt": "x"}', "[1, 2]", '{"prompt": 3}', "{not json"]),
)
_GOOD_FILE = st.tuples(
    st.just("p.txt"), st.lists(st.sampled_from(["the quick brown fox", "a river"]), min_size=1, max_size=3)
)
_FUZZED_FILE = st.tuples(st.sampled_from(["p.txt", "p.jsonl", "p.csv"]), st.lists(_LINE, min_size=1, max_size=4))
_PROMPT_FILE = st.one_of(_GOOD_FILE, _GOOD_FILE, _FUZZED_FILE)
# Where an output may point: a new file, the prompt file, the results file, a file of the user's, a folder,
# a file in a missing folder, a row file of an earlier run of this test.
_TARGETS = ["new.png", "new.png", "p.txt", "rows.jsonl", "mine.png", "notes.txt", "folder", "missing/x.png"]
_FLAGS = st.fixed_dictionaries(
    {},
    optional={
        "--batch-size": st.sampled_from(["1", "3", "0"]),
        "--max-batch-tokens": st.sampled_from(["4", "64"]),
        "--positions": st.sampled_from(["last", "all"]),
        "--system": st.sampled_from(["be brief", ""]),
        "--plot": st.sampled_from([*_TARGETS, "x.xyz"]),
        "--html": st.sampled_from(_TARGETS),
        "--repair": st.just(None),
        "--force": st.just(None),
    },
)


_USER_FILES = {"mine.png": b"\x89PNG\r\n\x1a\n someone's picture", "notes.txt": b"a note, one line, no newline"}


def _user_files(folder: Path) -> None:
    for name, content in _USER_FILES.items():
        (folder / name).write_bytes(content)
    (folder / "folder").mkdir()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    command=st.sampled_from(["analyze", "compare"]),
    prompt_file=_PROMPT_FILE,
    out=st.sampled_from(["rows.jsonl", "notes.txt", "mine.png", "p.txt", "folder"]),
    flags=_FLAGS,
)
# The cases of the issue, always run: a one-line file of the user's as --out, a picture of theirs as --plot.
@example(command="analyze", prompt_file=("p.txt", ["the quick brown fox"]), out="notes.txt", flags={})
@example(command="compare", prompt_file=("p.txt", ["a river"]), out="rows.jsonl", flags={"--plot": "mine.png"})
def test_any_input_exits_0_or_2_and_a_refusal_changes_no_file(checkpoints, capsys, command, prompt_file, out, flags):
    name, lines = prompt_file
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        _user_files(folder)
        prompts = folder / name
        prompts.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        argv = [command, "--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
        if command == "analyze":
            argv += ["--prompts", str(prompts)]
        else:
            argv += [str(prompts), str(folder / "notes.txt")]
            flags = {flag: value for flag, value in flags.items() if flag not in ("--html", "--positions")}
        argv += ["--out", str(folder / out)]
        for flag, value in flags.items():
            target = value if flag in ("--plot", "--html") else None
            argv += [flag] if value is None else [flag, str(folder / target) if target else value]
        before = _snapshot(folder)
        status = main(argv)
        err = capsys.readouterr().err
        assert status in (0, 2), (argv, err)
        assert "Traceback" not in err, err
        after = _snapshot(folder)
        if status == 2:
            assert err.strip().splitlines()[-1].startswith("tuco-peft: error: "), err
            assert after == before, (argv, err)
        assert after[name] == before[name], argv  # the prompt file
        if "--force" not in flags:
            assert {name: after.get(name) for name in _USER_FILES} == _USER_FILES, (argv, err)
