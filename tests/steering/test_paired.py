"""Paired blocks (tuco_peft.core.paired) on the Triton backend, under the interpreter.

ftc_scale, generate and decompose(positions="all") run each adapter block once on its input stacked twice,
the LoRA linears through the two-stream and shared-input kernels. References: the plain two-model
steering of tests/helpers/steering_reference.py, and the torch backend (which keeps the separate pre-trained pass).
"""

from collections import Counter

import pytest
import torch
from helpers.models import base_model, lora_model, model_pair, padded_batch
from helpers.quantized_models import nf4_llama
from helpers.steering import plain_logits
from helpers.steering_reference import greedy, steered_last_token_tuco, steered_logits

import tuco_peft
import tuco_peft.lora.fused as kernels_api
from tuco_peft.families import QKVLayout, spec_for
from tuco_peft.model.parts import model_parts
from tuco_peft.steering.forward import ftc_scale

pytestmark = pytest.mark.interpreter

ALPHAS = (0.5, 0.0, 1.7)


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """How often each fused entry point ran (the paired path must use them, not fall back)."""
    calls: Counter = Counter()
    for name in ("dual_lora_linear", "two_stream_lora_linear"):
        original = getattr(kernels_api, name)

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(kernels_api, name, counted)
    return calls


def _assert_paired(calls: Counter, model) -> None:
    """Every LoRA linear of the blocks ran fused, none of them through a second pre-trained pass; but those
    whose lora_A output the lean KV cache records (k/v, or a fused q/k/v: then no shared-input kernel runs)."""
    spec = spec_for(model_parts(model).layers[0], model.config)
    only_recorded_shared_input = spec.lean_cache and spec.qkv_layout is not QKVLayout.SEPARATE
    assert calls["two_stream_lora_linear"] > 0 and (calls["dual_lora_linear"] > 0) != only_recorded_shared_input
    for module in model_parts(model).layers.modules():
        assert "forward" not in module.__dict__ and not module._forward_hooks


@pytest.mark.device
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2"])
def test_steered_logits_match_the_two_model_reference(family, kernel_calls, recwarn, device):
    pretrained, model = (m.to(device) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch())
    with torch.no_grad(), ftc_scale(model, ALPHAS, backend="triton"):
        steered = plain_logits(model, ids, mask)
    expected = steered_logits(model, pretrained, ids, mask, ALPHAS)
    real = mask.bool()
    torch.testing.assert_close(steered[real], expected[real], atol=2e-5, rtol=2e-5)
    assert (expected[real] - plain_logits(model, ids, mask)[real].detach()).abs().max() > 1e-3
    _assert_paired(kernel_calls, model)
    assert not [w for w in recwarn if "tuco-peft" in str(w.message)]


@pytest.mark.device
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_generation_with_cache_follows_the_reference(family, kernel_calls, device):
    """Lean fine-tuned slots (llama), sliding-window slots (gemma2), a positional cache argument (gpt2), a cache
    argument of another name (gpt_neox's ``layer_past``)."""
    pretrained, model = (m.to(device) for m in model_pair(family))
    ids, mask = (t.to(device) for t in padded_batch())
    n_new = 4
    expected = greedy(model, pretrained, ids, mask, ALPHAS, n_new)
    out = tuco_peft.generate(
        model, ids, mask, alpha=ALPHAS, backend="triton", max_new_tokens=n_new, min_new_tokens=n_new,
        do_sample=False, pad_token_id=0,
    )
    assert torch.equal(out.sequences, expected)
    first = steered_last_token_tuco(model, pretrained, ids, mask, ALPHAS)
    torch.testing.assert_close(out.tuco[:, 0], first, atol=1e-5, rtol=0)
    _assert_paired(kernel_calls, model)


def test_steering_a_4bit_base_matches_the_torch_backend(kernel_calls):
    model = nf4_llama()
    ids, mask = padded_batch(lengths=(6, 4))
    with torch.no_grad():
        with ftc_scale(model, 0.6, backend="torch"):
            reference = plain_logits(model, ids, mask)
        with ftc_scale(model, 0.6, backend="triton"):
            fused = plain_logits(model, ids, mask)
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    _assert_paired(kernel_calls, model)


def test_modules_to_save_inside_a_block_run_per_half(kernel_calls):
    """A trained norm before attention: q/k/v inputs differ per half, so they take the two-stream kernel."""
    model = lora_model(base_model("llama"), modules_to_save=["input_layernorm"])
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm" and module.weight.requires_grad:
            module.weight.data.uniform_(0.5, 1.5)
    ids, mask = padded_batch(lengths=(6, 4))
    with torch.no_grad():
        reference = tuco_peft.decompose(model, ids, mask, positions="all", backend="torch")
        fused = tuco_peft.decompose(model, ids, mask, positions="all", backend="triton")
    torch.testing.assert_close(fused.ptc, reference.ptc, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.ftc, reference.ftc, atol=1e-5, rtol=1e-4)
    assert kernel_calls["two_stream_lora_linear"] > 0 and kernel_calls["dual_lora_linear"] == 0


def test_all_position_gradients_match_the_torch_backend(kernel_calls):
    model = lora_model(base_model("llama"))
    ids, mask = padded_batch(lengths=(6, 4))
    layer = model.base_model.model.model.layers[1]
    weights = [layer.self_attn.q_proj.lora_A["default"].weight, layer.mlp.down_proj.lora_B["default"].weight]
    grads = []
    for backend in ("torch", "triton"):
        d = tuco_peft.decompose(model, ids, mask, positions="all", backend=backend)
        grads.append(torch.autograd.grad(d.ftc.abs().sum() + d.ptc.square().sum(), weights))
    for fused, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)
    assert kernel_calls["two_stream_lora_linear"] > 0


def test_everything_is_restored_after_an_exception_inside_ftc_scale():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(6, 4))
    flags = {name: m.__dict__.get("_disable_adapters") for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), ftc_scale(model, 0.5, backend="triton"):
        plain_logits(model, ids, mask)
        raise RuntimeError("boom")
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert flags == {name: m.__dict__.get("_disable_adapters") for name, m in model.named_modules()}


def _trained_attention_norms(model):
    """A fine-tune that also trains each block's input norm (modules_to_save), away from the base's."""
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm" and module.weight.requires_grad:
            module.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_steps_with_a_trained_attention_norm_match_the_uncached_reference(backend):
    """The two blocks then project differently normed states: no lean (low-rank) fine-tuned cache slot."""
    pretrained, model = model_pair("llama", modules_to_save=["input_layernorm"])
    _trained_attention_norms(model)
    ids, mask = padded_batch(lengths=(6, 4))
    n_new = 3
    with torch.no_grad(), ftc_scale(model, ALPHAS, backend=backend):
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True, output_scores=True,
        )
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], n_new, dtype=mask.dtype)], dim=1)
    expected = steered_logits(model, pretrained, out.sequences, full_mask, ALPHAS)
    for step, scores in enumerate(out.scores):
        allowed = torch.isfinite(scores)  # min_new_tokens masks the end-of-sequence token
        torch.testing.assert_close(scores[allowed], expected[:, ids.shape[1] - 1 + step][allowed], atol=2e-5, rtol=2e-5)


def test_hooks_on_a_steered_block_and_output_hidden_states_see_the_steered_stream():
    """Forward hooks on a block (transformers' output recorders, users') see one stream on both backends."""
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 3))
    seen = []
    handle = model_parts(model).layers[1].register_forward_hook(lambda module, args, output: seen.append(output))
    hidden = {}
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # transformers installs its recorders
            for backend in ("torch", "triton"):
                with ftc_scale(model, ALPHAS, backend=backend):
                    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                hidden[backend] = out.hidden_states
                assert [tuple(h.shape) for h in out.hidden_states] == [(2, 5, 64)] * 4
                torch.testing.assert_close(seen[-1], out.hidden_states[2])  # block 1's steered output
    finally:
        handle.remove()
    for fused, reference in zip(hidden["triton"], hidden["torch"]):
        torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
