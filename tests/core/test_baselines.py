"""The paper's two-pass baselines (kept for benchmarking) agree with decompose and with the oracle."""

import torch
from helpers.models import model_pair, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass

import tuco_peft
from tuco_peft.apps.benchmark import compare_methods
from tuco_peft.core.baselines import disable_adapter_tuco, two_model_tuco


def test_baselines_agree_with_oracle_and_decompose():
    pretrained, model = model_pair("qwen2")
    ids, mask = padded_batch(side="right")
    with torch.no_grad():
        expected = tuco_at_last(*two_pass(model, decoder_blocks(pretrained), ids, mask)[:2], mask)
        for value in (
            two_model_tuco(model, pretrained, ids, mask),
            disable_adapter_tuco(model, ids, mask),
            tuco_peft.tuco(model, ids, mask),
        ):
            assert (value - expected).abs().max() < 1e-5


def test_compare_methods_reports_every_method_against_the_plain_forward():
    pretrained, model = model_pair("llama")
    ids, mask = padded_batch()
    report = compare_methods(model, pretrained, ids, mask, repeats=1)
    assert set(report["methods"]) == {
        "plain_forward", "decoder_forward", "decompose_last", "decompose_all", "disable_adapter_two_pass",
        "two_model_two_pass",
    }
    assert report["max_tuco_disagreement"] < 1e-5
    assert report["methods"]["plain_forward"]["time_ratio"] == 1.0
    two_models = report["methods"]["two_model_two_pass"]
    pretrained_bytes = sum(p.numel() * p.element_size() for p in pretrained.parameters())
    assert two_models["peak_total_bytes"] >= report["model_weight_bytes"] + pretrained_bytes  # both resident
