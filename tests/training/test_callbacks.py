"""TuCoCallback in real Trainer / SFTTrainer runs on tiny models: what it logs, and that it changes nothing else."""

import copy

import pytest
import torch
from helpers.models import VOCAB, base_model, lora_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

import tuco_peft
from tuco_peft.integrations.callback import TuCoCallback

PROMPTS = {
    "chat": ["w1 w2 w3", "w5 w6", "w7 w8 w9 w10 w11"],
    "web": ["w20 w21 w22 w23", "w30"],
}
N_LAYERS = 3


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: "w<i>" is token i + 3."""
    words = ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(tokenizer_models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def token_dataset(n=16, length=10, seed=0):
    rows = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in rows]


def training_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=4, logging_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train(model, args, *, every_n_steps=None, callbacks=(), trainer_class=Trainer, **trainer_kwargs):
    """Train for args.max_steps; with a TuCoCallback on PROMPTS when every_n_steps is given."""
    trainer_kwargs.setdefault("train_dataset", token_dataset())
    trainer_kwargs.setdefault("processing_class", tiny_tokenizer())
    trainer = trainer_class(model=model, args=args, callbacks=list(callbacks), **trainer_kwargs)
    if every_n_steps is not None:
        trainer.add_callback(TuCoCallback(trainer, PROMPTS, every_n_steps=every_n_steps, batch_size=2))
    trainer.train()
    return trainer


def untrained_trainer(tmp_path, model=None, **trainer_kwargs):
    """A Trainer that is never trained, to call the callback on directly."""
    model = model if model is not None else lora_model(base_model("llama"))
    trainer_kwargs.setdefault("processing_class", tiny_tokenizer())
    return Trainer(model=model, args=training_args(tmp_path), **trainer_kwargs)


def probe_entries(history):
    return [entry for entry in history if any(key.startswith("tuco/") for key in entry)]


def training_entries(history):
    """The trainer's own logs, without the run-time figures that differ from run to run."""
    timing = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [
        {key: value for key, value in entry.items() if key not in timing}
        for entry in history
        if not any(key.startswith("tuco/") for key in entry)
    ]


def trainable_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def expected_metrics(model, tokenizer):
    """What the callback should log, computed plainly: each prompt alone, the shares from the components."""
    model.eval()  # the probe's mode: no LoRA dropout
    metrics = {}
    for group, prompts in PROMPTS.items():
        tucos, shares = [], []
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                components = tuco_peft.decompose(model, ids)
            ptc_norm, ftc_norm = components.ptc[0].abs().sum(-1), components.ftc[0].abs().sum(-1)
            tucos.append(float(components.tuco[0]))
            shares.append(ftc_norm / (ptc_norm + ftc_norm))
        metrics[f"tuco/{group}"] = sum(tucos) / len(tucos)
        for layer, share in enumerate(torch.stack(shares).mean(0).tolist()):
            metrics[f"tuco/{group}/layer_{layer}"] = share
    return metrics


def assert_metrics_close(logged, expected):
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=2e-6), key


class LogRecorder(TrainerCallback):
    """Stands in for a report_to integration (wandb, tensorboard): records what on_log hands it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_reach_log_history_and_integrations_and_equal_a_plain_computation(tmp_path):
    model = lora_model(base_model("llama"))
    before = copy.deepcopy(model)
    recorder = LogRecorder()
    trainer = train(model, training_args(tmp_path, max_steps=5), every_n_steps=2, callbacks=[recorder])

    probes = probe_entries(trainer.state.log_history)
    assert [entry["step"] for entry in probes] == [0, 2, 4, 5]  # at the start, every 2 steps, and at the end
    group_keys = {f"tuco/{group}" for group in PROMPTS}
    layer_keys = {f"tuco/{group}/layer_{layer}" for group in PROMPTS for layer in range(N_LAYERS)}
    for entry in probes:
        assert set(entry) == group_keys | layer_keys | {"tuco/probe_seconds", "epoch", "step"}
        assert entry["tuco/probe_seconds"] > 0
    assert [logs for logs in recorder.logs if "tuco/chat" in logs] == [
        {key: value for key, value in entry.items() if key != "step"} for entry in probes
    ]
    tokenizer = tiny_tokenizer()
    assert_metrics_close(probes[0], expected_metrics(before, tokenizer))
    assert_metrics_close(probes[-1], expected_metrics(model, tokenizer))
    assert probes[0]["tuco/chat"] != probes[-1]["tuco/chat"]  # training moved it (lr 1e-2)


def draw_random(module, args, kwargs):
    """A forward pre-hook that draws from the global RNG, as any stochastic module reached by a probe could."""
    torch.rand(())


@pytest.mark.parametrize(
    "setting",
    [
        dict(gradient_accumulation_steps=2, logging_steps=2),
        dict(gradient_checkpointing=True, bf16=True, logging_steps=3),
    ],
    ids=["accumulation+dropout", "checkpointing+bf16"],
)
@pytest.mark.device
def test_training_is_identical_with_and_without_the_callback(tmp_path, setting, device):
    """On the device under test (the Trainer's own choice on a GPU, cuda:0)."""
    runs = []
    for every_n_steps in (None, 2):
        model = lora_model(base_model("llama"), lora_dropout=0.2)
        model.get_base_model().model.register_forward_pre_hook(draw_random, with_kwargs=True)
        args = training_args(tmp_path, use_cpu=device.type == "cpu", **setting)
        trainer = train(model, args, every_n_steps=every_n_steps)
        runs.append((trainer.state.log_history, trainable_state(model)))
    (plain_history, plain_weights), (probed_history, probed_weights) = runs

    assert [entry["step"] for entry in probe_entries(probed_history)] == [0, 2, 4]
    assert training_entries(probed_history) == training_entries(plain_history)
    logging_steps = setting["logging_steps"]  # probes on the trainer's logging steps and between them
    loss_steps = [entry["step"] for entry in training_entries(probed_history) if "loss" in entry]
    assert loss_steps == list(range(logging_steps, 5, logging_steps))
    assert plain_weights.keys() == probed_weights.keys()
    assert all(torch.equal(plain_weights[name], probed_weights[name]) for name in plain_weights)


def _model_flags(model):
    return (
        [(name, m.training) for name, m in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [getattr(m, "gradient_checkpointing", None) for m in model.modules()],
    )


def test_a_probe_restores_modes_grad_flags_rng_and_the_trainers_should_log(tmp_path):
    model = lora_model(base_model("llama"), lora_dropout=0.1)
    trainer = untrained_trainer(tmp_path, model)
    trainer.model.gradient_checkpointing_enable()
    model.train()
    decoder = model.get_base_model().model
    decoder.layers[1].eval()  # mixed modes must come back exactly, not as one model.train()
    decoder.layers[0].mlp.up_proj.lora_A.default.weight.requires_grad_(False)
    decoder.register_forward_pre_hook(draw_random, with_kwargs=True)
    flags = _model_flags(model)
    rng = torch.get_rng_state()
    callback = TuCoCallback(trainer, PROMPTS["chat"], every_n_steps=3)

    trainer.state.global_step = 3
    trainer.control.should_log = True  # set by DefaultFlowCallback before this callback runs
    control = callback.on_step_end(trainer.args, trainer.state, trainer.control)

    assert control.should_log and trainer.control.should_log
    assert set(trainer.state.log_history[-1]) >= {"tuco/prompts", "tuco/prompts/layer_0", "step"}
    assert _model_flags(model) == flags
    assert torch.equal(torch.get_rng_state(), rng)

    trainer.state.global_step = 4  # not a probe step: nothing logged
    callback.on_step_end(trainer.args, trainer.state, trainer.control)
    assert len(trainer.state.log_history) == 1

    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = decoder.layers[2].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        callback.measure()
    handle.remove()
    assert _model_flags(model) == flags


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probe_values_do_not_depend_on_an_enclosing_autocast(tmp_path, dtype):
    trainer = untrained_trainer(tmp_path)
    callback = TuCoCallback(trainer, PROMPTS)
    plain = callback.measure()
    with torch.autocast("cpu", dtype=dtype):
        autocast = callback.measure()
    del plain["tuco/probe_seconds"], autocast["tuco/probe_seconds"]
    assert autocast == plain


def test_sft_trainer_keeps_its_own_metrics_and_losses(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    words = torch.randint(0, VOCAB - 3, (12, 9), generator=torch.Generator().manual_seed(0))
    texts = [" ".join(f"w{i}" for i in row) for row in words.tolist()]
    histories = []
    for every_n_steps in (None, 2):
        args = SFTConfig(
            output_dir=str(tmp_path), max_steps=4, logging_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_length=16,
        )
        trainer = train(
            lora_model(base_model("llama")), args, every_n_steps=every_n_steps, trainer_class=SFTTrainer,
            train_dataset=Dataset.from_dict({"text": texts}),
        )
        histories.append(trainer.state.log_history)
    plain, probed = histories
    assert {"mean_token_accuracy", "num_tokens", "loss"} <= set(training_entries(plain)[0])
    assert training_entries(probed) == training_entries(plain)
    assert [entry["step"] for entry in probe_entries(probed)] == [0, 2, 4]


def _qlora_model(checkpoint_dir):
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, quantization_config=quantization, device_map="cpu")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # see the environment notes: no in-place CPU repacking
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return lora_model(model, lora_dropout=0.1)


def test_qlora_with_kbit_preparation_trains_identically_and_logs_exact_tuco(tmp_path):
    base_model("llama").save_pretrained(tmp_path / "base")
    runs = []
    for every_n_steps in (None, 2):
        model = _qlora_model(tmp_path / "base")
        trainer = train(model, training_args(tmp_path, gradient_checkpointing=True), every_n_steps=every_n_steps)
        runs.append((model, trainer.state.log_history))
    (_, plain), (model, probed) = runs
    assert training_entries(probed) == training_entries(plain)
    assert [entry["step"] for entry in probe_entries(probed)] == [0, 2, 4]
    assert_metrics_close(probe_entries(probed)[-1], expected_metrics(model, tiny_tokenizer()))


@pytest.mark.parametrize(
    "prompts, message",
    [
        ("w1 w2", "list of strings or a dict"),
        ([], "non-empty list"),
        ({}, "empty dict"),
        ({"chat": "w1 w2"}, "'chat' must be a non-empty list"),
        ({"": ["w1"]}, "non-empty strings"),
        ({"chat": ["w1", 3]}, "holds int"),
        ({"chat": ["w1", ""]}, r"prompts \[1\] of group 'chat' tokenize to no tokens"),
    ],
)
def test_bad_prompts_are_refused_with_the_way_out(tmp_path, prompts, message):
    trainer = untrained_trainer(tmp_path)
    with pytest.raises(tuco_peft.InputError, match=message):
        TuCoCallback(trainer, prompts)


def test_bad_settings_are_refused_with_the_way_out(tmp_path):
    trainer = untrained_trainer(tmp_path)
    for settings in (dict(every_n_steps=0), dict(batch_size=True), dict(every_n_steps=2.0)):
        with pytest.raises(tuco_peft.InputError, match="must be a positive integer"):
            TuCoCallback(trainer, PROMPTS, **settings)
    with pytest.raises(tuco_peft.InputError, match="must be a transformers.Trainer"):
        TuCoCallback(trainer.model, PROMPTS)
    untokenized = untrained_trainer(tmp_path, processing_class=None)
    with pytest.raises(tuco_peft.InputError, match="pass tokenizer="):
        TuCoCallback(untokenized, PROMPTS)
    assert 0 < TuCoCallback(untokenized, PROMPTS, tokenizer=tiny_tokenizer()).measure()["tuco/chat"] < 1
    full_fine_tune = untrained_trainer(tmp_path, base_model("llama"))
    with pytest.raises(tuco_peft.UnsupportedModelError, match="no LoRA adapters"):
        TuCoCallback(full_fine_tune, PROMPTS)
