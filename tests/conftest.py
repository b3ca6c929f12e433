import os
import sys

# Offline by construction: every model in the tests is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Triton interpreter must be chosen before any @triton.jit runs (CPU-only CI).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))
