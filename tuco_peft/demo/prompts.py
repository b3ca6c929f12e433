"""Held-out prompts of both kinds for the demo pair."""

from __future__ import annotations

import random

from . import corpus

_PROMPT_SEED = 1234  # not the training seed: these prompts are drawn apart from the training data


def demo_prompts(n_per_group: int = 40) -> dict[str, list[str]]:
    """Prompts in the fine-tune's chat format (``"chat"``) and pre-training-style passages (``"web"``).

    Chat prompts are already formatted (they end with the assistant marker), so they are tokenized as given.
    """
    rng = random.Random(_PROMPT_SEED)
    requests = [corpus.harmful_request(rng) if i % 2 else corpus.benign_request(rng) for i in range(n_per_group)]
    return {
        "chat": [corpus.chat_prompt(request) for request in requests],
        "web": [corpus.web_text(rng, rng.randint(1, 3)) for _ in range(n_per_group)],
    }
