"""What the documentation pages say, checked without building the site: every command they show is one the
parser takes (flags, values, arguments), every script or file they name exists, every Python snippet
compiles, every benchmark figure comes from benchmarks/README.md, and the generated references cover every
command, flag and model family.

The pages' commands and snippets also run, on the demo pair (test_documented_examples.py); the tutorials run
at every docs build (test_site.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
from dataclasses import dataclass

import pytest
from helpers import REPO_ROOT
from helpers.markdown import fenced_blocks

from tuco_peft.cli import build_parser

DOCS = REPO_ROOT / "docs"
BENCHMARKS_README = REPO_ROOT / "benchmarks" / "README.md"
_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    where: str  # the page (and cell) it is in


def _fenced_blocks(markdown: str, where: str) -> list[Block]:
    return [Block(block.language, block.text, where) for block in fenced_blocks(markdown)]


def _blocks() -> list[Block]:
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        blocks += _fenced_blocks(page.read_text(encoding="utf-8"), str(page.relative_to(REPO_ROOT)))
    for notebook in sorted(DOCS.rglob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        for number, cell in enumerate(cells):
            where = f"{notebook.relative_to(REPO_ROOT)}, cell {number}"
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                blocks += _fenced_blocks(source, where)
            elif cell["cell_type"] == "code":
                blocks.append(Block("python", source, where))
    return blocks


def _commands() -> list[tuple[list[str], str]]:
    """Every command of the pages' bash blocks, as argv, continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks():
        if block.language not in ("bash", "sh", "console"):
            continue
        for line in block.text.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and _ENV_ASSIGNMENT.match(argv[0]):
                argv = argv[1:]
            if argv:
                commands.append((argv, f"{block.where}: {line.strip()}"))
    return commands


COMMANDS = _commands()


def test_the_pages_show_commands():
    assert sum(argv[0] == "tuco-peft" for argv, _ in COMMANDS) >= 15


def _tuco_peft_argv(argv: list[str]) -> list[str] | None:
    if argv[0] == "tuco-peft":
        return argv[1:]
    if argv[0] in ("torchrun", "accelerate") and "tuco_peft.cli" in argv:
        return argv[argv.index("tuco_peft.cli") + 1 :]
    return None


def _extras() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return set(project.get("optional-dependencies", {}))


@pytest.mark.parametrize("argv, where", COMMANDS, ids=[where for _, where in COMMANDS])
def test_every_command_on_the_pages_is_one_that_exists(argv, where, capsys):
    command = _tuco_peft_argv(argv)
    if command is not None:
        try:
            args = build_parser().parse_args(command)
        except SystemExit:
            pytest.fail(f"{where}\nthe parser refuses it: {capsys.readouterr().err}")
        assert args.command == command[0]
    elif argv[:2] == ["pip", "install"]:
        for requirement in argv[2:]:
            extras = re.fullmatch(r"-e|\.(\[([\w,-]+)\])?|torch==[\d.]+", requirement)
            assert extras, f"{where}: an install the pages do not otherwise make: {requirement}"
            unknown = set((extras.group(2) or "").split(",")) - {""} - _extras()
            assert not unknown, f"{where}: pyproject.toml has no extra {sorted(unknown)}"
    elif argv[0] in ("python", "python3") and argv[1] == "-m":
        module = argv[2]
        assert importlib.util.find_spec(module.split(".")[0]) is not None, where
        if module.startswith("tuco_peft"):
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    elif argv[0] in ("python", "python3", "bash"):
        assert (REPO_ROOT / argv[1]).is_file(), f"{where}: no file {argv[1]} in the repository"
    else:
        pytest.fail(f"{where}: a command this test does not know how to check; teach it")


def test_files_the_commands_read_exist():
    for argv, where in COMMANDS:
        for arg in argv:
            if arg.startswith("examples/"):
                assert (REPO_ROOT / arg).exists(), f"{where}: no {arg} in the repository"


@pytest.mark.parametrize("block", [b for b in _blocks() if b.language == "python"], ids=lambda block: block.where)
def test_every_python_snippet_compiles(block):
    compile(block.text, block.where, "exec")


def _summary() -> str:
    page = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    return page[page.index("<!-- summary:") : page.index("<!-- end of summary -->")]


def test_benchmark_figures_and_commands_come_from_the_benchmarks_readme():
    record = BENCHMARKS_README.read_text(encoding="utf-8")
    summary = _summary()
    figures = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", summary)
    assert len(figures) >= 20
    missing = [figure for figure in figures if figure not in record]
    assert not missing, f"figures on docs/benchmarks.md that benchmarks/README.md does not hold: {missing}"
    commands = [line.strip() for line in summary.splitlines() if line.startswith("    python")]
    assert len(commands) >= 4
    for command in commands:
        assert command in record, f"a command that benchmarks/README.md does not show: {command}"


def _hook():
    if importlib.util.find_spec("mkdocs") is None:
        message = "the docs tooling is not installed: pip install -e '.[docs]'"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a skip would hide that the generated references went unchecked
        pytest.skip(message)
    spec = importlib.util.spec_from_file_location("docs_generated_hook", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_has_every_command_and_flag():
    reference = _hook().cli_reference()
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in commands.choices.items():
        assert f"## `tuco-peft {name}`" in reference
        for action in parser._actions:
            for option in action.option_strings:
                assert f"`{option}" in reference or f", {option}" in reference, f"tuco-peft {name} {option}"


def test_the_families_reference_has_every_registered_family():
    from tuco_peft.families import registered_model_types

    reference = _hook().families()
    for model_type in registered_model_types():
        assert f"### `{model_type}`" in reference


def test_the_error_catalogue_lists_messages_of_every_class():
    catalogue = _hook().error_messages()
    for name in ("TuCoError", "UnsupportedModelError", "InputError"):
        count = int(re.search(rf"### `{name}` \((\d+) messages\)", catalogue).group(1))
        assert count > 0
    assert "unmerge" in catalogue  # a message and its way out, e.g. merged adapters
