"""Code the test areas share: tiny models and checkpoints, the paper's plain references, and comparisons.

``tests/`` is on sys.path (conftest.py), so test files import ``helpers.<module>``.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
