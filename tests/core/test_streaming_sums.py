"""decompose(keep="sums"): the same TuCo, norms and cumulative TuCo as keep="all", from running sums."""

import dataclasses

import pytest
import torch
from helpers.models import FAMILIES, model_pair, padded_batch

import tuco_peft
from tuco_peft.core import accumulators
from tuco_peft.core.contributions import Decomposition, DecompositionSums, tuco_from_sums
from tuco_peft.errors import InputError, UnsupportedModelError


def _both(model, ids, mask, **kwargs) -> tuple[Decomposition, DecompositionSums]:
    with torch.no_grad():
        every = tuco_peft.decompose(model, ids, mask, keep="all", **kwargs)
        sums = tuco_peft.decompose(model, ids, mask, keep="sums", **kwargs)
    return every, sums


def _assert_same_answers(every: Decomposition, sums: DecompositionSums) -> None:
    # Same tensors, same reductions: bit for bit.
    for kept, reduced in zip(every.layer_norms(), sums.layer_norms()):
        assert torch.equal(kept, reduced)
    for name in ("x0", "xL", "positions"):
        assert torch.equal(getattr(every, name), getattr(sums, name))
    # A running float32 sum in block order is exactly a step-by-step sum over the kept blocks.
    ptc_running, ftc_running = every.ptc[:, 0], every.ftc[:, 0]
    for layer in range(1, every.n_layers):
        ptc_running, ftc_running = ptc_running + every.ptc[:, layer], ftc_running + every.ftc[:, layer]
    assert torch.equal(sums.ptc_sum, ptc_running) and torch.equal(sums.ftc_sum, ftc_running)
    assert torch.equal(sums.tuco, tuco_from_sums(ptc_running, ftc_running))
    # keep="all" sums with torch's own reductions (sum: pairwise; cumsum: accumulated in double on CPU):
    # the same values up to float32 rounding.
    torch.testing.assert_close(sums.tuco, every.tuco, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums.preco, every.preco, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums.cumulative_tuco(), every.cumulative_tuco(), rtol=1e-6, atol=1e-6)
    assert sums.n_layers == every.n_layers


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sums_answer_as_the_full_decomposition_at_every_position(family, side):
    _, model = model_pair(family)
    ids, mask = padded_batch(side=side)
    every, sums = _both(model, ids, mask, positions="all")
    _assert_same_answers(every, sums)
    padding = ~mask.bool()
    assert torch.all(sums.tuco[padding] == 0) and torch.all(sums.ptc_l1.transpose(1, 2)[padding] == 0)


@pytest.mark.parametrize("reduction", ["stacked", "one tensor at a time"])
def test_small_and_large_rows_reduce_to_the_same_bits(reduction, monkeypatch):
    """Few rows are reduced in one stacked operation, many one tensor at a time (no temporary of five times
    their size): the same sums either way."""
    if reduction == "one tensor at a time":
        monkeypatch.setattr(accumulators, "_ONE_REDUCTION_MAX_ELEMENTS", 0)
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    every, sums = _both(model, ids, mask, positions="all")
    _assert_same_answers(every, sums)


@pytest.mark.parametrize("positions", ["last", [2, -1, 5]])
def test_sums_answer_as_the_full_decomposition_at_chosen_positions(positions):
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(12, 12, 12))
    every, sums = _both(model, ids, mask, positions=positions)
    _assert_same_answers(every, sums)


def test_one_position_per_prompt_is_the_same_from_either_result():
    _, model = model_pair("qwen2")
    ids, mask = padded_batch()
    every, sums = _both(model, ids, mask, positions="all")
    last, _ = _both(model, ids, mask, positions="last")
    columns = torch.tensor([11, 11, 11])
    at_every, at_sums = every.at(columns), sums.at(columns)
    assert torch.equal(at_every.positions, last.positions)
    for name in ("ptc", "ftc", "x0", "xL"):  # one query row against all of them: matmuls of other shapes
        torch.testing.assert_close(getattr(at_every, name), getattr(last, name), rtol=1e-5, atol=1e-6)
    _assert_same_answers(at_every, at_sums)


@pytest.mark.parametrize("keep", ["all", "sums"])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_blocks_held_to_the_end_give_the_same_bits(keep, positions, monkeypatch):
    """A small paired call holds every block's states and computes all components after the forward
    (``Components.hold_blocks``); block by block, as the forward reaches them, gives the very same tensors."""
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        held = tuco_peft.decompose(model, ids, mask, positions=positions, keep=keep)
        with monkeypatch.context() as patch:
            patch.setattr(accumulators.Components, "hold_blocks", lambda self: None)
            block_by_block = tuco_peft.decompose(model, ids, mask, positions=positions, keep=keep)
    for field in dataclasses.fields(held):
        assert torch.equal(getattr(held, field.name), getattr(block_by_block, field.name)), field.name


def test_tuco_at_every_position_is_the_sums_tuco():
    _, model = model_pair("gemma2")
    ids, mask = padded_batch()
    _, sums = _both(model, ids, mask, positions="all")
    with torch.no_grad():
        assert torch.equal(tuco_peft.tuco(model, ids, mask, positions="all"), sums.tuco)
        # positions="last" runs the pre-trained path on one row: the same values, up to float32 rounding.
        torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), sums.tuco[:, -1], rtol=1e-5, atol=1e-6)


def test_per_block_components_are_refused_with_the_way_out():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    _, sums = _both(model, ids, mask, positions="all")
    for name in ("ptc", "ftc"):
        with pytest.raises(AttributeError, match="keep='all'"):
            getattr(sums, name)


def test_the_token_view_is_the_same_from_either_result():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    every, sums = _both(model, ids, mask, positions="all")
    from_every = every.view(input_ids=ids, attention_mask=mask).texts
    from_sums = sums.view(input_ids=ids, attention_mask=mask).texts
    assert [text.title for text in from_sums] == [text.title for text in from_every]
    for text_sums, text_every in zip(from_sums, from_every):
        for token_sums, token_every in zip(text_sums.tokens, text_every.tokens):
            assert token_sums.text == token_every.text
            assert token_sums.ptc_l1 == token_every.ptc_l1 and token_sums.ftc_l1 == token_every.ftc_l1
            assert token_sums.tuco == pytest.approx(token_every.tuco, rel=1e-6, abs=1e-6)


def test_an_unknown_keep_is_an_input_error():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    with pytest.raises(InputError, match="keep"):
        tuco_peft.decompose(model, ids, mask, keep="norms")


def test_a_changed_residual_stream_is_refused_while_streaming():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    second = model.base_model.model.model.layers[1]
    handle = second.register_forward_pre_hook(lambda module, args: (args[0] * 2, *args[1:]))
    try:
        with torch.no_grad(), pytest.raises(UnsupportedModelError, match="between blocks 0 and 1"):
            tuco_peft.decompose(model, ids, mask, positions="all", keep="sums")
    finally:
        handle.remove()


def test_sums_are_differentiable_as_the_full_decomposition():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    adapters = [param for name, param in model.named_parameters() if "lora_" in name]
    gradients = []
    for keep in ("all", "sums"):
        tuco = tuco_peft.decompose(model, ids, mask, positions="all", keep=keep).tuco
        gradients.append(torch.autograd.grad(tuco.sum(), adapters))
    for from_all, from_sums in zip(*gradients):
        torch.testing.assert_close(from_sums, from_all, rtol=1e-5, atol=1e-7)


def test_repr_is_one_line_of_shapes_and_tuco():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5,) * 8)
    with torch.no_grad():
        one = tuco_peft.decompose(model, ids[:1], mask[:1])
        many = tuco_peft.decompose(model, ids, mask, keep="sums")
        per_token = tuco_peft.decompose(model, ids, mask, positions="all", keep="sums")
    assert repr(one) == (
        f"Decomposition(ptc=[1, 3, 64], ftc=[1, 3, 64], x0=[1, 64], xL=[1, 64], positions=[1]; "
        f"tuco=[{one.tuco.item():.4f}])"
    )
    assert repr(many).endswith(", …])") and repr(many).count(".") == 6 and "\n" not in repr(many)
    assert repr(per_token).endswith("; tuco per position [8, 5])")
