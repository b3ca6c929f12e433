"""Texts as token strings with the TuCo at each token: what every token view (HTML, terminal) draws.

Built from a ``Decomposition`` or ``DecompositionSums`` (any ``positions``; per-block ‖PTC_l‖₁ / ‖FTC_l‖₁
at every decomposed token) or from a ``SteeredGeneration`` (the TuCo behind each new token; generation records no per-block
norms, so those tokens carry TuCo only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..io.results import ResultRow

_DECODE_WINDOW = 8  # tokens of left context decoded with each token, so spaces and merges come out as in the text
NO_BLOCK_NORMS = "per-block norms are not recorded during generation; new tokens show TuCo only"


@dataclass(frozen=True)
class ScoredToken:
    """One token: its text, and TuCo (None where it was not decomposed) with per-block L1 norms if known."""

    text: str
    tuco: float | None = None
    ptc_l1: tuple[float, ...] | None = None
    ftc_l1: tuple[float, ...] | None = None
    generated: bool = False


@dataclass(frozen=True)
class ScoredText:
    """A prompt (and any generated continuation) as scored tokens, with a title and a note for readers."""

    title: str
    tokens: tuple[ScoredToken, ...]
    note: str = ""

    def headline(self) -> tuple[str, float | None]:
        """The number that summarises the text: mean TuCo of the new tokens, else TuCo at the last scored token."""
        new = [t.tuco for t in self.tokens if t.generated and t.tuco is not None]
        if new:
            return f"mean TuCo of {len(new)} new tokens", sum(new) / len(new)
        scored = [t.tuco for t in self.tokens if t.tuco is not None]
        return ("TuCo at the last token", scored[-1]) if scored else ("TuCo", None)

    def profile(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(‖PTC_l‖₁, ‖FTC_l‖₁) per block at the last token that has them, or None."""
        norms = [(t.ptc_l1, t.ftc_l1) for t in self.tokens if t.ptc_l1 is not None and t.ftc_l1 is not None]
        return norms[-1] if norms else None



class DecomposedTokens(Protocol):
    """What the views read of a ``Decomposition`` or ``DecompositionSums`` (the views sit below the core)."""

    @property
    def x0(self) -> torch.Tensor: ...

    @property
    def positions(self) -> torch.Tensor: ...

    @property
    def tuco(self) -> torch.Tensor: ...

    def layer_norms(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class GeneratedTokens(Protocol):
    """What the views read of a ``SteeredGeneration``."""

    @property
    def sequences(self) -> torch.Tensor: ...

    @property
    def tuco(self) -> torch.Tensor: ...


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds to the decoded sequence, so SentencePiece spaces and byte merges survive.

    A character split over several byte tokens goes to the token that completes it (the others add ""),
    and one the sequence leaves unfinished to its last token, as decode shows it ("\ufffd"), so that
    ``"".join(token_texts(t, ids)) == t.decode(ids)``: a generation cut mid-character prints as decoded.
    """
    ids = [int(i) for i in ids]
    texts = []
    for index in range(len(ids)):
        start = max(0, index - _DECODE_WINDOW)
        before = _whole_characters(tokenizer.decode(ids[start:index], skip_special_tokens=False))
        through = tokenizer.decode(ids[start : index + 1], skip_special_tokens=False)
        if index < len(ids) - 1:
            through = _whole_characters(through)
        if through.startswith(before):
            texts.append(through[len(before) :])
        else:
            texts.append(tokenizer.decode([ids[index]], skip_special_tokens=False))
    return texts


def _whole_characters(text: str) -> str:
    """``text`` without the replacement characters that stand for an unfinished multi-byte character."""
    return text.rstrip("\ufffd")


def _labels(tokenizer: Any | None, ids: Sequence[int]) -> list[str]:
    return token_texts(tokenizer, ids) if tokenizer is not None else [f"[{int(i)}]" for i in ids]


def _per_row(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch] → [batch, 1] (the positions axis that ``positions="last"`` squeezes away); [batch, k] as is."""
    return tensor.reshape(batch, -1).cpu()


def texts_from_decomposition(
    decomposition: DecomposedTokens,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any | None = None,
    titles: Sequence[str] | None = None,
) -> list[ScoredText]:
    """One ``ScoredText`` per prompt, every decomposed token with its TuCo and per-block norms.

    With ``input_ids`` every real token of the prompt is shown (the ones not decomposed uncoloured), as
    decoded text with ``tokenizer`` or as ``[id]`` without. Without them only the decomposed positions
    are shown, labelled ``[position]``. Padding is taken from ``attention_mask``, else from the rows that
    ``decompose`` zeroed.
    """
    batch = decomposition.x0.shape[0]
    positions = _per_row(decomposition.positions, batch)
    tuco = _per_row(decomposition.tuco, batch)
    ptc_norm, ftc_norm = decomposition.layer_norms()
    if ptc_norm.ndim == 2:  # [batch, n_layers] → [batch, n_layers, 1]
        ptc_norm, ftc_norm = ptc_norm[..., None], ftc_norm[..., None]
    ptc_norm, ftc_norm = ptc_norm.transpose(1, 2).cpu(), ftc_norm.transpose(1, 2).cpu()  # [batch, k, n_layers]
    if attention_mask is not None:
        attention_mask = attention_mask.cpu().bool()
        real = attention_mask.gather(1, positions)
    else:
        x0 = decomposition.x0.reshape(batch, positions.shape[1], -1)
        real = x0.abs().sum(-1).cpu() > 0
    texts = []
    for row in range(batch):
        scores = {
            int(positions[row, j]): (
                float(tuco[row, j]),
                tuple(ptc_norm[row, j].tolist()),
                tuple(ftc_norm[row, j].tolist()),
            )
            for j in range(positions.shape[1])
            if real[row, j]
        }
        if input_ids is None:
            shown = sorted(scores)
            labels = [f"[{p}]" for p in shown]
        else:
            zeroed = {int(positions[row, j]) for j in range(positions.shape[1]) if not real[row, j]}
            shown = [
                p for p in range(input_ids.shape[1])
                if (attention_mask[row, p] if attention_mask is not None else p not in zeroed)
            ]
            labels = _labels(tokenizer, input_ids[row, shown].tolist())
        tokens = tuple(ScoredToken(label, *scores.get(p, ())) for p, label in zip(shown, labels))
        texts.append(ScoredText(titles[row] if titles else f"prompt {row}", tokens))
    return texts


def text_from_row(
    row: ResultRow, input_ids: Sequence[int], tokenizer: Any | None, title: str, note: str = ""
) -> ScoredText:
    """A stored ``analyze --positions all`` row as a ``ScoredText``, for prompts whose decomposition is gone
    (resumed, or computed by another rank): TuCo at every token from ``token_tuco``, and the per-block
    norms the row keeps, those at the last token. ``input_ids`` are the tokens analysed (``n_tokens`` of them).
    """
    values = row.token_tuco or []
    if len(values) != len(input_ids):
        raise ValueError(f"row {row.id!r} has {len(values)} token TuCo values for {len(input_ids)} tokens.")
    if row.ftc_l1 is None:
        raise ValueError(f"row {row.id!r} has no ftc_l1, the per-block norms drawn at its last token.")
    last_norms = (tuple(row.ptc_l1), tuple(row.ftc_l1))
    labels = _labels(tokenizer, input_ids)
    last = len(labels) - 1
    tokens = tuple(
        ScoredToken(label, value, *(last_norms if k == last else ()))
        for k, (label, value) in enumerate(zip(labels, values))
    )
    return ScoredText(title, tokens, note)


def texts_from_generation(
    generation: GeneratedTokens,
    tokenizer: Any | None = None,
    attention_mask: torch.Tensor | None = None,
    titles: Sequence[str] | None = None,
) -> list[ScoredText]:
    """One ``ScoredText`` per row: the prompt uncoloured, then each new token coloured by the TuCo behind it.

    Prompt padding is dropped by ``attention_mask`` (the prompts' mask) if given, else leading
    ``tokenizer.pad_token_id`` tokens; a row ends at its end-of-sequence token.
    """
    n_new = generation.tuco.shape[1]
    sequences = generation.sequences.cpu()
    prompt_length = sequences.shape[1] - n_new
    pad_id = getattr(tokenizer, "pad_token_id", None)
    texts = []
    for row in range(sequences.shape[0]):
        prompt = sequences[row, :prompt_length].tolist()
        if attention_mask is not None:
            prompt = [t for t, keep in zip(prompt, attention_mask[row].tolist()) if keep]
        elif pad_id is not None:
            while prompt and prompt[0] == pad_id:
                prompt = prompt[1:]
        values = generation.tuco[row].tolist()
        finished = next((k for k, value in enumerate(values) if math.isnan(value)), n_new)
        new = sequences[row, prompt_length : prompt_length + finished].tolist()
        labels = _labels(tokenizer, prompt + new)
        tokens = [ScoredToken(label) for label in labels[: len(prompt)]]
        tokens += [ScoredToken(label, value, generated=True) for label, value in zip(labels[len(prompt) :], values)]
        texts.append(ScoredText(titles[row] if titles else f"generation {row}", tuple(tokens), NO_BLOCK_NORMS))
    return texts
