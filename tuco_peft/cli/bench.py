"""``tuco-peft bench``: time and memory of ``decompose`` against the paper's two-model method, on the demo
pair unless a model is given.

Which method is cheaper depends on the regime, so bench times two workloads side by side: one short prompt
(training-loop probes, interactive use), where the fixed cost of each call can dominate, and a large batch
(throughput), where the arithmetic does; each is labelled with the regime measured for it
(``apps.benchmark.compare_workloads``). Both are cut from the prompts' tokens at exactly their shape, unpadded.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ..apps.runner import Runner, quiet_libraries, warn
from ..errors import InputError
from ..io import loaders
from ..io.checkpoints import resolve
from ..io.prompts import Prompt, encode_prompt
from .checks import analysable_prompts, check_cache_dir
from .options import CommandOptions, add_model_arguments, add_prompt_arguments, check_common
from .outputs import add_force_argument, check_outputs, json_report, write_json

SMALL_PROMPT_TOKENS = 16
DEFAULT_BATCH_SIZE, DEFAULT_TOKENS = 32, 256
DEFAULT_REPEATS, DEFAULT_WARMUP = 10, 2
_STEADY_SPREAD = 0.1  # beyond ± this share of the median between rounds, the figures come with a warning


@dataclass(frozen=True)
class BenchOptions(CommandOptions):
    prompt_file: str | None
    cache_dir: str | None
    tokens: int | None
    repeats: int
    warmup: int
    json: str | None
    force: bool


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="time and memory of decompose against the paper's two-model method, on one short prompt and on a "
        "large batch (demo pair by default)",
    )
    add_model_arguments(bench)
    bench.add_argument(
        "--prompts",
        dest="prompt_file",
        metavar="PROMPTS",
        help="prompt file whose tokens fill the workloads (default: the demo prompts)",
    )
    bench.add_argument(
        "--cache-dir",
        help="where the demo pair is built and cached when no model is given (default ~/.cache/tuco-peft/demo)",
    )
    add_prompt_arguments(bench, batch_size=DEFAULT_BATCH_SIZE, batch_size_help="prompts in the large workload")
    workloads = bench.add_argument_group(
        "workloads", f"one prompt of {SMALL_PROMPT_TOKENS} tokens, and --batch-size prompts of --tokens tokens"
    )
    workloads.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help=f"tokens per prompt of the large workload (default {DEFAULT_TOKENS}, or the model's context if shorter)",
    )
    workloads.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"timed rounds per workload, each method once per round in rotating order (default {DEFAULT_REPEATS})",
    )
    workloads.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help=f"untimed rounds of every method before timing, for one-off costs (default {DEFAULT_WARMUP})",
    )
    bench.add_argument("--json", help="write the figures of both workloads to this JSON file")
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


def _workload_shapes(options: BenchOptions, context: int | None) -> dict[str, tuple[int, int]]:
    """(prompts, tokens per prompt) of the small and the large workload, within the model's ``context``."""
    wanted = DEFAULT_TOKENS if options.tokens is None else options.tokens
    if wanted < 1:
        raise InputError(f"--tokens must be at least 1, got {wanted}.")
    tokens = wanted if context is None else min(wanted, context)
    if options.tokens is not None and tokens < wanted:
        warn(f"--tokens {wanted} is more than the model's context of {context}; the large workload uses {tokens}.")
    small = SMALL_PROMPT_TOKENS if context is None else min(SMALL_PROMPT_TOKENS, context)
    batch_size = options.prompts.batch_size
    if batch_size * tokens <= small:
        within = "" if context is None else f" (the model's context is {context})"
        raise InputError(
            f"the large workload, {batch_size} × {tokens} tokens{within}, must be larger than the small one, "
            f"1 × {small} tokens, to tell their regimes apart; raise --batch-size or --tokens."
        )
    return {"small": (1, small), "large": (batch_size, tokens)}


def benchmark(options: BenchOptions) -> int:
    choice = options.model
    check_common(choice, options.prompts, model_required=False)
    if choice.resident_base:
        raise InputError("bench measures the --base-model both resident and streamed; drop --resident-base.")
    if options.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {options.repeats}.")
    if options.warmup < 1:
        raise InputError(
            f"--warmup must be at least 1, got {options.warmup}: a method's first call pays one-off costs "
            "(allocation, kernel tuning) that are no part of its time."
        )
    _workload_shapes(options, context=None)  # the flags alone, before anything loads
    own_model = choice.base is not None or choice.model is not None
    if own_model and options.cache_dir is not None:
        raise InputError("--cache-dir is where the demo pair is cached; drop it when you pass a model.")
    check_cache_dir(options.cache_dir)
    check_outputs(json_report("--json", options.json), {"the prompt file": options.prompt_file}, force=options.force)
    prompts = _bench_prompts(options, own_model)
    if own_model:
        choice.check()
    else:
        from ..demo import ensure_demo_checkpoints

        base, adapter = (str(path) for path in ensure_demo_checkpoints(options.cache_dir))
        choice = replace(choice, base=base, adapters=(adapter,))  # the demo pair, measured as a model given would be
    from ..apps.benchmark import compare_full_finetune_methods, compare_methods, compare_workloads, token_windows

    quiet_libraries()
    load = choice.load
    full_finetune = choice.full_finetune()
    if full_finetune is not None:
        finetuned, base_model = full_finetune
        model, checkpoint, tokenizer = loaders.load_full_finetune(finetuned, base_model, load)
        assert isinstance(checkpoint, Path), "not resident: the pre-trained blocks stream from this checkpoint"
        pretrained = loaders.load_base(resolve(base_model, "--base-model"), load)
        measure = partial(compare_full_finetune_methods, model, pretrained, checkpoint)
    else:
        base, adapter = choice.lora_finetune()
        model, tokenizer = loaders.load_pair(base, adapter, load)
        pretrained = loaders.load_base(resolve(base, "--base"), load)  # the paper's method needs two models
        measure = partial(compare_methods, model, pretrained)
    prompt_format = options.prompts.format
    stream = [
        token
        for prompt in prompts
        for token in encode_prompt(
            tokenizer, prompt, chat_template=prompt_format.chat_template, system=prompt_format.system
        ).ids
    ]
    if not stream:
        raise InputError("bench needs at least one prompt with tokens; the prompts given have none.")
    device = load.torch_device()
    shapes = _workload_shapes(options, Runner(model, tokenizer).context_length())
    workloads = {}
    for name, (batch_size, tokens) in shapes.items():
        input_ids, attention_mask = token_windows(stream, batch_size, tokens)
        workloads[name] = (input_ids.to(device), attention_mask.to(device))
    print(
        f"timing every method on {device} on the same inputs, "
        + " and ".join(f"{_prompts(batch_size)} × {tokens} tokens" for batch_size, tokens in shapes.values())
        + f": {options.warmup} untimed rounds, then {options.repeats} timed rounds in rotating order …",
        flush=True,
    )
    report = compare_workloads(partial(measure, repeats=options.repeats, warmup=options.warmup), workloads)
    _print_report(report)
    if options.json:
        write_json(report, options.json, _write_report)
        print(f"json: {options.json}")
    return 0


def _spread(figures: dict) -> float:
    """Half the interquartile range of a method's times, relative to their median."""
    return (figures["q3_s"] - figures["q1_s"]) / 2 / figures["median_s"]


def _prompts(count: int) -> str:
    return "1 prompt" if count == 1 else f"{count} prompts"


def _write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _print_report(report: dict) -> None:
    from ..apps.benchmark import OVERHEAD_BOUND

    workloads = report["workloads"]
    print("time: median per call, ± half its interquartile range; × plain: median of each round's ratio")
    for name, workload in workloads.items():
        batch_size, tokens = workload["batch"]
        print(
            f"\n{name} workload, {_prompts(batch_size)} × {tokens} tokens: {workload['regime']} (a plain forward's "
            f"fixed cost per call is {workload['per_call_share']:.0%} of its time)"
        )
        print(f"{'method':<26} {'time':>10} {'±':>6} {'× plain':>8} {'IQR':>10} {'peak memory':>12} {'× plain':>8}")
        for method, figures in workload["methods"].items():
            spread = f"±{_spread(figures):.1%}"
            ratios = f"{figures['time_ratio_q1']:.2f}–{figures['time_ratio_q3']:.2f}"
            print(
                f"{method:<26} {figures['median_s'] * 1e3:>8.2f}ms {spread:>6} {figures['time_ratio']:>8.2f} "
                f"{ratios:>10} {figures['peak_total_bytes'] / 2**20:>10.1f}MB {figures['peak_total_ratio']:>8.2f}"
            )
        print(f"largest TuCo disagreement between methods: {workload['max_tuco_disagreement']:.2e}")
    print(
        f"\na plain forward here: {report['plain_forward_per_call_s'] * 1e3:.2f} ms per call + "
        f"{report['plain_forward_per_token_s'] * 1e6:.3g} µs per token (fitted to both workloads)"
    )
    widest = max(_spread(figures) for workload in workloads.values() for figures in workload["methods"].values())
    if widest > _STEADY_SPREAD:
        print(
            f"note: times varied by up to ±{widest:.0%} between rounds (other work on this machine?); raise --repeats "
            "or rerun on an idle machine before trusting small differences."
        )
    if workloads["large"]["regime"] == OVERHEAD_BOUND:
        print(
            "note: even the large workload is per-call-overhead-bound on this model and device; raise --batch-size "
            "or --tokens to measure compute."
        )
