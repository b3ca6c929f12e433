"""tuco_peft.generate: the TuCo behind each generated token, against decompose() and a no-cache reference."""

import pytest
import torch
from helpers.models import FAMILIES, base_model, model_pair, padded_batch
from helpers.steering import N_NEW, prefixes
from helpers.steering_reference import greedy, steered_last_token_tuco
from transformers import GenerationConfig

from tuco_peft.core.decompose import decompose
from tuco_peft.errors import InputError
from tuco_peft.steering.generation import generate


@pytest.mark.device
@pytest.mark.parametrize("family", FAMILIES)
def test_tuco_of_each_token_equals_decompose_on_its_prefix(family, device):
    model = model_pair(family)[1].to(device)
    ids, mask = (t.to(device) for t in padded_batch(lengths=(7, 4, 9)))
    out = generate(model, ids, mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    plain = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out.sequences, plain)
    assert out.tuco.shape == (3, N_NEW) and out.tuco.dtype == torch.float32
    with torch.no_grad():
        expected = torch.stack([decompose(model, p, m).tuco for p, m in prefixes(out.sequences, mask)], dim=1)
    torch.testing.assert_close(out.tuco, expected, atol=1e-5, rtol=0)
    assert out.tuco.std() > 1e-3  # the values move from token to token


@pytest.mark.device
def test_steered_tuco_and_tokens_match_the_no_cache_reference(device):
    pretrained, model = (m.to(device) for m in model_pair("llama"))
    ids, mask = (t.to(device) for t in padded_batch(lengths=(5, 8)))
    alphas = [1.4, 0.5, 1.9]
    out = generate(
        model, ids, mask, alpha=alphas, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0
    )
    assert torch.equal(out.sequences, greedy(model, pretrained, ids, mask, alphas, N_NEW))
    expected = torch.stack(
        [steered_last_token_tuco(model, pretrained, p, m, alphas) for p, m in prefixes(out.sequences, mask)], dim=1
    )
    torch.testing.assert_close(out.tuco, expected, atol=1e-5, rtol=0)


def test_alpha_zero_gives_zero_tuco_and_larger_alpha_larger_tuco():
    _, model = model_pair("qwen3")
    ids, mask = padded_batch(lengths=(6, 6))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert generate(model, ids, mask, alpha=0.0, **kwargs).tuco.abs().max() == 0
    first = [generate(model, ids, mask, alpha=a, max_new_tokens=1, pad_token_id=0).tuco[:, 0] for a in (0.5, 1.0, 2.0)]
    assert bool((first[0] < first[1]).all() and (first[1] < first[2]).all())


def test_tuco_is_nan_after_a_row_has_finished():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 8))
    free = generate(model, ids, mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, pad_token_id=0)
    eos = int(free.sequences[0, ids.shape[1] + 1])  # row 0 stops after its second new token
    stopped = generate(model, ids, mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, eos_token_id=eos)
    n_new = stopped.tuco.shape[1]
    first_eos = (stopped.sequences[0, ids.shape[1] :] == eos).nonzero()[0].item()
    assert first_eos <= 1
    assert not stopped.tuco[0, : first_eos + 1].isnan().any()
    assert stopped.tuco[0, first_eos + 1 :].isnan().all() and n_new > first_eos + 1
    row1_finished = (stopped.sequences[1, ids.shape[1] :] == eos).nonzero()
    row1_end = row1_finished[0].item() + 1 if len(row1_finished) else n_new
    assert not stopped.tuco[1, :row1_end].isnan().any()
    finite = ~stopped.tuco.isnan()  # until a row stops, its tokens and TuCo are those of the free run
    torch.testing.assert_close(stopped.tuco[finite], free.tuco[:, :n_new][finite])


def test_sampling_with_several_sequences_per_prompt():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 7))
    torch.manual_seed(0)
    out = generate(
        model,
        ids,
        mask,
        alpha=1.2,
        max_new_tokens=4,
        min_new_tokens=4,
        do_sample=True,
        num_return_sequences=2,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (4, ids.shape[1] + 4) and out.tuco.shape == (4, 4)
    assert bool(((out.tuco > 0) & (out.tuco < 1)).all())
    torch.testing.assert_close(out.tuco[0, 0], out.tuco[1, 0])  # copies of one prompt share the first step
    assert out.output.sequences is out.sequences


def test_bad_inputs_are_refused_and_model_is_left_unhooked():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 8), side="right")
    with pytest.raises(InputError, match="left padding"):
        generate(model, ids, mask, max_new_tokens=2)
    with pytest.raises(InputError, match="beam"):
        generate(model, ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(InputError, match="assistant_model"):
        generate(model, ids, max_new_tokens=2, assistant_model=base_model("llama"))
    with pytest.raises(InputError, match="prompt_lookup_num_tokens"):
        generate(model, ids, max_new_tokens=2, prompt_lookup_num_tokens=2)
    with pytest.raises(InputError, match="finite"):
        generate(model, ids, alpha=float("nan"), max_new_tokens=2)
    with pytest.raises(InputError, match="2-D"):
        generate(model, ids[0], max_new_tokens=2)
    with pytest.raises(Exception, match="no LoRA adapters"):
        generate(base_model("llama"), ids, max_new_tokens=2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("source", ["generation_config", "model"])
@pytest.mark.parametrize(
    "name, value, message",
    [("num_beams", 2, "cannot track TuCo through beam"), ("prompt_lookup_num_tokens", 2, "prompt_lookup_num_tokens")],
)
def test_beams_and_assisted_decoding_are_refused_from_any_generation_config(source, name, value, message):
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 8))
    kwargs = {}
    if source == "model":
        setattr(model.get_base_model().generation_config, name, value)
    else:
        kwargs["generation_config"] = GenerationConfig(max_new_tokens=2, pad_token_id=0, **{name: value})
    with pytest.raises(InputError, match=message):
        generate(model, ids, mask, max_new_tokens=2, pad_token_id=0, **kwargs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_keyword_overrides_beams_of_the_model_generation_config():
    _, model = model_pair("llama")
    ids, mask = padded_batch(lengths=(5, 8))
    model.get_base_model().generation_config.num_beams = 2
    out = generate(model, ids, mask, num_beams=1, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.tuco.shape == (2, 3) and not out.tuco.isnan().any()
