"""TuCo's gradients with respect to a model's trainable weights, from tuco-peft and from the two-model oracle."""

from __future__ import annotations

import torch

import tuco_peft
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass


def tuco_gradients(model, pretrained, ids, mask) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tuco-peft's, the oracle's) gradients of TuCo's sum over the batch, by parameter name; the oracle runs
    ``pretrained``'s blocks on the fine-tuned residual stream."""
    model.zero_grad()
    tuco_peft.tuco(model, ids, mask).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    tuco_at_last(ptc, ftc, mask).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return ours, expected
