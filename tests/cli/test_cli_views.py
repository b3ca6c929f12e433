"""`analyze --html`, `generate --html` and generate's coloured terminal output, on tiny checkpoints on disk."""

from __future__ import annotations

import html
import io
import re
import sys

import pytest
from helpers.cli_fixtures import fails, read_rows, write_lines

from tuco_peft.cli import main

PROMPTS = ["the quick brown fox", "how can I help you <b>today</b>?", "the lazy dog"]
_SECTION = re.compile(r"<section><h3>(.*?) <small>.*?</h3>(.*?)</section>", re.DOTALL)
_TOKEN = re.compile(r'<span class="tuco-tok[^"]*"([^>]*)>(.*?)</span>', re.DOTALL)


def _model_args(checkpoints):
    return ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]


def _analyze(checkpoints, prompts, out, page, *extra):
    argv = ["analyze", *_model_args(checkpoints), "--prompts", str(prompts), "--out", str(out)]
    return main([*argv, "--positions", "all", "--html", str(page), *extra])


def _sections(page) -> dict[str, tuple[str, list[str], str]]:
    """Each text of a page by title: (its tokens' text, the TuCo of each coloured token, its section's HTML)."""
    sections = {}
    for title, body in _SECTION.findall(page.read_text(encoding="utf-8")):
        tokens = _TOKEN.findall(body)
        text = html.unescape("".join(shown for _, shown in tokens)).replace("↵\n", "\n")
        values = [re.search(r'title="TuCo ([0-9.]+)', attributes).group(1) for attributes, _ in tokens if attributes]
        sections[html.unescape(title)] = (text, values, body)
    return sections


def test_analyze_html_shows_every_prompt_token_by_token_also_when_resumed(checkpoints, tmp_path, capsys):
    prompts, out, page = tmp_path / "p.txt", tmp_path / "rows.jsonl", tmp_path / "page.html"
    write_lines(prompts, PROMPTS[:2])
    assert _analyze(checkpoints, prompts, out, page) == 0
    first = _sections(page)
    write_lines(prompts, PROMPTS)  # a third prompt: the first two resume from their rows
    assert _analyze(checkpoints, prompts, out, page) == 0
    assert f"html: {page}" in capsys.readouterr().out
    sections = _sections(page)
    assert list(sections) == ["prompt 1 (line 1)", "prompt 2 (line 2)", "prompt 3 (line 3)"]
    document = page.read_text(encoding="utf-8")
    assert "<b>" not in document and "&lt;" in document  # the prompt's markup is shown, not applied
    assert "http://" not in document.replace("http://www.w3.org/2000/svg", "") and "https://" not in document
    for row, text in zip(read_rows(out), PROMPTS):
        shown, values, body = sections[f"prompt {row['id']} (line {row['id']})"]
        assert text in shown
        assert len(values) == row["n_tokens"]
        assert [float(v) for v in values] == pytest.approx(row["token_tuco"], abs=1e-3)
        resumed = row["id"] in (1, 2)
        assert ("from its row in" in body) is resumed
        assert (body.count("block 0:") == 1) is resumed  # a row keeps the per-block norms at its last token only
    for title, (shown, values, _) in first.items():  # drawn from the rows, the same text and values
        assert (shown, values) == sections[title][:2]


def test_analyze_html_flags_are_checked_before_the_model_loads(checkpoints, tmp_path, capsys, loading_forbidden):
    prompts, out = write_lines(tmp_path / "p.txt", PROMPTS), tmp_path / "rows.jsonl"
    analyze = ["analyze", *_model_args(checkpoints), "--prompts", str(prompts), "--out", str(out)]
    fails([*analyze, "--html", str(tmp_path / "page.html")], capsys, "add --positions all", status=2)
    fails(
        [*analyze, "--positions", "all", "--html", str(tmp_path / "missing" / "page.html")],
        capsys,
        "the folder",
        "does not exist",
        status=2,
    )
    fails([*analyze, "--positions", "all", "--html", str(out)], capsys, "--html", "is also", status=2)
    fails([*analyze, "--positions", "all", "--html", str(tmp_path)], capsys, "is a folder", status=2)
    assert not out.exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _generate(checkpoints, *extra) -> int:
    return main(["generate", *_model_args(checkpoints), "the quick brown", "--max-new-tokens", "3", *extra])


def test_generate_html_and_colour_on_a_terminal_only(checkpoints, tmp_path, capsys, monkeypatch):
    page = tmp_path / "generation.html"
    assert _generate(checkpoints, "--html", str(page)) == 0
    piped = capsys.readouterr().out
    assert "\x1b[" not in piped and f"html: {page}" in piped
    table = [line.split() for line in piped.splitlines() if re.match(r"\s+\d+\s+[0-9.]+\s", line)]
    assert [int(step) for step, *_ in table] == [0, 1, 2]  # the TuCo column, for pipes
    (title, (shown, values, body)), *others = _sections(page).items()
    assert not others and title == "α = 1" and shown.startswith("the quick brown")
    assert body.count("tuco-new") == 3 and len(values) == 3  # the prompt is not coloured, each new token is
    assert [float(v) for v in values] == pytest.approx([float(row[1]) for row in table], abs=1e-3)

    monkeypatch.setenv("COLORTERM", "truecolor")
    monkeypatch.delenv("NO_COLOR", raising=False)
    for no_colour, coloured in ((None, True), ("1", False)):
        if no_colour is not None:
            monkeypatch.setenv("NO_COLOR", no_colour)
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stdout", terminal)
        assert _generate(checkpoints) == 0
        printed = terminal.getvalue()
        assert ("\x1b[" in printed) is coloured, printed
        assert coloured or printed.startswith("the quick brown")


def test_generate_html_in_a_missing_folder_is_one_line_before_loading(checkpoints, tmp_path, capsys, loading_forbidden):
    fails(
        ["generate", *_model_args(checkpoints), "the lazy dog", "--html", str(tmp_path / "no" / "g.html")],
        capsys,
        "does not exist",
        status=2,
    )
