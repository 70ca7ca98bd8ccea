#!/usr/bin/env bash
# Run the whole test suite on a lent GPU machine (a bare image with JAX, PyTorch,
# pytest and pytest-xdist) in one command, and keep its log and summary.
#
# Usage: bash benchmarks/suite_on_device.sh [pytest arguments]
# Pure-Python packages missing there (beartype) travel as wheels in .whl/. The log
# and a one-line JSON summary are copied to $OUT (when set) for fetching.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_device_env.sh
. benchmarks/_device_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Optional extras are installed there too: a skip is a failure, as in CI.
export EQX_MODELS_REQUIRE_OPTIONAL=1 MPLBACKEND=Agg
# pytest-benchmark is installed there and warns under xdist (an error with the
# suite's filterwarnings); through the environment, pytest runs that tests start in
# subprocesses leave it out too.
export PYTEST_ADDOPTS="-p no:benchmark ${PYTEST_ADDOPTS:-}"
log="${OUT:-/tmp}/suite.log"
device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
start=$SECONDS
# Failures are written as they happen (tests/conftest.py), and the run is cut at
# SUITE_TIMEOUT seconds, so a run that does not finish in a device call's time
# still says what failed.
export EQX_MODELS_FAILURE_LOG="${OUT:-/tmp}/failures.log"
rm -f "$EQX_MODELS_FAILURE_LOG"
timeout "${SUITE_TIMEOUT:-540}" python3 -m pytest -n "${SUITE_WORKERS:-16}" -rfEs "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
grep -E "^=== " "$EQX_MODELS_FAILURE_LOG" 2>/dev/null || true
summary="$(grep -E '(passed|failed|error).* in [0-9.]+s' "$log" | tail -1)"
python3 - "$device" "$((SECONDS - start))" "$summary" "$status" <<'PY' | tee "${OUT:-/tmp}/suite.json"
import json, sys, datetime, jax
device, seconds, summary, status = sys.argv[1:]
print(json.dumps({
    "date": datetime.date.today().isoformat(), "device": device or jax.devices()[0].device_kind,
    "jax": jax.__version__, "python": sys.version.split()[0],
    "seconds": int(seconds), "summary": summary.strip("= "), "exit": int(status),
}))
PY
exit "$status"
