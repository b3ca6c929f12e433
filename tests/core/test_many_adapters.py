"""decompose_adapters: one decomposition per adapter a model holds, each exactly the model with that adapter set
(PEFT's set_adapter on a copy, and the two-model oracle), whether the adapters' prompts run in one mixed batch
(decompose's adapter_names) or one adapter after another; the model left as it was found."""

import copy

import pytest
import torch
from helpers.models import base_model, lora_model, padded_batch
from helpers.oracle import decoder_blocks, two_pass
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

import tuco_peft
from tuco_peft.errors import InputError, UnsupportedModelError

ADAPTERS = ["default", "wide", "attention-only"]


def _add(model, name, seed, **config):
    torch.manual_seed(seed)
    model.add_adapter(name, LoraConfig(init_lora_weights=False, **config))


def several_adapters(base):
    """A LoRA model holding three adapters of different ranks and targets; "default" active."""
    model = lora_model(base)
    _add(model, "wide", seed=7, r=8, lora_alpha=32, target_modules="all-linear")
    _add(model, "attention-only", seed=8, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return model.eval()


def _with_adapter_set(model, name):
    """An independent reference: a copy of the model with ``name`` set by PEFT's own API."""
    reference = copy.deepcopy(model)
    reference.set_adapter(name)
    return reference


def _state(model):
    return {
        "active": list(model.active_adapters),
        "layers": {n: m.__dict__.get("_active_adapter") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


@pytest.mark.parametrize("mixed_batches", [True, False], ids=["one mixed batch", "one adapter at a time"])
@pytest.mark.parametrize("keep", ["all", "sums"])
def test_each_adapter_is_the_model_with_that_adapter_set(keep, mixed_batches):
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    before = _state(model)
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(
            model, ids, mask, positions="all", keep=keep, mixed_batches=mixed_batches
        )
    assert list(results) == ADAPTERS
    assert _state(model) == before
    tucos = []
    for name, result in results.items():
        reference = _with_adapter_set(model, name)
        with torch.no_grad():
            alone = tuco_peft.decompose(reference, ids, mask, positions="all", keep=keep)
            ptc, ftc, _, _ = two_pass(reference, decoder_blocks(reference), ids, mask, pt_context=reference.disable_adapter)
        torch.testing.assert_close(result.tuco, alone.tuco, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.layer_norms(), alone.layer_norms(), rtol=0, atol=1e-6)
        real = mask[:, None, :, None]
        oracle_norms = ((ptc * real).abs().sum(-1), (ftc * real).abs().sum(-1))
        torch.testing.assert_close(result.layer_norms(), oracle_norms, rtol=1e-4, atol=1e-5)
        tucos.append(result.tuco)
    assert not torch.allclose(tucos[0], tucos[1], atol=1e-3) and not torch.allclose(tucos[0], tucos[2], atol=1e-3)


def test_chosen_adapters_in_their_order():
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, adapters=["attention-only", "default"])
        alone = tuco_peft.decompose(_with_adapter_set(model, "attention-only"), ids, mask)
    assert list(results) == ["attention-only", "default"]
    torch.testing.assert_close(results["attention-only"].ptc, alone.ptc, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mixed_batches", [True, False], ids=["one mixed batch", "one adapter at a time"])
def test_gradients_reach_each_adapter_and_only_it(mixed_batches):
    model = several_adapters(base_model("llama"))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    ids, mask = padded_batch()
    before = _state(model)
    results = tuco_peft.decompose_adapters(
        model, ids, mask, adapters=["wide", "default"], keep="sums", mixed_batches=mixed_batches
    )
    results["wide"].tuco.sum().backward()
    touched = {n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"wide"}
    assert _state(model) == before
    lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["wide"].weight
    reference = _with_adapter_set(model, "wide")
    reference_a = reference.base_model.model.model.layers[0].self_attn.q_proj.lora_A["wide"].weight
    reference_a.grad = None
    tuco_peft.tuco(reference, ids, mask).sum().backward()
    torch.testing.assert_close(lora_a.grad, reference_a.grad, rtol=1e-4, atol=1e-6)


def test_rows_of_any_adapters_in_any_order():
    """decompose(adapter_names=...): each row through its own adapter, "__base__" through none (no FTC)."""
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch(lengths=(9, 6, 12, 7))
    names = ["wide", "__base__", "default", "wide"]
    with torch.no_grad():
        mixed = tuco_peft.decompose(model, ids, mask, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":  # the pre-trained model itself: FTC is rounding (its rows are read apart)
                assert mixed.ftc[row].abs().max() < 1e-6 * mixed.ptc[row].abs().max() and mixed.tuco[row] < 1e-6
                continue
            alone = tuco_peft.decompose(_with_adapter_set(model, name), ids[row : row + 1], mask[row : row + 1])
            torch.testing.assert_close(mixed.ptc[row], alone.ptc[0], rtol=0, atol=1e-6)
            torch.testing.assert_close(mixed.ftc[row], alone.ftc[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(tuco_peft.tuco(model, ids, mask, adapter_names=names), mixed.tuco, rtol=0, atol=1e-6)


def test_dora_adapters_are_decomposed_one_at_a_time():
    """PEFT mixes no DoRA adapter in a batch: decompose_adapters takes them in turn, adapter_names refuses."""
    model = lora_model(base_model("llama"))
    _add(model, "dora", seed=9, r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask)
        for name in ("default", "dora"):
            alone = tuco_peft.tuco(_with_adapter_set(model, name), ids, mask)
            torch.testing.assert_close(results[name].tuco, alone, rtol=0, atol=1e-6)
    with pytest.raises(UnsupportedModelError, match="'dora' is DoRA on .*mixed_batches=False"):
        tuco_peft.decompose(model, ids, mask, adapter_names=["default", "dora", "dora"])


@pytest.mark.parametrize(
    "names, error, message",
    [
        (["default", "wide"], InputError, r"one adapter per row of input_ids \(3 names\)"),
        (["default", "wide", "gone"], InputError, "names 'gone', which the model does not hold"),
    ],
    ids=["too few", "unknown"],
)
def test_bad_adapter_names_are_refused(names, error, message):
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    with pytest.raises(error, match=message):
        tuco_peft.decompose(model, ids, mask, adapter_names=names)


@pytest.mark.parametrize(
    "adapters, message",
    [
        (["default", "missing"], "no adapter named 'missing'; it holds 'default', 'wide', 'attention-only'"),
        (["wide", "wide"], "names 'wide' more than once"),
        ([], "adapters is empty"),
        ("wide", "a list of adapter names"),
    ],
    ids=["unknown", "repeated", "empty", "a string"],
)
def test_bad_adapter_lists_are_refused(adapters, message):
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    with pytest.raises(InputError, match=message):
        tuco_peft.decompose_adapters(model, ids, mask, adapters=adapters)


def test_the_model_is_left_as_found_after_an_error_inside_a_decomposition():
    model = several_adapters(base_model("llama"))
    ids, mask = padded_batch()
    before = _state(model)
    with pytest.raises(InputError, match="positions must lie in"):
        tuco_peft.decompose_adapters(model, ids, mask, adapters=["wide"], positions=[99])
    assert _state(model) == before


def test_on_a_4bit_base_each_adapter_is_the_model_with_that_adapter_set():
    pytest.importorskip("bitsandbytes")
    from helpers.quantized_models import quantize_decoder_linears

    model = several_adapters(quantize_decoder_linears(base_model("llama", intermediate_size=128)))
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, keep="sums")
        for name in ADAPTERS:
            model.set_adapter(name)
            torch.testing.assert_close(results[name].tuco, tuco_peft.tuco(model, ids, mask), rtol=0, atol=1e-6)


def _with_token_and_norm_adapters(extra):
    """Two adapters that also train token 5's embedding (trainable tokens, outside the blocks) and, with
    ``extra``, their own copy of modules_to_save."""
    model = lora_model(base_model("llama"), trainable_token_indices=[5], **extra)
    _add(model, "other", seed=7, r=4, lora_alpha=8, target_modules="all-linear", trainable_token_indices=[5], **extra)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta.other" in name or "modules_to_save.other" in name:
                parameter.add_(0.5)
    return model


@pytest.mark.parametrize("mixed_batches", [None, False], ids=["mixed where PEFT can", "one adapter at a time"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"modules_to_save": ["input_layernorm"]}],
    ids=["trainable tokens", "trainable tokens and a norm in modules_to_save"],
)
def test_trainable_tokens_and_modules_to_save_follow_their_adapter(extra, mixed_batches):
    """PEFT switches these auxiliary wrappers with the adapter; each adapter's x0 and blocks are its own. A
    norm in modules_to_save cannot be mixed in one batch: the adapters are then taken in turn."""
    model = _with_token_and_norm_adapters(extra)
    ids, mask = padded_batch()
    ids[:, -1] = 5
    before = _state(model)
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask, mixed_batches=mixed_batches)
        for name in ("default", "other"):
            reference = _with_adapter_set(model, name)
            alone = tuco_peft.decompose(reference, ids, mask)
            torch.testing.assert_close(results[name].x0, alone.x0, rtol=0, atol=1e-6)
            torch.testing.assert_close(results[name].ftc, alone.ftc, rtol=0, atol=1e-6)
    assert not torch.allclose(results["default"].x0, results["other"].x0)
    assert _state(model) == before


def test_adapters_on_target_parameters_are_decomposed_one_at_a_time():
    """PEFT mixes no adapter on target_parameters in a batch (and older releases hold only one such adapter)."""
    model = lora_model(base_model("llama"), target_modules=[], target_parameters=["mlp.down_proj.weight"])
    _add(model, "other", seed=7, r=4, lora_alpha=8, target_modules="all-linear")
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask)
        for name in ("default", "other"):
            torch.testing.assert_close(
                results[name].tuco, tuco_peft.tuco(_with_adapter_set(model, name), ids, mask), rtol=0, atol=1e-6
            )
    with pytest.raises(UnsupportedModelError, match="target_parameters"):
        tuco_peft.decompose(model, ids, mask, adapter_names=["default", "other", "other"])


def test_a_training_run_on_disk_end_to_end(tmp_path):
    """The how-to's recipe: a run's checkpoint-N adapters found in step order, loaded into one model under
    their adapter names, each decomposed as PEFT's own loading of that checkpoint alone gives."""
    import json

    from peft import PeftModel

    from tuco_peft.io.adapter_series import find_adapters

    run = tmp_path / "run.v1"
    for step, seed in ((20, 3), (100, 4)):
        lora_model(base_model("llama"), seed=seed).save_pretrained(run / f"checkpoint-{step}")
        state = {"global_step": step, "log_history": [{"loss": 1.0 / step, "step": step}]}
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    checkpoints = find_adapters([run])
    assert [(c.step, c.train_loss) for c in checkpoints] == [(20, 1 / 20), (100, 1 / 100)]
    first, *rest = checkpoints
    model = PeftModel.from_pretrained(base_model("llama"), first.path, adapter_name=first.adapter_name).eval()
    for checkpoint in rest:
        model.load_adapter(checkpoint.path, adapter_name=checkpoint.adapter_name)
    ids, mask = padded_batch()
    with torch.no_grad():
        results = tuco_peft.decompose_adapters(model, ids, mask)
        for checkpoint in checkpoints:
            alone = PeftModel.from_pretrained(base_model("llama"), checkpoint.path).eval()
            torch.testing.assert_close(
                results[checkpoint.adapter_name].tuco, tuco_peft.tuco(alone, ids, mask), rtol=0, atol=1e-6
            )
