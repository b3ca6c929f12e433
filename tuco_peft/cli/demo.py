"""``tuco-peft demo``: the offline demo pair (a small LM and its LoRA chat fine-tune) and what TuCo shows."""

from __future__ import annotations

import argparse

from .checks import check_cache_dir

# As tuco_peft.demo.build has them (tested): importing it here would import torch for --help.
CACHE_ENV = "TUCO_PEFT_DEMO_DIR"
DEFAULT_CACHE = "~/.cache/tuco-peft/demo"


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the offline demo: a small LM and its LoRA chat fine-tune",
        description="Build a small Llama-style LM and a LoRA chat fine-tune of it, offline (once: about a minute "
        "on two CPU cores), then show what TuCo measures on them. The pair is cached in a folder named by a hash "
        f"of its recipe, under --cache-dir, else ${CACHE_ENV}, else {DEFAULT_CACHE}: <hash>/base holds the model "
        "and its tokenizer, <hash>/adapter the LoRA adapter, <hash>/run the fine-tune's checkpoints (checkpoint-N "
        "folders, as a Trainer saves them). The demo prints the paths, for --base and --adapter of the other "
        "commands.",
    )
    demo.add_argument(
        "--cache-dir",
        help=f"the folder the demo pair's hashed folder is built and cached in (default: ${CACHE_ENV}, else "
        f"{DEFAULT_CACHE})",
    )
    demo.set_defaults(run=lambda args: run_demo_command(args.cache_dir))


def run_demo_command(cache_dir: str | None) -> int:
    check_cache_dir(cache_dir)
    from ..apps.runner import quiet_libraries
    from ..demo.run import run_demo

    quiet_libraries()
    run_demo(cache_dir=cache_dir)
    return 0
