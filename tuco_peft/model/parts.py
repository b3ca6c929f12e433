"""Find the parts of a (PEFT-wrapped) transformers causal LM that the decomposition works on.

What is found depends on the model's structure only, so it is found once and kept for the next call while
that structure holds (``_Survey``): every call checks, in one quick walk, that the model still has the very
same modules (adapters added, injected or unloaded, merged-and-unloaded layers, swapped blocks all change
them), the same active adapters, the same config values (a sliding window set after loading, say) and the
same modules with a forward replaced on the instance (accelerate's device hooks). A stale survey is never used, nor anything derived
from it (``ModelParts.derived``).
"""

from __future__ import annotations

import copy
import inspect
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cache
from operator import attrgetter
from typing import Any, TypeVar, cast

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import UnsupportedModelError
from .interception import forward_replaced, submodules
from .inventory import ModuleInventory, take_inventory
from .shared_keys_values import passes_store

_LAYER_LIST_NAMES = ("layers", "h", "blocks")
# The block argument under which Kolibri 1.1 hands later blocks the key pool an indexer block selected.
_CARRIED_KEY_POOL = "index_pool"
T = TypeVar("T")


@dataclass(frozen=True)
class ModelParts:
    """A causal LM split into the pieces TuCo talks about.

    ``decoder`` runs the embeddings, the blocks and the final norm (never the LM head: TuCo needs no
    logits; a multimodal model's text decoder); ``layers`` are the decoder blocks in order, each one TuCo "layer".
    """

    causal_lm: PreTrainedModel
    decoder: nn.Module
    layers: nn.ModuleList
    config: PretrainedConfig  # the decoder's: a multimodal model's text config
    modules: ModuleInventory  # what the checks and switches of an analysis need, from one walk
    # Blocks reuse earlier blocks' keys/values (``model.shared_keys_values``): every pre-trained block then runs in
    # full, with a store of its own.
    shares_keys_values: bool
    _derived: dict[Hashable, Any]

    def derived(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, kept under ``key`` while the model keeps the structure it was surveyed in: for what a
        later layer derives from that structure alone (each block's pre-trained path), dropped with the
        survey when the model changes."""
        if key not in self._derived:
            self._derived[key] = make()
        return cast(T, self._derived[key])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def input_device(self) -> torch.device:
        """Where the token ids go: the input embeddings' device (the first of several with a device_map)."""
        weight = cast(torch.Tensor, self.causal_lm.get_input_embeddings().weight)  # an embedding's Parameter
        return weight.device


@cache
def _causal_lm_class_names() -> frozenset[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return frozenset(names)


def _is_causal_lm(model: PreTrainedModel) -> bool:
    name = type(model).__name__
    return name in _causal_lm_class_names() or name.endswith(("ForCausalLM", "LMHeadModel"))


def _blocks_sharing_keys_values(text_config: PretrainedConfig) -> int:
    """How many blocks reuse an earlier block's keys/values: Gemma 3n and Gemma 4 count them
    (``num_kv_shared_layers``), other families mark them ``"reuse"`` (``kv_sharing_modes``, e.g. Kolibri)."""
    modes = getattr(text_config, "kv_sharing_modes", None) or ()
    return max(int(getattr(text_config, "num_kv_shared_layers", None) or 0), list(modes).count("reuse"))


def _residual_streams(text_config: PretrainedConfig) -> int:
    """How many residual streams the blocks carry side by side: Gemma 3n's AltUp keeps several."""
    return int(getattr(text_config, "altup_num_inputs", None) or 1)


def _find_layers(decoder: nn.Module, config: PretrainedConfig) -> nn.ModuleList | None:
    for name in _LAYER_LIST_NAMES:
        candidate = getattr(decoder, name, None)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    n_layers = getattr(config, "num_hidden_layers", None)
    for module in decoder.modules():
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
            return module
    return None


def unwrap_causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel or PeftMixedModel (or the model itself when adapters were
    injected directly)."""
    from peft import PeftMixedModel, PeftModel, PeftType

    if isinstance(model, PeftMixedModel):  # several tuner kinds at once (LoRA + LoHa, ...); no prompt learning
        return model.base_model.model
    if isinstance(model, PeftModel):
        for name in model.active_adapters:
            config = model.peft_config[name]
            if config.is_prompt_learning:
                peft_type = cast(PeftType, config.peft_type)  # typed str | None; each prompt-learning config sets it
                raise UnsupportedModelError(
                    f"adapter {name!r} is {peft_type.value} (prompt learning): it adds virtual tokens, "
                    "not a per-block update, so TuCo is not defined block by block. Use a LoRA adapter."
                )
        # PEFT types the base model as any nn.Module; a PeftModel wraps a PreTrainedModel (its __init__'s type).
        return cast(PreTrainedModel, model.get_base_model())
    if isinstance(model, PreTrainedModel):
        return model
    raise UnsupportedModelError(
        f"expected a peft.PeftModel wrapping a transformers causal LM, got {type(model).__name__}; "
        "load one with PeftModel.from_pretrained(base_model, adapter_path)."
    )


def model_parts(model: nn.Module) -> ModelParts:
    """Locate the decoder stack and its blocks, refusing what is not a decoder-only causal LM."""
    causal_lm = unwrap_causal_lm(model)
    survey = _SURVEYS.get(causal_lm)
    if survey is None or not survey.holds_for(causal_lm):
        survey = _SURVEYS[causal_lm] = _Survey.of(causal_lm)
    return ModelParts(
        causal_lm,
        survey.decoder,
        survey.layers,
        survey.text_config,
        survey.inventory,
        survey.shares_keys_values,
        survey.derived,
    )


def _active_adapters(inventory: ModuleInventory) -> list[tuple[str, ...]]:
    return [tuple(module.active_adapters) for _, module in inventory.lora_layers + inventory.other_adapters]


@dataclass(frozen=True)
class _Survey:
    """What ``model_parts`` found in a causal LM, and the structure it found it in.

    Kept in a weak dictionary keyed by the causal LM, so it must not refer to the causal LM itself (that
    would keep it alive forever): it holds the LM's submodules and config, which do not refer back.
    """

    decoder: nn.Module
    layers: nn.ModuleList
    config: PretrainedConfig
    text_config: PretrainedConfig  # the decoder's (``config`` itself, but for a multimodal model)
    inventory: ModuleInventory
    shares_keys_values: bool
    structure: list[nn.Module]
    root_children: dict[str, nn.Module | None]  # the LM's own submodules by name
    children: list[dict[str, nn.Module | None]]  # those of each module of ``structure``, as surveyed
    active_adapters: list[tuple[str, ...]]
    attention: str | None
    replaced_forwards: list[nn.Module]
    settings: dict[str, Any]  # a deep copy of the config's values
    derived: dict[Hashable, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, causal_lm: PreTrainedModel) -> _Survey:
        config = causal_lm.config
        if getattr(config, "is_encoder_decoder", False) or not _is_causal_lm(causal_lm):
            raise UnsupportedModelError(
                f"{type(causal_lm).__name__} is not a decoder-only causal LM; TuCo decomposes the residual "
                "stream of a causal decoder (load the model with AutoModelForCausalLM)."
            )
        text_config = config.get_text_config(decoder=True)
        streams = _residual_streams(text_config)
        if streams > 1:
            raise UnsupportedModelError(
                f"{type(causal_lm).__name__} carries {streams} residual streams through its blocks (AltUp, as Gemma "
                "3n), while TuCo splits one residual stream into the blocks' updates; models with several streams "
                "are not supported."
            )
        # A multimodal model (Gemma 3 and 4 as AutoModelForCausalLM loads them): its text decoder, which text
        # prompts go through alone.
        decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
        decoder = getattr(decoder, "language_model", decoder)
        layers = _find_layers(decoder, text_config) if isinstance(decoder, nn.Module) else None
        if not isinstance(decoder, nn.Module) or layers is None:
            raise UnsupportedModelError(
                f"could not find the decoder blocks of {type(causal_lm).__name__} "
                f"(looked for {', '.join(_LAYER_LIST_NAMES)} under .{causal_lm.base_model_prefix})."
            )
        if _CARRIED_KEY_POOL in inspect.signature(type(layers[0]).forward).parameters:
            raise UnsupportedModelError(
                f"{type(causal_lm).__name__}'s blocks hand later blocks the pool of keys their indexer selected "
                f"({_CARRIED_KEY_POOL}, Kolibri 1.1), chosen from the fine-tuned queries and keys: the pre-trained blocks "
                "would need a pool of their own, so the numbers would be wrong once a prompt is longer than the "
                "pool. Models whose blocks carry a key pool are not supported."
            )
        shares_keys_values = _blocks_sharing_keys_values(text_config) > 0
        if shares_keys_values and not passes_store(layers[0]):
            raise UnsupportedModelError(
                f"{type(causal_lm).__name__} has blocks that reuse the keys/values of earlier blocks, but its blocks "
                "are not handed them as an argument (shared_kv_states), where the pre-trained blocks could be given "
                "keys/values of their own (transformers 5.5 kept them on the cache), so the numbers would be wrong. "
                "Upgrade transformers: from 5.6 on, the decoder hands them to each block, which tuco-peft follows."
            )
        inventory = take_inventory(causal_lm, layers)
        structure = submodules(causal_lm)
        return cls(
            decoder=decoder,
            layers=layers,
            config=config,
            text_config=text_config,
            inventory=inventory,
            shares_keys_values=shares_keys_values,
            structure=structure,
            root_children=dict(causal_lm._modules),
            children=[dict(children) for children in map(_children, structure)],
            active_adapters=_active_adapters(inventory),
            attention=getattr(config, "_attn_implementation", None),
            replaced_forwards=_replaced_forwards(structure),
            settings=copy.deepcopy(vars(config)),
        )

    def holds_for(self, causal_lm: PreTrainedModel) -> bool:
        """Whether ``causal_lm`` still has the structure this survey was taken in: the LM and every module it
        had hold the very same children under the same names (so, from the root down, the tree is the one
        surveyed), read and compared in C, by identity first; the survey holds every module it lists, so no
        id can be reused meanwhile."""
        config = causal_lm.config
        return (
            config is self.config
            and getattr(config, "_attn_implementation", None) == self.attention
            and causal_lm._modules == self.root_children
            and list(map(_children, self.structure)) == self.children
            and _active_adapters(self.inventory) == self.active_adapters
            and _replaced_forwards(self.structure) == self.replaced_forwards
            and vars(config) == self.settings
        )


_children = attrgetter("_modules")  # a module's submodules by name (nn.Module keeps them in ``_modules``)


def _replaced_forwards(modules: list[nn.Module]) -> list[nn.Module]:
    return [module for module in modules if forward_replaced(module)]


_SURVEYS: weakref.WeakKeyDictionary[nn.Module, _Survey] = weakref.WeakKeyDictionary()
