"""Every registered adapter kind on every registered family and four derived ones, against the two-model oracle: components at every
position, TuCo, and TuCo's gradients with respect to the adapter's weights, with each block on a one-pass path;
and in bfloat16 and float16 on Llama and Gemma 3, against the oracle at that precision. Each on the strategy
decompose picks for the batch (tests/core/test_adapter_kinds.py forces each strategy on Llama).

The kinds are those of ``tuco_peft.lora.kinds``, each on every linear of the block ("all-linear"); LoRA on
parameters (``target_parameters``) on the weights of the attention's projections and the MLP's output. A kind
PEFT itself cannot put on a family's layers (LoHa on GPT-2's ``Conv1D``, ...) is skipped, naming PEFT's reason.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.assertions import ORACLE_TOLERANCE, assert_components_close
from helpers.gradients import tuco_gradients
from helpers.models import FAMILIES, VOCAB, base_model, padded_batch
from helpers.oracle import decoder_blocks, last_index, tuco_at_last, two_pass
from helpers.strategies import pretrained_paths, record_strategies
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    HRAConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    RandLoraConfig,
    VeraConfig,
    get_peft_model,
)
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import tuco_peft
from tuco_peft.core.pretrained_path import ReplayBlock
from tuco_peft.families import derive_spec, spec_for
from tuco_peft.lora.kinds import registered_adapter_kinds

# Registered by nobody, their one-pass path proved on the first batch (tests/core/test_derived_families.py):
# NoPE layers, a post-norm block with a global layer, sandwich norms with an interleaved rotary embedding, a
# mixture of experts (its fused experts take LoRA through target_parameters under "all-linear").
DERIVED = {
    "smollm3": {},
    "olmo3": {"sliding_window": 6},
    "glm4": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}
_DERIVED_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None,
)  # fmt: skip


def _base(family: str) -> nn.Module:
    if family not in DERIVED:
        return base_model(family, intermediate_size=128)
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, **_DERIVED_SHAPE, **DERIVED[family])
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _mlp_output(block: nn.Module, mlp: str) -> str | None:
    """The name, within a block, of its MLP's last linear (the output projection, IA3's feed-forward layer), or
    None for a mixture of experts, whose experts are no linears."""
    linears = [name for name, m in getattr(block, mlp).named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    return f"{mlp}.{linears[-1]}" if linears else None


def _targets(model: nn.Module) -> tuple[list[str], str | None]:
    """(the attention's projections and the MLP's output, within a block; the MLP's output)."""
    block = decoder_blocks(model)[0]
    spec = spec_for(block, model.config) or derive_spec(block, model.config)
    assert spec is not None
    attention = [f"{spec.attention}.{name}" for name in dict.fromkeys(spec.projections)]
    mlp_output = _mlp_output(block, spec.mlp)
    return [*attention, *([mlp_output] if mlp_output else [])], mlp_output


KINDS = {
    "lora": lambda targets, mlp_output: LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "dora": lambda targets, mlp_output: LoraConfig(  # PEFT's DoRA takes no fused experts (target_parameters)
        r=4, target_modules="all-linear" if mlp_output else targets, use_dora=True, init_lora_weights=False
    ),
    "adalora": lambda targets, mlp_output: AdaLoraConfig(  # its non-default init draws unit normals: fp16 overflows
        init_r=4, target_r=2, total_step=10, target_modules="all-linear"
    ),
    "ia3": lambda targets, mlp_output: IA3Config(
        target_modules=targets, feedforward_modules=[mlp_output] if mlp_output else [], init_ia3_weights=False
    ),
    "loha": lambda targets, mlp_output: LoHaConfig(r=4, target_modules="all-linear", init_weights=False),
    "lokr": lambda targets, mlp_output: LoKrConfig(r=4, target_modules="all-linear", init_weights=False),
    "vera": lambda targets, mlp_output: VeraConfig(r=4, target_modules=targets[:1], init_weights=False),
    "randlora": lambda targets, mlp_output: RandLoraConfig(r=4, target_modules=targets[:1], init_weights=False),
    "oft": lambda targets, mlp_output: OFTConfig(
        r=0, oft_block_size=8, target_modules="all-linear", init_weights=False
    ),
    "boft": lambda targets, mlp_output: BOFTConfig(boft_block_size=8, target_modules=targets, init_weights=False),
    "hra": lambda targets, mlp_output: HRAConfig(r=4, target_modules="all-linear", init_weights=False),
    "lora-on-parameters": lambda targets, mlp_output: LoraConfig(
        r=4, target_modules=[], target_parameters=[f"{name}.weight" for name in targets], init_lora_weights=False
    ),
}


def _pair(family: str, kind: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    base = _base(family)
    pretrained = copy.deepcopy(base)
    torch.manual_seed(1)
    try:
        model = get_peft_model(base, KINDS[kind](*_targets(base))).eval()
    except (ValueError, TypeError, NotImplementedError) as error:
        pytest.skip(f"PEFT puts no {kind} adapter on {family}'s layers: {error}")
    with torch.no_grad():  # tuners whose random init is still the identity get trained-looking weights
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return pretrained.to(dtype), model.to(dtype)


def test_every_registered_kind_is_in_the_matrix():
    names = {kind.name for registered in registered_adapter_kinds() for kind in registered.kinds}
    covered = {
        "LoRA", "LoRA variant (DoRA, aLoRA, ...)", "AdaLoRA", "IA3", "IA3 on a feed-forward layer", "LoHa", "LoKr",
        "VeRA", "RandLoRA", "OFT", "BOFT", "HRA", "LoRA on parameters (target_parameters)",
    }  # fmt: skip
    assert names == covered, "a kind was registered: add it to KINDS"


@pytest.mark.device
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", [*FAMILIES, *DERIVED])
def test_each_kind_on_each_family_matches_the_oracle_in_one_pass(family, kind, monkeypatch, device):
    pretrained, model = (m.to(device) for m in _pair(family, kind))
    chosen = record_strategies(monkeypatch)
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tuco_peft.decompose(model, ids, mask, positions="all")
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    assert chosen and ReplayBlock not in chosen
    assert not [p for p in pretrained_paths(model) if getattr(p, "refuted", False)]  # a derived path was proved
    assert not [w for w in caught if "no one-pass rule" in str(w.message)]
    real = mask.bool()[:, None, :, None]
    assert ftc[real.expand_as(ftc)].abs().max() > 1e-3 * ptc.abs().max()  # the adapter changes every batch
    assert_components_close(ours.ptc, ptc * real)
    assert_components_close(ours.ftc, ftc * real)

    grads, expected = tuco_gradients(model, pretrained, ids, mask)
    assert grads and grads.keys() == expected.keys()
    # Each tensor to 1e-3 of its own largest entry (fp32 rounding left at most 1.3e-4: RandLoRA on GPT-NeoX),
    # with a floor of 1e-6 of the largest gradient of all for tensors whose gradients are nearly zero.
    largest = max(g.abs().max() for g in expected.values())
    for name, grad in grads.items():
        error = (grad - expected[name]).abs().max()
        assert error <= 1e-3 * expected[name].abs().max() + 1e-6 * largest, name


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_each_kind_in_half_precision_matches_the_oracle_at_that_precision(family, kind, dtype, monkeypatch, device):
    pretrained, model = (m.to(device) for m in _pair(family, kind, dtype))
    chosen = record_strategies(monkeypatch)
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tuco_peft.decompose(model, ids, mask)
        ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    assert chosen and ReplayBlock not in chosen
    assert not [w for w in caught if "no one-pass rule" in str(w.message)]
    t, rows = last_index(mask), torch.arange(ids.shape[0], device=device)
    components, tuco = ORACLE_TOLERANCE[dtype]
    assert_components_close(ours.ptc, ptc[rows, :, t], components)
    assert_components_close(ours.ftc, ftc[rows, :, t], components)
    assert (ours.tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < tuco
