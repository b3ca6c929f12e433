"""``tuco-peft generate``: FTC_α-steered generation, each new token coloured by the TuCo behind it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from ..apps.runner import Runner
from ..errors import InputError
from ..io.prompts import Prompt
from .checks import check_alpha
from .options import (
    CommandOptions,
    add_model_arguments,
    add_prompt_arguments,
    check_common,
)
from .outputs import add_force_argument, check_outputs, page


@dataclass(frozen=True)
class GenerateOptions(CommandOptions):
    prompt: str
    alpha: float
    max_new_tokens: int
    html: str | None
    force: bool


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    generate = commands.add_parser("generate", parents=[common], help="FTC_α-steered generation with per-token TuCo")
    add_model_arguments(generate)
    generate.add_argument("prompt", help="the prompt text")
    generate.add_argument(
        "--alpha", type=float, default=1.0, help="scale of the fine-tuning component (1 = fine-tuned)"
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--html", metavar="FILE", help="the text as an HTML page, new tokens coloured by their TuCo")
    add_force_argument(generate)
    add_prompt_arguments(generate)
    generate.set_defaults(run=lambda args: generate_text(GenerateOptions.from_args(args)))


def generate_text(options: GenerateOptions) -> int:
    check_common(options.model, options.prompts)
    check_alpha(options.alpha, "--alpha")
    check_outputs(page("--html", options.html), force=options.force)
    if options.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}.")
    prompt = Prompt(id="prompt", line=1, text=options.prompt)
    if prompt.is_empty:
        raise InputError("the prompt is empty; pass the text to continue.")
    options.model.check()
    import torch

    from ..steering.generation import generate
    from ..views import print_tokens, texts_from_generation, write_html

    runner = Runner.load(options.model, prompt_format=options.prompts.format)
    tokenizer = runner.tokenizer
    context = runner.context_length()
    if context is not None and options.max_new_tokens >= context:
        raise InputError(
            f"--max-new-tokens {options.max_new_tokens} leaves no room for the prompt in the model's context of "
            f"{context}; pass fewer."
        )
    encoded = runner.encode([prompt], room=options.max_new_tokens)
    if not encoded:
        raise InputError("the prompt has no tokens; pass other text.")
    input_ids = torch.tensor([encoded[0].ids])
    with torch.no_grad():
        out = generate(
            runner.model,
            input_ids,
            alpha=options.alpha,
            max_new_tokens=options.max_new_tokens,
            do_sample=False,
            base_model=runner.base_model,
        )
    new_tokens = out.sequences[0, input_ids.shape[1] :].tolist()
    title = f"α = {options.alpha:g}"
    # The prompt's mask, so that a leading token that doubles as padding (pad = bos) is kept.
    text = texts_from_generation(out, tokenizer, torch.ones_like(input_ids), titles=[title])[0]
    print_tokens(text)  # new tokens coloured by TuCo on a terminal; plain text when piped or NO_COLOR is set
    print(f"\n{'step':>4}  {'TuCo':>6}  token (α = {options.alpha:g}; TuCo at the position that chose it)")
    for step, (token, value) in enumerate(zip(new_tokens, out.tuco[0].tolist())):
        if math.isnan(value):  # the row has finished
            break
        print(f"{step:>4}  {value:>6.3f}  {tokenizer.decode([token])!r}")
    if options.html:
        print(f"html: {write_html([text], options.html, title=f'TuCo per generated token, {title}')}")
    return 0
