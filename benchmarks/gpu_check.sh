#!/usr/bin/env bash
# The one prepared run on the accelerator machine (one H200): install what is missing from the
# carried wheels, run the CUDA tests, then the GPU bench with what time is left; everything
# under 8 minutes, each step under `timeout`, the log and the figures in $OUT.
#
# Here, first:   benchmarks/gpu_wheels.sh        (writes .whl/, git-ignored)
# Then, as the device tool's command, carrying .whl:
#                bash benchmarks/gpu_check.sh
# What comes back ($OUT): gpu_check.log (everything), cuda_tests.xml (JUnit), gpu_bench.json
# (every figure, written after each section, so a stopped run still leaves them) and gpu_bench.md.
#
# Budget (seconds, from the start of this script): TOTAL (default 470) in all; the CUDA tests may
# take TESTS (default 200); the bench gets what is left but SLACK (default 45) for the bench's own
# last section to finish and for the files to be written.
#
# DRY_RUN=1 checks the script itself on a machine without a GPU: this machine's Python (PYTHON),
# no install, the CUDA tests skip and the bench runs on the CPU.
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-out}
TOTAL=${TOTAL:-470}
TESTS=${TESTS:-200}
SLACK=${SLACK:-45}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
step() { echo; echo "=== $* (at $(elapsed) s)"; }

step "machine"
timeout 20 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv || true
timeout 60 "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

DEVICE=cuda
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    step "dry run: no install, the bench on the CPU"
elif ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .whl/: run benchmarks/gpu_wheels.sh here first and carry .whl"
    exit 2
elif [ -f .whl/SOURCE_HASH ] && [ "$(benchmarks/gpu_source_hash.sh)" != "$(cat .whl/SOURCE_HASH)" ]; then
    echo "error: the tidy-detect wheel in .whl/ was built from other sources than this tree's; rerun benchmarks/gpu_wheels.sh"
    exit 2
else
    step "install the carried wheels"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: installing the wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/site
fi
timeout 60 "$PY" -c "import tidy_detect, transformers, tokenizers, huggingface_hub; print('tidy-detect', tidy_detect.__version__, 'from', tidy_detect.__file__); print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, 'huggingface_hub', huggingface_hub.__version__)" \
    || { echo "error: tidy-detect does not import with the carried wheels"; exit 3; }

step "CUDA tests (pytest -m cuda)"
timeout "$TESTS" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests/models/test_cuda.py \
    --junitxml "$OUT/cuda_tests.xml"
TESTS_RC=$?
echo "CUDA tests: exit $TESTS_RC (124: stopped at $TESTS s)"

step "GPU bench"
LEFT=$(( TOTAL - $(elapsed) ))
BUDGET=$(( LEFT - SLACK ))
if [ "$BUDGET" -lt 60 ]; then
    echo "error: only $LEFT s left for the bench; raise TOTAL or lower TESTS"
    BENCH_RC=4
else
    echo "bench time budget: $BUDGET s (hard limit $LEFT s)"
    SECTIONS=()
    [ "$DEVICE" = cpu ] && SECTIONS=(--sections peak,head --images 2)
    timeout --kill-after=10 "$LEFT" "$PY" -m tidy_detect.cli bench --device "$DEVICE" --preset paper \
        --time-budget "$BUDGET" --out "$OUT/gpu_bench.json" "${SECTIONS[@]}" > "$OUT/gpu_bench.md"
    BENCH_RC=$?
    cat "$OUT/gpu_bench.md"
    echo "GPU bench: exit $BENCH_RC (124: stopped at $LEFT s; gpu_bench.json then holds the sections done)"
fi

step "done: CUDA tests exit $TESTS_RC, GPU bench exit $BENCH_RC"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
