"""Full fine-tunes: the pre-trained model passed explicitly (loaded, or streamed from safetensors)."""

import pytest
import torch
from accelerate import dispatch_model
from helpers.models import FAMILIES, base_model, full_finetune_pair, lora_model, padded_batch
from helpers.oracle import decoder_blocks, last_index, tuco_at_last, two_pass

import tuco_peft


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["last", "all"])
def test_full_finetune_matches_two_model_oracle(family, positions):
    pretrained, finetuned = full_finetune_pair(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        ptc, ftc, _, _ = two_pass(finetuned, decoder_blocks(pretrained), ids, mask)
        d = tuco_peft.decompose(finetuned, ids, mask, positions=positions, base_model=pretrained)
    if positions == "last":
        assert (d.tuco - tuco_at_last(ptc, ftc, mask)).abs().max() < 1e-5
        t = last_index(mask)
        ptc, ftc = ptc[torch.arange(3), :, t], ftc[torch.arange(3), :, t]
    else:
        real = mask.bool()[:, None, :, None]
        ptc, ftc = ptc * real, ftc * real
    scale = ptc.abs().max()
    assert (d.ptc - ptc).abs().max() <= 1e-4 * scale
    assert (d.ftc - ftc).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_checkpoint_equals_resident_model(tmp_path, family):
    pretrained, finetuned = full_finetune_pair(family)
    pretrained.save_pretrained(tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        resident = tuco_peft.decompose(finetuned, ids, mask, base_model=pretrained)
        streamed = tuco_peft.decompose(finetuned, ids, mask, base_model=tmp_path)
        single_file = tuco_peft.decompose(finetuned, ids, mask, base_model=tmp_path / "model.safetensors")
    for other in (streamed, single_file):
        torch.testing.assert_close(other.ptc, resident.ptc, atol=0, rtol=0)
        torch.testing.assert_close(other.ftc, resident.ftc, atol=0, rtol=0)


def test_checkpoint_of_another_architecture_or_size_is_refused(tmp_path):
    _, finetuned = full_finetune_pair("llama")
    ids, mask = padded_batch()
    base_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(tuco_peft.UnsupportedModelError, match="architecture and size"):
        tuco_peft.tuco(finetuned, ids, mask, base_model=tmp_path / "gpt2")
    with pytest.raises(tuco_peft.UnsupportedModelError, match="architecture and size"):
        tuco_peft.tuco(finetuned, ids, mask, base_model=base_model("qwen2"))
    base_model("llama").save_pretrained(tmp_path / "wider-mlp")
    finetuned_smaller = full_finetune_pair("llama")[1]
    finetuned_smaller.model.layers[0].mlp.down_proj = torch.nn.Linear(48, 64, bias=False)
    finetuned_smaller.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 48, bias=False)
    finetuned_smaller.model.layers[0].mlp.gate_proj = torch.nn.Linear(64, 48, bias=False)
    finetuned_smaller.config.intermediate_size = 48
    with pytest.raises(tuco_peft.UnsupportedModelError, match="does not fit"):
        tuco_peft.tuco(finetuned_smaller, ids, mask, base_model=tmp_path / "wider-mlp")
    with pytest.raises(tuco_peft.UnsupportedModelError, match="does not exist"):
        tuco_peft.tuco(finetuned, ids, mask, base_model=tmp_path / "missing")


_OFFLOADING_DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_accelerate_dispatched_model_with_offloaded_blocks(tmp_path, finetune):
    if finetune == "full":
        pretrained, model = full_finetune_pair("llama")
        transformers_model = model
    else:
        pretrained, model = None, lora_model(base_model("llama"))
        transformers_model = model.get_base_model()
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = tuco_peft.decompose(model, ids, mask, positions="all", base_model=pretrained)
    dispatch_model(transformers_model, device_map=_OFFLOADING_DEVICE_MAP, main_device="cpu", offload_dir=str(tmp_path))
    assert transformers_model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    with torch.no_grad():
        got = tuco_peft.decompose(model, ids, mask, positions="all", base_model=pretrained)
    torch.testing.assert_close(got.ptc, expected.ptc, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.ftc, expected.ftc, atol=1e-6, rtol=1e-5)


def test_a_base_model_in_another_dtype_is_refused():
    pretrained, finetuned = full_finetune_pair("llama")
    ids, mask = padded_batch()
    with pytest.raises(tuco_peft.UnsupportedModelError, match="same dtype"):
        tuco_peft.tuco(finetuned, ids, mask, base_model=pretrained.to(torch.bfloat16))
