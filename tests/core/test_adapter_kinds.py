"""Every PEFT tuner that can be switched off has an exact TuCo: its pre-trained block is the block with the
adapters off. Each kind against the two-model oracle (tests/helpers/oracle.py), for decompose by every one-pass
strategy (the kinds of ``tuco_peft.lora.kinds``) and by the generic path (a kind it does not know), and for
cached steered generation against the two-model steering reference."""

import copy
import importlib
import warnings

import pytest
import torch
from helpers.assertions import assert_close, assert_components_close
from helpers.gradients import tuco_gradients
from helpers.models import base_model, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from helpers.steering import greedy_generate
from helpers.steering_reference import steered_logits
from helpers.strategies import STRATEGIES, force, record_strategies
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    FourierFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftMixedModel,
    RandLoraConfig,
    VBLoRAConfig,
    VeraConfig,
    get_peft_model,
)
from peft.tuners.lora import config as lora_config
from peft.tuners.lora.layer import ParamWrapper

import tuco_peft
from tuco_peft.core.pretrained_path import ReplayBlock, SharedProjectionBlock, SharedReadBlock
from tuco_peft.errors import UnsupportedModelError
from tuco_peft.lora.adapters import has_pretrained_projection, is_additive_lora

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# Non-trivial initial weights everywhere, so that the fine-tuning component is not zero.
KINDS = {
    "dora": lambda: LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    "dora-on-mlp": lambda: LoraConfig(r=4, target_modules=MLP, use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(target_modules=ATTENTION + ["down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False),
    "loha": lambda: LoHaConfig(r=4, target_modules=ATTENTION + MLP, init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, target_modules=ATTENTION + MLP, init_weights=False),
    "vera": lambda: VeraConfig(r=4, target_modules=["q_proj", "o_proj"], init_weights=False),
    "oft": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=ATTENTION, init_weights=False),
    "boft": lambda: BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"], init_weights=False),
    "hra": lambda: HRAConfig(r=4, target_modules=ATTENTION + MLP, init_weights=False),
    "randlora": lambda: RandLoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=False),
    "lora-on-parameters": lambda: LoraConfig(  # PEFT's ParamWrapper: the weight changes during the base call
        r=4, target_modules=[], init_lora_weights=False,
        target_parameters=["self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight"],
    ),
    "bdlora": lambda: _bd_lora(),  # a LoRA variant that adds into its base output in place
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=ATTENTION + MLP,
                                     init_lora_weights=False),
    # PeftMixedModel: the second tuner's layers nest over the first's where both target a projection
    "lora-under-loha": lambda: (LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
                                LoHaConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"], init_weights=False)),
    "lora-under-oft": lambda: (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                               OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "k_proj"], init_weights=False)),
    "adalora-under-loha": lambda: (  # AdaLoRA adds into its base output in place, under LoHa's forward
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        LoHaConfig(r=4, target_modules=["q_proj", "k_proj"], init_weights=False),
    ),
    "oft-under-lora": lambda: (OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "k_proj"], init_weights=False),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
}
# Kinds tuco_peft.lora.kinds does not know: the generic path, with a warning naming them.
UNREGISTERED = {
    "fourierft": lambda: FourierFTConfig(n_frequency=32, target_modules=ATTENTION, init_weights=False),
    "vblora": lambda: VBLoRAConfig(r=4, num_vectors=8, vector_length=8, target_modules=["q_proj", "up_proj"]),
}


def _bd_lora() -> LoraConfig:
    if not hasattr(lora_config, "BdLoraConfig"):
        pytest.skip("BD-LoRA came with a later PEFT than this one")
    block_diagonal = lora_config.BdLoraConfig(
        target_modules_bd_a=["q_proj", "k_proj", "v_proj"], target_modules_bd_b=["o_proj"], nblocks=2
    )
    return LoraConfig(r=4, target_modules=ATTENTION, init_lora_weights=False, use_bdlora=block_diagonal)


def tuner_pair(kind: str, attention: str | None = "eager"):
    """(pre-trained model, a copy of it with the adapter ``kind`` randomly initialised)."""
    base = base_model("llama", attention=attention, intermediate_size=128)
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    configs = {**KINDS, **UNREGISTERED}[kind]()
    if isinstance(configs, tuple):  # a mixed model, every adapter active
        model = get_peft_model(base, configs[0], adapter_name="first", mixed=True)
        model.add_adapter("second", configs[1])
        model.set_adapter(["first", "second"])
        model.eval()
    else:
        model = get_peft_model(base, configs).eval()
    with torch.no_grad():  # tuners whose random init is still the identity get trained-looking weights
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return pretrained, model


def decompose_against_the_oracle(kind: str, device: torch.device | str = "cpu") -> list:
    """decompose and tuco of a tuner ``kind`` against the oracle, on ``device``; the warnings they gave."""
    pretrained, model = (m.to(device) for m in tuner_pair(kind))
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad():
        finetuned = model.base_model.model if isinstance(model, PeftMixedModel) else model
        ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, mask)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decomposition = tuco_peft.decompose(model, ids, mask, positions="all")
            tuco = tuco_peft.tuco(model, ids, mask)
    real = mask.bool()[:, None, :, None]
    scale = ptc.abs().max()
    assert (decomposition.ptc - ptc * real).abs().max() <= 1e-4 * scale
    assert (decomposition.ftc - ftc * real).abs().max() <= 1e-4 * scale
    assert (tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5
    assert ftc.abs().max() > 1e-3 * scale  # the adapter matters, so the checks above can fail
    return [str(w.message) for w in caught]


@pytest.mark.device
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_tuner_runs_one_pass_and_matches_the_oracle(kind, strategy, monkeypatch, device):
    force(monkeypatch, strategy)
    chosen = record_strategies(monkeypatch)
    messages = decompose_against_the_oracle(kind, device)
    assert chosen and set(chosen) == {STRATEGIES[strategy]}
    assert not [m for m in messages if "no one-pass rule" in m]


@pytest.mark.parametrize("kind", UNREGISTERED)
def test_a_tuner_of_no_registered_kind_takes_the_generic_path_with_a_warning(kind, monkeypatch):
    force(monkeypatch, "separate reads")
    chosen = record_strategies(monkeypatch)
    messages = decompose_against_the_oracle(kind)
    assert set(chosen) == {ReplayBlock}
    layer_class = {"fourierft": "FourierFTLinear", "vblora": "vblora.layer.Linear"}[kind]
    assert [m for m in messages if "no one-pass rule" in m and layer_class in m]


@pytest.mark.parametrize("kind", ["dora", "loha", "ia3", "oft", "adalora", "lora-on-parameters"])
def test_every_tuner_is_differentiable(kind):
    """With grad mode on, TuCo's gradient flows to the adapter's own weights."""
    _, model = tuner_pair(kind)
    ids, mask = padded_batch()
    tuco_peft.tuco(model, ids, mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["lora-on-parameters", "oft", "dora"])
def test_gradients_match_the_oracle_for_every_strategy(kind, strategy, monkeypatch):
    """A tuner whose pre-trained projection is one more call of its layer (``target_parameters``, OFT) or is
    captured (DoRA). PEFT's ``target_parameters`` re-registers its parametrization at every fine-tuned call,
    which bumps the wrapped weight's version: the pre-trained calls must not save the weight itself."""
    force(monkeypatch, strategy)
    pretrained, model = tuner_pair(kind)
    ours, expected = tuco_gradients(model, pretrained, *padded_batch())
    assert ours.keys() == expected.keys() and ours
    for name, grad in ours.items():
        assert_close(grad, expected[name], relative=1e-4)


@pytest.mark.parametrize("trainable_base", [False, True], ids=["frozen-base", "trainable-base"])
def test_lora_on_parameters_back_propagates_after_later_calls_in_the_same_graph(trainable_base):
    """Each adapters-on call of LoRA on parameters re-registers its parametrization, which bumps the wrapped
    weight's version: the pre-trained calls, which saved that weight, must still back-propagate after a loss
    computed after TuCo, or a second TuCo, ran the layers again. The gradients are those of each term alone,
    the wrapped weights' own too where they are trained."""
    _, model = tuner_pair("lora-on-parameters")
    wrapped = [m.get_base_layer().weight for m in model.modules() if isinstance(m, ParamWrapper)]
    for weight in wrapped:
        weight.requires_grad_(trainable_base)
    ids, mask = padded_batch()

    def loss() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).mean()

    def gradients(*terms) -> dict[str, torch.Tensor]:
        model.zero_grad()
        sum(term() for term in terms).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    def tuco() -> torch.Tensor:
        return tuco_peft.tuco(model, ids, mask).sum()

    alone = {"tuco": gradients(tuco), "loss": gradients(loss)}
    assert all(weight.grad is not None for weight in wrapped) == trainable_base
    for together, expected in [
        (gradients(tuco, loss), {n: alone["tuco"][n] + alone["loss"][n] for n in alone["tuco"]}),
        (gradients(tuco, tuco), {n: 2 * alone["tuco"][n] for n in alone["tuco"]}),
    ]:
        assert together.keys() == expected.keys()
        for name, grad in together.items():
            assert_close(grad, expected[name], relative=1e-5)


@pytest.mark.parametrize(
    "kind",
    [
        "dora", "dora-on-mlp", "loha", "ia3", "oft", "vera", "adalora", "lora-on-parameters", "fourierft",
        "lora-under-oft",
    ],
)
def test_cached_steered_generation_with_every_tuner(kind):
    """With the default attention (sdpa) and one unpadded prompt, as users generate."""
    pretrained, model = tuner_pair(kind, attention=None)
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    n_new, alphas = 5, [1.5, 0.5, 2.0]
    with tuco_peft.ftc_scale(model, alphas):
        out = greedy_generate(model, ids, mask, n_new, output_logits=True, return_dict_in_generate=True)
    full_mask = torch.ones_like(out.sequences)
    finetuned = model.base_model.model if isinstance(model, PeftMixedModel) else model
    reference = steered_logits(finetuned, pretrained, out.sequences, full_mask, alphas)[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shared_reads", [True, False], ids=["shared reads", "separate reads"])
def test_dora_runs_one_pass_and_matches_the_oracle_with_its_dropout_on(shared_reads, monkeypatch):
    """DoRA's forward computes its base output first: the pre-trained q/k/v are captured, no block is replayed;
    in training mode with LoRA dropout, against the oracle run on the same dropout masks."""
    decompose_module = importlib.import_module("tuco_peft.core.decompose")
    monkeypatch.setattr(decompose_module, "SHARED_READS_MAX_TOKENS", 10**9 if shared_reads else 0)
    monkeypatch.setattr(decompose_module, "SHARED_READS_MIN_WIDTH", 0)
    base = base_model("llama", intermediate_size=128)
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", use_dora=True, lora_dropout=0.3, init_lora_weights=False)
    model = get_peft_model(base, config).train()
    paths = []
    pretrained_path = decompose_module.pretrained_path
    monkeypatch.setattr(
        decompose_module, "pretrained_path", lambda *a, **k: paths.append(pretrained_path(*a, **k)) or paths[-1]
    )
    ids, mask = padded_batch()
    torch.manual_seed(5)
    ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    torch.manual_seed(5)
    decomposition = tuco_peft.decompose(model, ids, mask, positions="all")
    assert {type(path) for path in paths} == {SharedReadBlock if shared_reads else SharedProjectionBlock}
    real = mask.bool()[:, None, :, None]
    assert_components_close(decomposition.ptc, ptc.detach() * real)
    assert_components_close(decomposition.ftc, ftc.detach() * real)
    assert ftc.abs().max() > 1e-3 * ptc.abs().max()


def test_dora_is_not_taken_for_a_plain_lora_linear():
    """DoRA rescales the base output, so its keys are not base + low-rank: its base output is the pre-trained
    projection (captured), but no lean cache slot and no fused kernel."""
    _, model = tuner_pair("dora")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert not is_additive_lora(q_proj) and has_pretrained_projection(q_proj)
    model.base_model.model.model.layers[0].self_attn.q_proj.use_dora["default"] = False
    q_proj.lora_variant.pop("default")
    assert is_additive_lora(q_proj)


def test_a_mixed_model_of_lora_and_loha():
    """``PeftMixedModel``: several tuner kinds active at once, on shared and on separate modules."""
    base = base_model("llama")
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora, adapter_name="lora", mixed=True)
    model.add_adapter("loha", LoHaConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False))
    model.set_adapter(["lora", "loha"])
    model.eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(model.base_model.model, decoder_blocks(pretrained), ids, mask)
        tuco = tuco_peft.tuco(model, ids, mask)
        with tuco_peft.ftc_scale(model, 1.5):
            steered = greedy_generate(model, ids, mask, 4, output_logits=True, return_dict_in_generate=True)
    assert (tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :4])], dim=1)
    reference = steered_logits(model.base_model.model, pretrained, steered.sequences, full_mask, [1.5] * 3)
    torch.testing.assert_close(torch.stack(steered.logits, dim=1), reference[:, ids.shape[1] - 1 : -1], atol=1e-4,
                               rtol=1e-4)


def test_a_batch_that_mixes_adalora_adapters_is_refused():
    """PEFT's mixed batches pass ``adapter_names`` on, which AdaLoRA's forward hands to its base layer."""
    _, model = tuner_pair("adalora")
    ids, mask = padded_batch()
    with pytest.raises(UnsupportedModelError, match="PEFT does not mix AdaLoRA adapters"):
        tuco_peft.decompose(model, ids, mask, adapter_names=["default"] * len(ids))
