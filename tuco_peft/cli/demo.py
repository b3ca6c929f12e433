"""``tuco-peft demo``: the offline demo pair (a small LM and its LoRA chat fine-tune) and what TuCo shows."""

from __future__ import annotations

import argparse

from .checks import check_cache_dir


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser(
        "demo", parents=[common], help="the offline demo: a small LM and its LoRA chat fine-tune"
    )
    demo.add_argument("--cache-dir", help="where the demo pair is built and cached (default ~/.cache/tuco-peft/demo)")
    demo.set_defaults(run=lambda args: run_demo_command(args.cache_dir))


def run_demo_command(cache_dir: str | None) -> int:
    check_cache_dir(cache_dir)
    from ..demo.run import run_demo
    from ..runner import quiet_libraries

    quiet_libraries()
    run_demo(cache_dir=cache_dir)
    return 0
