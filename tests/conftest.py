import os
import sys

# Offline by construction: every model in the tests is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Triton interpreter must be chosen before any @triton.jit runs (CPU-only CI).
os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository's kernels/ folder is installed as tuco_peft.kernels. With the repository root on sys.path
# (as `python -m pytest` puts it) it would pose as Hugging Face's unrelated top-level "kernels" package,
# which transformers and bitsandbytes probe for.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO_ROOT]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads, and oversubscribe a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny base, adapter and variant checkpoints on disk for the command-line tests (cli_fixtures.py)."""
    from cli_fixtures import save_checkpoints

    return save_checkpoints(tmp_path_factory.mktemp("checkpoints"))
