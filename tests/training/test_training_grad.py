"""TuCo as a differentiable training term: its gradients equal the two-model reference's under autograd."""

import pytest
import torch
from helpers.models import VOCAB, base_model, lora_model, model_pair, padded_batch
from helpers.oracle import decoder_blocks, tuco_at_last, two_pass
from transformers import Trainer, TrainingArguments

import tuco_peft


def lora_parameters(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def gradients(value, parameters):
    return torch.autograd.grad(value.sum(), list(parameters.values()))


def checkpointing_flags(model):
    return [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def assert_gradients_equal(actual, expected, names):
    scale = max(float(g.abs().max()) for g in expected)
    for name, a, e in zip(names, actual, expected):
        assert float(a.abs().max()) > 0, f"no gradient reaches {name}"
        assert float((a - e).abs().max()) <= 1e-5 * scale, name


@pytest.mark.device
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_tuco_gradients_equal_the_two_model_reference_with_checkpointing_on(family, device):
    pretrained, model = (m.to(device) for m in model_pair(family))
    pretrained.requires_grad_(False)
    parameters = lora_parameters(model)
    ids, mask = (t.to(device) for t in padded_batch())
    model.train()
    model.gradient_checkpointing_enable()
    assert all(checkpointing_flags(model))

    value = tuco_peft.tuco(model, ids, mask)
    actual = gradients(value, parameters)
    assert all(checkpointing_flags(model))  # decompose paused it for its own forward only

    model.gradient_checkpointing_disable()  # the reference's hooks need the plain forward
    ptc, ftc, _, _ = two_pass(model, decoder_blocks(pretrained), ids, mask)
    reference = tuco_at_last(ptc, ftc, mask)
    expected = gradients(reference, parameters)

    torch.testing.assert_close(value, reference, atol=1e-5, rtol=0)
    assert_gradients_equal(actual, expected, list(parameters))
    assert all(p.requires_grad for p in parameters.values())
    assert not any(p.requires_grad for name, p in model.named_parameters() if name not in parameters)


def test_qlora_tuco_gradients_equal_the_reference(tmp_path):
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_model("llama").save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    for module in quantized.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    model = lora_model(prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=True)).train()
    parameters = lora_parameters(model)
    ids, mask = padded_batch()

    value = tuco_peft.tuco(model, ids, mask)
    actual = gradients(value, parameters)

    # The reference runs the same quantized blocks with PEFT's own switch for the pre-trained path.
    model.gradient_checkpointing_disable()
    ptc, ftc, _, _ = two_pass(model, decoder_blocks(model), ids, mask, pt_context=model.disable_adapter)
    reference = tuco_at_last(ptc, ftc, mask)
    expected = gradients(reference, parameters)

    torch.testing.assert_close(value, reference, atol=1e-5, rtol=0)
    assert_gradients_equal(actual, expected, list(parameters))


class TuCoPenaltyTrainer(Trainer):
    """The language-modelling loss plus ``weight`` times the batch's mean TuCo."""

    def __init__(self, *args, weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        lm_loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return lm_loss + self.weight * tuco_peft.tuco(model, inputs["input_ids"]).mean()


def test_a_tuco_penalty_trains_through_the_trainer_with_checkpointing(tmp_path):
    rows = torch.randint(1, VOCAB, (16, 10), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in rows]
    ids, mask = padded_batch()
    after = {}
    for weight in (0.0, 10.0):
        model = lora_model(base_model("llama"), init_lora_weights=True)  # B = 0: TuCo starts at 0
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
            gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        )
        trainer = TuCoPenaltyTrainer(model=model, args=args, train_dataset=data, weight=weight)
        trainer.train()
        assert all(checkpointing_flags(model))
        with torch.no_grad():
            after[weight] = tuco_peft.tuco(model.eval(), ids, mask).mean()
    assert after[0.0] > 0.2  # the language-modelling loss alone raises TuCo from 0...
    assert after[10.0] < 0.8 * after[0.0]  # ...and the penalty holds it down
