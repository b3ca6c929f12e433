"""Fingerprints of what produced a row, by content, so that a rerun resumes only rows it would compute again.

A checkpoint retrained into the same folder keeps its path but not its weights; keying rows by path would
mix two fine-tunes in one file. Each checkpoint is fingerprinted by the files that decide its outputs:
its config, its weights and their index; the tokenizer by the files it is read from, chat template included.

Reading every byte of a multi-gigabyte checkpoint at each start would cost minutes, so files up to
``HASHED_IN_FULL_BYTES`` are hashed whole, and a larger weight file by its size, its modification time and,
for safetensors, its header (every tensor's name, dtype, shape and offsets). Retraining rewrites the file and
so changes its modification time; copying a large file without keeping its time (``cp`` without ``-p``)
changes it too, and then a rerun is refused although the weights are the same.

A hub id that is not a local folder is fingerprinted by the id itself: its files may not be here yet, and
the fingerprint must be the same before and after they are fetched. Download it to a folder (``hf download
ID --local-dir DIR``) to key its rows by content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from .loading import PICKLE_SUFFIXES, TOKENIZER_FILES, Source, safetensors_header

HASHED_IN_FULL_BYTES = 64 * 2**20
_CONFIG_FILES = ("config.json", "adapter_config.json")
_PICKLE_WEIGHT_PREFIXES = ("model", "pytorch_model", "adapter_model")


def file_digest(path: Path) -> str:
    """A digest of one file: of its bytes when small, else of its size, modification time and header."""
    stat = path.stat()
    digest = hashlib.sha256()
    if stat.st_size <= HASHED_IN_FULL_BYTES:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    if path.suffix == ".safetensors":
        digest.update(safetensors_header(path))
    return digest.hexdigest()


def _files_digest(directory: Path, names: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{file_digest(directory / name)}\0".encode())
    return digest.hexdigest()


def _decides_outputs(name: str) -> bool:
    """Config, safetensors weights and indexes, and the pickle weights transformers or PEFT would load."""
    if name in _CONFIG_FILES or name.endswith((".safetensors", ".safetensors.index.json")):
        return True
    return name.startswith(_PICKLE_WEIGHT_PREFIXES) and name.endswith((*PICKLE_SUFFIXES, ".bin.index.json"))


def checkpoint_fingerprint(source: Source) -> str:
    """The fingerprint of a model or adapter: its config and weight files, or its hub id."""
    if source.local is None:
        return f"hub:{source.location}"
    names = [path.name for path in source.local.iterdir() if path.is_file() and _decides_outputs(path.name)]
    return _files_digest(source.local, names)


def tokenizer_fingerprint(source: Source) -> str:
    """The fingerprint of the tokenizer files of ``source`` (vocabulary, special tokens, chat template)."""
    if source.local is None:
        return f"hub:{source.location}"
    return _files_digest(source.local, [name for name in TOKENIZER_FILES if (source.local / name).is_file()])
