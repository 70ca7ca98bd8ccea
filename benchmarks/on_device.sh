#!/usr/bin/env bash
# Run benchmark scripts on a lent GPU machine (a bare image with JAX and PyTorch).
#
# Usage: bash benchmarks/on_device.sh "chmm.py" "ghost.py --size gpu" ...
# Each job is one word-split command line: an argument with spaces cannot be quoted
# inside it (run such a script directly after sourcing benchmarks/_device_env.sh).
# Pure-Python packages missing there (beartype, peers such as dynamax) travel as
# wheels in .whl/; results are copied to $OUT (when set) for fetching.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benchmarks/_device_env.sh
. benchmarks/_device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
status=0
# Only the result files this run writes go back: $OUT returns a handful of files.
stamp=$(mktemp)
for job in "$@"; do
  echo "== benchmarks/$job"
  start=$SECONDS
  # shellcheck disable=SC2086
  (cd benchmarks && python3 $job) || { echo "!! $job failed"; status=1; }
  echo "== $job took $((SECONDS - start)) s"
  # After every job, so a later job that runs out of time loses only its own.
  if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name '*-gpu.json' -newer "$stamp" -exec cp {} "$OUT"/ \;
  fi
done
exit $status
