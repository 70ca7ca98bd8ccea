#!/usr/bin/env bash
# Run benchmark scripts on a lent GPU machine (a bare image with JAX and PyTorch).
#
# Usage: bash benchmarks/on_device.sh "chmm.py" "ghost.py --size gpu" ...
# Pure-Python packages missing there (beartype, peers such as dynamax) travel as
# wheels in .whl/; results are copied to $OUT (when set) for fetching.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_device_env.sh
. benchmarks/_device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
status=0
for job in "$@"; do
  echo "== benchmarks/$job"
  start=$SECONDS
  # shellcheck disable=SC2086
  (cd benchmarks && python3 $job) || { echo "!! $job failed"; status=1; }
  echo "== $job took $((SECONDS - start)) s"
  # After every job, so a later job that runs out of time loses only its own.
  if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*-gpu.json "$OUT"/ 2>/dev/null || true
  fi
done
exit $status
