"""Paired blocks on the torch backend: ftc_scale and generate run each adapter block once on its input
stacked twice, and every LoRA linear calls its base layer once for both streams; decompose(positions="all"),
a compute-bound prefill, keeps the separate pre-trained pass (pairing would double its activations).

References: the two-model steering of tests/helpers/steering_reference.py and ``decompose(replay=True)``
(a second pass through each block with its adapters off).
"""

from __future__ import annotations

import importlib
from collections import Counter

import pytest
import torch
from helpers.assertions import assert_components_close
from helpers.lora_layers import dense_linear, linear_4bit, lora_layer
from helpers.models import base_model, lora_model, model_pair, padded_batch
from helpers.quantized_models import nf4_llama
from helpers.steering import plain_logits
from helpers.steering_reference import greedy, steered_last_token_tuco, steered_logits
from torch import nn

import tuco_peft
from tuco_peft.core.paired import StackedArguments
from tuco_peft.lora.adapters import is_additive_lora
from tuco_peft.lora.backend import make_backend
from tuco_peft.model.parts import model_parts
from tuco_peft.steering.forward import ftc_scale

ALPHAS = (0.5, 0.0, 1.7)


class CallCounter:
    """Counts, without hooks or instance forwards (either would change the path), the calls of every
    decoder block's forward and of every LoRA linear's base layer, with the rows each base call got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, model: nn.Module):
        layers = model_parts(model).layers
        self.blocks = list(layers)
        self.base_layers = [m.get_base_layer() for m in layers.modules() if is_additive_lora(m)]
        self.block_calls: Counter = Counter()
        self.base_rows: dict[int, list[int]] = {id(m): [] for m in self.base_layers}
        block_forward = type(self.blocks[0]).forward
        linear_forward = type(self.base_layers[0]).forward

        def counted_block(module, *args, **kwargs):
            self.block_calls[id(module)] += 1
            return block_forward(module, *args, **kwargs)

        def counted_linear(module, x, *args, **kwargs):
            if id(module) in self.base_rows:
                self.base_rows[id(module)].append(x.reshape(-1, x.shape[-1]).shape[0])
            return linear_forward(module, x, *args, **kwargs)

        monkeypatch.setattr(type(self.blocks[0]), "forward", counted_block)
        monkeypatch.setattr(type(self.base_layers[0]), "forward", counted_linear)

    def assert_paired(self, steps: int, rows_per_step: list[int]) -> None:
        """Each block ran once per step; each base layer once per step, on both streams' rows stacked, or on
        one stream's rows where both streams are the same (q/k/v share the normed block input)."""
        assert [self.block_calls[id(b)] for b in self.blocks] == [steps] * len(self.blocks)
        stacked = 0
        for base_layer in self.base_layers:
            calls = self.base_rows[id(base_layer)]
            assert len(calls) == steps
            assert all(rows in (step_rows, 2 * step_rows) for rows, step_rows in zip(calls, rows_per_step))
            stacked += calls == [2 * rows for rows in rows_per_step]
        assert stacked > 0


def test_ftc_scale_runs_paired_and_matches_the_two_model_reference(monkeypatch):
    pretrained, model = model_pair("llama")
    ids, mask = padded_batch()
    expected = steered_logits(model, pretrained, ids, mask, ALPHAS)
    counter = CallCounter(monkeypatch, model)
    with torch.no_grad(), ftc_scale(model, ALPHAS, backend="torch"):
        steered = plain_logits(model, ids, mask)
    counter.assert_paired(steps=1, rows_per_step=[ids.numel()])
    real = mask.bool()
    torch.testing.assert_close(steered[real], expected[real], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_runs_paired_and_follows_the_reference(monkeypatch, family):
    """Llama's lean fine-tuned cache slots rebuild keys/values from lora_A outputs recorded by hooks, which
    the paired torch path must still call; gpt2 passes its cache positionally."""
    pretrained, model = model_pair(family)
    ids, mask = padded_batch()
    n_new = 4
    expected = greedy(model, pretrained, ids, mask, ALPHAS, n_new)
    first = steered_last_token_tuco(model, pretrained, ids, mask, ALPHAS)
    counter = CallCounter(monkeypatch, model)
    out = tuco_peft.generate(
        model, ids, mask, alpha=ALPHAS, backend="torch", max_new_tokens=n_new, min_new_tokens=n_new,
        do_sample=False, pad_token_id=0,
    )
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(out.tuco[:, 0], first, atol=1e-5, rtol=0)
    steps = len(counter.base_rows[id(counter.base_layers[0])])
    assert steps == n_new  # the prompt, then one step per new token but the last
    counter.assert_paired(steps=steps, rows_per_step=[ids.numel()] + [ids.shape[0]] * (steps - 1))


@pytest.mark.parametrize("model_factory", [lambda: lora_model(base_model("llama")), nf4_llama], ids=["fp32", "nf4"])
def test_decompose_all_positions_stays_unpaired_and_equals_the_replay_path(monkeypatch, model_factory):
    # A batch beyond the small ones whose pre-trained rows share the fine-tuned calls or run paired
    # (test_shared_reads.py).
    decompose_module = importlib.import_module("tuco_peft.core.decompose")
    monkeypatch.setattr(decompose_module, "SHARED_READS_MAX_TOKENS", 0)
    monkeypatch.setattr(decompose_module, "PAIRED_MAX_TOKENS", 0)
    model = model_factory()
    ids, mask = padded_batch(lengths=(6, 4))
    with torch.no_grad():
        replay = tuco_peft.decompose(model, ids, mask, positions="all", backend="torch", replay=True)
        counter = CallCounter(monkeypatch, model)
        separate = tuco_peft.decompose(model, ids, mask, positions="all", backend="torch")
    assert all(n == ids.numel() for rows in counter.base_rows.values() for n in rows)  # no stacked call
    assert_components_close(separate.ptc, replay.ptc)
    assert_components_close(separate.ftc, replay.ftc)


@pytest.mark.parametrize(
    "base", [lambda: dense_linear(), lambda: linear_4bit("nf4", nested=False)], ids=["dense", "nf4"]
)
def test_two_stream_calls_the_base_layer_once_and_equals_peft(base):
    layer = lora_layer(base(), ranks=(4, 2))
    x_pt, x_ft = torch.randn(3, 72), torch.randn(2, 5, 72)
    calls = []
    base_forward = type(layer.base_layer).forward

    def counted(module, x, *args, **kwargs):
        if module is layer.base_layer:  # not the lora_A/lora_B linears
            calls.append(x.shape)
        return base_forward(module, x, *args, **kwargs)

    with torch.no_grad():
        expected = layer.base_layer(x_pt), layer(x_ft)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(layer.base_layer), "forward", counted)
            y_pt, y_ft = make_backend("torch").two_stream(x_pt, x_ft, layer)
    assert calls == [torch.Size([13, 72])]
    torch.testing.assert_close(y_pt, expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y_ft, expected[1], atol=1e-6, rtol=1e-5)


def test_a_hooked_base_layer_sees_each_stream_on_its_own():
    """Something observing the base layer (a user's hook) must see what it sees unpaired: two calls."""
    layer = lora_layer(dense_linear(), ranks=(4,))
    x_pt, x_ft = torch.randn(3, 72), torch.randn(4, 72)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        with torch.no_grad():
            _y_pt, y_ft = make_backend("torch").two_stream(x_pt, x_ft, layer)
    finally:
        handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], x_pt) and torch.equal(seen[1], x_ft)
    with torch.no_grad():
        torch.testing.assert_close(y_ft, layer(x_ft))


def test_arguments_every_block_shares_are_stacked_once_per_forward():
    """Position embeddings and masks reach every block as the same objects: the first paired block stacks
    them and the others reuse that copy; another forward's arguments, and each block's hidden states, are
    stacked anew."""
    arguments = StackedArguments()
    cos, sin = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    embeddings = (cos, sin)
    stacked = arguments.stacked("position_embeddings", embeddings, batch=2)
    assert torch.equal(stacked[0], torch.cat([cos, cos])) and torch.equal(stacked[1], torch.cat([sin, sin]))
    assert arguments.stacked("position_embeddings", embeddings, batch=2) is stacked
    next_forward = (cos.clone(), sin.clone())
    assert arguments.stacked("position_embeddings", next_forward, batch=2) is not stacked
    x = torch.randn(2, 3, 4)
    assert arguments.stacked("hidden_states", x, batch=2) is not arguments.stacked("hidden_states", x, batch=2)
