"""Check the checkpoints of the command line before anything loads, and refuse unsafe input clearly.

A base model and its LoRA adapter, or a fully fine-tuned model and its pre-trained checkpoint, and the
tokenizer: each a local directory or a Hugging Face Hub id. The checks read no weights and import no torch,
so a wrong folder or a truncated file is reported at once. Weights load from safetensors only unless the
user trusts pickle files (``--trust-pickle``); remote code runs only with ``--trust-remote-code``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A folder holds a tokenizer when it has one of the markers; TOKENIZER_FILES are all it is read from.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TOKENIZER_FILES = (
    *_TOKENIZER_MARKERS,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors format's own limit


@dataclass(frozen=True)
class LoadOptions:
    """How to load: ``dtype`` and ``device`` may be ``"auto"`` (float32 on CPU, bfloat16 on CUDA)."""

    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    trust_pickle: bool = False
    trust_remote_code: bool = False

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise InputError(f"--device {self.device!r} is not a torch device (try cpu, cuda or cuda:1).") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {self.device} was asked for but CUDA is not available; pass --device cpu.")
        return device

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives: a local directory, or a hub id to fetch."""

    flag: str
    location: str
    local: Path | None

    def describe(self) -> str:
        return f"{self.flag} {self.location}"


def is_hub_id(location: str) -> bool:
    """Whether ``location`` has the form of a Hub model id (``name`` or ``owner/name``), not of a path."""
    return bool(_HUB_ID.match(location)) and not location.startswith(".")


def resolve(location: str, flag: str) -> Source:
    """A local directory if one exists at ``location``; a hub id if it looks like one; an error otherwise."""
    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {location} is a file; pass the checkpoint's directory.")
        return Source(flag, location, path)
    if is_hub_id(location):
        return Source(flag, location, None)
    raise InputError(f"{flag} {location}: no such directory.")



def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file, once the file is known to be as long as the header says.

    Raises ``ValueError`` saying what is wrong with a truncated file or one that is not safetensors.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"its header claims {length} bytes of the file's {size}")
        header = handle.read(length)
    try:
        entries = json.loads(header)
        end = max(
            (int(entry["data_offsets"][1]) for name, entry in entries.items() if name != "__metadata__"), default=0
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ValueError("its header is not a safetensors header") from None
    if 8 + length + end != size:
        raise ValueError(f"its header describes {8 + length + end} bytes, the file has {size}")
    return header


def _check_safetensors(source: Source, folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        try:
            safetensors_header(path)
        except ValueError as error:
            raise InputError(
                f"{source.describe()}: {path} is truncated or corrupt ({error}); save or download it again."
            ) from None


def _check_weight_files(source: Source, folder: Path, safetensors_names: tuple[str, ...], trust_pickle: bool) -> None:
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") and name.startswith(safetensors_names) for name in files):
        return
    pickled = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if not pickled:
        raise InputError(f"{source.describe()} holds no weights (no .safetensors file).")
    if not trust_pickle:
        raise InputError(
            f"{source.describe()} holds only pickle weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors, or pass --trust-pickle if you trust their origin."
        )


def read_json_object(path: Path, whose: str, way_out: str) -> dict:
    """The JSON object in ``path``, or an ``InputError`` that names ``whose`` file it is, what is wrong with it
    and ``way_out``."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{whose}: {path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"{way_out}."
        ) from None
    except UnicodeDecodeError:
        raise InputError(f"{whose}: {path} is not UTF-8 text; {way_out}.") from None
    except OSError as error:
        raise InputError(f"{whose}: {path} cannot be read ({error.strerror}); {way_out}.") from None
    if not isinstance(content, dict):
        raise InputError(f"{whose}: {path} is not a JSON object; {way_out}.")
    return content


def _read_config(source: Source, folder: Path, name: str) -> dict:
    """A checkpoint's config.json or adapter_config.json."""
    return read_json_object(folder / name, source.describe(), "fix it, or save or download the checkpoint again")


def _check_remote_code(source: Source, folder: Path, trust_remote_code: bool) -> None:
    if trust_remote_code or not (folder / "config.json").is_file():
        return
    config = _read_config(source, folder, "config.json")
    if config.get("auto_map"):
        raise InputError(
            f"{source.describe()} needs custom model code (auto_map in config.json); pass --trust-remote-code "
            "if you have read it and trust it."
        )


def _check_kind(source: Source, folder: Path, adapter: bool) -> None:
    """A model folder where a model is wanted, an adapter folder where an adapter is."""
    has_model, has_adapter = ((folder / name).is_file() for name in ("config.json", "adapter_config.json"))
    if adapter and not has_adapter:
        if has_model:
            raise InputError(
                f"{source.describe()} is a full model (config.json), not a PEFT adapter; pass it as --base with "
                "its adapter as --adapter, or as --model for a full fine-tune."
            )
        raise InputError(f"{source.describe()} is not a PEFT adapter (no adapter_config.json).")
    if not adapter and not has_model:
        if has_adapter:
            partner = " and this folder as --adapter" if source.flag == "--base" else ""
            raise InputError(
                f"{source.describe()} is a PEFT adapter (adapter_config.json), not a model; pass the model it was "
                f"trained on as {source.flag}{partner}."
            )
        raise InputError(
            f"{source.describe()} is not a transformers checkpoint (no config.json); pass the folder of the "
            "model's config.json and weights."
        )


def check_checkpoint(source: Source, options: LoadOptions, kind: str = "model") -> None:
    """Every check of a checkpoint that loads no weights, so that it can run before anything loads.

    ``kind`` is "model" (loaded by transformers), "adapter" (loaded by PEFT) or "streamed" (a pre-trained
    checkpoint whose safetensors decompose streams). A local folder must be of that kind, hold weights it
    may load, need no code it may not run and hold whole safetensors files; a hub id is checked when fetched.
    """
    if kind == "streamed" and options.load_in_4bit:
        raise InputError(
            "--load-in-4bit with a streamed --base-model is not supported (streamed blocks are read unquantized); "
            "add --resident-base to load both models in 4-bit."
        )
    folder = source.local  # the checks below read it, and name the source in their messages
    if folder is None:
        return
    _check_kind(source, folder, adapter=kind == "adapter")
    _read_config(source, folder, "adapter_config.json" if kind == "adapter" else "config.json")
    if kind == "streamed":
        if not any(folder.glob("*.safetensors")):
            raise InputError(
                f"{source.describe()} has no .safetensors weights to stream; convert them, or add --resident-base "
                "(with --trust-pickle for pickle weights you trust)."
            )
    else:
        weight_names = ("adapter_model",) if kind == "adapter" else ("model",)
        _check_weight_files(source, folder, weight_names, options.trust_pickle)
        if kind == "model":
            _check_remote_code(source, folder, options.trust_remote_code)
    _check_safetensors(source, folder)


def tokenizer_source(base: Source, finetune: Source | None) -> Source:
    """Where the tokenizer is read from: the fine-tune (adapter or fine-tuned model) when it ships one
    (fine-tunes often add a chat template), else the base."""
    if (
        finetune is not None
        and finetune.local is not None
        and any((finetune.local / name).is_file() for name in _TOKENIZER_MARKERS)
    ):
        return finetune
    return base


def check_tokenizer(source: Source) -> None:
    """A local folder the tokenizer is read from holds one."""
    if source.local is not None and not any((source.local / name).is_file() for name in _TOKENIZER_MARKERS):
        raise InputError(
            f"{source.describe()} holds no tokenizer ({', '.join(_TOKENIZER_MARKERS)}), nor does its fine-tune; "
            "save the tokenizer into it with tokenizer.save_pretrained(DIR)."
        )


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of a fine-tune, by flag without its dashes, and where its tokenizer is read from."""

    by_flag: dict[str, Source]
    tokenizer: Source


def check_pair(base: str, adapter: str, options: LoadOptions) -> Checkpoints:
    """A base model and its LoRA adapter, each checked as far as it can be without loading it."""
    base_source, adapter_source = resolve(base, "--base"), resolve(adapter, "--adapter")
    check_checkpoint(base_source, options)
    check_checkpoint(adapter_source, options, "adapter")
    return _with_tokenizer({"base": base_source, "adapter": adapter_source}, base_source, adapter_source)


def check_full_finetune(
    finetuned: str, pretrained: str, options: LoadOptions, *, resident: bool = False
) -> Checkpoints:
    """A fully fine-tuned model and its pre-trained checkpoint (to load with ``resident``, else to stream),
    each checked as far as it can be without loading it."""
    finetuned_source, pretrained_source = resolve(finetuned, "--model"), resolve(pretrained, "--base-model")
    check_checkpoint(finetuned_source, options)
    check_checkpoint(pretrained_source, options, "model" if resident else "streamed")
    return _with_tokenizer(
        {"model": finetuned_source, "base_model": pretrained_source}, pretrained_source, finetuned_source
    )


def _with_tokenizer(by_flag: dict[str, Source], base: Source, finetune: Source) -> Checkpoints:
    tokenizer = tokenizer_source(base, finetune)
    check_tokenizer(tokenizer)
    check_hub_reachable(by_flag.values())
    return Checkpoints(by_flag, tokenizer)


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_SECONDS = 5.0


@cache
def _hub_unreachable(endpoint: str) -> str | None:
    """Why one connection to the Hub's host fails (None when it opens)."""
    from urllib.parse import urlsplit

    address = urlsplit(endpoint)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return None


def hub_connection_failure() -> str | None:
    """Why one connection to the Hub's host fails now, or None when it opens. Behind a proxy, which the probe
    would bypass, nothing is probed and None is returned."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    return _hub_unreachable(constants.ENDPOINT)


def check_hub_reachable(sources: Iterable[Source]) -> None:
    """Refuse hub ids at once when the Hub cannot be reached: huggingface_hub would retry each file for most
    of a minute, printing a line per retry, before failing. With HF_HUB_OFFLINE set nothing is fetched (and
    a missing copy fails at once); behind a proxy the connection is not probed."""
    from huggingface_hub import constants

    remote = [source for source in sources if source.local is None]
    if not remote or constants.HF_HUB_OFFLINE:
        return
    reason = hub_connection_failure()
    if reason is not None:
        raise InputError(
            f"{remote[0].describe()} is not a local directory and the Hugging Face Hub ({constants.ENDPOINT}) "
            f"cannot be reached ({reason}); set HF_HUB_OFFLINE=1 to use a copy in the Hub's cache, or download "
            "it where there is network (hf download ID --local-dir DIR) and pass the directory."
        )
