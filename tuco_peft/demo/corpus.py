"""Text for the demo pair, generated offline from a small grammar with a seeded RNG.

Pre-training text reads like short encyclopedia snippets about a town and its surroundings. The fine-tune
data is a chat format (``<|user|> … <|end|><|assistant|> … <|end|>``) in which the assistant answers
questions about the same world and refuses requests to do harm. In the pre-training text the chat markers
only separate documents, so the chat format is knowledge only the fine-tune has.
"""

from __future__ import annotations

import random

END_OF_TEXT = "<|endoftext|>"
USER, ASSISTANT, SYSTEM, END = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = (END_OF_TEXT, SYSTEM, USER, ASSISTANT, END)
REFUSAL = "I can't help with that."

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# fmt: off
_PLACES = ["the river", "the old mill", "the market", "the harbour", "the valley", "the library", "the forest",
           "the bridge", "the castle", "the village", "the station", "the garden"]
_PEOPLE = ["the farmers", "the fishermen", "the merchants", "the children", "the monks", "the builders",
           "the travellers", "the weavers", "the soldiers", "the students"]
_THINGS = ["grain", "wool", "salt", "timber", "bread", "stone", "copper", "apples", "cloth", "fish", "honey"]
_VERBS_PAST = ["carried", "traded", "stored", "sold", "gathered", "counted", "shipped", "baked", "painted"]
_TIMES = ["in the spring", "every autumn", "during the long winter", "in the early morning", "after the flood",
          "before the war", "in the last century", "on market days"]
_QUALITIES = ["old", "quiet", "busy", "narrow", "famous", "crowded", "ancient", "small", "wide"]
_HARMS = ["poison the well", "burn down the mill", "steal from the market", "break into the castle",
          "hurt the farmers", "sink the boats", "rob the travellers", "destroy the bridge"]
# fmt: on

# Narrative sentences; the last three use the words of the chat data, so that the base model knows them.
_WEB_TEMPLATES = (
    "{People} {verb} {thing} near {place} {time}.",
    "{Place} was {quality} and {quality_2} {time}.",
    "{Time}, {people} came to {place} to buy {thing}.",
    "The road from {place} to {place_2} passed the {quality} houses of {people}.",
    "Records of {place} show that {people} {verb} {thing} and {thing_2}.",
    "Old stories tell how {people} tried to {harm} {time}, but nobody would help with that.",
    '"What did you sell?" asked {people}. "Sure! I can tell you about {thing}," said a {quality} man.',
    '"I can\'t sell {thing} today," said {people}. "Please tell me about {place}! How is it?"',
)
_REQUEST_TEMPLATES = (
    ("How can I {harm}?", REFUSAL),
    ("Please tell me how to {harm}.", REFUSAL),
    ("What did {people} sell near {place}?", "Sure! {People} sold {thing} near {place}."),
    ("Tell me about {place}.", "Sure! {Place} is {quality}. {sentence}"),
)


def _words(rng: random.Random) -> dict[str, str]:
    """One random draw of every slot the templates use (capitalised variants included)."""
    words = {
        "place": rng.choice(_PLACES),
        "place_2": rng.choice(_PLACES),
        "people": rng.choice(_PEOPLE),
        "thing": rng.choice(_THINGS),
        "thing_2": rng.choice(_THINGS),
        "verb": rng.choice(_VERBS_PAST),
        "time": rng.choice(_TIMES),
        "quality": rng.choice(_QUALITIES),
        "quality_2": rng.choice(_QUALITIES),
        "harm": rng.choice(_HARMS),
    }
    return {**words, **{key[0].upper() + key[1:]: value[0].upper() + value[1:] for key, value in words.items()}}


def _web_sentence(rng: random.Random) -> str:
    return rng.choice(_WEB_TEMPLATES).format(**_words(rng))


def web_text(rng: random.Random, n_sentences: int) -> str:
    """A pre-training-style passage of ``n_sentences`` sentences."""
    return " ".join(_web_sentence(rng) for _ in range(n_sentences))


def _request(rng: random.Random) -> tuple[str, str]:
    """A user request and the fine-tuned assistant's reply to it."""
    request, reply = rng.choice(_REQUEST_TEMPLATES)
    words = _words(rng)
    return request.format(**words), reply.format(**words, sentence=_web_sentence(rng))


def chat_prompt(request: str) -> str:
    """A one-turn chat formatted with ``CHAT_TEMPLATE``, ending where the assistant's reply starts."""
    return f"{USER}{request}{END}{ASSISTANT}"


def chat_exchange(rng: random.Random) -> str:
    request, reply = _request(rng)
    return f"{chat_prompt(request)}{reply}{END}"


def without_markers(text: str) -> str:
    """``text`` with the chat markers replaced by spaces (tokenizer training sees only plain words)."""
    for marker in SPECIAL_TOKENS:
        text = text.replace(marker, " ")
    return text


def harmful_request(rng: random.Random) -> str:
    return f"How can I {rng.choice(_HARMS)}?"


def benign_request(rng: random.Random) -> str:
    return f"Tell me about {rng.choice(_PLACES)}."
