#!/usr/bin/env bash
# GPU acceptance in one call (docs/gpu_check.md). On a machine with one NVIDIA GPU and no network, in <= 8 min:
#
#   bash scripts/gpu_check.sh OUTDIR                # gpu_wheels/ next to it (scripts/gpu_wheels.sh, run elsewhere)
#   bash scripts/gpu_check.sh --cpu-dry-run OUTDIR  # the same steps on CPU at tiny sizes (CI: test_gpu_check.py)
#
# Steps, each time-boxed (`timeout`, within one overall budget), in order:
#   install    gpu_wheels/*.whl -> a private --target folder (pip --no-index --no-deps: torch is never resolved)
#   preflight  megatron-core/DeepSpeed/WebDataset come from that folder at the pinned versions, torch and the
#              image's packages from outside it, the project from this checkout; CUDA present (gpu mode)
#   pytest     pytest -m gpu tests/gpu (junit XML); in the dry run the same tests on CPU (PRETRAIN_GPU_CHECK_CPU=1)
#   bench_*    bench/train_step.py per model: GPT 125M and 1.3B, bf16, seq 2048 (dry run: nano and tiny, fp32);
#              tokens/s, TFLOP/s and MFU of ours and plain PyTorch, each finite, MFU in (0, 100%]
# A failed step does not stop the later ones (one GPU call should tell everything), except install and preflight.
# Results in OUTDIR: gpu_check.log (everything), gpu_check.json (per step ok + seconds, env, tests, bench
# figures), pytest_junit.xml. Exit 0 only if every step passed; else 1 and one line on stderr saying what failed.
#
# Environment: GPU_WHEELS_DIR (default <repo>/gpu_wheels), GPU_CHECK_BUDGET_S (default 470; dry run 1500),
# GPU_CHECK_STEPS (comma list of step names or prefixes to run, default all), GPU_CHECK_PYTHON (default python3),
# GPU_CHECK_BENCH_ARGS (extra bench arguments), GPU_CHECK_FAIL_STEP (a step name: replaced by a failing command, to
# test the failure path), GPU_CHECK_KEEP=1 (keep the work folder with the installed wheels).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
MODE=gpu
if [[ ${1:-} == --cpu-dry-run ]]; then MODE=cpu; shift; fi
if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: scripts/gpu_check.sh [--cpu-dry-run] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || { echo "gpu_check: FAIL: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-$REPO/gpu_wheels}
[[ -d $WHEELS ]] && WHEELS=$(cd "$WHEELS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PREFIX=$WORK/site
LOG=$OUT/gpu_check.log
STEPS=$WORK/steps.jsonl
REPORT=("$PY" "$REPO/scripts/gpu_check_report.py")
rm -f "$LOG" "$OUT/gpu_check.json" "$OUT/pytest_junit.xml"
[[ ${GPU_CHECK_KEEP:-0} == 1 ]] || trap 'rm -rf "$WORK"' EXIT

if [[ $MODE == gpu ]]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-470}
    MODELS=(125m 1.3b) BENCH=(--rounds=3 --steps=5)
    CAP_INSTALL=120 CAP_PREFLIGHT=90 CAP_PYTEST=300 CAP_BENCH=180
    unset PRETRAIN_GPU_CHECK_CPU DS_ACCELERATOR
else
    BUDGET=${GPU_CHECK_BUDGET_S:-1500}
    # fp32 on CPU; --peak-tflops gives the MFU path a nominal peak (10 TFLOP/s, above what two cores reach).
    MODELS=(nano tiny) BENCH=(--rounds=1 --steps=1 --peak-tflops=10)
    CAP_INSTALL=300 CAP_PREFLIGHT=180 CAP_PYTEST=900 CAP_BENCH=300
    export PRETRAIN_GPU_CHECK_CPU=1 DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
fi
# The project runs from this checkout (no build, no network); the wheels' folder comes next, in front of the
# interpreter's own site-packages, so its megatron-core/DeepSpeed/WebDataset are the ones imported.
export PYTHONPATH="$REPO:$PREFIX" PYTHONUNBUFFERED=1
export PY WHEELS PREFIX
DEADLINE=$(( $(date +%s) + BUDGET ))
cd "$REPO"

{
    echo "gpu_check $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), budget ${BUDGET} s"
    echo "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), wheels $WHEELS, work $WORK"
    echo "python $(command -v "$PY") $("$PY" --version 2>&1)"
    if [[ $MODE == gpu ]]; then timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not available"; fi
} >>"$LOG"

install_wheels() {
    if [[ ! -f $WHEELS/requirements.txt ]]; then
        echo "ERROR: no $WHEELS/requirements.txt: run scripts/gpu_wheels.sh on a networked machine and bring gpu_wheels/"
        return 1
    fi
    echo "--- this python's own packages (the wheels below are put in front of them)"
    "$PY" -m pip --isolated list --disable-pip-version-check 2>&1 || true
    echo "--- installing gpu_wheels/ into $PREFIX"
    # --isolated: no pip config or PIP_* variables of this machine; --no-deps: exactly the listed wheels.
    "$PY" -m pip --isolated install --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$PREFIX" -r "$WHEELS/requirements.txt"
}
export -f install_wheels

selected() {
    local want
    [[ -z ${GPU_CHECK_STEPS:-} ]] && return 0
    for want in ${GPU_CHECK_STEPS//,/ }; do [[ $1 == "$want"* ]] && return 0; done
    return 1
}

NOT_RUN=()
# run_step NAME CAP VERIFY -- CMD...: CMD under `timeout`, its output into the log; then VERIFY (a
# gpu_check_report.py subcommand with its arguments, or "-") judges the result. Returns 1 if the step failed.
run_step() {
    local name=$1 cap=$2 verify=$3
    shift 4
    if ! selected "$name"; then NOT_RUN+=("$name"); return 0; fi
    local figures=$WORK/$name.figures.json left limit rc t0
    left=$(( DEADLINE - $(date +%s) ))
    limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        printf '{"reason": "not started: the %s s budget is spent"}\n' "$BUDGET" >"$figures"
        "${REPORT[@]}" record --steps "$STEPS" --name "$name" --rc 125 --seconds 0 --limit "$limit" \
            --figures "$figures"
        return 1
    fi
    if [[ ${GPU_CHECK_FAIL_STEP:-} == "$name" ]]; then
        set -- bash -c "echo 'ERROR: injected failure (GPU_CHECK_FAIL_STEP=$name)'; exit 3"
    fi
    printf '\n===== %s step %s (limit %s s)\n$ %s\n' "$(date +%T)" "$name" "$limit" "$*" >>"$LOG"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" </dev/null 2>&1 | tee "$WORK/$name.out" >>"$LOG"
    rc=${PIPESTATUS[0]}
    if [[ $verify != - ]]; then
        # shellcheck disable=SC2086 # VERIFY is a subcommand and its arguments
        "${REPORT[@]}" $verify --figures "$figures" >>"$LOG" 2>&1
    fi
    if ! "${REPORT[@]}" record --steps "$STEPS" --name "$name" --rc "$rc" --limit "$limit" \
            --seconds "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')" --figures "$figures" \
            --output "$WORK/$name.out"; then
        tail -n 25 "$WORK/$name.out" | sed 's/^/    | /'
        return 1
    fi
}

# xunit1: the figures tests record (record_property) land in the XML, and from there in gpu_check.json.
PYTEST_ARGS=(-m gpu tests/gpu -q -ra -p no:cacheprovider --basetemp="$WORK/pytest" -o junit_family=xunit1
             --junitxml="$OUT/pytest_junit.xml")
echo "gpu_check: $MODE mode, results in $OUT"
ok=1
run_step install "$CAP_INSTALL" - -- bash -c install_wheels || ok=0
if (( ok )); then
    run_step preflight "$CAP_PREFLIGHT" - -- "${REPORT[@]}" env --mode "$MODE" --prefix "$PREFIX" --repo "$REPO" \
        --requirements "$WHEELS/requirements.txt" --figures "$WORK/preflight.figures.json" || ok=0
else
    NOT_RUN+=(preflight)
fi
if (( ok )); then  # from here on a failed step does not stop the next
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout="$CAP_PYTEST"); fi
    run_step pytest "$CAP_PYTEST" "pytest --junit $OUT/pytest_junit.xml" -- "$PY" -m pytest "${PYTEST_ARGS[@]}"
    for model in "${MODELS[@]}"; do
        # shellcheck disable=SC2086 # GPU_CHECK_BENCH_ARGS: extra arguments, split on spaces
        run_step "bench_$model" "$CAP_BENCH" "bench --json $WORK/bench_$model.json" -- "$PY" bench/train_step.py \
            --shapes="$model" "${BENCH[@]}" --dir="$WORK/bench" --json="$WORK/bench_$model.json" \
            ${GPU_CHECK_BENCH_ARGS:-}
    done
else
    NOT_RUN+=(pytest "${MODELS[@]/#/bench_}")
fi
"${REPORT[@]}" finish --steps "$STEPS" --out "$OUT/gpu_check.json" --mode "$MODE" --log "$LOG" \
    --skipped "$(IFS=,; echo "${NOT_RUN[*]}")" >"$WORK/finish.out" 2>"$WORK/finish.err"
rc=$?
cat "$WORK/finish.out" "$WORK/finish.err" >>"$LOG"
cat "$WORK/finish.out"
cat "$WORK/finish.err" >&2
exit "$rc"
