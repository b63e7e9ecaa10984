#!/usr/bin/env bash
# The prepared GPU check: what a CPU cannot prove, in under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [RESULT.json]     (default: benchmarks/results/gpu-check.json)
#
# Run it from the repository root with the project installed (scripts/setup.sh, or `pip install -e .[dev]`
# next to a CUDA build of torch). Steps, each under its own time limit so one hang cannot eat the rest:
#   gpu-tests   the tests that skip without a GPU (CUDA placement, bf16 on CUDA, DeepSpeed with nccl)
#   agreement   the engine, exits off, against transformers' generate, float32 and bfloat16 (gpu_check.py)
#   speed       benchmarks/speed.py at the OPT-1.3B shape on CUDA, bf16: wall / layer speed-up of fixed exits
#   plan        `earlyexit bench paper --dry-run --probe` on this GPU: measured GPU-hours and peak memory per cell
#   zero        with two GPUs or more: a 2-process nccl `run --zero 2` on a random-weight model
# Every step's exit status, seconds, JSON and log tail go into one results file. A failing step does not
# stop the others; the script's own exit status is 1 when any step failed.
set -u
out=${1:-benchmarks/results/gpu-check.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1

if ! python -c "import torch" 2>/dev/null; then
    echo "gpu_check: \`python\` cannot import torch; activate the project's environment (. .venv/bin/activate)" >&2
    exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is visible here; run it on a GPU machine" >&2
    exit 2
fi
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, keep its log, status and time
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local began=$(date +%s.%N)
    timeout "$limit" "$@" >"$work/$name.log" 2>&1
    echo $? >"$work/$name.rc"
    python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$began" "$(date +%s.%N)" >"$work/$name.seconds"
    tail -n 5 "$work/$name.log"
}

step gpu-tests 150 python -m pytest -q -rs -p no:cacheprovider tests/test_device_dtype.py -k cuda
step agreement 90 python benchmarks/gpu_check.py agreement --device cuda --json "$work/agreement.json"
step speed 150 python benchmarks/speed.py --device cuda --dtype bfloat16 --shape opt-1.3b --batch-sizes 1,8 \
    --repeats 5 --json "$work/speed.json"
step plan 90 earlyexit bench paper --dry-run --probe --device cuda --output "$work/bench" --plan-json "$work/plan.json"
if [ "$gpus" -ge 2 ]; then
    step zero 120 torchrun --nproc_per_node 2 "$(command -v earlyexit)" run --backend blip2-opt --model tiny-random \
        --strategy free --zero 2 --device cuda --train-limit 64 --dev-limit 8 --test-limit 16 --batch-size 4 \
        --max-new-tokens 8 --no-speculative --output "$work/zero-run" --json "$work/zero.json"
else
    echo "== zero: skipped (one GPU visible; the 2-process nccl run needs two)"
fi

python benchmarks/gpu_check.py collect "$work" --json "$out"
failed=$(cat "$work"/*.rc | grep -cv '^0$')
echo "gpu_check: $failed step(s) failed; results in $out"
[ "$failed" -eq 0 ]
