#!/usr/bin/env bash
# Build, here, the wheels that benchmarks/gpu_check.sh installs on the accelerator machine.
#
#   benchmarks/gpu_wheels.sh            # writes .whl/ (git-ignored; the device run carries it)
#
# The accelerator machine (see docs/gpu.md) runs its own Python 3.12 with PyTorch, numpy, Pillow,
# pyarrow, scipy, scikit-learn, typer, rich, safetensors, tokenizers and huggingface_hub, and can
# reach no package index. What it lacks travels as wheels:
#
#   - tidy-detect itself, built from this tree (pure Python);
#   - transformers at the version installed here: tidy-detect's speed-ups and their tests are
#     guarded to the versions they were tested on (models/optimize.py), and the image has another;
#   - regex at the version installed here (transformers checks its version when imported).
#
# spaCy does not travel: spaCy 3.8.18 with its compiled dependencies and its English model is
# 69.3 MiB of cp312 wheels (spacy 35.5 MB, blis 14.3 MB, en_core_web_sm 12.8 MB, thinc 4.3 MB,
# pydantic-core 2.3 MB, ...; measured with pip download), more than the 64 MiB one device call
# carries, the tree included. Nothing of the GPU path needs it: the
# phrase stage runs on the CPU whatever the device, the GPU bench uses fixed phrases, and the
# CUDA tests assemble their extractor with fixed phrases (the one that needs spaCy skips).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${WHEELS_DIR:-.whl}
LIMIT_MIB=${WHEELS_LIMIT_MIB:-48}  # leaves room under the 64 MiB of one call for the tree itself

rm -rf "$OUT"
mkdir -p "$OUT"

# The project, built from a copy of what the wheel holds, so the build leaves no build/ or
# egg-info in the tree; no build isolation, so no index is needed for setuptools (the venv has it).
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r pyproject.toml README.md src "$SRC"/
find "$SRC" -name __pycache__ -prune -exec rm -rf {} +
if ! "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT" "$SRC" > "$SRC/build.log" 2>&1; then
    cat "$SRC/build.log" >&2
    echo "error: building the tidy-detect wheel failed" >&2
    exit 1
fi

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
TRANSFORMERS=$(version transformers)
REGEX=$(version regex)

# Binary wheels for the device's interpreter (CPython 3.12, x86-64 manylinux), as the device
# README describes; --no-deps: each needed package is named.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --dest "$OUT" \
    "transformers==$TRANSFORMERS" "regex==$REGEX"

# One version of each package, or the device's install stops.
names=$(for wheel in "$OUT"/*.whl; do basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | tr '_' '-'; done)
duplicates=$(echo "$names" | sort | uniq -d)
if [ -n "$duplicates" ]; then
    echo "error: more than one wheel of: $duplicates (in $OUT)" >&2
    exit 1
fi

# What the project wheel was built from, so that gpu_check.sh can refuse a stale wheel.
benchmarks/gpu_source_hash.sh > "$OUT/SOURCE_HASH"

size=$(du -sb "$OUT" | cut -f1)
echo "wheels in $OUT ($((size / 1024 / 1024)) MiB):"
ls -l "$OUT"
if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "error: the wheels take $((size / 1024 / 1024)) MiB, over the $LIMIT_MIB MiB left for them in one device call" >&2
    exit 1
fi
