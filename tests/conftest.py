"""Test settings shared by every test file, and the device tier.

Tests marked ``device`` run on the device named by ``pytest --device cpu|cuda|cuda:N`` (or
``TUCO_PEFT_TEST_DEVICE``; default cpu) through the ``device`` fixture: ``pytest -m device --device cuda``
is the GPU check. On a CPU the Triton kernels run under the interpreter; on CUDA they are compiled.
"""

import os
import shutil
import sys

# Offline by construction: every model in the tests is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The test files of every area (core/, steering/, …) import the shared code as helpers.<module>.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
import torch

# Tiny models gain nothing from threads, and oversubscribe a shared 2-core machine.
torch.set_num_threads(1)

DEVICE_VARIABLE = "TUCO_PEFT_TEST_DEVICE"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get(DEVICE_VARIABLE, "cpu"),
        help=f"torch device of the tests marked 'device': cpu (default), cuda, cuda:1 … (also ${DEVICE_VARIABLE})",
    )


def pytest_configure(config: pytest.Config) -> None:
    device = _test_device(config)
    # The interpreter must be chosen before any @triton.jit runs, that is before the test modules import
    # tuco_peft.kernels; on a GPU the kernels are compiled for it instead.
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(f"--device {device} compiles the Triton kernels: unset TRITON_INTERPRET.")


def _test_device(config: pytest.Config) -> torch.device:
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1 …).") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {name}: the device tier runs on cpu or cuda.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: CUDA is not available here; pass --device cpu.")
    return device


def pytest_report_header(config: pytest.Config) -> str:
    device = _test_device(config)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, Triton interpreter"
    return f"tuco-peft device tier: {device} ({where})"


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """Where the tests marked ``device`` put their models and inputs."""
    return _test_device(pytestconfig)


@pytest.fixture
def loading_forbidden(monkeypatch):
    """Make loading a model an error, so that a test can show a check ran before it."""
    import tuco_peft.io.loaders

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_pair", "load_full_finetune", "load_base"):
        monkeypatch.setattr(tuco_peft.io.loaders, name, refuse)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny base, adapter and variant checkpoints on disk for the command-line tests (helpers/cli_fixtures.py)."""
    from helpers.cli_fixtures import save_checkpoints

    return save_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture
def pair(checkpoints, tmp_path):
    """A copy of the tiny base and adapter that a test may change in place (retrain, truncate, corrupt)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(checkpoints.base, base)
    shutil.copytree(checkpoints.adapter, adapter)
    return base, adapter
