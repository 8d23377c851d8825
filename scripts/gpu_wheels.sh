#!/usr/bin/env bash
# Run on a machine with network access: put the wheels that a GPU machine without network lacks into gpu_wheels/
# (ignored by git), for `scripts/gpu_check.sh` to install with `pip install --no-index --find-links gpu_wheels`.
#
#   bash scripts/gpu_wheels.sh            # -> gpu_wheels/*.whl, gpu_wheels/requirements.txt, gpu_wheels/MANIFEST
#
# The GPU image brings CUDA torch, transformers, sentencepiece, safetensors, prometheus-client, xxhash, numpy and
# pytest; it lacks megatron-core, DeepSpeed and WebDataset and their less common dependencies. Every wheel here
# is installed by gpu_check.sh into a private --target folder that is put on PYTHONPATH in front of the image's
# packages, so the versions below are the ones that run; torch and numpy are never part of it (the image's CUDA
# torch must stay). Compiled wheels are fetched for each Python in GPU_WHEELS_PYTHONS (default: 3.12, the GPU
# image's, and this machine's, which `gpu_check.sh --cpu-dry-run` installs from the same folder).
#
# Cached: when gpu_wheels/MANIFEST names this exact set and every file in it matches its sha256, nothing is
# downloaded. The folder's total size is printed; more than GPU_WHEELS_MAX_MIB (40) fails.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${GPU_WHEELS_DIR:-gpu_wheels}
MAX_MIB=${GPU_WHEELS_MAX_MIB:-40}
HERE_PY=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHONS=${GPU_WHEELS_PYTHONS:-$(printf '%s\n' 3.12 "$HERE_PY" | sort -u | tr '\n' ' ')}

pin() {  # pin NAME DEFAULT: the version constraints-cpu.txt pins (the set proven on CPU), else DEFAULT
    local v
    v=$(sed -n "s/^$1==\([^ #]*\).*/\1/p" constraints-cpu.txt 2>/dev/null | head -1)
    echo "$1==${v:-$2}"
}
# The three libraries the GPU image lacks, at the versions of constraints-cpu.txt, and everything they import
# that the image may lack (versions: the CPU environment these were proven in). DeepSpeed has no wheel on PyPI:
# it is built here with no ops (DS_BUILD_OPS=0: pure Python, ops JIT-compiled if ever used; we use none).
DEEPSPEED=$(pin deepspeed 0.19.8)
REQUIREMENTS=(
    "$DEEPSPEED"
    "$(pin megatron-core 0.16.1)"
    "$(pin webdataset 1.0.2)"
    braceexpand==0.1.7          # webdataset
    hjson==3.1.0                # deepspeed (config parsing)
    pydantic==2.13.4            # deepspeed (config models) ...
    pydantic-core==2.46.4       # ... and its compiled core and dependencies
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.15.0   # pydantic 2.13 needs >= 4.14.1, newer than torch asks for
    py-cpuinfo==9.0.0           # deepspeed
    einops==0.8.2               # deepspeed, megatron-core
    msgpack==1.2.4              # deepspeed
    ninja==1.13.2               # deepspeed (declared; JIT op builds only)
    psutil==7.2.2               # deepspeed; megatron-core's dist_checkpointing (undeclared)
    PyYAML==6.0.3               # ours (configs), webdataset
    tqdm==4.70.1                # deepspeed, ours
    packaging==26.2             # deepspeed, megatron-core (>= 24.2)
)
SPEC=$(printf '%s\n' "pythons: $PYTHONS" "${REQUIREMENTS[@]}")

size_report() {
    local bytes
    bytes=$(find "$DEST" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
    local mib
    mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
    echo "gpu_wheels: $(find "$DEST" -name '*.whl' | wc -l) wheels, $mib MiB in $DEST (limit $MAX_MIB MiB)"
    if awk -v b="$bytes" -v m="$MAX_MIB" 'BEGIN {exit !(b > m * 1048576)}'; then
        echo "gpu_wheels: $DEST holds $mib MiB, over the $MAX_MIB MiB limit" >&2
        exit 1
    fi
}

if [[ -f $DEST/MANIFEST ]] && [[ "$(sed -n '/^== files$/q;p' "$DEST/MANIFEST")" == "$SPEC" ]] \
        && (cd "$DEST" && sed '1,/^== files$/d' MANIFEST | sha256sum --check --quiet --status); then
    echo "gpu_wheels: $DEST already holds this set (MANIFEST and sha256 match); nothing downloaded"
    size_report
    exit 0
fi

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp"
# Binary wheels only, for manylinux x86-64 CPython of each version (the GPU machine is x86-64, glibc >= 2.28).
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64 any; do
    PLATFORMS+=(--platform "$p")
done
OTHERS=("${REQUIREMENTS[@]:1}")
for py in $PYTHONS; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
        "${PLATFORMS[@]}" -d "$DEST.tmp" "${OTHERS[@]}"
done
# DeepSpeed: a pure wheel with no prebuilt ops. DS_ACCELERATOR=cuda records "cuda" as its build accelerator (it
# would record this machine's "cpu"); --no-build-isolation lets its setup.py import the torch installed here
# without pip resolving another one.
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda python3 -m pip wheel --quiet --no-cache-dir --no-deps --no-build-isolation \
    --no-binary deepspeed -w "$DEST.tmp" "$DEEPSPEED"
ds_wheel=$(ls "$DEST.tmp"/deepspeed-*.whl)
[[ $ds_wheel == *-py3-none-any.whl ]] || { echo "gpu_wheels: $ds_wheel is not a pure wheel (ops built?)" >&2; exit 1; }
if unzip -p "$ds_wheel" deepspeed/git_version_info_installed.py | grep -q "': True"; then
    echo "gpu_wheels: $ds_wheel has prebuilt ops; build it with DS_BUILD_OPS=0" >&2
    exit 1
fi
if ls "$DEST.tmp" | grep -Eiq '^(torch|numpy|nvidia)[-_]'; then
    echo "gpu_wheels: torch/numpy/nvidia wheels must not be in the set: $(ls "$DEST.tmp" | grep -Ei '^(torch|numpy|nvidia)[-_]')" >&2
    exit 1
fi
printf '%s\n' "${REQUIREMENTS[@]}" | sed 's/ *#.*//' > "$DEST.tmp/requirements.txt"
{
    echo "$SPEC"
    echo "== files"
    (cd "$DEST.tmp" && sha256sum -- *.whl requirements.txt)
} > "$DEST.tmp/MANIFEST.tmp"
mv "$DEST.tmp/MANIFEST.tmp" "$DEST.tmp/MANIFEST"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
ls -1 "$DEST"/*.whl | sed 's|.*/|  |'
size_report
