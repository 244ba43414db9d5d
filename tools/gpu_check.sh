#!/usr/bin/env bash
# The one GPU check (make test-gpu): the end-to-end tests with --device cuda, the seed model and
# every framework fixture against the float64 reference on CUDA, and lstm_bench.gpu, all
# written to docs/perf/gpu.json (GPU, onnxruntime-gpu version, provider, differences, rows).
#
#   tools/gpu_check.sh              on a machine with an NVIDIA GPU; without one it says
#                                   SKIPPED in one line and exits 0 (GPU_CHECK_REQUIRE=1: exit 1)
#   tools/gpu_check.sh --rehearse   the same steps on the CPU (a few tests, --quick grid),
#                                   written to /tmp/gpu-rehearsal.json: checks the script itself
#
# Environment: GPU_PYTHON (python3), GPU_DEVICE (cuda), GPU_OUT (docs/perf/gpu.json),
# GPU_TESTS (the test files), GPU_TEST_SECONDS (240), GPU_BENCH_ARGS (lstm_bench.gpu flags,
# --seconds 0.1 --load cpu cuda --load-seconds 3), GPU_PARTS (where .gpu1/ ... are: the repository), GPU_SITE (/tmp/lstm-gpu-site:
# where tools/gpu_wheel.sh install puts onnxruntime-gpu).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY=${GPU_PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/lstm-gpu-site}
DEVICE=${GPU_DEVICE:-cuda}
OUT=${GPU_OUT:-docs/perf/gpu.json}
# The tests where the device matters; the store and TLS tests are the same on any device
# (and need redis-server and openssl): GPU_TESTS=tests/service runs them all.
TESTS=${GPU_TESTS:-tests/service/test_runtime.py tests/service/test_devstate.py
tests/service/test_semantics.py tests/service/test_streaming.py tests/service/test_sessions.py
tests/service/test_imported_models.py tests/service/test_batcher.py tests/service/test_metrics.py
tests/service/test_lifecycle.py tests/service/test_bad_input.py tests/service/test_versions.py}
TEST_SECONDS=${GPU_TEST_SECONDS:-240}
BENCH_ARGS=${GPU_BENCH_ARGS:---seconds 0.1 --load cpu $DEVICE --load-seconds 3}
REHEARSE=0

say() { echo "gpu_check: $*"; }
die() { echo "gpu_check: $*" >&2; exit 1; }

if [ "${1:-}" = --rehearse ]; then
    REHEARSE=1 DEVICE=cpu OUT=${GPU_OUT:-/tmp/gpu-rehearsal.json}
    TESTS=${GPU_TESTS:-tests/service/test_runtime.py tests/service/test_devstate.py}
    BENCH_ARGS=${GPU_BENCH_ARGS:---quick --seconds 0.02 --sessions 1000 4096 --hidden 64 --layers 1 --load cpu --load-seconds 1}
elif [ -n "${1:-}" ]; then
    die "usage: tools/gpu_check.sh [--rehearse]"
fi

if [ $REHEARSE = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    say "SKIPPED: no NVIDIA GPU on this machine (nvidia-smi finds none)"
    [ "${GPU_CHECK_REQUIRE:-0}" = 1 ] && exit 1
    exit 0
fi
[ -d "$SITE" ] && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

has_cuda() {
    "$PY" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null
}
if [ $REHEARSE = 0 ] && ! has_cuda; then
    if compgen -G "${GPU_PARTS:-.}/.gpu[1-9]/MANIFEST" >/dev/null || [ -f "${GPU_STASH:-/tmp/lstm-gpu-parts}/MANIFEST" ]; then
        GPU_PYTHON=$PY tools/gpu_wheel.sh install "$SITE" >/dev/null || exit 1
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
    has_cuda || die "onnxruntime in $PY has no CUDA execution provider: pip install -e '.[gpu]' (with PyPI), or carry .gpu1/ ... .gpu5/ from 'tools/gpu_wheel.sh fetch'"
fi

# CUDA 13 and cuDNN 9 as nvidia-* Python packages: onnxruntime's preload_dlls() finds most of
# them; their lib/ folders on LD_LIBRARY_PATH cover the rest.
libs=$("$PY" - <<'EOF'
import glob, os, site, sys
roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
found = {os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "lib", "*.so*"), recursive=True)}
print(":".join(sorted(found)))
EOF
)
[ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The package's compiled parts are built for this Python where they are missing.
if ! "$PY" -c 'import service.server' 2>/dev/null && [ -f setup.py ]; then
    "$PY" setup.py -q build_ext --inplace >/tmp/gpu-check-build.log 2>&1 \
        || die "cannot build the compiled modules for $PY (see /tmp/gpu-check-build.log)"
fi
problem=$("$PY" -c 'import service.server, pytest_asyncio' 2>&1 | tail -1) \
    || die "$PY cannot import the server or its tests: $problem"

say "device $DEVICE, $("$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())')"
# The measurements first: with a few minutes of GPU, they are the evidence that must come back.
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
"$PY" -m lstm_bench.gpu --device "$DEVICE" --check-models --out "$OUT" $BENCH_ARGS
bench_rc=$?

workers=()
"$PY" -c 'import xdist' 2>/dev/null && [ $REHEARSE = 0 ] && workers=(-n 8)
log=/tmp/gpu-check-tests.log
# shellcheck disable=SC2086  # TESTS is a list of paths
LSTM_TEST_DEVICE=$DEVICE timeout "$TEST_SECONDS" "$PY" -m pytest -q -p no:cacheprovider \
    "${workers[@]}" $TESTS >"$log" 2>&1
tests_rc=$?
summary=$(grep -E '(passed|failed|error)' "$log" | tail -1)
[ $tests_rc = 124 ] && summary="timed out after ${TEST_SECONDS}s: $summary"
say "end-to-end tests (LSTM_TEST_DEVICE=$DEVICE): ${summary:-no summary, see $log} (log: $log)"
if [ -f "$OUT" ]; then
    "$PY" - "$OUT" "rc=$tests_rc: $summary" "$TESTS" <<'EOF'
import json, sys
path, summary, tests = sys.argv[1:]
result = json.load(open(path))
result["end_to_end_tests"] = {"device": result["device"], "summary": summary, "files": tests.split()}
with open(path, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
EOF
fi

if [ $tests_rc != 0 ] || [ $bench_rc != 0 ]; then
    die "FAILED (tests rc=$tests_rc, lstm_bench.gpu rc=$bench_rc); $OUT has what was measured"
fi
say "passed; wrote $OUT"
