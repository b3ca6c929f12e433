"""The option groups several commands share, as argparse groups and as typed values, and their checks.

Each command turns its ``argparse.Namespace`` into these frozen dataclasses (``CommandOptions.from_args``),
once, at its top; everything below takes those typed values. Checks use the flags alone, so bad input is refused before anything loads.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..apps.distributed import Ranks
from ..apps.runner import Batching, ModelChoice, PromptFormat
from ..errors import InputError
from ..io.adapter_series import AdapterCheckpoint
from ..io.checkpoints import Checkpoints, LoadOptions, check_pair
from ..io.fingerprint import checkpoint_fingerprint, tokenizer_fingerprint
from ..io.results import Provenance
from .outputs import add_force_argument

if TYPE_CHECKING:
    from typing_extensions import Self

_PARTNERS = {"--base": "--adapter", "--adapter": "--base", "--model": "--base-model", "--base-model": "--model"}
_MODEL_CHOICE = (
    "pass --base BASE --adapter ADAPTER for a LoRA fine-tune, or --model FINETUNED --base-model PRETRAINED for "
    "a full fine-tune"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "model",
        "a LoRA fine-tune (--base BASE --adapter ADAPTER) or a full fine-tune (--model FINETUNED --base-model "
        "PRETRAINED); each a local directory or a hub id",
    )
    group.add_argument("--base", help="the pre-trained model the adapter was trained on")
    group.add_argument(
        "--adapter",
        action="append",
        help="the LoRA adapter; analyze, compare and eval take several (repeat it), a training run's folder (its "
        "checkpoint-N adapters in step order) or a folder of adapters, all on --base loaded once",
    )
    group.add_argument("--model", metavar="FINETUNED", help="a fully fine-tuned model (instead of --base/--adapter)")
    group.add_argument(
        "--base-model",
        metavar="PRETRAINED",
        help="the pre-trained model --model was fine-tuned from (same architecture and size); its safetensors "
        "are streamed one block at a time, so only one model is resident",
    )
    group.add_argument(
        "--resident-base",
        action="store_true",
        help="load --base-model as a second model in memory instead of streaming it (faster; twice the weights)",
    )
    group.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda if available)")
    group.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="load the weights in 4-bit NF4 (QLoRA; bitsandbytes): --base, or --model and a --resident-base",
    )
    group.add_argument("--trust-pickle", action="store_true", help="allow pickle (.bin) weights; safetensors otherwise")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped with the checkpoint")


def add_results_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("results file (--out)")
    group.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing --out, wait for it to finish, then resume (default: refuse at once)",
    )
    group.add_argument(
        "--repair",
        action="store_true",
        help="drop the lines of --out that are not rows, repeat one, or hold another prompt than the prompt "
        "file's, keeping every good row; their prompts are computed again",
    )
    add_force_argument(group)


def add_prompt_arguments(
    parser: argparse.ArgumentParser,
    *,
    token_budget: bool = False,
    batch_size: int = 8,
    batch_size_help: str = "prompts per forward pass, at most",
) -> None:
    """The prompt format and batch size (``batch_size_help`` says what it sizes, with its default ``batch_size``);
    with ``token_budget``, ``--max-batch-tokens`` too (length-bucketed commands)."""
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--chat-template",
        action="store_true",
        help="format each prompt with the tokenizer's chat template (TuCo at the last template token)",
    )
    group.add_argument("--system", help="system prompt (with --chat-template)")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_size_help} (default {batch_size})")
    if token_budget:
        group.add_argument(
            "--max-batch-tokens",
            type=int,
            metavar="N",
            help="at most N positions per forward pass (prompts × the longest one's tokens); prompts are batched "
            "with others of similar length either way (default: no limit but --batch-size)",
        )


@dataclass(frozen=True)
class PromptOptions:
    """--chat-template, --system, --batch-size and (analyze, compare) --max-batch-tokens."""

    chat_template: bool
    system: str | None
    batch_size: int
    max_batch_tokens: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PromptOptions:
        return cls(args.chat_template, args.system, args.batch_size, getattr(args, "max_batch_tokens", None))

    @property
    def format(self) -> PromptFormat:
        return PromptFormat(self.chat_template, self.system)

    @property
    def batching(self) -> Batching:
        return Batching(self.batch_size, self.max_batch_tokens)

    def check(self) -> None:
        if self.system is not None and not self.chat_template:
            raise InputError("--system needs --chat-template (the system prompt is part of the chat format).")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise InputError(f"--max-batch-tokens must be at least 1, got {self.max_batch_tokens}.")


@dataclass(frozen=True)
class ResultsOptions:
    """--out and how to treat it: --wait behind another run, --repair damaged lines, --force over a file
    tuco-peft did not write (and over the command's other outputs)."""

    out: str | None
    wait: bool = False
    repair: bool = False
    force: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ResultsOptions:
        return cls(args.out, args.wait, args.repair, args.force)

    def check(self) -> None:
        if self.out is None and (self.wait or self.repair):
            raise InputError("--wait and --repair go with --out (the results file they are about).")


def model_choice(args: argparse.Namespace) -> ModelChoice:
    """The model flags; under a data-parallel launcher, ``--device auto`` spreads the ranks over the GPUs."""
    device, ranks = args.device, Ranks.from_environment()
    if device == "auto" and ranks.world_size > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    load = LoadOptions(
        dtype=args.dtype,
        device=device,
        load_in_4bit=args.load_in_4bit,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    adapters = tuple(args.adapter or ())
    return ModelChoice(args.base, adapters, args.model, args.base_model, args.resident_base, load)




@dataclass(frozen=True)
class CommandOptions:
    """One command's typed flags: the model and prompt groups, then a subclass's own fields, each read from
    the argparse attribute of its name (``results`` from the results group)."""

    model: ModelChoice
    prompts: PromptOptions

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        own = {
            f.name: ResultsOptions.from_args(args) if f.name == "results" else getattr(args, f.name)
            for f in fields(cls)
            if f.name not in ("model", "prompts")
        }
        return cls(model=model_choice(args), prompts=PromptOptions.from_args(args), **own)


def check_model_choice(choice: ModelChoice, required: bool = True, several_adapters: bool = False) -> None:
    """One model to analyse: a base and its adapter (with ``several_adapters``, its adapters), or a fine-tuned
    model and its pre-trained checkpoint."""
    if len(choice.adapters) > 1 and not several_adapters:
        raise InputError(
            f"--adapter is given {len(choice.adapters)} times; this command takes one adapter (analyze, compare "
            "and eval take several)."
        )
    given = [flag for flag in _PARTNERS if getattr(choice, flag[2:].replace("-", "_")) is not None]
    if {"--base", "--adapter"} & set(given) and {"--model", "--base-model"} & set(given):
        raise InputError(f"{' and '.join(given)} mix a LoRA fine-tune with a full fine-tune; {_MODEL_CHOICE}.")
    for flag in given:
        if _PARTNERS[flag] not in given:
            raise InputError(f"{flag} needs {_PARTNERS[flag]}; {_MODEL_CHOICE}.")
    if required and not given:
        raise InputError(f"no model given; {_MODEL_CHOICE}.")
    if choice.resident_base and choice.base_model is None:
        raise InputError("--resident-base goes with --base-model (the pre-trained model of a full fine-tune).")


def check_common(
    choice: ModelChoice,
    prompts: PromptOptions,
    results: ResultsOptions | None = None,
    plot: str | None = None,
    model_required: bool = True,
    several_adapters: bool = False,
) -> None:
    """Every check of the shared flags alone, before anything is read or loaded, and that the device exists."""
    check_model_choice(choice, model_required, several_adapters)
    prompts.check()
    if choice.load.device != "auto":
        choice.load.torch_device()  # a device that does not exist here
    if results is not None:
        results.check()
    if plot:
        from ..apps.plotting import check_plot_path

        check_plot_path(plot)


def provenance(choice: ModelChoice, prompt_format: PromptFormat, positions: str, command: str) -> Provenance:
    """What each row records of how it was computed, once every checkpoint has been checked: the settings,
    and the fingerprint of the command, the checkpoints' content and the tokenizer."""
    checkpoints = choice.check()
    fingerprint = {name: checkpoint_fingerprint(source) for name, source in checkpoints.by_flag.items()}
    fingerprint.update(command=command, tokenizer=tokenizer_fingerprint(checkpoints.tokenizer))

    def where(location: str | None) -> str | None:
        return location if location is None or not Path(location).exists() else str(Path(location).resolve())

    settings = {
        "base": where(choice.base),
        "adapter": where(choice.adapter),
        "model": where(choice.model),
        "base_model": where(choice.base_model),
        "dtype": str(choice.load.torch_dtype()).removeprefix("torch."),
        "load_in_4bit": choice.load.load_in_4bit,
        "chat_template": prompt_format.chat_template,
        "system": prompt_format.system,
        "positions": positions,
    }
    return {"settings": settings, "fingerprint": fingerprint}


def checked_adapters(choice: ModelChoice, adapters: Sequence[AdapterCheckpoint]) -> list[Checkpoints]:
    """``--base`` with each of ``adapters``, checked as far as they can be without loading them: all must ship
    the same tokenizer (the rows of one file are compared token by token)."""
    assert choice.base is not None, "check_model_choice gives --adapter its --base"
    checked = [check_pair(choice.base, str(adapter.path), choice.load) for adapter in adapters]
    first = tokenizer_fingerprint(checked[0].tokenizer)
    for adapter, checkpoints in zip(adapters[1:], checked[1:]):
        if tokenizer_fingerprint(checkpoints.tokenizer) != first:
            raise InputError(
                f"--adapter {adapter.path} ships another tokenizer than --adapter {adapters[0].path}; analyse "
                "adapters with different tokenizers in separate runs."
            )
    return checked


def provenances(
    choice: ModelChoice,
    series: Sequence[AdapterCheckpoint] | None,
    prompt_format: PromptFormat,
    positions: str,
    command: str,
) -> dict[str | None, Provenance]:
    """What this run's rows record, as ``ResultsFile.check_made_like`` expects it: ``{None: provenance}`` for
    one fine-tune, and in a run over several adapters (``series``) each adapter's by name, which share all but
    the adapter."""
    if series is None:
        return {None: provenance(choice, prompt_format, positions, command)}
    checked = checked_adapters(choice, series)
    shared = provenance(replace(choice, adapters=(str(series[0].path),)), prompt_format, positions, command)
    return {
        adapter.name: {
            "settings": {**shared["settings"], "adapter": str(adapter.path.resolve())},
            "fingerprint": {**shared["fingerprint"], "adapter": checkpoint_fingerprint(checkpoints.by_flag["adapter"])},
        }
        for adapter, checkpoints in zip(series, checked)
    }
