"""Choosing α by cross-validation on multiple-choice questions (Nuti et al., ICML 2025, §5).

The paper's protocol: score each question by the next-token probabilities of its answer options (one
forward, no free generation) under FTC_α steering for a few α, choose α on k − 1 folds and evaluate it on
the held-out fold. The cross-validated gain is the honest improvement over α = 1; the best in-sample
accuracy per α is reported too, but it is optimistic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..io.prompts import encode_prompt
from ..model.inputs import left_pad, position_ids_from_mask
from ..model.parts import model_parts
from ..steering.forward import ftc_scale

PAPER_ALPHAS = (0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_YES_NO = {"yes", "no"}


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question. ``answer`` indexes ``choices``.

    ``lettered`` (MMLU style): the choices are listed under letters in the prompt and the letters are
    scored. Otherwise (yes/no style, e.g. Anthropic model-written evals) the choice texts themselves are
    scored right after the question.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    lettered: bool = True

    def prompt(self) -> str:
        if self.lettered:
            listed = "\n".join(f"{letter}. {choice}" for letter, choice in zip(_LETTERS, self.choices))
            return f"{self.question.rstrip()}\n{listed}\nAnswer:"
        question = self.question.rstrip()
        return question if question.endswith("Answer:") else f"{question}\n\nAnswer:"

    def options(self) -> tuple[str, ...]:
        """The continuations after the prompt, with the space that follows "Answer:" (see ``encode_items``)."""
        if self.lettered:
            return tuple(f" {letter}" for letter in _LETTERS[: len(self.choices)])
        return tuple(choice if choice.startswith(" ") else f" {choice}" for choice in self.choices)


def _answer_index(answer: Any, choices: Sequence[str], where: str) -> int:
    if isinstance(answer, str) and answer.strip() in choices:
        return list(choices).index(answer.strip())
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in _LETTERS[: len(choices)]:
        return _LETTERS.index(answer.strip().upper())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return answer
    raise InputError(
        f"{where}: answer {answer!r} is neither an index below {len(choices)}, a letter A–{_LETTERS[len(choices) - 1]} "
        "nor one of the choices."
    )


def parse_item(record: dict[str, Any], where: str = "item") -> ChoiceItem:
    """One item from ``{"question", "choices", "answer"}`` or a model-written-evals record.

    Model-written evals (``answer_matching_behavior`` / ``answer_not_matching_behavior``) become a
    two-way choice whose correct answer is the behaviour-matching one. Choices that are exactly yes/no
    are scored as words, everything else as lettered options.
    """
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise InputError(f"{where}: expected an object with a string 'question', got {str(record)[:80]!r}.")
    if "answer_matching_behavior" in record:
        matching, other = record["answer_matching_behavior"], record.get("answer_not_matching_behavior")
        other = other[0] if isinstance(other, list) and len(other) == 1 else other
        if not isinstance(matching, str) or not isinstance(other, str):
            raise InputError(f"{where}: answer_matching_behavior and answer_not_matching_behavior must be strings.")
        return ChoiceItem(record["question"], (matching, other), 0, lettered=False)
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where}: 'choices' must be a list of at least two strings.")
    if len(choices) > len(_LETTERS):
        raise InputError(f"{where}: {len(choices)} choices; at most {len(_LETTERS)} can be lettered.")
    answer = _answer_index(record.get("answer"), choices, where)
    yes_no = {c.strip().lower() for c in choices} == _YES_NO
    return ChoiceItem(record["question"], tuple(choices), answer, lettered=not yes_no)


def load_items(path: str | Path) -> list[ChoiceItem]:
    """Items from a JSONL file (one record per line, blank lines skipped); errors name the line."""
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
            items.append(parse_item(record, f"{path}:{number}"))
    if not items:
        raise InputError(f"{path} holds no items.")
    return items


@dataclass
class SweepResult:
    """Accuracy per α, and α chosen by k-fold cross-validation against α = 1.

    ``correct`` is bool ``[n_items, n_alphas]``; ``chosen_alphas[f]`` was selected on every fold but f;
    ``cv_gain = cv_accuracy − baseline_accuracy`` on held-out folds (pooled over items).
    """

    alphas: tuple[float, ...]
    accuracy: dict[float, float]
    correct: torch.Tensor
    chosen_alphas: list[float]
    cv_accuracy: float
    baseline_accuracy: float

    @property
    def cv_gain(self) -> float:
        return self.cv_accuracy - self.baseline_accuracy


def _best_alpha(accuracy: torch.Tensor, alphas: Sequence[float]) -> int:
    """Index of the most accurate α; ties go to the α closest to 1 (no steering unless it helps)."""
    best = accuracy.max()
    return min((j for j in range(len(alphas)) if accuracy[j] == best), key=lambda j: (abs(alphas[j] - 1.0), alphas[j]))


def cross_validate(correct: torch.Tensor, alphas: Sequence[float], folds: int = 5, seed: int = 0) -> SweepResult:
    """Choose α on k − 1 folds by accuracy, score it on the held-out fold; items are shuffled with ``seed``."""
    alphas = tuple(float(a) for a in alphas)
    n_items = correct.shape[0]
    if 1.0 not in alphas:
        raise InputError(f"alphas {alphas} must include 1.0, the fine-tuned model the gain is measured against.")
    if folds < 2 or folds > n_items:
        raise InputError(f"folds must be between 2 and the number of items ({n_items}), got {folds}.")
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))
    baseline = alphas.index(1.0)
    chosen, held_out_correct = [], 0
    for fold in order.tensor_split(folds):
        train = torch.ones(n_items, dtype=torch.bool)
        train[fold] = False
        pick = _best_alpha(correct[train].double().mean(0), alphas)
        chosen.append(alphas[pick])
        held_out_correct += int(correct[fold, pick].sum())
    return SweepResult(
        alphas=alphas,
        accuracy={a: float(correct[:, j].double().mean()) for j, a in enumerate(alphas)},
        correct=correct,
        chosen_alphas=chosen,
        cv_accuracy=held_out_correct / n_items,
        baseline_accuracy=float(correct[:, baseline].double().mean()),
    )


def encode_items(
    tokenizer: Any, items: Sequence[ChoiceItem], format_prompt: Callable[[ChoiceItem], str] = ChoiceItem.prompt
) -> tuple[list[list[int]], list[list[int]]]:
    """The context each item is scored after, and the token of each option scored there.

    Prompt and option are tokenized together, and the tokens the options share (a space that the tokenizer
    splits off, as in " A" → " ", "A", or a SentencePiece "▁") move into the context, so the scored tokens
    are the first ones where the options differ.
    """
    contexts: list[list[int]] = []
    options: list[list[int]] = []
    for index, item in enumerate(items):
        prompt = format_prompt(item)
        completions = [encode_prompt(tokenizer, prompt + option).ids for option in item.options()]
        shared = 0
        while all(shared < len(ids) and ids[shared] == completions[0][shared] for ids in completions):
            shared += 1
        scored = [ids[shared] for ids in completions if shared < len(ids)]
        if len(scored) < len(completions) or len(set(scored)) != len(scored):
            raise InputError(
                f"item {index}: the options {item.options()} do not each start with a token of their own after "
                "the prompt, so next-token probabilities cannot tell them apart; reword the choices."
            )
        contexts.append(completions[0][:shared])
        options.append(scored)
    return contexts, options


@torch.no_grad()
def _predictions(
    model: nn.Module, prompts: Sequence[list[int]], options: Sequence[list[int]], batch_size: int, pad_id: int
) -> list[int]:
    """Index of the most probable option of each item: one forward per item, batched."""
    device = model_parts(model).input_device
    predictions = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        position_ids = position_ids_from_mask(mask)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits[:, -1]
        for row, option_ids in enumerate(options[start : start + batch_size]):
            predictions.append(int(logits[row, option_ids].argmax()))
    return predictions


def alpha_sweep(
    model: nn.Module,
    tokenizer: Any,
    items: Iterable[ChoiceItem | dict[str, Any]],
    alphas: Sequence[float] = PAPER_ALPHAS,
    folds: int = 5,
    *,
    batch_size: int = 8,
    seed: int = 0,
    format_prompt: Callable[[ChoiceItem], str] = ChoiceItem.prompt,
    log_path: str | Path | None = None,
) -> SweepResult:
    """Accuracy of ``model`` under ``ftc_scale(model, α)`` for each α, and the cross-validated gain over α = 1.

    Args:
        items: ``ChoiceItem``s or records for ``parse_item`` (see ``load_items`` for JSONL files).
        format_prompt: item → prompt text, e.g. to apply a chat template; the default lists lettered
            choices and ends with "Answer:". A text that already starts with the tokenizer's BOS token is
            tokenized without adding special tokens.
        log_path: if given, one JSON line per α is appended as soon as that α is scored.
    """
    choice_items = [
        item if isinstance(item, ChoiceItem) else parse_item(item, f"items[{i}]") for i, item in enumerate(items)
    ]
    if not choice_items:
        raise InputError("items is empty.")
    cross_validate(torch.zeros(len(choice_items), len(alphas), dtype=torch.bool), alphas, folds, seed)  # check early
    prompts, options = encode_items(tokenizer, choice_items, format_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers = torch.tensor([item.answer for item in choice_items])
    columns = []
    for alpha in alphas:
        with ftc_scale(model, alpha):
            predicted = torch.tensor(_predictions(model, prompts, options, batch_size, pad_id))
        columns.append(predicted == answers)
        if log_path is not None:
            n_items = len(choice_items)
            record = {"alpha": float(alpha), "accuracy": float(columns[-1].double().mean()), "n_items": n_items}
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
    return cross_validate(torch.stack(columns, dim=1), alphas, folds, seed)
