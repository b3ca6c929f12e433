"""Every command and Python snippet that README.md and the documentation pages show runs as written, on the
demo pair.

The fenced ``bash`` blocks are split into commands, each run once (a command shown on two pages too), from a
scratch copy of the repository's ``examples/`` (the pages' commands run from the repository's root). The
``python`` blocks of each page run in order in one namespace, which starts as the one that README's Python API
snippet sets up (model, tokenizer, ids, mask). What cannot run here as written (installing packages, the test
suite itself, hub ids and 7B models, four processes on two cores, a GPU, lm-eval tasks whose data sets are on
the Hub) is in the tables below, each substitution visible; a command or snippet that no rule covers fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT
from helpers.markdown import FencedBlock, fenced_blocks

from tuco_peft.cli import main
from tuco_peft.demo import DemoRecipe, ensure_demo_checkpoints, ensure_demo_run
from tuco_peft.demo.build import CACHE_ENV, SCALE_ENV

pytestmark = pytest.mark.slow  # two dozen commands, lm-eval's task index, a two-process run, a QLoRA SFT of 60 steps

README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]
RUN = ("bash", "python")
DRAWN = ("dot",)  # diagrams, drawn when the site is built (docs/hooks/offline.py)
DEMO_SCALE = 0.01  # the demo recipe with 1% of its training steps: the same model, built in seconds
_ENV_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")

# Commands that are not run, and why.
NOT_RUN = {
    "pip install": "installs packages: these tests run in the environment it made",
    "python3 -m pytest": "runs the test suite, this test among it",
    "python -m tuco_peft.kernels.ahead_of_time": "compiles every kernel variant, for minutes: "
    "tests/fused_kernels/test_kernels_compile.py compiles a subset",
    "bash benchmarks/gpu_check.sh": "needs a CUDA GPU (the device tier it runs there runs here on the CPU, in the suite)",
}
# Stand-ins for what the README names but this machine cannot load: hub ids of 7B models and adapter folders
# of the reader's own. Filled in with the demo pair's paths (see ``demo``).
STAND_INS = {
    "BASE": "base",
    "ADAPTER": "adapter",
    "meta-llama/Llama-2-7b-hf": "base",
    "./my-lora": "adapter",
    "lmsys/vicuna-7b-v1.5": "merged",  # a full fine-tune: the demo pair with its adapter merged
    "meta-llama/Llama-3.1-8B": "base",
    "my-lora-adapter": "adapter",
    "merged": "merged",  # the folder that a snippet of docs/how-to/full-fine-tunes.md writes
    "runs/my-run": "run",
}
# torchrun, as this interpreter's launcher, on a free local port; two processes for two CPU cores.
TORCHRUN_ON_TWO_CORES = {"--nproc_per_node": "2"}
# Flags added to a command: the benchmark's default workloads take minutes on two cores, and its figures are
# not what this test checks.
ADDED_FLAGS = {
    "tuco-peft bench": ["--batch-size", "2", "--tokens", "16", "--repeats", "1", "--warmup", "1"],
}
# lm-eval's own tasks load their data sets from the Hub: with no network and no cache (as here), the command
# must be refused in one line, before the model loads, saying so.
REFUSED_OFFLINE = {"arc_easy,hellaswag": "its data set must be cached or given locally"}
# Python snippets that are compiled but not run, and why, by page and section.
COMPILED_ONLY = {
    ("docs/how-to/training-callback.md", "The callback"): "needs a trainer and a data set; "
    "examples/qlora_sft_tuco.py (run above) and tests/training run one",
    ("docs/how-to/training-callback.md", "TuCo as a loss term"): "lm_loss and lam are the reader's; "
    "tests/training checks the term's gradients",
    ("docs/how-to/full-fine-tunes.md", "In Python"): "finetuned, pretrained and path/to/base are the reader's; "
    "tests/core/test_full_finetune.py and tests/steering/test_steering_full_finetune.py run each call",
    ("docs/how-to/triton-backend.md", "Choosing the backend"): "needs CUDA; tests/fused_kernels run the backend "
    "under the Triton interpreter",
}
SET_UP = ("README.md", "Python API")  # its snippet loads the model that the other snippets use
OUTPUT_FLAGS = ("--out", "--plot", "--html", "--json")


def _page_name(page: Path) -> str:
    return str(page.relative_to(REPO_ROOT))


def _blocks(page: Path) -> list[FencedBlock]:
    return fenced_blocks(page.read_text(encoding="utf-8"))


def _commands() -> list[str]:
    """Every command of every page's bash blocks, once, continuation lines joined, comments dropped."""
    commands: dict[str, None] = {}
    for page in PAGES:
        for block in _blocks(page):
            if block.language == "bash":
                for line in block.text.replace("\\\n", " ").splitlines():
                    if line.strip() and not line.lstrip().startswith("#"):
                        commands.update((" ".join(command.split()), None) for command in line.split("&&"))
    return list(commands)


def _python_blocks(page: Path) -> list[FencedBlock]:
    return [block for block in _blocks(page) if block.language == "python"]


@dataclass(frozen=True)
class DemoPair:
    base: Path
    adapter: Path
    merged: Path
    run: Path  # the fine-tune's checkpoints

    def stand_in(self, text: str) -> str:
        return str(getattr(self, STAND_INS[text])) if text in STAND_INS else text


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoPair:
    """The demo pair as `tuco-peft demo` builds it (at 1% of its training steps), its merged fine-tune and its
    run folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = tmp_path_factory.mktemp("demo")
    recipe = DemoRecipe().scaled(DEMO_SCALE)
    base, adapter = ensure_demo_checkpoints(cache, recipe)
    merged = cache / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().save_pretrained(
        merged
    )
    AutoTokenizer.from_pretrained(base).save_pretrained(merged)
    return DemoPair(base, adapter, merged, ensure_demo_run(cache, recipe))


@pytest.fixture
def scratch(demo, tmp_path, monkeypatch) -> Path:
    """A working folder with the repository's examples, offline, where `tuco-peft demo` finds the demo pair
    and lm-eval finds no cached data set."""
    import datasets.config

    shutil.copytree(REPO_ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, str(demo.base.parents[1]))
    monkeypatch.setenv(SCALE_ENV, str(DEMO_SCALE))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    return tmp_path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _outputs(argv: list[str]) -> list[Path]:
    return [Path(argv[i + 1]) for i, flag in enumerate(argv[:-1]) if flag in OUTPUT_FLAGS]


def _inputs_written_by_pages(argv: list[str]) -> list[str]:
    """The commands of the pages that write what ``argv`` reads (a results file that another line's --out writes),
    to run first: each command runs in a scratch folder of its own."""
    writers = {}
    for command in (command for command in _commands() if command.startswith("tuco-peft ")):
        for path in _outputs(shlex.split(command)):
            writers.setdefault(str(path), command)
    read = [arg for previous, arg in zip(["", *argv], argv) if previous not in OUTPUT_FLAGS]
    return [writers[arg] for arg in read if arg in writers]


def _torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    argv = [TORCHRUN_ON_TWO_CORES.get(previous, arg) for previous, arg in zip(["", *argv], argv)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [*launcher, "--master_port", str(_free_port()), *argv[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=300)


def _script(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A Python script of the repository's examples, run as the pages show it, by this interpreter."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.parametrize("command", _commands(), ids=lambda command: command)
def test_documented_command_runs_as_written(command, demo, scratch, capsys, monkeypatch):
    reason = next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    for writer in _inputs_written_by_pages(shlex.split(command)):
        assert main([demo.stand_in(arg) for arg in shlex.split(writer)][1:]) == 0, writer
    argv = [demo.stand_in(arg) for arg in shlex.split(command)]
    while _ENV_ASSIGNMENT.match(argv[0]):
        monkeypatch.setenv(*_ENV_ASSIGNMENT.match(argv.pop(0)).groups())
    argv += next((flags for prefix, flags in ADDED_FLAGS.items() if command.startswith(prefix)), [])
    if argv[0] in ("torchrun", "python"):
        result = (_torchrun if argv[0] == "torchrun" else _script)(argv, scratch)
        assert result.returncode == 0, result.stderr[-3000:]
    elif argv[0] == "tuco-peft":
        refused = next((REFUSED_OFFLINE[arg] for arg in argv if arg in REFUSED_OFFLINE), None)
        code = main(argv[1:])
        err = capsys.readouterr().err
        if refused is not None:
            assert code == 2 and refused in err.strip().splitlines()[-1], err
            assert not any(path.exists() for path in _outputs(argv))
            return
        assert code == 0, err
    else:
        pytest.fail(f"the command {command!r} has no rule in tests/docs/test_documented_examples.py")
    written = [path for path in _outputs(argv) if path.is_file() or path.is_dir() and any(path.iterdir())]
    missing = [str(path) for path in _outputs(argv) if path not in written]  # a script's --out may be a folder
    assert not missing, f"{command!r} did not write {missing}"


def _with_stand_ins(code: str, demo: DemoPair) -> str:
    """``code`` with each quoted hub id or adapter name of STAND_INS replaced by the demo pair's path."""
    return re.sub(r"\"([^\"]+)\"", lambda quoted: repr(demo.stand_in(quoted[1])), code)


@pytest.fixture(scope="module")
def namespace(demo) -> dict:
    """What README's Python API snippet defines (model, tokenizer, ids, mask, …), run on the demo pair."""
    (set_up,) = [block for block in _python_blocks(README) if block.section == SET_UP[1]]
    names: dict = {}
    exec(compile(_with_stand_ins(set_up.text, demo), "README.md", "exec"), names)  # noqa: S102 (README's code)
    return names


@pytest.mark.parametrize("page", [page for page in PAGES if _python_blocks(page)], ids=_page_name)
def test_documented_python_runs(page, demo, namespace, scratch):
    """The page's snippets, in order, in one namespace (a later snippet may use what an earlier one made)."""
    names = dict(namespace)
    for block in _python_blocks(page):
        where = (_page_name(page), block.section)
        code = compile(_with_stand_ins(block.text, demo), f"{where[0]} ({where[1]})", "exec")
        if where == SET_UP:
            assert {"model", "tokenizer", "ids", "mask"} <= namespace.keys()  # it ran in ``namespace``
        elif where not in COMPILED_ONLY:
            exec(code, names)  # noqa: S102 (the page's own code)


def test_every_block_is_one_that_runs_or_is_drawn():
    for page in PAGES:
        for block in _blocks(page):
            assert block.language in RUN + DRAWN, f"{_page_name(page)}: a {block.language!r} block has no rule here"


def test_every_rule_is_for_a_documented_line():
    """The tables name only what the pages' code holds, so that no rule outlives the line it was written for."""
    commands = _commands()
    for prefix in [*NOT_RUN, *ADDED_FLAGS]:
        assert any(command.startswith(prefix) for command in commands), prefix
    code = [*commands, *(block.text for page in PAGES for block in _python_blocks(page))]
    for name in [*STAND_INS, *TORCHRUN_ON_TWO_CORES, *REFUSED_OFFLINE]:
        assert any(name in line for line in code), name
    sections = {(_page_name(page), block.section) for page in PAGES for block in _python_blocks(page)}
    assert {*COMPILED_ONLY, SET_UP} <= sections
