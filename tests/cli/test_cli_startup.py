"""`tuco-peft` starts at once: --help and usage errors import neither torch, transformers nor peft; --debug
works before or after the command; Ctrl-C during the heavy imports is one line and exit 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.cli_fixtures import write_lines

from tuco_peft.cli import main

HEAVY = ("torch", "transformers", "peft")
_ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=_ENV, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["analyze", "--help"],
        ["analyze", "--prompts", "p.txt"],  # argparse: --out is required
        ["analyze", "--base", "B", "--prompts", "p.txt", "--out", "o.jsonl"],  # --base needs --adapter
        ["analyze", "--base", "B", "--adapter", "A", "--prompts", "p.txt", "--out", "o", "--batch-size", "0"],
        ["compare", "--base", "B", "--adapter", "A", "a.txt", "b.txt", "--wait"],  # --wait needs --out
    ],
)
def test_help_and_usage_errors_import_no_heavy_library(argv):
    run = _python(
        "import sys; from tuco_peft.cli import main; code = main(sys.argv[1:]); "
        f"print([name for name in {HEAVY!r} if name in sys.modules]); sys.exit(code)",
        *argv,
    )
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stderr
    assert run.returncode == (0 if {"--help", "--version"} & set(argv) else 2), run.stderr
    assert "Traceback" not in run.stderr


def test_importing_the_package_imports_no_heavy_library_yet_exports_everything():
    run = _python(
        "import sys, tuco_peft; heavy = [n for n in ('torch', 'transformers') if n in sys.modules]; "
        "from tuco_peft import decompose, tuco, TuCoCallback; import tuco_peft.core.decompose; "
        "print(heavy, callable(tuco_peft.decompose), decompose is tuco_peft.decompose, sorted(tuco_peft.__all__) "
        "== sorted(n for n in tuco_peft.__all__ if hasattr(tuco_peft, n)))"
    )
    assert run.stdout.split() == ["[]", "True", "True", "True"], run.stderr


def test_debug_shows_the_traceback_before_or_after_the_command_and_keeps_the_exit_status(tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.txt", ["the lazy dog"])
    argv = ["analyze", "--base", "B", "--adapter", "A", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    for debug_first, debug_last in ((["--debug"], []), ([], ["--debug"])):
        assert main([*debug_first, *argv, "--system", "hi", *debug_last]) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "InputError: --system needs" in err
        assert err.strip().splitlines()[-1].startswith("tuco-peft: error: --system needs --chat-template")
    assert main([*argv, "--system", "hi"]) == 2  # and without it, one line
    assert capsys.readouterr().err.startswith("tuco-peft: error: --system needs --chat-template")


def test_version_answers_at_once(capsys):
    import tuco_peft

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tuco-peft {tuco_peft.__version__}"


@pytest.mark.slow  # processes of their own
@pytest.mark.parametrize("delay", [0.2, 0.8, 1.6])
def test_ctrl_c_at_any_moment_is_one_line_and_130(checkpoints, tmp_path, delay):
    """From main()'s start: torch's import (where a KeyboardInterrupt aborts from C++), transformers' lazy
    imports (where it becomes an ImportError), the loading and the analysis."""
    prompts = write_lines(tmp_path / "p.txt", [f"the lazy dog {i}" for i in range(200)])
    argv = ["analyze", "--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter)]
    argv += ["--prompts", str(prompts), "--out", str(tmp_path / "rows.jsonl"), "--batch-size", "1"]
    code = "import sys; from tuco_peft.cli import main; print('ready', flush=True); sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, *argv], env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "tuco-peft: interrupted; rows already written are kept, rerun the same command to resume."
    )
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


# Makes a third-party logger warn and err while the command loads its model, as bitsandbytes does.
_THIRD_PARTY_NOTICES = """
import logging, sys
import tuco_peft.io.loaders as loading
from tuco_peft.cli import main

load_pair = loading.load_pair

def load_pair_noisily(*args, **kwargs):
    logging.getLogger("somelib.backend").warning("a third-party notice")
    logging.getLogger("somelib").error("a third-party error")
    return load_pair(*args, **kwargs)

loading.load_pair = load_pair_noisily
"""


@pytest.mark.slow  # processes of their own, each importing torch, transformers and peft
def test_other_libraries_log_warnings_only_with_debug_or_the_users_logging_config(checkpoints, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", ["the lazy dog"])
    model = ["--base", str(checkpoints.base), "--adapter", str(checkpoints.adapter), "--prompts", str(prompts)]
    bitsandbytes_speaks = "gemm_4bit" in _python("import bitsandbytes").stderr  # depends on the CPU's features

    out = [str(tmp_path / name) for name in ("a.jsonl", "b.jsonl", "c.jsonl")]
    quiet = _python(_THIRD_PARTY_NOTICES + "sys.exit(main(sys.argv[1:]))", "analyze", *model, "--out", out[0])
    assert quiet.returncode == 0, quiet.stderr
    assert "a third-party notice" not in quiet.stderr and "gemm_4bit" not in quiet.stderr
    assert "kernels-community" not in quiet.stderr
    assert "a third-party error" in quiet.stderr  # errors still come through

    then_configured = (
        f"code = main(['--debug', *sys.argv[1:], '--out', {out[1]!r}])\n"
        "print('== the user configures logging', file=sys.stderr, flush=True)\n"
        "logging.basicConfig(format='%(name)s: %(message)s')\n"
        f"sys.exit(code or main([*sys.argv[1:], '--out', {out[2]!r}]))\n"
    )
    loud = _python(_THIRD_PARTY_NOTICES + then_configured, "analyze", *model)
    assert loud.returncode == 0, loud.stderr
    with_debug, with_config = loud.stderr.split("== the user configures logging")
    assert "a third-party notice" in with_debug and ("gemm_4bit" in with_debug) == bitsandbytes_speaks
    assert "somelib.backend: a third-party notice" in with_config
