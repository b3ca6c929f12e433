#!/usr/bin/env bash
# The GPU check in one run, for a GPU machine without network where torch, transformers, peft and triton
# are installed and bitsandbytes may exist only as a wheel file: install tuco-peft offline, print the
# versions and the GPU, run the device tier on CUDA (pytest -m device --device cuda, at most 4 minutes),
# then the GPU benchmarks (benchmarks/bench_kernels.py, capped at 270 s; bench_adapters.py, 8 adapters on one
# base in mixed batches, capped at 120 s), writing logs and JSON into OUTDIR
# as they go. A part that fails is reported and the others still run; the exit status is 1 if any failed.
#
#   bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR]    # DIR: wheels to install first (bitsandbytes, …)
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR]" >&2; exit 2; }
(( $# >= 1 )) || usage
out=$1; shift
wheels=""
while (( $# > 0 )); do
    case $1 in
        --wheels) (( $# >= 2 )) || usage; wheels=$2; shift 2 ;;
        *) usage ;;
    esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n $wheels ]]; then  # absolute: the parts run from the repository root
    wheels=$(cd "$wheels" && pwd) || usage
    compgen -G "$wheels/*.whl" >/dev/null || { echo "gpu_check: no .whl file in $wheels" >&2; exit 2; }
fi
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
python=${PYTHON:-python3}
site=$(mktemp -d)/site  # installs go here, on PYTHONPATH: the image's own environment stays as it is
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset TRITON_INTERPRET  # the kernels are compiled for the GPU here
failed=()

# part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output also in OUTDIR/NAME.log.
part() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s"
    (( status == 0 )) || failed+=("$name (exit $status, see $out/$name.log)")
}

packages=("$repo")
if [[ -n $wheels ]]; then packages+=("$wheels"/*.whl); fi
read -r -d '' versions <<'PY'
import importlib.metadata as metadata
import torch

for name in ("tuco-peft", "torch", "transformers", "peft", "triton", "bitsandbytes", "accelerate", "numpy"):
    try:
        print(f"{name:13} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name:13} not installed")
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"CUDA {torch.version.cuda}, {len(gpus)} GPU(s): {', '.join(gpus) or 'none'}")
PY

cd "$repo" || exit 2
part install 180 "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation --target "$site" \
    "${packages[@]}"
part versions 60 "$python" -c "$versions"
# Informational only: torch's view of the GPU (versions part) is what the check relies on.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/nvidia-smi.log"
part device_tier 240 "$python" -m pytest -m device --device cuda -q -p no:cacheprovider \
    --junitxml "$out/device_tier.xml" --durations 15
part bench_kernels 330 "$python" benchmarks/bench_kernels.py --max-seconds 270 --out "$out/bench_kernels.json"
# Issue 20: 8 adapters' prompts in one mixed batch against one adapter at a time, batches of one prompt.
part bench_adapters 120 "$python" benchmarks/bench_adapters.py --models 135m --device cuda --dtype bfloat16 \
    --prompts 16 --batch-size 1 --repeats 3 --out "$out/bench_adapters.json"

if (( ${#failed[@]} )); then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: every part passed; logs and JSON in $out"
