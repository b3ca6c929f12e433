"""Small batches compute the pre-trained rows inside the fine-tuned forward's own calls (``SharedReadBlock``) or,
on narrow models, run each block paired (``core.paired.PairedBlock``); large ones compute the rows after the
block (``SharedProjectionBlock``): each against the two-model oracle, family by family, with gradients and LoRA
dropout, and with hooks that see what they would see without tuco-peft."""

import pytest
import torch
from helpers.assertions import assert_close, assert_components_close
from helpers.models import FAMILIES, base_model, lora_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks, two_pass
from helpers.strategies import PAIRED, STRATEGIES, force, record_strategies

import tuco_peft
from tuco_peft.core.pretrained_path import LayoutMismatch, SharedProjectionBlock, SharedReadBlock
from tuco_peft.model.interception import forward_replaced


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    """Forces one strategy whatever the batch size, and checks that every block took it."""
    force(monkeypatch, request.param)
    chosen = record_strategies(monkeypatch)
    yield request.param
    assert chosen and set(chosen) == {STRATEGIES[request.param]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["last", "all"])
def test_each_strategy_matches_the_oracle(family, positions, strategy):
    pretrained, model = model_pair(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        result = tuco_peft.decompose(model, ids, mask, positions=positions)
    if positions == "last":
        rows = torch.arange(len(ids))
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        ptc, ftc = ptc[rows, :, last], ftc[rows, :, last]
    else:
        ptc, ftc = ptc * mask[:, None, :, None], ftc * mask[:, None, :, None]
    assert_components_close(result.ptc, ptc)
    assert_components_close(result.ftc, ftc)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_one_unpadded_prompt(family, strategy):
    pretrained, model = model_pair(family)
    ids = padded_batch(lengths=(7,))[0]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        result = tuco_peft.decompose(model, ids)
    assert_components_close(result.ptc, ptc[:, :, -1])
    assert_components_close(result.ftc, ftc[:, :, -1])


def _gradients_and_components(model, ids, mask, strategy, monkeypatch):
    force(monkeypatch, strategy)
    model.zero_grad()
    torch.manual_seed(11)  # the same LoRA dropout masks for both strategies
    result = tuco_peft.decompose(model, ids, mask)
    (result.ftc.square().sum() + result.ptc.abs().sum()).backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return grads, result.ptc.detach(), result.ftc.detach()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.2])
def test_gradients_are_the_same_for_every_strategy(family, lora_dropout, monkeypatch):
    """With LoRA dropout in training mode (PEFT's forward draws the masks, in the same order on every path)
    and without it (a paired block's plain LoRA linears then skip PEFT's forward)."""
    _, model = model_pair(family, lora_dropout=lora_dropout)
    model.train()
    ids, mask = padded_batch()
    separate = _gradients_and_components(model, ids, mask, "separate reads", monkeypatch)
    assert any("lora_A" in name for name in separate[0])
    for strategy in ("shared reads", PAIRED):
        grads, ptc, ftc = _gradients_and_components(model, ids, mask, strategy, monkeypatch)
        assert grads.keys() == separate[0].keys()
        for name, grad in grads.items():
            assert_close(grad, separate[0][name], relative=1e-5)
        assert_components_close(ptc, separate[1])
        assert_components_close(ftc, separate[2])


def test_hooks_on_the_mlp_and_output_projection_see_the_fine_tuned_stream_alone(monkeypatch):
    """As without tuco-peft; the separate reads call them again for the pre-trained rows, and hooks see that."""
    force(monkeypatch, "shared reads")
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    block = decoder_blocks(model)[1]
    seen = {}
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: seen.setdefault(name, []).append(
            (tuple(args[0].shape), tuple(output.shape))
        ))
        for name, module in {"mlp": block.mlp, "o_proj": block.self_attn.o_proj}.items()
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            expected, seen = dict(seen), {}
            tuco_peft.tuco(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == expected


def test_a_block_that_calls_its_mlp_again_finishes_its_forward_then_is_named(monkeypatch):
    """The second call runs the MLP as without tuco-peft (on its own input, not beside the pre-trained rows); the
    pre-trained update then says what the forward did, and the model is left as found."""
    force(monkeypatch, "shared reads")
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    block = decoder_blocks(model)[0]
    forward, calls = type(block).forward, []

    def calls_its_mlp_again(self, hidden_states, *args, **kwargs):
        out = forward(self, hidden_states, *args, **kwargs)
        calls.append((hidden_states, self.mlp(hidden_states)))
        return out

    monkeypatch.setattr(type(block), "forward", calls_its_mlp_again)
    with torch.no_grad():
        with pytest.raises(LayoutMismatch, match="called mlp other than once, on the normed states alone"):
            tuco_peft.tuco(model, ids, mask)
        (states, out), *_ = calls
        assert_close(out, block.mlp(states), relative=1e-6)
    assert not any(forward_replaced(module) for module in model.modules())


@pytest.mark.parametrize("norm", ["post_attention_layernorm", "input_layernorm"])
def test_a_norm_saved_with_the_adapter_is_switched_off_for_the_pre_trained_rows(norm, monkeypatch):
    """``modules_to_save`` on a block's norm: the pre-trained rows take the original norm, which shared reads
    (computed with the adapters on) could not give, so such blocks read their weights separately."""
    force(monkeypatch, "shared reads")
    chosen = record_strategies(monkeypatch)
    pretrained, model = model_pair("llama", modules_to_save=[norm])
    with torch.no_grad():
        for block in decoder_blocks(model):
            getattr(block, norm).modules_to_save["default"].weight.mul_(1.5)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
        result = tuco_peft.decompose(model, ids, mask, positions="all")
    assert chosen and SharedReadBlock not in chosen
    real = mask[:, None, :, None]
    assert_components_close(result.ptc * real, ptc * real)
    assert_components_close(result.ftc * real, ftc * real)


@pytest.mark.parametrize(
    ("batch", "length", "width", "expected"),
    [
        (1, 16, 256, SharedReadBlock),
        (4, 64, 256, SharedReadBlock),  # 256 tokens, padding included
        (4, 65, 256, SharedProjectionBlock),
        (1, 16, 128, PAIRED),
        (2, 64, 128, PAIRED),
        (1, 129, 128, SharedProjectionBlock),
    ],
)
def test_small_batches_share_reads_or_pair_by_width(batch, length, width, expected, monkeypatch):
    chosen = record_strategies(monkeypatch)
    model = lora_model(base_model("llama", hidden_size=width, intermediate_size=2 * width))
    ids = torch.randint(1, 90, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuco_peft.tuco(model, ids)
    assert set(chosen) == {expected}
