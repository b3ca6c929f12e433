"""Fingerprints of what produced a row, by content, so that a rerun resumes only rows it would compute again.

A checkpoint retrained into the same folder keeps its path but not its weights; keying rows by path would
mix two fine-tunes in one file. Each checkpoint is fingerprinted by the files that decide its outputs:
its config, its weights and their index; the tokenizer by the files it is read from, chat template included.

Reading every byte of a multi-gigabyte checkpoint at each start would cost minutes, so files up to
``HASHED_IN_FULL_BYTES`` are hashed whole, and a larger one by content samples: a safetensors file by its
header (every tensor's name, dtype, shape and offsets) and the first, middle and last ``SAMPLE_BYTES`` of
every tensor, any other file by its size and ``SAMPLES`` blocks spread evenly over it. Training changes
every element of the tensors it trains, so a retrained file differs in its samples, however it was written
(in place at the same size, or copied with its old modification time); a copy of the same weights, under
any time stamp, resumes. A few megabytes are read per checkpoint.

A hub id that is not a local folder is fingerprinted by the id itself: its files may not be here yet, and
the fingerprint must be the same before and after they are fetched. Download it to a folder (``hf download
ID --local-dir DIR``) to key its rows by content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .checkpoints import PICKLE_SUFFIXES, TOKENIZER_FILES, Source, safetensors_header

HASHED_IN_FULL_BYTES = 64 * 2**20
SAMPLE_BYTES = 4096
SAMPLES = 1024
_CONFIG_FILES = ("config.json", "adapter_config.json")
_PICKLE_WEIGHT_PREFIXES = ("model", "pytorch_model", "adapter_model")


def _spans(start: int, end: int, count: int) -> Iterator[tuple[int, int]]:
    """``count`` blocks of ``SAMPLE_BYTES`` spread evenly over [start, end), the first at its start and the
    last at its end; the whole range when they would cover it."""
    if end - start <= count * SAMPLE_BYTES:
        yield start, end
        return
    last = end - SAMPLE_BYTES
    for index in range(count):
        offset = start + (last - start) * index // (count - 1)
        yield offset, offset + SAMPLE_BYTES


def _sampled_ranges(path: Path, size: int) -> Iterator[tuple[int, int]]:
    """The byte ranges a large file is fingerprinted by: a safetensors file's header and three blocks of
    every tensor (first, middle, last), else blocks spread over the whole file."""
    if path.suffix != ".safetensors":
        yield from _spans(0, size, SAMPLES)
        return
    header = safetensors_header(path)
    data_start = 8 + len(header)
    yield 0, data_start
    entries = json.loads(header)
    for name in sorted(entries):
        if name != "__metadata__":
            begin, end = entries[name]["data_offsets"]
            yield from _spans(data_start + begin, data_start + end, 3)


def _read(handle: BinaryIO, start: int, end: int) -> bytes:
    handle.seek(start)
    return handle.read(end - start)


def file_digest(path: Path) -> str:
    """A digest of one file: of its bytes when small, else of its size and content samples (see above)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= HASHED_IN_FULL_BYTES:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(f"sampled:{size}:".encode())
        for start, end in _sampled_ranges(path, size):
            digest.update(_read(handle, start, end))
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
