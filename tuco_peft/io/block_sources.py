"""Where the pre-trained blocks come from.

- ``AdapterBlocks``: an adapter fine-tune; the pre-trained block is the fine-tuned block with its adapters
  switched off (``block`` switches them). No second copy of anything.
- ``ModelBlocks``: a full fine-tune beside its loaded base model (the paper's own setting).
- ``StreamedBlocks``: a full fine-tune and a base checkpoint on disk (safetensors). Each pre-trained block is
  built from the memory-mapped file when its turn comes and dropped after, so peak memory is about one model
  plus one block.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import CONFIG_MAPPING

from ..errors import UnsupportedModelError
from ..lora.adapters import adapters_disabled, check_adapters
from ..model.analysis_state import analysis_state, check_deterministic
from ..model.parts import ModelParts, model_parts


class _ResidentBlocks:
    separate_model: bool

    def __init__(self, parts: ModelParts):
        self.layers = parts.layers
        self.switchable = parts.modules.switchable

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Pre-trained block ``index``, its adapters (if it has any) off while it is in use."""
        with adapters_disabled(self.switchable[index]):
            yield self.layers[index]


class AdapterBlocks(_ResidentBlocks):
    separate_model = False


class ModelBlocks(_ResidentBlocks):
    separate_model = True

    def __init__(self, parts: ModelParts, base: ModelParts):
        _check_same_architecture(
            parts, type(base.layers[0]).__name__, len(base.layers), base.config.hidden_size, "base_model"
        )
        for index, (ours, theirs) in enumerate(zip(parts.layers, base.layers)):
            mine, other = next(ours.parameters()), next(theirs.parameters())
            same_device = mine.device == other.device or "meta" in (mine.device.type, other.device.type)
            if mine.dtype != other.dtype or not same_device:
                raise UnsupportedModelError(
                    f"block {index} of base_model is {other.dtype} on {other.device}, the fine-tuned model's is "
                    f"{mine.dtype} on {mine.device}; load both in the same dtype and place their blocks alike."
                )
        super().__init__(base)
        self.base = base


class StreamedBlocks:
    separate_model = True

    def __init__(self, parts: ModelParts, checkpoint: Path):
        self.parts = parts
        self.file_of_key: dict[str, Path] = {}
        for file in _safetensors_files(checkpoint):
            with safe_open(file, framework="pt", device="cpu") as handle:
                self.file_of_key.update(dict.fromkeys(handle.keys(), file))
        self.prefixes = [_block_prefix(parts, i) for i in range(parts.n_layers)]
        config_file = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
        if config_file.exists():
            _check_same_architecture(
                parts, *_checkpoint_architecture(config_file), str(checkpoint), compare_type=parts.config.model_type
            )

    def _block_tensors(self, index: int, names: set[str]) -> dict[str, torch.Tensor]:
        """Read one block's tensors; each file is mapped only while it is read, so no page stays resident."""
        prefix, keys = self._checkpoint_keys(index, names)
        tensors: dict[str, torch.Tensor] = {}
        for file in {self.file_of_key[key] for key in keys}:
            with safe_open(file, framework="pt", device="cpu") as handle:
                in_file = [key for key in keys if self.file_of_key[key] == file]
                tensors.update((key[len(prefix) :], handle.get_tensor(key)) for key in in_file)
        return tensors

    def _checkpoint_keys(self, index: int, names: set[str]) -> tuple[str, list[str]]:
        """Where block ``index``'s tensors are in the checkpoint, and their keys: under the block's name in the
        model, or that name without the base model's prefix (GPT-2's "h.0."), or else under the one prefix that
        ends as the block's name does and holds exactly the block's tensors ``names`` (a multimodal checkpoint in
        the layout it is saved in: "language_model.model.layers.0." for "model.language_model.layers.0.")."""
        full = self.prefixes[index]
        legacy = full.removeprefix(self.parts.causal_lm.base_model_prefix + ".")
        for prefix in (full, legacy):
            if keys := self._keys_under(prefix):
                return prefix, keys
        tail = "." + ".".join(full.split(".")[-3:])  # ".layers.0."
        candidates = {key[: at + len(tail) - 1] for key in self.file_of_key if (at := ("." + key).find(tail)) >= 0}
        under = {prefix: self._keys_under(prefix) for prefix in candidates}
        fitting = [(p, keys) for p, keys in under.items() if {key[len(p) :] for key in keys} == names]
        if len(fitting) != 1:
            raise UnsupportedModelError(
                f"the base checkpoint has no tensors for block {index} (looked for '{full}*', and for one prefix "
                f"ending in '{tail[1:]}' with this block's tensors); is it a checkpoint of the same architecture?"
            )
        return fitting[0]

    def _keys_under(self, prefix: str) -> list[str]:
        return [key for key in self.file_of_key if key.startswith(prefix)]

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        twin = self.parts.layers[index]
        reference = next(twin.parameters())
        with torch.device("meta"):
            block = type(twin)(self.parts.config, layer_idx=index)
        expected = {k: tuple(v.shape) for k, v in block.state_dict().items()}
        tensors = self._block_tensors(index, set(expected))
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            mismatch = sorted(set(found.items()) ^ set(expected.items()))[:3]
            raise UnsupportedModelError(
                f"block {index} of the base checkpoint does not fit the fine-tuned model's block "
                f"(differences, name and shape: {mismatch}); pass the base checkpoint of this architecture and size."
            )
        block.load_state_dict(tensors, assign=True)
        yield block.to(device=reference.device, dtype=reference.dtype).eval()


def _safetensors_files(checkpoint: Path) -> list[Path]:
    if checkpoint.is_file():
        if checkpoint.suffix != ".safetensors":
            raise UnsupportedModelError(f"{checkpoint} is not a .safetensors file; streaming reads safetensors only.")
        return [checkpoint]
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        return sorted({checkpoint / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(
            f"no .safetensors files in {checkpoint}; save the base model with save_pretrained(..., "
            "safe_serialization=True) or pass the loaded model."
        )
    return files


def _block_prefix(parts: ModelParts, index: int) -> str:
    layer = parts.layers[index]
    for name, module in parts.causal_lm.named_modules():
        if module is layer:
            return name + "."
    raise UnsupportedModelError(f"block {index} is not a submodule of the fine-tuned model.")


def _checkpoint_architecture(config_file: Path) -> tuple[str, int | None, int | None]:
    """(model_type, blocks, width) of a checkpoint's text decoder (a multimodal model's text config), from its
    config.json read through its family's transformers config class, which knows the family's own field names
    (GPT-2's ``n_layer``, ``n_embd``)."""
    fields = json.loads(config_file.read_text())
    kind = fields.get("model_type", "?")
    if kind not in CONFIG_MAPPING:
        return kind, None, None
    config = CONFIG_MAPPING[kind].from_dict(fields).get_text_config(decoder=True)
    return config.model_type, config.num_hidden_layers, config.hidden_size


def _check_same_architecture(
    parts: ModelParts, kind: str, n_layers: int | None, d_model: int | None, what: str, compare_type: str | None = None
) -> None:
    expected_kind = compare_type if compare_type is not None else type(parts.layers[0]).__name__
    if (kind, n_layers, d_model) != (expected_kind, parts.n_layers, parts.d_model):
        raise UnsupportedModelError(
            f"{what} is {kind} with {n_layers} blocks of width {d_model}, but the fine-tuned model is "
            f"{expected_kind} with {parts.n_layers} blocks of width {parts.d_model}; the pre-trained model "
            "must have the fine-tuned model's architecture and size."
        )


PretrainedBlocks = AdapterBlocks | ModelBlocks | StreamedBlocks


def pretrained_blocks(parts: ModelParts, base_model: nn.Module | str | Path | None) -> PretrainedBlocks:
    """Resolve decompose's ``base_model`` argument."""
    if base_model is None:
        return AdapterBlocks(parts)
    if isinstance(base_model, (str, Path)):
        path = Path(base_model)
        if not path.exists():
            raise UnsupportedModelError(
                f"base_model path {path} does not exist; pass a local safetensors checkpoint (directory or file) "
                "or a loaded model."
            )
        return StreamedBlocks(parts, path)
    return ModelBlocks(parts, model_parts(base_model))


def checked_pretrained_blocks(parts: ModelParts, base_model: nn.Module | str | Path | None) -> PretrainedBlocks:
    """Resolve ``base_model`` after the checks every analysis needs: LoRA adapters that can be switched off
    (adapter fine-tunes), and no train-mode dropout in the blocks of either model."""
    if base_model is None:
        check_adapters(parts.modules)
    check_deterministic(parts.modules)
    source = pretrained_blocks(parts, base_model)
    if isinstance(source, ModelBlocks):
        check_deterministic(source.base.modules)
    return source


@contextmanager
def analysis_states(parts: ModelParts, source: PretrainedBlocks) -> Iterator[None]:
    """``model.analysis_state.analysis_state`` for the fine-tuned blocks and, when it is another loaded model, the base's."""
    with analysis_state(parts.modules):
        if isinstance(source, ModelBlocks):
            with analysis_state(source.base.modules):
                yield
        else:
            yield
