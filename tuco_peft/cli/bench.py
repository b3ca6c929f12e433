"""``tuco-peft bench``: time and memory of ``decompose`` against the paper's two-model method, on the demo
pair unless a model is given."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .. import loading
from ..errors import InputError
from ..prompts import Prompt
from ..runner import Runner, quiet_libraries
from .checks import analysable_prompts, check_cache_dir
from .options import CommandOptions, add_model_arguments, add_prompt_arguments, check_common
from .outputs import add_force_argument, check_outputs, json_report, write_json

_OVERHEAD_BOUND_TOKENS = 4096  # below this, a forward pass of a small model is dominated by Python overhead


@dataclass(frozen=True)
class BenchOptions(CommandOptions):
    prompt_file: str | None
    cache_dir: str | None
    repeats: int
    json: str | None
    force: bool


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="time and memory of decompose against the paper's two-model method (demo pair by default)",
    )
    add_model_arguments(bench)
    bench.add_argument(
        "--prompts", dest="prompt_file", metavar="PROMPTS", help="prompt file (default: the demo prompts)"
    )
    bench.add_argument(
        "--cache-dir",
        help="where the demo pair is built and cached when no model is given (default ~/.cache/tuco-peft/demo)",
    )
    add_prompt_arguments(bench)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--json", help="write the figures to this JSON file")
    add_force_argument(bench)
    bench.set_defaults(run=lambda args: benchmark(BenchOptions.from_args(args)))


def _bench_prompts(options: BenchOptions, own_model: bool) -> list[Prompt]:
    if options.prompt_file is not None:
        return analysable_prompts(options.prompt_file, options.prompts.chat_template)
    if own_model:
        raise InputError("bench with a model of your own needs --prompts FILE.")
    from ..demo import demo_prompts

    texts = itertools.chain(*demo_prompts().values())
    return [Prompt(id=i, line=i, text=text) for i, text in enumerate(texts, start=1)]


def benchmark(options: BenchOptions) -> int:
    choice = options.model
    check_common(choice, options.prompts, model_required=False)
    if choice.resident_base:
        raise InputError("bench measures the --base-model both resident and streamed; drop --resident-base.")
    if options.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {options.repeats}.")
    own_model = choice.base is not None or choice.model is not None
    if own_model and options.cache_dir is not None:
        raise InputError("--cache-dir is where the demo pair is cached; drop it when you pass a model.")
    check_cache_dir(options.cache_dir)
    check_outputs(json_report("--json", options.json), {"the prompt file": options.prompt_file}, force=options.force)
    prompts = _bench_prompts(options, own_model)
    base, adapter = choice.base, choice.adapter
    if own_model:
        choice.check()
    else:
        from ..demo import ensure_demo_checkpoints

        base, adapter = (str(path) for path in ensure_demo_checkpoints(options.cache_dir))
    from ..benchmark import compare_full_finetune_methods, compare_methods
    from ..inputs import left_pad

    quiet_libraries()
    load = choice.load
    if choice.model is not None:
        model, checkpoint, tokenizer = loading.load_full_finetune(choice.model, choice.base_model, load)
        pretrained = loading.load_base(loading.resolve(choice.base_model, "--base-model"), load)
        measure = partial(compare_full_finetune_methods, model, pretrained, checkpoint)
    else:
        model, tokenizer = loading.load_pair(base, adapter, load)
        pretrained = loading.load_base(loading.resolve(base, "--base"), load)  # the paper's method needs two models
        measure = partial(compare_methods, model, pretrained)
    encoded = Runner(model, tokenizer, prompt_format=options.prompts.format).encode(prompts)
    if not encoded:
        raise InputError("bench needs at least one non-empty prompt.")
    input_ids, attention_mask = left_pad([tokens.ids for tokens in encoded[: options.prompts.batch_size]])
    input_ids, attention_mask = input_ids.to(load.torch_device()), attention_mask.to(load.torch_device())
    report = measure(input_ids, attention_mask, repeats=options.repeats)
    _print_report(report)
    if options.json:
        write_json(report, options.json, _write_report)
        print(f"json: {options.json}")
    return 0


def _write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _print_report(report: dict) -> None:
    print(
        f"batch {report['batch'][0]} × {report['batch'][1]} tokens on {report['device']}, median of {report['repeats']}"
    )
    print(f"{'method':<26} {'time':>10} {'× plain':>8} {'peak memory':>12} {'× plain':>8}")
    for name, figures in report["methods"].items():
        print(
            f"{name:<26} {figures['median_s'] * 1e3:>8.2f}ms {figures['time_ratio']:>8.2f} "
            f"{figures['peak_total_bytes'] / 2**20:>10.1f}MB {figures['peak_total_ratio']:>8.2f}"
        )
    print(f"largest TuCo disagreement between methods: {report['max_tuco_disagreement']:.2e}")
    tokens = report["batch"][0] * report["batch"][1]
    if tokens < _OVERHEAD_BOUND_TOKENS:
        print(
            f"note: {tokens} tokens is little work per forward pass, so these times are mostly per-call overhead; "
            "pass --prompts with longer prompts and a larger --batch-size to measure compute."
        )
