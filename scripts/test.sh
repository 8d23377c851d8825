#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (CPU, gloo). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` while iterating.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m pytest -q --timeout=900 "$@"
