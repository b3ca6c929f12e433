"""QLoRA SFT of the demo base model with TRL, watching the TuCo of chat prompts and of web text as it trains.

    python examples/qlora_sft_tuco.py [--steps 60] [--every 10] [--out runs/qlora_sft_tuco]

The demo base model (a small LM pre-trained offline on encyclopedia-style text, see ``tuco_peft.demo``) is
loaded in 4-bit, prepared with ``prepare_model_for_kbit_training`` and given a fresh LoRA adapter, then
fine-tuned with TRL's ``SFTTrainer`` on the demo's chat data, the data of the demo's own adapter. A
``TuCoCallback`` measures the mean TuCo of held-out chat-formatted prompts and of pre-training-style passages
every ``--every`` steps. Each measurement is appended to ``OUT/tuco.jsonl`` as it comes; at the end the
curves are plotted to ``OUT/tuco.png`` (if matplotlib is installed) and the probes' share of the run time is
printed. Runs on a GPU or, more slowly, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTConfig, SFTTrainer

from tuco_peft.demo import demo_prompts, ensure_demo_checkpoints
from tuco_peft.demo.corpus import chat_exchange
from tuco_peft.integrations.callback import TuCoCallback


class ProbeWriter(TrainerCallback):
    """Append every TuCo measurement to a JSONL file the moment it is logged."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and any(key.startswith("tuco/") for key in logs):
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def load_qlora_base(base_dir: Path, device: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map=device)
    if device == "cpu":
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                # bitsandbytes would otherwise repack the 4-bit weights in place on the first no-grad forward
                # of an AVX512-BF16 CPU, after which training through them is wrong.
                module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def plot(records: list[dict], groups: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for group in groups:
        axis.plot([r["step"] for r in records], [r[f"tuco/{group}"] for r in records], marker="o", label=group)
    axis.set(xlabel="optimizer step", ylabel="mean TuCo", ylim=(0, 1), title="TuCo during QLoRA SFT (demo pair)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--every", type=int, default=10, help="steps between TuCo probes")
    parser.add_argument("--prompts-per-group", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/qlora_sft_tuco"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base_dir, _ = ensure_demo_checkpoints()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_qlora_base(base_dir, device)
    rng = random.Random(0)
    chats = Dataset.from_dict({"text": [chat_exchange(rng) for _ in range(2000)]})
    config = SFTConfig(
        output_dir=str(args.out), max_steps=args.steps, logging_steps=args.every, learning_rate=3e-3,
        per_device_train_batch_size=16, max_length=64, bf16=device == "cuda", use_cpu=device == "cpu",
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=chats, processing_class=tokenizer, peft_config=lora)

    prompts = demo_prompts(n_per_group=args.prompts_per_group)
    trainer.add_callback(ProbeWriter(args.out / "tuco.jsonl"))
    trainer.add_callback(TuCoCallback(trainer, prompts, every_n_steps=args.every, batch_size=16))
    trainer.train()

    records = [entry for entry in trainer.state.log_history if "tuco/probe_seconds" in entry]
    for record in records:
        print(f"step {record['step']:4d}  " + "  ".join(f"tuco/{g} {record[f'tuco/{g}']:.3f}" for g in prompts))
    probe_seconds = sum(record["tuco/probe_seconds"] for record in records)
    train_seconds = trainer.state.log_history[-1]["train_runtime"]
    print(
        f"{len(records)} probes of {sum(map(len, prompts.values()))} prompts took {probe_seconds:.2f} s in all, "
        f"{100 * probe_seconds / train_seconds:.1f}% of the {train_seconds:.1f} s run ({device})."
    )
    print(f"measurements: {args.out / 'tuco.jsonl'}")
    if plot(records, list(prompts), args.out / "tuco.png"):
        print(f"plot: {args.out / 'tuco.png'}")


if __name__ == "__main__":
    main()
