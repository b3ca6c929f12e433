"""Turn ``--adapter DIR`` arguments into the ordered adapters to measure, refusing wrong folders before any
model loads.

Each location is a local folder: an adapter (it holds ``adapter_config.json``), the output folder of a
training run (its ``checkpoint-N`` folders, in step order), or a folder of adapter folders (by name). A
checkpoint carries the step and the training loss that its ``trainer_state.json`` logged, so that a series
of results can be set against training. Only JSON files are read and no torch is imported: a wrong folder
is named at once, before minutes of model loading.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .checkpoints import is_hub_id, read_json_object
from .fingerprint import file_digest

ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"  # the Hugging Face Trainer writes it into every checkpoint folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterCheckpoint:
    """One adapter to measure. ``name`` labels its result rows and is unique in a series; ``step`` and
    ``train_loss`` come from a training checkpoint's trainer_state.json (None outside a training run)."""

    name: str
    path: Path
    step: int | None = None
    train_loss: float | None = None

    @property
    def adapter_name(self) -> str:
        """``name`` as PEFT's ``adapter_name`` takes it: module names hold no "." (it becomes "_"), and the
        prefix keeps a folder named like a module attribute ("train") or PEFT's "__base__" from meaning one."""
        return "tuco:" + self.name.replace(".", "_")


def find_adapters(locations: Sequence[str | Path], base: str | None = None) -> list[AdapterCheckpoint]:
    """The adapters at ``locations``, in their order, each folder expanded to the adapters it holds.

    Raises ``InputError`` naming the path and the way out for a location that is not a local folder, a folder
    with no adapter, a checkpoint whose trainer_state.json is missing or unreadable, two adapters that would
    share a name in the results and, when ``base`` is given, an adapter trained on another base model.
    """
    adapters: list[AdapterCheckpoint] = []
    paths_by_name: dict[str, Path] = {}
    kinds: dict[object, Path] = {}
    for location in locations:
        for adapter in _expand(location):
            config = read_json_object(adapter.path / ADAPTER_CONFIG, f"--adapter {location}", "fix it, or save the adapter again")
            if base is not None:
                _check_base(location, adapter.path / ADAPTER_CONFIG, config, base)
            if adapter.adapter_name in paths_by_name:
                raise InputError(
                    f"--adapter {paths_by_name[adapter.adapter_name]} and --adapter {adapter.path} would both be "
                    f"named {adapter.adapter_name.removeprefix('tuco:')!r}; pass only one of them, or rename one folder."
                )
            paths_by_name[adapter.adapter_name] = adapter.path
            kinds.setdefault(config.get("peft_type"), adapter.path)
            if len(kinds) > 1:
                (first_kind, first), (kind, _) = kinds.items()
                raise InputError(
                    f"--adapter {adapter.path} is a {kind} adapter and --adapter {first} a {first_kind} one; one run "
                    "takes adapters of one kind (PEFT holds them in one model), so analyse each kind in its own run."
                )
            adapters.append(adapter)
    return adapters


def adapter_series(locations: Sequence[str], base: str | None = None) -> list[AdapterCheckpoint] | None:
    """The adapters of a run over several (``find_adapters``), or None when ``locations`` is one location that
    holds no others (an adapter's folder, a Hub id, or something else, which the single fine-tune's checks
    name): one fine-tune."""
    if len(locations) == 1 and not _holds_adapters(Path(locations[0]).expanduser()):
        return None
    return find_adapters(locations, base)


def _holds_adapters(path: Path) -> bool:
    """Whether ``path`` is a training run's folder or a folder of adapters."""
    if not path.is_dir():
        return False
    if _checkpoint_folders(path):
        return True
    return not (path / ADAPTER_CONFIG).is_file() and any((child / ADAPTER_CONFIG).is_file() for child in path.iterdir())


def _checkpoint_folders(path: Path) -> list[Path]:
    return sorted(child for child in path.iterdir() if child.is_dir() and _CHECKPOINT.match(child.name))


def _expand(location: str | Path) -> list[AdapterCheckpoint]:
    """The adapters one location stands for: itself, its checkpoints in step order, or its adapter
    subfolders by name."""
    path = Path(location).expanduser()
    if not path.exists():
        raise InputError(
            f"--adapter {location}: no such local folder (adapters are read from local folders, not the Hub); "
            "pass a folder, downloading a Hub adapter first with hf download ID --local-dir DIR."
        )
    if not path.is_dir():
        raise InputError(f"--adapter {location} is a file; pass the adapter's folder (it holds {ADAPTER_CONFIG}).")
    folders = sorted(child for child in path.iterdir() if child.is_dir())
    checkpoints = _checkpoint_folders(path)
    final = [_adapter(location, path)] if (path / ADAPTER_CONFIG).is_file() else []
    if checkpoints and not _CHECKPOINT.match(path.name):  # the output folder of a training run
        for folder in checkpoints:
            if not (folder / ADAPTER_CONFIG).is_file():
                raise InputError(
                    f"--adapter {location}: {folder} is not a PEFT adapter (no {ADAPTER_CONFIG}); pass the run's "
                    "adapter checkpoints one by one, or remove it from the run folder."
                )
        checkpoints.sort(key=lambda folder: (_step_in_name(folder), folder.name))
        series = [_adapter(location, folder) for folder in checkpoints]
        # The adapter a Trainer saved into the run folder at the end (save_model) comes after its checkpoints,
        # unless it is the last checkpoint again.
        if final and not _same_weights(path, checkpoints[-1]):
            series.append(_final_adapter(location, path))
        return series
    if final:
        return final
    adapters = [folder for folder in folders if (folder / ADAPTER_CONFIG).is_file()]
    if not adapters:
        raise InputError(
            f"--adapter {location} holds no PEFT adapter ({ADAPTER_CONFIG}, in it or in its subfolders); pass "
            "an adapter's folder, a training run's output folder of checkpoint-N adapters, or a folder of "
            "adapter folders."
        )
    return [_adapter(location, folder) for folder in adapters]


def _same_weights(adapter: Path, other: Path) -> bool:
    """Whether two adapter folders hold the same weights files, byte for byte (as far as ``file_digest`` tells)."""
    names = [name for name in _WEIGHT_FILES if (adapter / name).is_file()]
    return bool(names) and all(
        (other / name).is_file() and file_digest(adapter / name) == file_digest(other / name) for name in names
    )


def _final_adapter(location: str | Path, run: Path) -> AdapterCheckpoint:
    """The adapter saved into a run folder itself, at the step its trainer_state.json says the run ended at
    (``Trainer.save_state`` writes it there), if it says so."""
    named = _adapter(location, run)
    state_path = run / TRAINER_STATE
    if not state_path.is_file():
        return named
    state = read_json_object(state_path, f"--adapter {location}", "fix it, or remove it")
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool):
        return named
    return AdapterCheckpoint(named.name, run, step, _train_loss(state, step))


def _step_in_name(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def _adapter(location: str | Path, folder: Path) -> AdapterCheckpoint:
    """An adapter folder; a ``checkpoint-N`` one is named after its run and carries its step and loss."""
    absolute = Path(os.path.abspath(folder))  # "." and "run/.." have names too
    if not _CHECKPOINT.match(folder.name):
        return AdapterCheckpoint(absolute.name, folder)
    state_path = folder / TRAINER_STATE
    elsewhere = "copy the adapter's files into a folder not named checkpoint-N and pass that"
    if not state_path.is_file():
        raise InputError(
            f"--adapter {location}: {folder} is a training checkpoint without {TRAINER_STATE}, so its step is "
            f"unknown; restore the file from the training run, or {elsewhere}."
        )
    restore = f"restore it from the training run, or {elsewhere}"
    state = read_json_object(state_path, f"--adapter {location}", restore)
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise InputError(f"--adapter {location}: {state_path} has no integer global_step; {restore}.")
    if step != _step_in_name(folder):
        raise InputError(
            f"--adapter {location}: {folder} is named for step {_step_in_name(folder)} but its {TRAINER_STATE} "
            f"says global_step {step}; rename the folder to checkpoint-{step}, or restore the file from the training "
            "run."
        )
    return AdapterCheckpoint(f"{absolute.parent.name}/{folder.name}", folder, step, _train_loss(state, step))


def _train_loss(state: dict[str, object], step: int) -> float | None:
    """The training loss logged last at or before ``step`` (eval_loss and the final train_loss are not it)."""
    history = state.get("log_history")
    entries = history if isinstance(history, list) else []
    logged = [
        entry["loss"]
        for entry in entries
        if isinstance(entry, dict)
        and _is_number(entry.get("loss"))
        and _is_number(entry.get("step"))
        and entry["step"] <= step
    ]
    return float(logged[-1]) if logged else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_base(location: str | Path, config_path: Path, config: dict[str, object], base: str) -> None:
    """An adapter that names its base model (base_model_name_or_path) names ``base``, where that can be told."""
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and _certainly_other(named, base):
        raise InputError(
            f"--adapter {location}: {config_path} says the adapter was trained on {named!r}, not on --base "
            f"{base!r}; pass the base the adapter was trained on."
        )


def _certainly_other(named: str, base: str) -> bool:
    """Two folders on disk that are not one, or two different Hub ids. A folder and a Hub id may be the same
    model (a local download, a path on the machine that trained it): their shapes are checked when the
    adapter loads (``io.loaders.check_adapter_fits``)."""
    paths = (Path(named).expanduser(), Path(base).expanduser())
    on_disk = [path.exists() for path in paths]
    if all(on_disk):
        return paths[0].resolve() != paths[1].resolve()
    if any(on_disk) or not all(is_hub_id(name) for name in (named, base)):
        return False
    return named.lower() != base.lower()  # the Hub's ids are not case-sensitive
