#!/usr/bin/env bash
# A digest of the package's files (code and package data), the same here and on the device:
# gpu_wheels.sh records it with the wheels, gpu_check.sh compares it with the tree it runs in.
set -euo pipefail
cd "$(dirname "$0")/.."
find src/tidy_detect -type f -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort \
    | xargs sha256sum | sha256sum | cut -d' ' -f1
