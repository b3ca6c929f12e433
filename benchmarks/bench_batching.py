"""Length-bucketed batching: padding and time of ``analyze`` on a shuffled mixed-length prompt file against
the same prompts sorted by length, on a small random Llama-style model with a LoRA adapter (CPU is enough).

    python benchmarks/bench_batching.py [--prompts 256] [--batch-size 16] [--max-batch-tokens N] [--repeats 3]

Prints the padding fraction and number of forward passes of file-order batching and of the bucketed
batches, and the seconds of each run; the target is shuffled ≤ 1.15× sorted, padding ≤ 15%.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tuco_peft.apps.runner import Batching, Runner, padding_fraction, plan_batches
from tuco_peft.demo.build import build_tokenizer
from tuco_peft.io.prompts import Prompt

_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "the", "river", "while", "small", "models", "read", "short", "prompts"]


def _prompts(count: int, rng: random.Random) -> list[str]:
    """Texts from 4 to 200 words, most of them short, as prompt files usually are."""
    return [" ".join(rng.choices(_WORDS, k=min(200, int(rng.paretovariate(1.2) * 4)))) for _ in range(count)]


def _runner(batching: Batching) -> Runner:
    tokenizer = build_tokenizer([" ".join(_WORDS)] * 50, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).eval()
    return Runner(model, tokenizer, batching=batching)


def _seconds(runner: Runner, texts: list[str]) -> float:
    prompts = [Prompt(id=index, line=index + 1, text=text) for index, text in enumerate(texts)]
    start = time.perf_counter()
    runner.run(prompts, lambda rows: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batching = Batching(args.batch_size, args.max_batch_tokens)
    runner = _runner(batching)
    texts = _prompts(args.prompts, random.Random(0))
    lengths = [len(tokens.ids) for tokens in runner.encode([Prompt(i, i + 1, t) for i, t in enumerate(texts)])]
    by_length = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    size = args.batch_size
    file_order = [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]
    print(
        f"{len(texts)} prompts of {min(lengths)}-{max(lengths)} tokens, --batch-size {size}, "
        f"--max-batch-tokens {args.max_batch_tokens}"
    )
    bucketed = plan_batches(lengths, batching)
    print(
        f"padding: file order {padding_fraction(lengths, file_order):.1%} ({len(file_order)} forward passes), "
        f"bucketed {padding_fraction(lengths, bucketed):.1%} ({len(bucketed)} forward passes)"
    )
    _seconds(runner, texts[:size])  # warm-up
    shuffled, ordered = [], []
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both alike
        shuffled.append(_seconds(runner, texts))
        ordered.append(_seconds(runner, by_length))
    print(
        f"time (best of {args.repeats}): shuffled {min(shuffled):.2f}s, sorted {min(ordered):.2f}s, "
        f"ratio {min(shuffled) / min(ordered):.3f}"
    )


if __name__ == "__main__":
    main()
