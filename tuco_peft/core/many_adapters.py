"""TuCo of each adapter a model holds: the checkpoints of a training run, or a shelf of adapters trained on one
base, measured against that base loaded once (``PeftModel.load_adapter`` adds each to the same model).

Each adapter is decomposed as if it alone were active. Where PEFT can mix adapters in one batch (LoRA, no
DoRA), the prompts of every adapter run in one forward, each row through its own adapter (``decompose``'s
``adapter_names``): every base weight is read once for all of them, as multi-LoRA serving does. Otherwise one
adapter after another. Either way the model's own active adapter, and which weights are trainable, are left as
they were found.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Literal

import torch
from torch import nn

from ..errors import InputError
from ..lora.adapters import adapter_active, held_adapters, why_not_mixable
from ..lora.backend import Backend
from ..model.inputs import Positions, prepare_batch
from ..model.parts import model_parts
from .contributions import Decomposition, DecompositionSums
from .decompose import decompose


def decompose_adapters(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    adapters: Sequence[str] | None = None,
    positions: Positions = "last",
    backend: Backend | None = None,
    keep: Literal["all", "sums"] = "all",
    mixed_batches: bool | None = None,
) -> dict[str, Decomposition | DecompositionSums]:
    """``decompose`` once per adapter of ``model``, each as the only active one: ``{adapter name: result}``.

    Args:
        model: a ``peft.PeftModel`` holding several adapters (``model.load_adapter(path, adapter_name=...)``).
        input_ids: ``[batch, seq]`` token ids, as in ``decompose``.
        attention_mask: as in ``decompose``.
        adapters: the adapters to decompose, in this order; all that the model holds if omitted.
        positions: as in ``decompose``.
        backend: as in ``decompose``.
        keep: as in ``decompose``.
        mixed_batches: the prompts of every adapter in one forward (the batch grows by the number of
            adapters); ``None``: where PEFT can mix the adapters, else one after another.
    """
    parts = model_parts(model)
    held = held_adapters(parts.modules)
    names = held if adapters is None else _checked(adapters, held)
    if mixed_batches is None:
        mixed_batches = why_not_mixable(parts.modules, names) is None
    if mixed_batches:
        batch = prepare_batch(input_ids, attention_mask, positions, parts.input_device)  # checked before it grows
        rows = len(batch.input_ids)
        if not isinstance(positions, str):  # token indices: one row of them per prompt, for each adapter
            positions = batch.rows.repeat(len(names), 1)
        result = decompose(
            model,
            batch.input_ids.repeat(len(names), 1),
            batch.attention_mask.repeat(len(names), 1),
            positions=positions,
            backend=backend,
            keep=keep,
            adapter_names=[name for name in names for _ in range(rows)],
        )
        return {name: _prompts(result, slice(i * rows, (i + 1) * rows)) for i, name in enumerate(names)}
    results: dict[str, Decomposition | DecompositionSums] = {}
    for name in names:
        with adapter_active(parts.modules, name):
            results[name] = decompose(model, input_ids, attention_mask, positions=positions, backend=backend, keep=keep)
    return results


def _prompts(result: Decomposition | DecompositionSums, rows: slice) -> Decomposition | DecompositionSums:
    """The decomposition of the prompts ``rows`` of the batch (every field's first axis)."""
    return type(result)(**{field.name: getattr(result, field.name)[rows] for field in fields(result)})


def _checked(adapters: Sequence[str], held: list[str]) -> list[str]:
    if isinstance(adapters, str):
        raise InputError(f"adapters must be a list of adapter names, got the string {adapters!r}; pass [{adapters!r}].")
    names = list(adapters)
    if not names:
        raise InputError(f"adapters is empty; name at least one of the model's adapters: {', '.join(held)}.")
    unknown = [name for name in names if name not in held]
    if unknown:
        raise InputError(
            f"the model holds no adapter named {', '.join(map(repr, unknown))}; it holds {', '.join(map(repr, held))} "
            "(add one with model.load_adapter(path, adapter_name=...))."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"adapters names {', '.join(map(repr, repeated))} more than once; name each adapter once.")
    return names
