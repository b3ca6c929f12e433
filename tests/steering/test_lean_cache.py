"""The lean dual KV cache (tuco_peft.steering.lean_cache): the same steered generation as two full cache slots, in the
memory the module docstring states, for every family with a lean cache and every dynamic slot kind."""

import copy
from collections import defaultdict

import pytest
import torch
from helpers.models import base_model, lora_model, model_pair, padded_batch
from helpers.steering import greedy_generate
from helpers.steering_reference import greedy, steered_logits
from peft import LoraConfig, get_peft_model
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from tuco_peft.core.paired import PairedBlock
from tuco_peft.families import QKNorm, attention_heads, spec_for
from tuco_peft.model.parts import model_parts
from tuco_peft.steering.forward import ftc_scale
from tuco_peft.steering.lean_cache import LowRankDelta, LowRankSlot, PastRotary, PreNormKeySlot

# k_norm per head (qwen3) and over the full key width (olmo2): their pre-trained slots hold pre-norm keys.
K_NORM_FAMILIES = ["qwen3", "olmo2"]
# The registered families whose spec allows a lean cache (test_families checks the spec is followed):
# separate projections, fused [q | k | v] (phi3, gpt2) and fused by head (gpt_neox); no rotary (gpt2);
# sliding windows on every layer (mistral), on some layers (qwen2) and alternating (gemma2); k-norms; a k-norm
# with sliding windows and rotary bases per type of layer (gemma3_text).
LEAN_FAMILIES = [
    "llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", *K_NORM_FAMILIES, "gemma3_text"
]
ALPHAS = [1.5, 0.6, 2.0]
N_NEW = 8  # past every test config's window (4 or 5) with prompts of up to 9 tokens


def _steered_generation(model, ids, mask, n_new=N_NEW, **kwargs):
    with ftc_scale(model, ALPHAS):
        return greedy_generate(model, ids, mask, n_new, return_dict_in_generate=True, output_scores=True, **kwargs)


def _without_lean_slots(monkeypatch):
    monkeypatch.setattr(LowRankDelta, "for_block", staticmethod(lambda *args: None))


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_lean_slots_generate_as_two_full_slots_and_keep_the_same_window(family, monkeypatch):
    """Prompts longer than the sliding windows (4 or 5 tokens here), and generation past them."""
    pretrained, model = model_pair(family)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    lean = _steered_generation(model, ids, mask)
    cache = lean.past_key_values
    finetuned, twins = cache.layers[:3], cache.layers[3:]
    assert all(isinstance(slot, LowRankSlot) for slot in finetuned)
    for slot, twin in zip(finetuned, twins):  # the same tokens: a window keeps the same suffix in both
        assert slot.keys.shape[-2] == twin.keys.shape[-2] and slot.get_seq_length() == twin.get_seq_length()
    if family in ("mistral", "gemma2"):
        assert min(twin.keys.shape[-2] for twin in twins) == 3 < ids.shape[1] + N_NEW - 1  # window 4 holds 3
    _without_lean_slots(monkeypatch)
    full = _steered_generation(model, ids, mask)
    assert not any(isinstance(slot, LowRankSlot) for slot in full.past_key_values.layers)
    assert torch.equal(lean.sequences, full.sequences)
    assert torch.equal(lean.sequences, greedy(model, pretrained, ids, mask, ALPHAS, N_NEW))
    # The rebuilt keys add the same terms in another order, k_PT + RoPE(s·B·u) for RoPE(W·x + s·B·A·x): fp32
    # rounding apart, the steps' logits agree.
    for lean_scores, full_scores in zip(lean.scores, full.scores):
        torch.testing.assert_close(lean_scores, full_scores, atol=2e-5, rtol=1e-5)


# Older transformers refuse to crop a sliding-window slot past its window, so assisted decoding with one.
_CROPS_FULL_WINDOWS = hasattr(DynamicSlidingWindowLayer, "activate_past_recording")


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        *(
            pytest.param(family, marks=pytest.mark.skipif(not _CROPS_FULL_WINDOWS, reason="no past recording"))
            for family in ("mistral", "gemma2")
        ),
    ],
)
def test_prompt_lookup_decoding_crops_lean_slots_as_their_twins(family):
    """Assisted decoding records past tokens beyond the window (set before the first forward, so before the
    lean slots exist) and crops the rejected candidates from every slot."""
    pretrained, model = model_pair(family)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # a pattern the lookup proposes candidates from
    mask = torch.ones_like(ids)
    generated = _steered_generation(model, ids, mask, prompt_lookup_num_tokens=3)
    slots = generated.past_key_values.layers
    assert all(isinstance(slot, LowRankSlot) for slot in slots[:3])
    recording = [getattr(slot, "record_past", False) for slot in slots]
    assert recording[:3] == recording[3:] and (family == "llama") != any(recording)
    assert torch.equal(generated.sequences, greedy(model, pretrained, ids, mask, ALPHAS, N_NEW))


@pytest.mark.parametrize("family", ["mistral", "gpt_neox", *K_NORM_FAMILIES])
def test_beam_search_reorders_lean_slots_with_their_twins(family):
    """Beam scores are the reference's log-probabilities of the chosen tokens (window, fused-by-head and
    pre-norm key slots)."""
    pretrained, model = model_pair(family)
    ids, mask = padded_batch(lengths=(6, 8))
    with ftc_scale(model, ALPHAS), torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, num_beams=3,
            num_return_sequences=3, length_penalty=0.0, do_sample=False, pad_token_id=0, output_scores=True,
            return_dict_in_generate=True,
        )
    sequences, width = out.sequences, ids.shape[1]
    full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones(sequences.shape[0], 5, dtype=mask.dtype)], 1)
    log_probs = steered_logits(model, pretrained, sequences, full_mask, ALPHAS).log_softmax(-1)
    chosen = log_probs[:, width - 1 : -1].gather(-1, sequences[:, width:, None])[..., 0]
    torch.testing.assert_close(out.sequences_scores, chosen.sum(-1), atol=1e-4, rtol=1e-5)
    assert len(set(map(tuple, sequences[:3].tolist()))) == 3  # three distinct beams, each checked


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])  # full, half and quarter rotary
def test_rotary_of_the_past_computed_once_per_forward_changes_no_bit(family, monkeypatch):
    _, model = model_pair(family)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    rotary_calls = []
    rotary_emb = model_parts(model).decoder.rotary_emb
    rotary_emb.register_forward_hook(lambda *args: rotary_calls.append(1))
    memoized = _steered_generation(model, ids, mask)
    # The decoder's own call at every forward, then one for the three lean blocks at every step with a past.
    assert len(rotary_calls) == N_NEW + (N_NEW - 1)
    def direct_call(self, rotary_emb, like, positions, layer_type=None):
        return rotary_emb(like, positions) if layer_type is None else rotary_emb(like, positions, layer_type)

    monkeypatch.setattr(PastRotary, "__call__", direct_call)
    direct = _steered_generation(model, ids, mask)
    assert len(rotary_calls) == 2 * N_NEW + 4 * (N_NEW - 1)
    assert torch.equal(memoized.sequences, direct.sequences)
    assert all(torch.equal(a, b) for a, b in zip(memoized.scores, direct.scores))


def test_a_new_generation_does_not_reuse_the_past_rotary_of_the_last_one():
    """Same shapes, other left padding: the cached positions of each row differ between the two prompts."""
    _, model = model_pair("llama")
    first_ids, first_mask = padded_batch(seed=2, lengths=(7, 4, 9))
    ids, mask = padded_batch(seed=3, lengths=(9, 7, 4))
    with ftc_scale(model, ALPHAS):
        greedy_generate(model, first_ids, first_mask, N_NEW)
        second = greedy_generate(model, ids, mask, N_NEW, return_dict_in_generate=True, output_scores=True)
    alone = _steered_generation(model, ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(second.scores, alone.scores))


@pytest.mark.parametrize("family", K_NORM_FAMILIES)
def test_pre_trained_keys_recomputed_from_pre_norm_keys_are_the_attentions_bit_for_bit(family, monkeypatch):
    """At every step, the past keys a pre-norm slot returns, RoPE(k_norm(K0)), are the keys the attention
    handed it at the earlier steps."""
    _, model = model_pair(family)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    given, returned = defaultdict(list), defaultdict(list)
    update = PreNormKeySlot.update

    def recording_update(slot, key_states, value_states, *args, **kwargs):
        keys, values = update(slot, key_states, value_states, *args, **kwargs)
        given[id(slot)].append(key_states)
        returned[id(slot)].append(keys)
        return keys, values

    monkeypatch.setattr(PreNormKeySlot, "update", recording_update)
    _steered_generation(model, ids, mask)
    assert len(given) == 3
    for slot, keys in returned.items():
        assert len(keys) == N_NEW
        for step in range(1, N_NEW):
            assert torch.equal(keys[step], torch.cat(given[slot][: step + 1], dim=-2))


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("key_adapter", [True, False], ids=["lora-k_proj", "plain-k_proj"])
@pytest.mark.parametrize("family", K_NORM_FAMILIES)
def test_pre_norm_keys_paired_or_not_with_or_without_an_adapter_on_k_proj(family, key_adapter, paired, monkeypatch):
    """K0 is read where it is computed: once from the fine-tuned k_proj's base layer (paired), twice, alike
    (unpaired: adapters on, then off), or from a k_proj without adapter called on both halves at once."""
    pretrained = base_model(family)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if key_adapter else ["q_proj", "v_proj", "o_proj"]
    model = lora_model(copy.deepcopy(pretrained), target_modules=targets)
    if not paired:
        monkeypatch.setattr(PairedBlock, "supports", staticmethod(lambda layer, config: False))
    ids, mask = padded_batch(lengths=(7, 4, 9))
    lean = _steered_generation(model, ids, mask)
    assert all(isinstance(slot, PreNormKeySlot) for slot in lean.past_key_values.layers[3:])
    _without_lean_slots(monkeypatch)
    full = _steered_generation(model, ids, mask)
    assert torch.equal(lean.sequences, full.sequences)
    assert torch.equal(lean.sequences, greedy(model, pretrained, ids, mask, ALPHAS, N_NEW))
    for lean_scores, full_scores in zip(lean.scores, full.scores):
        torch.testing.assert_close(lean_scores, full_scores, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", K_NORM_FAMILIES)
def test_pre_norm_keys_in_bfloat16_generate_as_two_full_slots_bit_for_bit(family, monkeypatch):
    """bf16 keys, fp32 LoRA weights (PEFT's default), fp32 cos/sin (OLMo-2): the slots add and rotate in the
    dtypes the attention does, so the steps' scores are the two full slots' exactly."""
    model = lora_model(base_model(family, dtype=torch.bfloat16))
    ids, mask = padded_batch(lengths=(7, 4, 9))
    lean = _steered_generation(model, ids, mask)
    assert lean.past_key_values.layers[3].keys.dtype == torch.bfloat16
    _without_lean_slots(monkeypatch)
    full = _steered_generation(model, ids, mask)
    assert torch.equal(lean.sequences, full.sequences)
    assert all(torch.equal(a, b) for a, b in zip(lean.scores, full.scores))


def test_pre_norm_keys_in_sliding_window_slots():
    """Qwen3 with a sliding window on some layers: K0 is cropped to the window as keys would be."""
    layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    base = base_model("qwen3", use_sliding_window=True, sliding_window=4, layer_types=layer_types)
    pretrained, model = copy.deepcopy(base), lora_model(base)
    ids, mask = padded_batch(lengths=(7, 4, 9))
    lean = _steered_generation(model, ids, mask)
    slots = lean.past_key_values.layers
    assert [type(slot).__name__ for slot in slots[3:]] == ["PreNormKeySlot", *["PreNormKeySlidingWindowSlot"] * 2]
    assert slots[4].keys.shape[-2] == slots[1].keys.shape[-2] == 3  # window 4 holds 3
    assert torch.equal(lean.sequences, greedy(model, pretrained, ids, mask, ALPHAS, N_NEW))


def test_a_cache_reused_by_another_ftc_scale_gets_plain_slots_where_it_no_longer_steers():
    pretrained, model = model_pair("qwen3")
    ids, mask = padded_batch(lengths=(7, 4, 9))
    cache = DynamicCache(config=model.config)
    with ftc_scale(model, ALPHAS):
        greedy_generate(model, ids, mask, 2, past_key_values=cache)
    cache.reset()
    if cache.get_seq_length():
        pytest.skip("this transformers version's reset zeroes the cache but keeps its length (5.5): not reusable")
    alphas = [1.5, 1.0, 1.0]
    with ftc_scale(model, alphas):
        generated = greedy_generate(model, ids, mask, N_NEW, past_key_values=cache)
    expected = [LowRankSlot, DynamicLayer, DynamicLayer, PreNormKeySlot, DynamicLayer, DynamicLayer]
    assert [type(slot) for slot in cache.layers] == expected
    assert torch.equal(generated, greedy(model, pretrained, ids, mask, alphas, N_NEW))


def test_fused_projection_with_several_adapters_and_lora_bias():
    """One u per adapter for the fused projection; each adapter's B (and bias) rows of the keys and values."""
    base = base_model("phi3")
    pretrained = copy.deepcopy(base)
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "first")
    second = LoraConfig(r=2, lora_alpha=6, target_modules=["qkv_proj"], lora_bias=True, init_lora_weights=False)
    model.add_adapter("second", second)
    torch.manual_seed(4)
    biases = [m.lora_B["second"].bias for m in model.modules() if hasattr(m, "lora_B") and "second" in m.lora_B]
    for bias in biases:  # PEFT starts lora_bias at zero
        bias.data.normal_()
    model.base_model.set_adapter(["first", "second"])
    model.eval()
    ids, mask = padded_batch(lengths=(7, 4, 9))
    lean = _steered_generation(model, ids, mask)
    assert all(isinstance(slot, LowRankSlot) for slot in lean.past_key_values.layers[:3])
    assert torch.equal(lean.sequences, greedy(model, pretrained, ids, mask, ALPHAS, N_NEW))
    model.base_model.set_adapter("first")
    first_only, both = _steered_generation(model, ids, mask).scores[0], lean.scores[0]
    allowed = torch.isfinite(both)  # min_new_tokens masks the end-of-sequence token
    assert (first_only[allowed] - both[allowed]).abs().max() > 1e-3  # the second adapter counts


def _lean_bytes_per_token(rank: int, fused: bool, element_bytes: int) -> int:
    """A lean slot's bytes per cached token: u of rank r (fused q/k/v) or 2r (k and v), one int64 position."""
    return (1 if fused else 2) * rank * element_bytes + 8


def _bytes(slot) -> int:
    return sum(t.numel() * t.element_size() for t in (slot.keys, slot.values))


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_slot_sizes(family):
    _, model = model_pair(family, r=4)
    parts = model_parts(model)
    spec = spec_for(parts.layers[0], parts.config)
    attention = getattr(parts.layers[0], spec.attention)
    kv_width = attention_heads(parts.config)[1] * getattr(attention, spec.head_dim)
    fused = spec.key_value_projections[0] == spec.key_value_projections[1]
    ids, mask = padded_batch(lengths=(7, 4, 9))
    cache = _steered_generation(model, ids, mask).past_key_values
    for slot, twin in zip(cache.layers[:3], cache.layers[3:]):
        assert isinstance(twin, PreNormKeySlot) == (spec.qk_norm is not QKNorm.NONE)  # K0: the size of keys
        tokens = ids.shape[0] * twin.keys.shape[-2]
        assert _bytes(twin) == tokens * 2 * kv_width * 4
        assert _bytes(slot) == tokens * _lean_bytes_per_token(4, fused, element_bytes=4)


@pytest.mark.parametrize(
    ("kv_width", "fused"),
    [(1024, False), (256, False), (3072, True), (768, True), (2048, True)],
    ids=["llama3-8b", "qwen2-1.5b", "phi3-mini", "gpt2", "pythia-1.4b"],
)
@pytest.mark.parametrize("element_bytes", [2, 4])
def test_lean_cache_is_at_most_1_3x_plain_at_rank_64(kv_width, fused, element_bytes):
    """Plain generation stores 2·kv_width elements per token and block; steering adds a lean slot."""
    plain = 2 * kv_width * element_bytes
    assert (plain + _lean_bytes_per_token(64, fused, element_bytes)) / plain <= 1.3
