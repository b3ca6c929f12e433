"""Watch TuCo while a LoRA/QLoRA model trains: a callback for ``transformers.Trainer`` and TRL's trainers.

The callback measures the TuCo of fixed probe prompts every few optimizer steps, in one analysis forward per
probe batch, and logs it through the trainer so that it reaches ``trainer.state.log_history`` and every
``report_to`` integration. It leaves no trace on the run: the same losses are logged at the same steps with
or without it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..core.contributions import tuco_from_sums
from ..core.decompose import decompose
from ..errors import InputError
from ..io.prompts import encode_prompt
from ..lora.adapters import check_adapters
from ..model.inputs import left_pad
from ..model.parts import model_parts

Prompts = Sequence[str] | Mapping[str, Sequence[str]]

UNNAMED_GROUP = "prompts"
"""The group name under which a plain list of prompts is logged: ``tuco/prompts``."""


def _trained_model(trainer: Trainer) -> nn.Module:
    """The model being trained: ``Trainer.__init__`` always sets it (the model given, or ``model_init``'s),
    though transformers types the attribute as optional."""
    assert trainer.model is not None, "a Trainer holds its model once built"
    return trainer.model


@contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """Run analysis forwards in the middle of training without leaving a trace on the run.

    Eval mode (no dropout), no autograd, autocast off (the probe computes in the model's own dtypes, so its
    values do not depend on the training precision), and a forked RNG on the CPU and on every CUDA device of
    the model, so the next training step draws the same dropout masks as it would without the probe. Each
    module's train/eval flag is put back as it was, also after an exception.
    """
    modes = [(module, module.training) for module in model.modules()]
    devices = {parameter.device for parameter in model.parameters()}
    cuda_indices = sorted({device.index for device in devices if device.type == "cuda"})
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_indices))
            stack.enter_context(torch.no_grad())
            for device_type in {device.type for device in devices}:
                if torch.amp.is_autocast_available(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def _named_groups(prompts: Prompts) -> dict[str, list[str]]:
    if isinstance(prompts, str) or not isinstance(prompts, (Sequence, Mapping)):
        raise InputError(
            f"prompts must be a list of strings or a dict of named lists, got {type(prompts).__name__}; "
            'e.g. ["Hello", ...] or {"chat": [...], "web": [...]}.'
        )
    groups = dict(prompts) if isinstance(prompts, Mapping) else {UNNAMED_GROUP: prompts}
    if not groups:
        raise InputError("prompts is an empty dict; give at least one named group of prompts.")
    for name, group in groups.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"prompt group names must be non-empty strings (they become tuco/<name>), got {name!r}.")
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) == 0:
            raise InputError(f"prompt group {name!r} must be a non-empty list of strings.")
        kinds = {type(prompt).__name__ for prompt in group if not isinstance(prompt, str)}
        if kinds:
            raise InputError(f"prompt group {name!r} holds {', '.join(sorted(kinds))}; every prompt must be a string.")
    return {name: list(group) for name, group in groups.items()}


def _tokenized_batches(
    name: str, group: list[str], tokenizer: Any, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    token_lists = [encode_prompt(tokenizer, prompt).ids for prompt in group]
    empty = [index for index, tokens in enumerate(token_lists) if not tokens]
    if empty:
        raise InputError(f"prompts {empty} of group {name!r} tokenize to no tokens; drop them or give them text.")
    return [left_pad(token_lists[start : start + batch_size]) for start in range(0, len(token_lists), batch_size)]


class TuCoCallback(TrainerCallback):
    """Log the TuCo of fixed probe prompts while a LoRA/QLoRA model trains.

    At the start of training and every ``every_n_steps`` optimizer steps (and at the last step) it logs,
    for each prompt group: ``tuco/<group>``, the mean TuCo of its prompts, and ``tuco/<group>/layer_<l>``,
    the mean fine-tuning share ‖FTC_l‖₁ / (‖PTC_l‖₁ + ‖FTC_l‖₁) of each block at the last token; plus
    ``tuco/probe_seconds``, the cost of the probe. Prompts are tokenized as given (apply the chat template
    first for a chat model: the paper measures TuCo on formatted prompts).

    Example::

        trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora)
        trainer.add_callback(TuCoCallback(trainer, {"chat": chat_prompts, "web": web_snippets}, every_n_steps=20))
        trainer.train()

    Args:
        trainer: the ``transformers.Trainer`` (or TRL trainer) whose model is a LoRA/QLoRA ``PeftModel``.
        prompts: a list of strings (logged as ``tuco/prompts``) or a dict of named lists of strings.
        tokenizer: tokenizes the prompts; defaults to ``trainer.processing_class``.
        every_n_steps: optimizer steps between probes.
        batch_size: prompts per analysis forward.
    """

    def __init__(
        self,
        trainer: Trainer,
        prompts: Prompts,
        *,
        tokenizer: Any = None,
        every_n_steps: int = 50,
        batch_size: int = 8,
    ):
        if not isinstance(trainer, Trainer):
            raise InputError(
                f"trainer must be a transformers.Trainer (TRL's trainers are), got {type(trainer).__name__}; "
                "create the trainer first, then TuCoCallback(trainer, prompts)."
            )
        for name, value in (("every_n_steps", every_n_steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        tokenizer = tokenizer if tokenizer is not None else trainer.processing_class
        if tokenizer is None:
            raise InputError("the trainer has no processing_class to tokenize the prompts with; pass tokenizer=.")
        # Refuse a model TuCo cannot decompose now, not after the first every_n_steps steps of training.
        parts = model_parts(_trained_model(trainer))
        check_adapters(parts.modules)
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self._batches = {
            name: _tokenized_batches(name, group, tokenizer, batch_size)
            for name, group in _named_groups(prompts).items()
        }

    def measure(self) -> dict[str, float]:
        """Probe the model now: the metrics the callback logs, as a dict."""
        model = _trained_model(self.trainer)
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        with _probing(model):
            for name, batches in self._batches.items():
                tucos, layer_shares = [], []
                for input_ids, attention_mask in batches:
                    components = decompose(model, input_ids, attention_mask)
                    tucos.append(components.tuco)
                    # Each block's own share (no sum over layers): [batch, n_layers].
                    layer_shares.append(tuco_from_sums(components.ptc, components.ftc))
                metrics[f"tuco/{name}"] = torch.cat(tucos).mean().item()
                shares = torch.cat(layer_shares).mean(0).tolist()
                width = len(str(len(shares) - 1))
                for layer, share in enumerate(shares):
                    metrics[f"tuco/{name}/layer_{layer:0{width}d}"] = share
        metrics["tuco/probe_seconds"] = time.perf_counter() - start
        return metrics

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        return self._measure_and_log(control)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            return self._measure_and_log(control)
        return control

    def _measure_and_log(self, control: TrainerControl) -> TrainerControl:
        metrics = self.measure()
        # Logging clears control.should_log, which the trainer's own loss log of this step reads after the
        # callbacks: put it back. And the base class's log() is called on purpose: subclasses such as TRL's
        # SFTTrainer fold their running metrics into whatever is logged and reset them, which would take
        # them away from the trainer's own log of this step.
        should_log = control.should_log
        Trainer.log(self.trainer, metrics)
        control.should_log = should_log
        return control
