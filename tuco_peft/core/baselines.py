"""The paper's own way of computing TuCo, kept as baselines to benchmark against.

``two_model_tuco`` is Algorithm 1 of Nuti et al. as published: the fine-tuned and the pre-trained model both
in memory, a fine-tuned forward that records every block's input, then every pre-trained block run on
those inputs. ``disable_adapter_tuco`` is the same with one copy of the weights: the second pass toggles
PEFT's ``disable_adapter()``. Both compute every position of every block; tuco-peft's ``decompose`` does
not need to.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import torch
from torch import nn

from ..model.block_args import hidden_states
from ..model.inputs import last_real_index, position_ids_from_mask
from ..model.interception import hooked
from ..model.parts import model_parts
from .contributions import tuco_from_sums
from .pretrained_path import block_output


def _record_block_inputs(
    ft_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[tuple[tuple, dict[str, Any], torch.Tensor]]:
    """Each block's (args, kwargs, output) in one fine-tuned forward, in the order the blocks ran."""
    layers = model_parts(ft_model).layers
    inputs: list[tuple[tuple, dict[str, Any]]] = []
    outputs: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs.append((args, kwargs))

    def finish(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        outputs.append(block_output(output))

    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(hooked(layer, before=record, after=finish, with_kwargs=True))
        ft_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    return [(args, kwargs, output) for (args, kwargs), output in zip(inputs, outputs)]


def _two_pass_tuco(
    ft_model: nn.Module,
    pt_layers: nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pretrained_context: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    records = _record_block_inputs(ft_model, input_ids, attention_mask)
    last = last_real_index(attention_mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    ptc_sum = ftc_sum = torch.zeros(())  # 0-d on the CPU: adds to a tensor on any device, as 0.0 would
    with pretrained_context():
        for layer, (args, kwargs, ft_out) in zip(pt_layers, records):
            x = hidden_states(args, kwargs)
            pt_update = block_output(layer(*args, **kwargs)).float() - x.float()
            ft_update = ft_out.float() - x.float()
            ptc_sum = ptc_sum + pt_update[rows, last]
            ftc_sum = ftc_sum + (ft_update - pt_update)[rows, last]
    return tuco_from_sums(ptc_sum, ftc_sum)


def two_model_tuco(
    ft_model: nn.Module, pt_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """TuCo by the paper's Algorithm 1: two models in memory, two passes."""
    pt_layers = model_parts(pt_model).layers
    return _two_pass_tuco(ft_model, pt_layers, input_ids, attention_mask, nullcontext)


def disable_adapter_tuco(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """TuCo by two passes over one PeftModel, the second under PEFT's ``disable_adapter()``."""
    layers = model_parts(model).layers
    # disable_adapter is PeftModel's method: torch's stub types any attribute of a Module as Tensor | Module.
    return _two_pass_tuco(model, layers, input_ids, attention_mask, model.disable_adapter)  # type: ignore[arg-type]
