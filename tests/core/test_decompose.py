"""decompose/tuco against the paper's two-pass Algorithm 1 (tests/helpers/oracle.py), family by family."""

import copy
import importlib
from collections import Counter

import pytest
import torch
from helpers.assertions import ORACLE_TOLERANCE, assert_components_close
from helpers.models import FAMILIES, base_model, family_config, lora_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks, last_index, tuco_at_last, two_pass
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM, FalconConfig, OPTConfig, PhiConfig

import tuco_peft
from tuco_peft.core.pretrained_path import ReplayBlock, SharedProjectionBlock, pretrained_path


def _oracle(pretrained, model, ids, mask):
    with torch.no_grad():
        return two_pass(model, decoder_blocks(pretrained), ids, mask)

@pytest.mark.device
@pytest.mark.parametrize("dtype", list(ORACLE_TOLERANCE), ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_matches_two_model_oracle(family, dtype, device):
    pretrained, model = (m.to(device, dtype) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch(side="left"))
    ptc, ftc, x0, xL = _oracle(pretrained, model, ids, mask)
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask)
    t, rows = last_index(mask), torch.arange(ids.shape[0], device=device)
    assert d.ptc.shape == (3, 3, 64) and d.ptc.dtype == torch.float32 and d.ptc.device.type == device.type
    components, tuco = ORACLE_TOLERANCE[dtype]
    assert_components_close(d.ptc, ptc[rows, :, t], components)
    assert_components_close(d.ftc, ftc[rows, :, t], components)
    torch.testing.assert_close(d.x0, x0[rows, t])
    torch.testing.assert_close(d.xL, xL[rows, t], rtol=components, atol=components * float(xL.abs().max()))
    expected = tuco_at_last(ptc, ftc, mask)
    assert (d.tuco - expected).abs().max() < tuco
    assert 0.05 < float(d.tuco.min()) and float(d.tuco.max()) < 0.999  # a non-degenerate check


@pytest.mark.device
@pytest.mark.parametrize("family", FAMILIES)
def test_all_positions_match_oracle_and_zero_padding(family, device):
    pretrained, model = (m.to(device) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch(side="right"))
    ptc, ftc, _, _ = _oracle(pretrained, model, ids, mask)
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask, positions="all")
    real = mask.bool()[:, None, :, None]
    assert_components_close(d.ptc, ptc * real)
    assert_components_close(d.ftc, ftc * real)
    assert torch.all(d.ptc[~mask.bool()[:, None, :, None].expand_as(d.ptc)] == 0)
    assert d.tuco.shape == ids.shape


def test_explicit_positions_select_the_same_rows_as_all():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(12, 12, 12))
    with torch.no_grad():
        every = tuco_peft.decompose(model, ids, mask, positions="all")
        some = tuco_peft.decompose(model, ids, mask, positions=[2, -1, 7])
    torch.testing.assert_close(some.ptc, every.ptc[:, :, [2, 11, 7]])
    torch.testing.assert_close(some.tuco, every.tuco[:, [2, 11, 7]])
    assert some.positions.tolist() == [[2, 11, 7]] * 3


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_replay_path_equals_one_pass_path(family):
    _, model = model_pair(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        fast = tuco_peft.decompose(model, ids, mask, positions="all")
        replay = tuco_peft.decompose(model, ids, mask, positions="all", replay=True)
    assert_components_close(fast.ptc, replay.ptc)
    assert_components_close(fast.ftc, replay.ftc)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_identity_x0_plus_components_is_last_block_output(family):
    _, model = model_pair(family)
    ids, mask = padded_batch()
    captured = {}
    last = decoder_blocks(model)[-1]
    handle = last.register_forward_hook(lambda m, a, o: captured.setdefault("xL", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask)
    handle.remove()
    xL = captured["xL"][torch.arange(3), last_index(mask)].float()
    torch.testing.assert_close(d.x0 + d.ptc.sum(1) + d.ftc.sum(1), xL, atol=1e-5, rtol=1e-5)
    embeddings = model.get_input_embeddings().weight[ids[torch.arange(3), last_index(mask)]]
    if family == "gpt2":  # x0 includes the learned absolute position embedding
        embeddings = embeddings + model.get_base_model().transformer.wpe(mask.sum(-1) - 1)
    if family == "gemma":  # and Gemma's sqrt(d) scale
        embeddings = embeddings * 64**0.5
    torch.testing.assert_close(d.x0, embeddings, atol=1e-4, rtol=1e-5)


def test_zero_adapter_gives_zero_tuco():
    model = lora_model(base_model("qwen3"), init_lora_weights=True)  # B = 0: the fine-tune changes nothing
    ids, mask = padded_batch()
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask)
    assert d.tuco.abs().max() < 1e-5
    assert d.ptc.abs().sum() > 1


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_padded_batch_equals_each_prompt_alone(family, side):
    _, model = model_pair(family)
    ids, mask = padded_batch(side=side)
    with torch.no_grad():
        batched = tuco_peft.decompose(model, ids, mask)
        for row in range(ids.shape[0]):
            alone = tuco_peft.decompose(model, ids[row][mask[row].bool()][None])
            torch.testing.assert_close(batched.ptc[row], alone.ptc[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(batched.ftc[row], alone.ftc[0], atol=2e-5, rtol=1e-4)
            assert abs(float(batched.tuco[row] - alone.tuco[0])) < 1e-5


def test_sdpa_attention_gives_the_same_numbers_as_eager():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        eager = tuco_peft.tuco(model, ids, mask)
        model.get_base_model().set_attn_implementation("sdpa")
        sdpa = tuco_peft.tuco(model, ids, mask)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_paper_appendix_a_example_gives_one_half():
    h = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ptc = torch.stack([0 * h, 0 * h, h, -h / 2])[None]
    ftc = torch.stack([h, -h / 2, 0 * h, 0 * h])[None]
    d = tuco_peft.Decomposition(ptc=ptc, ftc=ftc, x0=torch.zeros(1, 4), xL=h[None], positions=torch.tensor([0]))
    assert float(d.tuco) == pytest.approx(0.5)
    assert float(d.preco) == pytest.approx(0.5)
    # Layers are summed before the norm: the per-layer shares differ from the final TuCo.
    assert d.cumulative_tuco()[0].tolist() == pytest.approx([1.0, 1.0, 0.5 / 1.5, 0.5])


def test_tuco_is_the_decomposition_tuco():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(tuco_peft.tuco(model, ids, mask), tuco_peft.decompose(model, ids, mask).tuco)


@pytest.mark.parametrize(
    "config",
    [
        OPTConfig(
            vocab_size=97, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
            word_embed_proj_dim=64,
        ),
        FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
        PhiConfig(  # attention and MLP in parallel from one norm, a "dense" output projection, partial rotary
            vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            pad_token_id=0,
        ),
    ],
    ids=lambda config: config.model_type,
)
def test_other_decoder_families_take_the_exact_replay_path(config):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    pretrained = copy.deepcopy(base)
    model = lora_model(base)
    layers = decoder_blocks(model)
    assert isinstance(pretrained_path(layers[0], config), ReplayBlock)
    ids, mask = padded_batch()
    ptc, ftc, _, _ = _oracle(pretrained, model, ids, mask)
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask)
    t, rows = last_index(mask), torch.arange(ids.shape[0])
    assert_components_close(d.ptc, ptc[rows, :, t])
    assert_components_close(d.ftc, ftc[rows, :, t])
    assert (d.tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("gpt_neox", {}), ("gpt_neox", {"use_parallel_residual": False}), ("olmo2", {})],
    ids=["gpt_neox-parallel", "gpt_neox-sequential", "olmo2-post-norm"],
)
def test_parallel_residual_and_post_norm_families_take_the_one_pass_path(family, overrides):
    torch.manual_seed(0)
    base = base_model(family, **overrides)
    pretrained = copy.deepcopy(base)
    model = lora_model(base)
    assert isinstance(pretrained_path(decoder_blocks(model)[0], base.config), SharedProjectionBlock)
    ids, mask = padded_batch()
    ptc, ftc, _, _ = _oracle(pretrained, model, ids, mask)
    with torch.no_grad():
        d = tuco_peft.decompose(model, ids, mask)
        every = tuco_peft.decompose(model, ids, mask, positions="all")
    t, rows = last_index(mask), torch.arange(ids.shape[0])
    assert_components_close(d.ptc, ptc[rows, :, t])
    assert_components_close(d.ftc, ftc[rows, :, t])
    assert (d.tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5
    assert_components_close(every.ptc, ptc * mask.bool()[:, None, :, None])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_match_the_replay_path_and_fp32(dtype):
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch()
    with torch.no_grad():
        full = tuco_peft.decompose(model, ids, mask)
        model.to(dtype)
        half = tuco_peft.decompose(model, ids, mask)
        replay = tuco_peft.decompose(model, ids, mask, replay=True)
    assert half.ptc.dtype == half.ftc.dtype == half.tuco.dtype == torch.float32
    assert (half.tuco - full.tuco).abs().max() < 2e-2
    assert (half.tuco - replay.tuco).abs().max() < 1e-3
    assert (half.ptc - replay.ptc).abs().max() < 1e-2 * replay.ptc.abs().max()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_bf16_zero_adapter_has_no_spurious_fine_tuning_share(family):
    # In bf16 the block's residual adds round; a pre-trained path computed at another precision would put
    # that rounding into FTC, which grows with the size of the residual stream.
    model = lora_model(base_model(family), init_lora_weights=True).to(torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30)
    ids, mask = padded_batch()
    with torch.no_grad():
        tuco = tuco_peft.tuco(model, ids, mask)
    assert tuco.abs().max() < 1e-3


def test_nan_components_give_nan_tuco_not_zero():
    nan = torch.tensor([[float("nan"), 1.0]])
    inf = torch.tensor([[float("inf"), 1.0]])
    ones = torch.ones(1, 2)
    assert tuco_peft.tuco_from_sums(nan, ones).isnan().all()
    assert tuco_peft.tuco_from_sums(inf, ones).isnan().all()
    assert tuco_peft.tuco_from_sums(torch.zeros(1, 2), torch.zeros(1, 2)).tolist() == [0.0]


def test_a_sliding_window_in_a_llama_config_is_ignored_as_transformers_does():
    config = family_config("llama")
    config.sliding_window = 4  # e.g. Mistral weights converted to the Llama architecture
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    pretrained = copy.deepcopy(base)
    model = lora_model(base)
    ids, mask = padded_batch()
    ptc, ftc, _, _ = _oracle(pretrained, model, ids, mask)
    with torch.no_grad():
        assert (tuco_peft.tuco(model, ids, mask) - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5


@pytest.mark.parametrize(("paired_max_tokens", "expected_calls"), [(0, 1), (10**9, 0)], ids=["rowwise", "paired"])
def test_the_pretrained_rows_reach_base_layers_without_peft_forward(
    monkeypatch, paired_max_tokens, expected_calls, peft_forward_calls
):
    """PEFT's forward of a LoRA linear runs at most once per call of ``decompose``, in the fine-tuned forward:
    the pre-trained rows call the base layers directly (what it would do with its adapters off, without its
    cost). A paired block computes its plain LoRA linears without PEFT's forward at all."""
    monkeypatch.setattr(importlib.import_module("tuco_peft.core.decompose"), "PAIRED_MAX_TOKENS", paired_max_tokens)
    model = lora_model(base_model("llama")).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        tuco_peft.decompose(model, ids, mask)
    lora_layers = [id(m) for m in model.modules() if isinstance(m, LoraLinear)]
    assert peft_forward_calls == Counter({layer: expected_calls for layer in lora_layers if expected_calls})
