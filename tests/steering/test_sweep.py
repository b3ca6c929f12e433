"""alpha_sweep: items from JSONL, per-α accuracy against the no-cache reference, honest cross-validation."""

import json
import string

import pytest
import torch
from helpers.models import VOCAB, model_pair
from helpers.steering_reference import steered_logits
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tuco_peft.errors import InputError
from tuco_peft.integrations.alpha_sweep import (
    ChoiceItem,
    alpha_sweep,
    cross_validate,
    encode_items,
    load_items,
    parse_item,
)

_SPECIAL = ["[PAD]", "[UNK]", "Answer", ":", ".", "A", "B", "C", "D", "Yes", "No"]
_WORDS = [f"w{i}" for i in range(VOCAB - len(_SPECIAL))]


def word_tokenizer():
    """A whitespace/punctuation word-level tokenizer whose vocabulary fits the tiny models."""
    vocab = {word: i for i, word in enumerate(_SPECIAL + _WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def space_splitting_tokenizer():
    """Byte-level BPE whose only merge is " w": " A" and " Yes" start with a lone space token, as on BPE
    tokenizers trained without letter merges; a BOS token is added in front of every text."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = string.ascii_letters + string.digits + " :.?\n"
    symbols = sorted({c for piece, _ in byte_level.pre_tokenize_str(alphabet) for c in piece})
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", *symbols, "Ġw"])}
    backend = Tokenizer(models.BPE(vocab, merges=[("Ġ", "w")]))
    backend.pre_tokenizer = byte_level
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>")


def mwe_record(question, matching, not_matching):
    """A line of Anthropic's model-written evals."""
    return {"question": question, "answer_matching_behavior": matching, "answer_not_matching_behavior": not_matching}


def random_items(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        words = [_WORDS[j] for j in torch.randint(len(_WORDS), (length,), generator=generator)]
        if i % 2:
            items.append({"question": " ".join(words), "choices": ["w1 w2", "w3", "w4", "w5"], "answer": i % 4})
        else:
            items.append(mwe_record(" ".join(words), " Yes", " No"))
    return items


def test_loader_reads_both_styles(tmp_path):
    path = tmp_path / "items.jsonl"
    records = [
        {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "B"},
        {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1},
        mwe_record("Is it good?\n\nAnswer:", " No", [" Yes"]),
        {"question": "Sky blue?", "choices": ["Yes", "No"], "answer": "Yes"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    items = load_items(path)
    assert [item.answer for item in items] == [1, 1, 0, 0]
    assert items[0].prompt() == "Capital of France?\nA. Rome\nB. Paris\nC. Oslo\nAnswer:"
    assert items[0].options() == (" A", " B", " C")
    assert items[2] == ChoiceItem("Is it good?\n\nAnswer:", (" No", " Yes"), 0, lettered=False)
    assert items[2].prompt() == "Is it good?\n\nAnswer:" and items[3].prompt() == "Sky blue?\n\nAnswer:"
    assert items[3].options() == (" Yes", " No")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
        ('{"choices": ["a", "b"], "answer": 0}', "question"),
        ('{"question": "q", "choices": ["a", "b"]', "not valid JSON"),
    ],
)
def test_loader_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message) as error:
        load_items(path)
    assert f"{path}:2" in str(error.value)


def test_accuracy_per_alpha_matches_the_no_cache_reference(tmp_path):
    pretrained, model = model_pair("llama")
    tokenizer = word_tokenizer()
    items = random_items(10)
    alphas = (0.0, 1.0, 2.5)
    log = tmp_path / "sweep.jsonl"
    result = alpha_sweep(model, tokenizer, items, alphas=alphas, folds=5, batch_size=4, log_path=log)
    expected = torch.zeros(len(items), len(alphas), dtype=torch.bool)
    for i, record in enumerate(items):
        item = parse_item(record)
        ids = torch.tensor([tokenizer(item.prompt())["input_ids"]])
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"][0] for o in item.options()]
        for j, alpha in enumerate(alphas):
            logits = steered_logits(model, pretrained, ids, torch.ones_like(ids), [alpha] * 3)[0, -1]
            expected[i, j] = int(logits[option_ids].argmax()) == item.answer
    assert torch.equal(result.correct, expected)
    assert not torch.equal(expected[:, 0], expected[:, 1])  # α changes some answers
    assert result.accuracy == {a: float(expected[:, j].double().mean()) for j, a in enumerate(alphas)}
    assert [json.loads(line)["alpha"] for line in log.read_text().splitlines()] == list(alphas)
    assert len(result.chosen_alphas) == 5


def test_cross_validation_selects_on_training_folds_only():
    alphas = (0.9, 1.0, 1.1)
    correct = torch.zeros(10, 3, dtype=torch.bool)
    correct[:, 1] = torch.arange(10) % 2 == 0  # α = 1 gets half right
    correct[:, 2] = True  # α = 1.1 gets every item right: chosen on every fold
    result = cross_validate(correct, alphas, folds=5)
    assert result.chosen_alphas == [1.1] * 5
    assert result.cv_gain == pytest.approx(0.5) and result.baseline_accuracy == 0.5

    lucky = correct.clone()
    lucky[:, 2] = lucky[:, 1]
    lucky[3, 2] = True  # α = 1.1 is better on one item only: the fold holding it cannot select it
    result = cross_validate(lucky, alphas, folds=5)
    assert max(result.accuracy.values()) - result.accuracy[1.0] == pytest.approx(0.1)  # in-sample gain
    assert result.cv_gain == 0.0
    assert result.chosen_alphas.count(1.0) == 1 and result.chosen_alphas.count(1.1) == 4

    tied = torch.ones(10, 3, dtype=torch.bool)
    assert cross_validate(tied, alphas, folds=2).chosen_alphas == [1.0, 1.0]  # ties keep the fine-tune


def test_bad_sweep_arguments_are_refused():
    _, model = model_pair("llama")
    tokenizer = word_tokenizer()
    with pytest.raises(InputError, match="include 1.0"):
        alpha_sweep(model, tokenizer, random_items(6), alphas=(0.9, 1.1))
    with pytest.raises(InputError, match="folds"):
        alpha_sweep(model, tokenizer, random_items(3), folds=5)
    with pytest.raises(InputError, match="token of their own"):
        alpha_sweep(model, tokenizer, [mwe_record("w1", " w2 w3", " w2")] * 4, folds=2)
    with pytest.raises(InputError, match="empty"):
        alpha_sweep(model, tokenizer, [])


def test_options_are_scored_where_they_first_differ_on_a_space_splitting_tokenizer():
    tokenizer = space_splitting_tokenizer()
    alone = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in (" A", " B")]
    assert alone[0][0] == alone[1][0]  # a lone space: the options' own first tokens cannot tell them apart
    items = [parse_item(r) for r in random_items(6)]
    items.append(parse_item(mwe_record("w1 w2?", " w7", " w3")))  # share " w", differ at the digit
    contexts, options = encode_items(tokenizer, items)
    for item, context, option_ids in zip(items, contexts, options):
        shared = " w" if item.options()[0].startswith(" w") else " "
        assert context == tokenizer(item.prompt() + shared)["input_ids"]
        assert context.count(tokenizer.bos_token_id) == 1
        first_letters = [option[len(shared)] for option in item.options()]
        assert option_ids == tokenizer.convert_tokens_to_ids(first_letters)

    templated_contexts, templated_options = encode_items(tokenizer, items, lambda item: "<s>" + item.prompt())
    assert templated_contexts == contexts and templated_options == options  # the template's BOS is not doubled


def test_sweep_on_a_space_splitting_tokenizer_matches_the_no_cache_reference():
    pretrained, model = model_pair("llama")
    tokenizer = space_splitting_tokenizer()
    items = [parse_item(r) for r in random_items(6)]
    alphas = (0.0, 1.0)
    result = alpha_sweep(model, tokenizer, items, alphas=alphas, folds=2, batch_size=4)
    expected = torch.zeros(len(items), len(alphas), dtype=torch.bool)
    for i, item in enumerate(items):
        ids = torch.tensor([tokenizer(item.prompt() + " ")["input_ids"]])
        option_ids = tokenizer.convert_tokens_to_ids([option.strip()[0] for option in item.options()])
        for j, alpha in enumerate(alphas):
            logits = steered_logits(model, pretrained, ids, torch.ones_like(ids), [alpha] * 3)[0, -1]
            expected[i, j] = int(logits[option_ids].argmax()) == item.answer
    assert torch.equal(result.correct, expected)
