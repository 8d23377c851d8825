#!/usr/bin/env bash
# Install the project (editable) with the pinned CPU stack into the current Python. Idempotent; ~1-2 min on a
# fresh machine, seconds when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
# DeepSpeed: build no CUDA/C++ ops at install time (CPU machines have no CUDA; we need none of them).
export DS_BUILD_OPS=0
python3 -m pip install --quiet --root-user-action=ignore --disable-pip-version-check \
    -c constraints-cpu.txt -e ".[dev,tensorboard,wandb,report]"
