"""Peak memory above the loaded model of decompose(positions="all"), keeping every block's components or only
running sums, against the decoder-only forward, at several sequence lengths.

Issue 12 target: keep="sums" ≤ 1.3× the decoder-only forward at 2 × 2048 tokens, growing linearly with the
sequence (not with layers × sequence × width). Default model: SmolLM-135M's shapes (30 blocks, width 576, GQA
9/3 heads, vocab 49152), random weights, LoRA r=16 on every linear, fp32.

    python benchmarks/bench_memory.py                        # 2 × 1024 and 2 × 2048 tokens
    python benchmarks/bench_memory.py --layers 8 --seq 512 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_decompose import lora_finetune
from transformers import AutoModelForCausalLM, LlamaConfig

from tuco_peft.apps.benchmark import peak_extra_memory
from tuco_peft.core import decompose
from tuco_peft.model.parts import model_parts


def lora_model(args: argparse.Namespace) -> torch.nn.Module:
    """A Llama of the given shapes with random weights, and a random LoRA adapter on every linear."""
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, *args.seq),
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation=args.attention).eval()
    return lora_finetune(base, args)


@torch.no_grad()
def _peaks(model: torch.nn.Module, decoder: torch.nn.Module, ids: torch.Tensor) -> dict[str, int]:
    """Peak bytes above the loaded model of each method on ``ids`` (no padding), one after the other."""
    mask = torch.ones_like(ids)
    methods = {
        "decoder_forward": lambda: decoder(input_ids=ids, attention_mask=mask, use_cache=False),
        "keep_all": lambda: decompose(model, ids, mask, positions="all", keep="all"),
        "keep_sums": lambda: decompose(model, ids, mask, positions="all", keep="sums"),
    }
    return {name: peak_extra_memory(method, ids.device) for name, method in methods.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--out", default="bench-memory.json")
    args = parser.parse_args()

    model = lora_model(args)
    decoder = model_parts(model).decoder
    generator = torch.Generator().manual_seed(1)
    report = {"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    print(f"{args.layers} blocks, width {args.hidden}, {args.attention} attention, {torch.get_num_threads()} threads")
    ratio = "× decoder"
    print(f"{'tokens':>12}{'decoder MiB':>13}{'keep=all MiB':>14}{ratio:>11}{'keep=sums MiB':>15}{ratio:>11}")
    _peaks(model, decoder, torch.randint(0, args.vocab, (args.batch, 64), generator=generator))  # warm-up
    for seq in args.seq:
        peak = _peaks(model, decoder, torch.randint(0, args.vocab, (args.batch, seq), generator=generator))
        report["rows"].append({"batch": args.batch, "seq": seq, "peak_extra_bytes": peak})
        mib = {name: value / 2**20 for name, value in peak.items()}
        print(
            f"{f'{args.batch} × {seq}':>12}{mib['decoder_forward']:>13.0f}{mib['keep_all']:>14.0f}"
            f"{mib['keep_all'] / mib['decoder_forward']:>11.2f}{mib['keep_sums']:>15.0f}"
            f"{mib['keep_sums'] / mib['decoder_forward']:>11.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
