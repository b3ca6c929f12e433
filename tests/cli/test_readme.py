"""Every command and Python snippet of README.md runs as written, on the demo pair.

The README's fenced ``bash`` blocks are split into commands, run from a scratch copy of the repository's
``examples/`` (the README's commands run from the repository's root); its ``python`` blocks run in the
namespace that its Python API section sets up. What cannot run here as written (installing packages, the test
suite itself, hub ids and 7B models, four processes on two cores, lm-eval tasks whose data sets are on the
Hub) is in the tables below, each substitution visible; a command or snippet that no rule covers fails.
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
from helpers.markdown import FencedBlock, fenced_blocks

from tuco_peft.cli import main
from tuco_peft.demo import DemoRecipe, ensure_demo_checkpoints, ensure_demo_run
from tuco_peft.demo.build import CACHE_ENV, SCALE_ENV

pytestmark = pytest.mark.slow  # a dozen commands, lm-eval's task index and a two-process run

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEMO_SCALE = 0.01  # the demo recipe with 1% of its training steps: the same model, built in seconds

# Commands that are not run, and why.
NOT_RUN = {
    "pip install": "installs packages: these tests run in the environment it made",
    "python3 -m pytest": "runs the test suite, this test among it",
}
# Stand-ins for what the README names but this machine cannot load: hub ids of 7B models and adapter folders
# of the reader's own. Filled in with the demo pair's paths (see ``demo``).
STAND_INS = {
    "BASE": "base",
    "ADAPTER": "adapter",
    "RUN": "run",  # the demo fine-tune's checkpoints
    "meta-llama/Llama-2-7b-hf": "base",
    "./my-lora": "adapter",
    "lmsys/vicuna-7b-v1.5": "merged",  # a full fine-tune: the demo pair with its adapter merged
    "meta-llama/Llama-3.1-8B": "base",
    "my-lora-adapter": "adapter",
}
# torchrun, as this interpreter's launcher, on a free local port; two processes for two CPU cores.
TORCHRUN_ON_TWO_CORES = {"--nproc_per_node": "2"}
# Flags added to a command: the benchmark's default workloads take minutes on two cores, and its figures are
# not what this test checks.
ADDED_FLAGS = {"tuco-peft bench": ["--batch-size", "2", "--tokens", "16", "--repeats", "1", "--warmup", "1"]}
# lm-eval's own tasks load their data sets from the Hub: with no network and no cache (as here), the command
# must be refused in one line, before the model loads, saying so.
REFUSED_OFFLINE = {"arc_easy,hellaswag": "its data set must be cached or given locally"}
# Python snippets that are compiled but not run, and why.
COMPILED_ONLY = {
    "In training loops": "needs a trainer and a data set; examples/qlora_sft_tuco.py and tests/training run one",
}
SET_UP_SECTION = "Python API"  # its snippet loads the model that every other snippet uses
OUTPUT_FLAGS = ("--out", "--plot", "--html", "--json")


def _blocks() -> list[FencedBlock]:
    return fenced_blocks(README.read_text(encoding="utf-8"))


def _commands() -> list[str]:
    commands = []
    for block in _blocks():
        if block.language == "bash":
            for line in block.text.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    commands += [command.strip() for command in line.split("&&")]
        else:
            assert block.language == "python", f"README block of language {block.language!r} has no rule here"
    return commands


def _python_blocks() -> list[FencedBlock]:
    return [block for block in _blocks() if block.language == "python"]


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

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
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


def _inputs_written_by_readme(argv: list[str]) -> list[str]:
    """The README commands that write what ``argv`` reads (a results file that another line's --out writes),
    to run first: each command runs in a scratch folder of its own."""
    writers = {}
    for command in _commands():
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


@pytest.mark.parametrize("command", _commands(), ids=lambda command: " ".join(command.split()))
def test_readme_command_runs_as_written(command, demo, scratch, capsys):
    reason = next((why for prefix, why in NOT_RUN.items() if command.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    for writer in _inputs_written_by_readme(shlex.split(command)):
        assert main([demo.stand_in(arg) for arg in shlex.split(writer)][1:]) == 0, writer
    argv = [demo.stand_in(arg) for arg in shlex.split(command)]
    argv += next((flags for prefix, flags in ADDED_FLAGS.items() if command.startswith(prefix)), [])
    if argv[0] == "torchrun":
        result = _torchrun(argv, scratch)
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
        pytest.fail(f"README command {command!r} has no rule in tests/cli/test_readme.py")
    missing = [str(path) for path in _outputs(argv) if not path.is_file()]
    assert not missing, f"{command!r} did not write {missing}"


def _with_stand_ins(code: str, demo: DemoPair) -> str:
    """``code`` with each quoted hub id or adapter name of STAND_INS replaced by the demo pair's path."""
    return re.sub(r"\"([^\"]+)\"", lambda quoted: repr(demo.stand_in(quoted[1])), code)


@pytest.fixture(scope="module")
def namespace(demo) -> dict:
    """What the Python API section's snippet defines (model, tokenizer, ids, mask, …), run on the demo pair."""
    (set_up,) = [block for block in _python_blocks() if block.section == SET_UP_SECTION]
    names: dict = {}
    code = compile(_with_stand_ins(set_up.text, demo), "README.md", "exec")
    exec(code, names)  # noqa: S102 (the README's own code)
    return names


@pytest.mark.parametrize(
    "block", _python_blocks(), ids=lambda block: f"{block.section}:{block.text.splitlines()[0][:30]}"
)
def test_readme_python_snippet_runs(block, demo, namespace, scratch):
    code = compile(_with_stand_ins(block.text, demo), "README.md", "exec")
    if block.section == SET_UP_SECTION:
        assert {"model", "tokenizer", "ids", "mask"} <= namespace.keys()  # it ran in ``namespace``
    elif block.section in COMPILED_ONLY:
        pytest.skip(f"compiled, not run: {COMPILED_ONLY[block.section]}")
    else:
        exec(code, dict(namespace))  # noqa: S102 (the README's own code)


def test_every_rule_is_for_a_readme_line():
    """The tables name only what the README holds, so that no rule outlives the line it was written for."""
    commands, sections = _commands(), {block.section for block in _python_blocks()}
    for prefix in [*NOT_RUN, *ADDED_FLAGS]:
        assert any(command.startswith(prefix) for command in commands), prefix
    text = README.read_text(encoding="utf-8")
    for name in [*STAND_INS, *TORCHRUN_ON_TWO_CORES, *REFUSED_OFFLINE]:
        assert name in text, name
    assert set(COMPILED_ONLY) | {SET_UP_SECTION} <= sections
