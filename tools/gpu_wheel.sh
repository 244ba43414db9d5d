#!/usr/bin/env bash
# onnxruntime-gpu for a GPU machine that reaches no package registry, carried there in parts.
#
#   tools/gpu_wheel.sh fetch          where PyPI answers: download the onnxruntime-gpu wheel
#                                     (cp312, manylinux_2_28) and the few packages a bare GPU
#                                     image lacks, and split them into .gpu1/ ... .gpu5/
#                                     (each <= 55 MiB, ignored by git through .git/info/exclude)
#   tools/gpu_wheel.sh stash          on the GPU machine, in each call that carries a part:
#                                     check it and keep it under $GPU_STASH (/tmp/lstm-gpu-parts);
#                                     parts are looked for in $GPU_PARTS (the repository)
#   tools/gpu_wheel.sh install [DIR]  on the GPU machine once every part is there: join, check
#                                     the sha256, pip install --no-deps --target DIR
#                                     (default /tmp/lstm-gpu-site); prints the PYTHONPATH to use
#
# The CUDA 13 and cuDNN 9 libraries themselves are not carried: the GPU image has them as
# nvidia-* Python packages, which onnxruntime's preload_dlls() (and tools/gpu_check.sh's
# LD_LIBRARY_PATH) find.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU=onnxruntime-gpu==1.31.1
PYTHON_VERSION=3.12
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
# What the server and its tests need beyond the GPU image's own packages (it has numpy, onnx,
# prometheus-client, pytest-timeout, hypothesis, h5py, safetensors, but not these, or maybe
# older ones than the generated stubs and pytest-asyncio accept): the versions make test uses.
DEPS=(grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
      pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-asyncio==1.5.0 redis==8.1.0)
PART_BYTES=$((50 * 1024 * 1024))
PARTS=5
STASH=${GPU_STASH:-/tmp/lstm-gpu-parts}
DOWNLOAD=${GPU_DOWNLOAD:-/tmp/lstm-gpu-wheel}
PY=${GPU_PYTHON:-python3}

say() { echo "gpu_wheel: $*" >&2; }
die() { say "$*"; exit 1; }

fetch() {
    local platform_args=() p
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    rm -rf "$DOWNLOAD" && mkdir -p "$DOWNLOAD/deps"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 -d "$DOWNLOAD" "$ORT_GPU" \
        || die "pip could not download $ORT_GPU (is PyPI reachable?)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp "${platform_args[@]}" -d "$DOWNLOAD/deps" "${DEPS[@]}" \
        || die "pip could not download ${DEPS[*]}"
    local wheel
    wheel=$(ls "$DOWNLOAD"/onnxruntime_gpu-*.whl)
    local size
    size=$(stat -c %s "$wheel")
    [ "$size" -le $((PART_BYTES * PARTS)) ] || die "$(basename "$wheel") is $size bytes: over $PARTS parts"
    rm -rf .gpu[1-9]
    split -b "$PART_BYTES" -d -a 1 --numeric-suffixes=1 "$wheel" "$DOWNLOAD/part-"
    {
        echo "wheel $(basename "$wheel") $size $(sha256sum "$wheel" | cut -d' ' -f1)"
        for f in "$DOWNLOAD"/part-*; do
            echo "part ${f##*/} $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1)"
        done
        for f in "$DOWNLOAD"/deps/*.whl; do
            echo "dep ${f##*/} $(stat -c %s "$f") $(sha256sum "$f" | cut -d' ' -f1)"
        done
    } >"$DOWNLOAD/MANIFEST"
    local n=1 f
    for f in "$DOWNLOAD"/part-*; do
        mkdir -p ".gpu$n"
        mv "$f" ".gpu$n/"
        cp "$DOWNLOAD/MANIFEST" ".gpu$n/"
        n=$((n + 1))
    done
    # The last part is the smallest: the other packages travel with it.
    mkdir -p ".gpu$((n - 1))/deps" && cp "$DOWNLOAD"/deps/*.whl ".gpu$((n - 1))/deps/"
    mkdir -p .git/info && touch .git/info/exclude
    for ((i = 1; i < n; i++)); do
        grep -qx "/.gpu$i/" .git/info/exclude || echo "/.gpu$i/" >>.git/info/exclude
    done
    rm -f "$wheel"
    du -sh .gpu[1-9] | sed 's/^/gpu_wheel: /' >&2
    say "$(basename "$wheel"): $size bytes in $((n - 1)) parts (.gpu1/ ... .gpu$((n - 1))/); carry one per call, each followed by 'tools/gpu_wheel.sh stash'"
}

# Check the parts in the working tree against their MANIFEST and keep them in $STASH.
stash() {
    mkdir -p "$STASH/deps"
    local dir found=0 name size sum kind
    for dir in "${GPU_PARTS:-.}"/.gpu[1-9]; do
        [ -f "$dir/MANIFEST" ] || continue
        cp "$dir/MANIFEST" "$STASH/MANIFEST"
        while read -r kind name size sum; do
            local file=""
            [ "$kind" = part ] && [ -f "$dir/$name" ] && file="$dir/$name"
            [ "$kind" = dep ] && [ -f "$dir/deps/$name" ] && file="$dir/deps/$name"
            [ -n "$file" ] || continue
            [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sum" ] || die "$file: sha256 differs from MANIFEST"
            if [ "$kind" = part ]; then cp "$file" "$STASH/"; else cp "$file" "$STASH/deps/"; fi
            found=$((found + 1))
        done <"$dir/MANIFEST"
    done
    [ -f "$STASH/MANIFEST" ] || die "no part here (.gpu1/ ... .gpu5/ come from 'tools/gpu_wheel.sh fetch')"
    local have=("$STASH"/part-*)
    [ -e "${have[0]}" ] || have=()
    say "stashed $found file(s) in $STASH; have ${#have[@]} of $(grep -c '^part ' "$STASH/MANIFEST") parts"
}

install() {
    local target=${1:-/tmp/lstm-gpu-site}
    if compgen -G "${GPU_PARTS:-.}/.gpu[1-9]/MANIFEST" >/dev/null; then stash; fi
    [ -f "$STASH/MANIFEST" ] || die "no parts stashed in $STASH: carry .gpu1/ ... .gpu5/ first"
    local kind name size sum wheel="" want="" missing=()
    while read -r kind name size sum; do
        case $kind in
            wheel) wheel=$name want=$sum ;;
            part | dep)
                local at="$STASH/$name"
                [ "$kind" = dep ] && at="$STASH/deps/$name"
                [ -f "$at" ] || missing+=("$name")
                ;;
        esac
    done <"$STASH/MANIFEST"
    [ ${#missing[@]} -eq 0 ] || die "missing from $STASH: ${missing[*]}"
    cat "$STASH"/part-* >"$STASH/$wheel"
    [ "$(sha256sum "$STASH/$wheel" | cut -d' ' -f1)" = "$want" ] || die "$wheel: sha256 differs after joining"
    local platform_args=() p deps=("$STASH"/deps/*.whl)
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    # The target's Python and platform named as fetch chose them: the same command also
    # runs (as a rehearsal) under another Python.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
        "${platform_args[@]}" --target "$target" "$STASH/$wheel" "${deps[@]}" \
        || { rm -f "$STASH/$wheel"; die "pip could not install $wheel"; }
    rm -f "$STASH/$wheel"
    say "installed $wheel and ${#deps[@]} packages into $target"
    echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}"
}

case ${1:-} in
    fetch) fetch ;;
    stash) stash ;;
    install) install "${2:-}" ;;
    *) die "usage: tools/gpu_wheel.sh fetch | stash | install [DIR]" ;;
esac
