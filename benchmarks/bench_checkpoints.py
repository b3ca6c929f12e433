"""A training run's checkpoints on one base (issue 20), as a user runs them: ``tuco-peft analyze --adapter RUN``
(one process, the base loaded once, every checkpoint's rows from mixed batches) against one ``analyze`` per
checkpoint, and against the issue's yardstick: one base load + N × one checkpoint's compute. Target: the one
run ≤ 1.15× the yardstick.

What is built, in a temporary folder, for each model (``--model demo 135m``: the shapes of ``bench_overhead``,
random weights, fp32, saved as safetensors with a byte-level BPE tokenizer trained offline on the demo's
corpus): a run folder of ``--checkpoints`` ``checkpoint-K`` folders, each a different random LoRA adapter
(r = 8 on every linear of the blocks, q/k/v/o/gate/up/down, ``init_lora_weights=False``) with a
``trainer_state.json``; and a prompt file of ``--prompts`` prompts of 16 to 128 tokens.

Every figure is a fresh CLI process (``python -m tuco_peft.cli analyze``, ``HF_HUB_OFFLINE=1``, ``--threads``
intra-op threads), timed from its start to its exit by the wall clock, so interpreter start, imports, loading,
prompt encoding, writing the rows and the summary all count, as they do for a user. Its peak resident memory
is its own ``ru_maxrss`` (``os.wait4`` of that child alone). Each round runs, one after another (``--quick``
runs two at a time, fit only for a smoke run):

- **one run**: ``analyze --adapter RUN`` over all checkpoints (the multi-adapter run; it must write a row per
  checkpoint and prompt, else the round is an error);
- **one-prompt run**: ``analyze --adapter RUN/checkpoint-K`` of the first checkpoint on the shortest prompt
  alone: a base load, one adapter load and everything else a process pays, with almost no prompt work;
- **separate runs**: ``analyze --adapter RUN/checkpoint-K`` on all prompts, one process per checkpoint.

Times are medians over ``--repeats`` rounds (each round's separate runs summed first). From them:

- *load* = the one-prompt run;
- *one checkpoint's compute* = the median separate run − the one-prompt run (every separate run does the same
  work on the same shapes); it leaves out the one short prompt's compute of the one-prompt run, so the
  yardstick is, if anything, low (strict);
- *yardstick* = load + N × compute; ratios: one run / yardstick (target ≤ 1.15), separate runs / one run.

Peak memory: the one run's peak RSS against what it should need, *expected* = the one-prompt run's peak (the
interpreter and libraries, the base's weights and one adapter) + (N − 1) × one adapter's
``adapter_model.safetensors`` bytes + one batch's activations, the latter measured, not modelled: the median
separate run's peak − the one-prompt run's peak (the same process but for the batches; 0 if below). The
JSON also gives the parts: the base's weight bytes (its safetensors, as loaded in fp32), the adapters'
bytes, and the runtime (the one-prompt peak less base and one adapter) that a sum of weights and
activations alone leaves out: hundreds of MiB, more than the demo model itself. So the ratio of the peak to
the sum itself (base weights + N adapters + one batch's activations) is taken above the runtime: (the one
run's peak − the runtime) / that sum, which the runtime does not dilute (on the demo model it is within the
RSS noise of a process, a MiB or so, of a sum of about 2 MiB).

    python benchmarks/bench_checkpoints.py                   # demo and 135M, 8 checkpoints × 64 prompts
    python benchmarks/bench_checkpoints.py --model demo --repeats 1
    python benchmarks/bench_checkpoints.py --quick           # a smoke run: seconds, numbers meaningless

Run it alone on the machine; ``--quick`` writes JSON only to an ``--out`` given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from bench_adapters import with_adapters
from bench_overhead import MODELS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "cpu-checkpoints.json"
TARGET = 1.15  # issue 20: the one run ≤ 1.15 × (one base load + N × one checkpoint's compute)
RANK = 8
STEPS_PER_CHECKPOINT = 50
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """What one model's measurements read: the base, the run folder and its checkpoints, the prompt files."""

    base: Path
    run: Path
    checkpoints: list[Path]
    prompts: Path
    one_prompt: Path
    prompt_tokens: list[int]
    parameters: int
    base_bytes: int
    adapter_bytes: list[int]


def demo_tokenizer():
    """A byte-level BPE tokenizer trained offline on the demo's corpus, whose ids fit every model's vocabulary."""
    from tuco_peft.demo import corpus
    from tuco_peft.demo.build import build_tokenizer

    rng = random.Random(0)
    tokenizer = build_tokenizer([corpus.web_text(rng, 4) for _ in range(300)], MODELS["demo"]["vocab_size"])
    assert all(len(tokenizer) <= shapes["vocab_size"] for shapes in MODELS.values()), "ids must fit every model"
    return tokenizer


def prompt_texts(tokenizer, count: int, seed: int, tokens: tuple[int, int] = (16, 128)) -> list[str]:
    """``count`` one-line prompts of ``tokens`` (least, most) tokens each, cut from the demo corpus' web text."""
    from tuco_peft.demo import corpus

    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        wanted = rng.randint(*tokens)
        ids: list[int] = []
        while len(ids) < wanted:
            ids += tokenizer(corpus.web_text(rng, 4) + " ", add_special_tokens=False)["input_ids"]
        texts.append(" ".join(tokenizer.decode(ids[:wanted]).split()))  # one line, no edge spaces
    return texts


def trainer_state(step: int, index: int) -> dict:
    """What a Hugging Face Trainer writes into a checkpoint folder, as far as tuco-peft reads it."""
    losses = [{"loss": round(3.0 / (1 + 0.02 * s + 0.01 * index), 4), "step": s} for s in range(10, step + 1, 10)]
    return {"global_step": step, "epoch": step / (STEPS_PER_CHECKPOINT * 4), "log_history": losses}


def build(model_name: str, n_checkpoints: int, n_prompts: int, root: Path) -> Workload:
    """The base (with its tokenizer), the run folder of ``n_checkpoints`` adapters and the prompt files."""
    tokenizer = demo_tokenizer()
    base_dir, run_dir, staging = root / "base", root / "run", root / "staging"
    model = with_adapters(MODELS[model_name], n_checkpoints, RANK)  # "default", then "a1", "a2", …
    assert isinstance(model, peft.PeftModel), "bench_adapters builds a PeftModel"
    checkpoints = []
    for index, name in enumerate(model.peft_config):
        model.peft_config[name].base_model_name_or_path = str(base_dir)
        # PEFT saves "a1" into staging/a1; no embedding is adapted, so none is saved (nor the base's config read).
        model.save_pretrained(str(staging), selected_adapters=[name], save_embedding_layers=False)
        step = STEPS_PER_CHECKPOINT * (index + 1)
        checkpoint = run_dir / f"checkpoint-{step}"
        shutil.move(staging if name == "default" else staging / name, checkpoint)
        (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state(step, index), indent=2))
        checkpoints.append(checkpoint)
    shutil.rmtree(staging, ignore_errors=True)
    base = model.unload()  # the base's own modules back, adapters dropped, nothing merged
    parameters = sum(parameter.numel() for parameter in base.parameters())
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    del model, base
    gc.collect()  # the parent's copy of the model is not kept through the measurements

    texts = prompt_texts(tokenizer, n_prompts, seed=1)
    tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n", encoding="utf-8")
    one_prompt = root / "one_prompt.txt"
    one_prompt.write_text(texts[tokens.index(min(tokens))] + "\n", encoding="utf-8")
    return Workload(
        base=base_dir,
        run=run_dir,
        checkpoints=checkpoints,
        prompts=prompts,
        one_prompt=one_prompt,
        prompt_tokens=tokens,
        parameters=parameters,
        base_bytes=sum(path.stat().st_size for path in base_dir.glob("*.safetensors")),
        adapter_bytes=[(path / "adapter_model.safetensors").stat().st_size for path in checkpoints],
    )


@dataclass(frozen=True)
class Process:
    """One CLI run: wall seconds from start to exit, its own peak RSS, and the rows it wrote."""

    seconds: float
    peak_mib: float
    rows: list[dict]

    def as_json(self) -> dict:
        return {"seconds": self.seconds, "peak_mib": self.peak_mib, "rows": len(self.rows)}


def analyze(base: Path, adapter: Path, prompts: Path, scratch: Path, batch_size: int, threads: int) -> Process:
    """``tuco-peft analyze`` in a fresh process, into a fresh --out (an existing one would resume)."""
    out = Path(tempfile.mkdtemp(prefix="analyze-", dir=scratch))
    command = [
        sys.executable,
        "-m",
        "tuco_peft.cli",
        "analyze",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--prompts",
        str(prompts),
        "--out",
        str(out / "rows.jsonl"),
        "--batch-size",
        str(batch_size),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    log = out / "log.txt"
    with open(log, "w") as handle:
        start = time.perf_counter()
        # cwd: `-m` puts the checkout first on sys.path, so this checkout's CLI is measured.
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the maximum over all children
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if child.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"analyze --adapter {adapter} exited {child.returncode}: {lines[-1]}")
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    shutil.rmtree(out)
    return Process(seconds, usage.ru_maxrss * 1024 / MIB, rows)  # ru_maxrss: KiB on Linux


def check_one_run(process: Process, work: Workload) -> None:
    """The multi-adapter run wrote one row per checkpoint and prompt, each naming its adapter and step."""
    expected = len(work.checkpoints) * len(work.prompt_tokens)
    adapters = {row.get("adapter") for row in process.rows}
    steps = {row.get("step") for row in process.rows}
    if len(process.rows) != expected or len(adapters) != len(work.checkpoints) or None in steps:
        raise RuntimeError(
            f"analyze --adapter {work.run} wrote {len(process.rows)} rows of {len(adapters - {None})} adapters "
            f"(steps {sorted(s for s in steps if s is not None)}); expected {expected} rows, one per checkpoint "
            f"({len(work.checkpoints)}) and prompt, each with its adapter and step"
        )


def checked(process: Process | RuntimeError, rows: int) -> Process:
    """A single-adapter run that ran and wrote a row per prompt."""
    if isinstance(process, RuntimeError):
        raise process
    if len(process.rows) != rows:
        raise RuntimeError(f"a single-adapter analyze wrote {len(process.rows)} rows, not {rows}")
    return process


def measure(work: Workload, args: argparse.Namespace, scratch: Path) -> dict:
    """``args.repeats`` rounds of the one run, the one-prompt run and the separate runs; medians and ratios."""
    n = len(work.checkpoints)

    def run(adapter: Path, prompts: Path) -> Process:
        return analyze(work.base, adapter, prompts, scratch, args.batch_size, args.threads)

    for _ in range(args.warmup):  # file caches and the interpreter's compiled modules, off the clock
        run(work.checkpoints[0], work.one_prompt)
    # Each round's processes, in order: the one run, the one-prompt run, the separate runs.
    runs = [(work.run, work.prompts), (work.checkpoints[0], work.one_prompt)]
    runs += [(checkpoint, work.prompts) for checkpoint in work.checkpoints]

    def attempt(adapter_and_prompts: tuple[Path, Path]) -> Process | RuntimeError:
        try:
            return run(*adapter_and_prompts)
        except RuntimeError as error:
            return error

    rounds: list[dict] = []
    errors: list[str] = []
    # --jobs 1 (the default) runs them one after another: any other number shares the machine between them.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for index in range(args.repeats):
            one_run, one_prompt, *separate = pool.map(attempt, runs)
            entry: dict = {}
            try:
                if isinstance(one_run, RuntimeError):
                    raise one_run
                check_one_run(one_run, work)
                entry["one_run"] = one_run.as_json()
            except RuntimeError as error:
                errors.append(f"round {index + 1}, one run: {error}")
            entry["one_prompt"] = checked(one_prompt, 1).as_json()
            entry["separate"] = [checked(process, len(work.prompt_tokens)).as_json() for process in separate]
            rounds.append(entry)
            shown = f"one run {entry['one_run']['seconds']:.1f} s" if "one_run" in entry else "one run failed"
            total = sum(process["seconds"] for process in entry["separate"])
            print(f"  round {index + 1}: {shown}, separate runs {total:.1f} s", flush=True)

    median = statistics.median
    load = median(entry["one_prompt"]["seconds"] for entry in rounds)
    single = median(process["seconds"] for entry in rounds for process in entry["separate"])
    compute = max(single - load, 0.0)
    yardstick = load + n * compute
    separate = median(sum(process["seconds"] for process in entry["separate"]) for entry in rounds)
    one_prompt_peak = median(entry["one_prompt"]["peak_mib"] for entry in rounds)
    single_peak = median(process["peak_mib"] for entry in rounds for process in entry["separate"])
    adapter_mib = statistics.mean(work.adapter_bytes) / MIB
    activations = max(single_peak - one_prompt_peak, 0.0)
    expected = one_prompt_peak + (n - 1) * adapter_mib + activations
    memory = {
        "one_prompt_peak": one_prompt_peak,
        "separate_run_peak": single_peak,
        "base_weights": work.base_bytes / MIB,
        "adapter_each": adapter_mib,
        "adapters_all": sum(work.adapter_bytes) / MIB,
        "activations": activations,
        "runtime": one_prompt_peak - (work.base_bytes + work.adapter_bytes[0]) / MIB,
        "expected": expected,
    }
    memory["weights_and_activations"] = memory["base_weights"] + memory["adapters_all"] + activations
    seconds = {
        "load": load,
        "separate_run": single,
        "compute_per_checkpoint": compute,
        "yardstick": yardstick,
        "separate_runs": separate,
    }
    ratios: dict = dict.fromkeys(
        (
            "one_run_to_yardstick",
            "separate_to_one_run",
            "peak_rss_to_expected",
            "above_runtime_to_weights_and_activations",
        )
    )
    done = [entry["one_run"] for entry in rounds if "one_run" in entry]
    if done:
        seconds["one_run"] = median(process["seconds"] for process in done)
        memory["one_run_peak"] = median(process["peak_mib"] for process in done)
        ratios = {
            "one_run_to_yardstick": seconds["one_run"] / yardstick,
            "separate_to_one_run": separate / seconds["one_run"],
            "peak_rss_to_expected": memory["one_run_peak"] / expected,
            "above_runtime_to_weights_and_activations": (memory["one_run_peak"] - memory["runtime"])
            / memory["weights_and_activations"],
        }
    return {
        "seconds": seconds,
        "memory_mib": memory,
        "ratios": ratios,
        "target": {
            "one_run_to_yardstick_max": TARGET,
            "met": None if not done else ratios["one_run_to_yardstick"] <= TARGET,
        },
        "compute_below_noise": single <= load,
        "rounds": rounds,
        "errors": errors,
    }


def table(results: list[dict]) -> str:
    """The results as a Markdown table."""
    header = (
        "| model | N × prompts | one run s | separate runs s | load s | compute/ckpt s | yardstick s | "
        "one run / yardstick | separate / one run | one-run peak MiB | expected MiB | peak / expected | "
        "above runtime / weights + activations |"
    )
    lines = [header, "|---|---|" + "---:|" * 11]

    def shown(value: float | None, digits: int = 2, suffix: str = "") -> str:
        return "—" if value is None else f"{value:.{digits}f}{suffix}"

    for result in results:
        seconds, memory, ratios = result["seconds"], result["memory_mib"], result["ratios"]
        lines.append(
            f"| {result['model']} | {result['checkpoints']} × {result['prompts']} | {shown(seconds.get('one_run'))} | "
            f"{shown(seconds['separate_runs'])} | {shown(seconds['load'])} | "
            f"{shown(seconds['compute_per_checkpoint'])} | "
            f"{shown(seconds['yardstick'])} | {shown(ratios['one_run_to_yardstick'], suffix='×')} | "
            f"{shown(ratios['separate_to_one_run'], suffix='×')} | {shown(memory.get('one_run_peak'), 0)} | "
            f"{shown(memory['expected'], 0)} | {shown(ratios['peak_rss_to_expected'], suffix='×')} | "
            f"{shown(ratios['above_runtime_to_weights_and_activations'], suffix='×')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=list(MODELS), help="default: demo 135m (--quick: demo)")
    parser.add_argument("--checkpoints", type=int, help="checkpoints in the run folder (default 8; --quick: 2)")
    parser.add_argument("--prompts", type=int, help="prompts of 16 to 128 tokens (default 64; --quick: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="analyze --batch-size (default 8)")
    parser.add_argument("--repeats", type=int, help="rounds of every measurement (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, help="untimed one-prompt runs first (default 1; --quick: 0)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each CLI process (default 2)")
    parser.add_argument(
        "--jobs", type=int, help="CLI processes at once (default 1: timings need the machine alone; --quick: 2)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step on tiny sizes")
    parser.add_argument("--out", help=f"JSON results (default {DEFAULT_OUT.relative_to(REPO_ROOT)}; --quick: none)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.model = args.model or (["demo"] if quick else ["demo", "135m"])
    args.checkpoints = args.checkpoints or (2 if quick else 8)
    args.prompts = args.prompts or (4 if quick else 64)
    args.repeats = args.repeats or (1 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    args.jobs = args.jobs or (2 if quick else 1)
    out = Path(args.out) if args.out else (None if quick else DEFAULT_OUT)

    report: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_average_start": os.getloadavg()[0],
        **{key: value for key, value in vars(args).items() if key != "out"},
        "rank": RANK,
        "results": [],
        "errors": [],
    }
    if quick:
        report["note"] = "--quick: a smoke run of every step; its numbers measure nothing"
    for name in args.model:
        with tempfile.TemporaryDirectory(prefix=f"bench-checkpoints-{name}-") as folder:
            root = Path(folder)
            start = time.perf_counter()
            work = build(name, args.checkpoints, args.prompts, root)
            print(
                f"{name}: {work.parameters / 1e6:.1f}M parameters, {args.checkpoints} checkpoints, "
                f"{args.prompts} prompts of {min(work.prompt_tokens)}–{max(work.prompt_tokens)} tokens "
                f"(built in {time.perf_counter() - start:.1f} s)",
                flush=True,
            )
            measured = measure(work, args, root)
        result = {
            "model": name,
            "shapes": MODELS[name],
            "parameters": work.parameters,
            "checkpoints": args.checkpoints,
            "prompts": args.prompts,
            "prompt_tokens": {
                "min": min(work.prompt_tokens),
                "max": max(work.prompt_tokens),
                "total": sum(work.prompt_tokens),
            },
            **measured,
        }
        report["results"].append(result)
        report["errors"] += [f"{name}: {error}" for error in measured["errors"]]
        if measured["compute_below_noise"]:
            print(f"  {name}: the prompts' compute is below the noise of a process start: use more --prompts")
    report["load_average_end"] = os.getloadavg()[0]
    print()
    print(table(report["results"]))
    print(
        "load: a one-prompt run; compute/ckpt: a separate run − load; yardstick: load + N × compute/ckpt "
        f"(target: one run ≤ {TARGET}× it); expected MiB: one-prompt peak + (N − 1) adapters + one batch's "
        "activations (a separate run's peak − the one-prompt peak)"
    )
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
