#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (CPU, gloo). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` while iterating.
#
# Three pytest workers (pytest-xdist) by default on the 2-core machine: most of a test is single-threaded Python
# (imports, process start-up, small-model steps), and the Slurm and multi-node tests spend much of their time
# waiting (timeouts, requeues, polls), which a third worker fills (about a minute less than two, measured).
# --dist loadscope keeps each module on one worker, so its module-scoped trained runs are built once; the modules go
# out in tests/conftest.py's order (waiting ones, then slow ones first), not xdist's default by test count.
# PYTEST_WORKERS=0 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian packages the Slurm, Prometheus and report tests use (root + apt only; no-ops when present): installed here, once,
# rather than by two test workers at the same time (apt holds one lock).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    bash scripts/slurm_cluster.sh install
    # iproute2 (ip netns) and util-linux (nsenter, unshare) for the network-namespace hosts of tests/multinode/.
    command -v ip >/dev/null && command -v nsenter >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 util-linux >/dev/null
    bash scripts/prometheus_server.sh install
    # Headless Chromium renders `pretrain report`'s page in tests/integration/test_goodput_restarts.py.
    if ! command -v chromium >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                 --no-install-recommends chromium >/dev/null; }
    fi
fi
workers=${PYTEST_WORKERS:-3}
parallel=()
if [ "$workers" != 0 ]; then parallel=(-n "$workers" --dist loadscope --no-loadscope-reorder); fi
exec python3 -m pytest -q -p no:benchmark --timeout=900 "${parallel[@]}" "$@"
