"""Validate a batch of prompts and decide which token positions to decompose."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import InputError
from .attention import key_visibility

Positions = Literal["last", "all"] | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Batch:
    """A validated batch. ``rows[b]`` are the sequence indices decomposed for prompt b."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    squeeze_positions: bool
    # Each row's adapter where the rows go through different ones (PEFT's ``adapter_names``).
    adapter_names: tuple[str, ...] | None = None
    # True where no attention mask was given: no row is padding.
    unpadded: bool = False
    # What every block of a forward derives alike from the batch, made by the first block that asks (one
    # call's worth: a small call costs what its per-block tensor operations cost).
    _per_forward: dict[str, tuple[Any, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def key_visibility(self, sliding_window: int | None) -> torch.Tensor:
        """``model.attention.key_visibility`` at these rows, made once per window."""
        return self.shared(
            f"visibility {sliding_window}",
            self.attention_mask,
            lambda mask: key_visibility(mask, self.rows, sliding_window),
        )

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` [b, seq, ...] at the rows: [b, k, ...] (the index made once per trailing shape). A batch
        axis of 1 (rotary tables, alike for every prompt) is broadcast."""
        index = self.shared(
            f"index {tuple(states.shape[2:])}",
            self.rows,
            lambda rows: rows.reshape(*rows.shape, *([1] * (states.ndim - 2))).expand(-1, -1, *states.shape[2:]),
        )
        if len(states) != len(index):
            states = states.expand(len(index), *states.shape[1:])
        return states.gather(1, index)

    def shared(self, name: str, source: Any, make: Callable[[Any], Any]) -> Any:
        """``make(source)``, made once per forward for every block that asks with the same ``source`` object (the
        decoder hands each block the same position embeddings, for one)."""
        made = self._per_forward.get(name)
        if made is None or made[0] is not source:
            made = self._per_forward[name] = (source, make(source))
        return made[1]

    def to(self, device: torch.device) -> Batch:
        if self.input_ids.device == device:
            return self
        input_ids, attention_mask, position_ids, rows = (
            t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.rows)
        )
        return Batch(
            input_ids, attention_mask, position_ids, rows, self.squeeze_positions, self.adapter_names, self.unpadded
        )

    @property
    def row_is_real(self) -> torch.Tensor:
        """[batch, n_rows] bool: False where a decomposed row is padding (positions="all")."""
        return self.attention_mask.gather(1, self.rows).bool()


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` with every sequence ending at the last column."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding."""
    n = attention_mask.shape[1]
    return n - 1 - attention_mask.flip(-1).argmax(-1)


def _as_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise InputError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}.")
    if attention_mask.shape != input_ids.shape:
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids."
        )
    if attention_mask.is_floating_point() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise InputError("attention_mask must hold 0 (padding) and 1 (token) integers or booleans.")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"rows {empty} of attention_mask are all padding; drop them from the batch.")
    return mask


def _rows(positions: Positions, mask: torch.Tensor) -> tuple[torch.Tensor, bool]:
    batch, n = mask.shape
    if isinstance(positions, str):
        if positions == "last":
            return last_real_index(mask)[:, None], True
        if positions == "all":
            return torch.arange(n, device=mask.device).expand(batch, n), False
        raise InputError(f'positions must be "last", "all" or token indices, got {positions!r}.')
    try:
        rows = torch.as_tensor(positions, device=mask.device)
    except (ValueError, TypeError, RuntimeError):  # a ragged list, or one holding other things than integers
        raise InputError(
            "positions must be token indices: one list for every row, or a [batch, k] integer tensor (rows of "
            "equal length); pad a ragged list of per-row positions by repeating an index."
        ) from None
    if rows.dtype not in (torch.int32, torch.int64) or rows.ndim not in (1, 2) or rows.numel() == 0:
        raise InputError(
            "positions must be a non-empty list/1-D tensor of token indices (the same for every row) "
            f"or a [batch, k] integer tensor; got {rows.dtype} with shape {tuple(rows.shape)}."
        )
    rows = rows.long().expand(batch, -1) if rows.ndim == 1 else rows.long()
    if rows.shape[0] != batch:
        raise InputError(f"positions has {rows.shape[0]} rows but the batch has {batch}.")
    if bool(((rows < -n) | (rows >= n)).any()):
        raise InputError(f"positions must lie in [-{n}, {n}) for sequences of length {n}.")
    rows = rows % n
    if not bool(mask.gather(1, rows).all()):
        raise InputError("some requested positions are padding tokens; pick positions where attention_mask is 1.")
    return rows, False


def prepare_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: Positions,
    device: torch.device,
) -> Batch:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(
            f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}; tokenize with return_tensors='pt'."
        )
    if input_ids.ndim != 2:
        raise InputError(
            f"input_ids must be 2-D [batch, seq], got shape {tuple(input_ids.shape)}; use input_ids.unsqueeze(0) "
            "for one prompt."
        )
    if input_ids.numel() == 0:
        raise InputError(f"the batch is empty (input_ids shape {tuple(input_ids.shape)}).")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise InputError(f"input_ids must hold integer token ids, got {input_ids.dtype}.")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.to(device)
    if attention_mask is None:  # no padding: what the mask would give, without reading one
        batch, n = input_ids.shape
        mask = torch.ones_like(input_ids)
        position_ids = torch.arange(n, device=input_ids.device).expand(batch, n)
        if isinstance(positions, str) and positions == "last":
            return Batch(input_ids, mask, position_ids, position_ids[:, -1:], True, unpadded=True)
        return Batch(input_ids, mask, position_ids, *_rows(positions, mask), unpadded=True)
    mask = _as_mask(input_ids, attention_mask)
    rows, squeeze = _rows(positions, mask)
    return Batch(input_ids, mask, position_ids_from_mask(mask), rows, squeeze)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the mask, so that a padded prompt sees the positions it would see alone."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
