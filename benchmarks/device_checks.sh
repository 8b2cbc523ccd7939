#!/usr/bin/env bash
# One prepared run for a lent GPU machine (benchmarks/README.md, "On a GPU"): the accelerator tests
# (tests/test_device.py: float32 equals the CPU, bfloat16 cached = uncached, batch = one by one, bf16 training),
# then the three benchmarks at their CUDA defaults (Qwen2-VL-2B shapes, random weights, bfloat16). Each step runs
# under its own time limit, so an overrun still leaves the other steps' results; logs and JSON go to OUTDIR.
#
#   bash benchmarks/device_checks.sh [OUTDIR]        # OUTDIR: default $OUT (the device tool's folder), else device-results
#
# Environment: DEVICE (default cuda), PYTHON (default python3), BENCH_ARGS (extra flags for every benchmark),
# GENERATE_ARGS / MEMORY_ARGS / TRAIN_ARGS (extra flags for one of them; see benchmarks/README.md for a CPU smoke
# test of this script), LIMIT_TESTS,
# LIMIT_GENERATE, LIMIT_GENERATE_STATIC, LIMIT_MEMORY, LIMIT_TRAIN (seconds per step; defaults 100, 150, 50, 90, 140:
# with the 60 s environment step at most 10 minutes, one device call). Needs torch, transformers, torchvision, pytest and
# scikit-learn (the device image has them) but not the package's other dependencies: vedas_hf is put on the path
# from this checkout, nothing is installed or downloaded. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-device-results}}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:-}
GENERATE_ARGS=${GENERATE_ARGS:-}
MEMORY_ARGS=${MEMORY_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPO=$(pwd)
export PYTHONUNBUFFERED=1

# The installed layout (vedas_hf/ with modeling/ as vedas_hf.modeling, as setup.cfg maps it) as a copy on the path;
# the commands run from that folder, so the checkout's own vedas_hf/ (which lacks modeling/) is never imported.
SITE=$(mktemp -d)
cp -r vedas_hf "$SITE/vedas_hf" && rm -rf "$SITE/vedas_hf/modeling" && cp -r modeling "$SITE/vedas_hf/modeling"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
cd "$SITE" || exit 1

failed=0
step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=KILL "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUTDIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step environment 60 "$PY" -c "
import platform, torch, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__)
print('device', '$DEVICE', torch.cuda.get_device_name() if '$DEVICE'.startswith('cuda') else platform.processor())
import vedas_hf.modeling, vedas_hf.testing; print('vedas_hf from', vedas_hf.__file__)"
step tests "${LIMIT_TESTS:-100}" env VEDAS_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
    --rootdir "$REPO" "$REPO/tests/test_device.py"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step generate "${LIMIT_GENERATE:-150}" "$PY" "$REPO/benchmarks/bench_generate.py" --device "$DEVICE" $BENCH_ARGS $GENERATE_ARGS \
    --json "$OUTDIR/generate.json"
# shellcheck disable=SC2086  # static-cache decoding after the latent steps (transformers compiles it on a GPU)
step generate_static "${LIMIT_GENERATE_STATIC:-50}" "$PY" "$REPO/benchmarks/bench_generate.py" --device "$DEVICE" \
    --static --no-naive --no-per-step --batch-sizes 1 --reps 3 $BENCH_ARGS $GENERATE_ARGS --json "$OUTDIR/generate_static.json"
# shellcheck disable=SC2086
step memory "${LIMIT_MEMORY:-90}" "$PY" "$REPO/benchmarks/bench_memory.py" --device "$DEVICE" $BENCH_ARGS $MEMORY_ARGS \
    --json "$OUTDIR/memory.json"
# shellcheck disable=SC2086
step train "${LIMIT_TRAIN:-140}" "$PY" "$REPO/benchmarks/bench_train.py" --device "$DEVICE" --recon-crop-size 224 $BENCH_ARGS \
    $TRAIN_ARGS --json "$OUTDIR/train.json"
cd "$REPO" && rm -rf "$SITE"
echo "failed steps: $failed"
exit "$failed"
