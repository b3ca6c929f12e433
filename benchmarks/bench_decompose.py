"""Time and peak memory of decompose against a plain forward and the paper's two-pass method.

Issue targets (CPU, fp32, Llama-style model of ~60M parameters, batch 4 × 256):
decompose(positions="last") ≤ 1.15× the time and ≤ 1.10× the peak memory of a plain forward of the same
PeftModel; positions="all" ≤ 1.9× the time.

    python benchmarks/bench_decompose.py                     # CPU defaults above
    python benchmarks/bench_decompose.py --full-finetune     # base model resident / streamed from disk
    python benchmarks/bench_decompose.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from tuco_peft.apps.benchmark import compare_full_finetune_methods, compare_methods


def build_base(args: argparse.Namespace):
    """A random model of ``args.family`` (Llama unless set; Qwen3 adds its q/k norms), heads of 64 dims."""
    config = AutoConfig.for_model(
        getattr(args, "family", "llama"),
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        head_dim=64,
        max_position_embeddings=max(2048, args.seq),
    )
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device=args.device, dtype=dtype).eval()


def lora_finetune(base, args: argparse.Namespace):
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def full_finetune(base):
    """A stand-in for a fully fine-tuned model: every weight moved a little."""
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(0.05 * param.std() * torch.randn_like(param))
    return finetuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-finetune", action="store_true", help="compare base_model= resident/streamed")
    parser.add_argument("--out", default="bench-decompose.json")
    args = parser.parse_args()

    base = build_base(args)
    pretrained = copy.deepcopy(base)
    n_params = sum(p.numel() for p in pretrained.parameters())
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(args.device)
    attention_mask = torch.ones_like(input_ids)
    if args.full_finetune:
        with tempfile.TemporaryDirectory() as checkpoint:
            pretrained.save_pretrained(checkpoint)
            report = compare_full_finetune_methods(
                full_finetune(base), pretrained, checkpoint, input_ids, attention_mask, repeats=args.repeats
            )
    else:
        report = compare_methods(lora_finetune(base, args), pretrained, input_ids, attention_mask, repeats=args.repeats)
    report.update(
        settings=vars(args),
        base_parameters=n_params,
        torch=torch.__version__,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
    )

    kind = "full fine-tune" if args.full_finetune else f"LoRA r={args.rank} fine-tune"
    print(f"{kind} of a Llama-style model, {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.device}, batch {args.batch}×{args.seq}")
    print(f"{'method':<26}{'median s':>10}{'× plain':>9}{'extra MiB':>11}{'total MiB':>11}{'× plain':>9}")
    for name, row in report["methods"].items():
        print(
            f"{name:<26}{row['median_s']:>10.3f}{row['time_ratio']:>9.2f}"
            f"{row['peak_extra_bytes'] / 2**20:>11.1f}{row['peak_total_bytes'] / 2**20:>11.1f}{row['peak_total_ratio']:>9.2f}"
        )
    print(f"max TuCo disagreement between methods: {report['max_tuco_disagreement']:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(report, out, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
