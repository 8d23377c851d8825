#!/usr/bin/env bash
# README command 1: set up, then run the end-to-end demo on the bundled Shakespeare corpus (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec pretrain demo "$@"
