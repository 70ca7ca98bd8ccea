"""TiDHy: streaming evaluation of a long recording, in chunks, against one-shot.

Usage: `python benchmarks/tidhy_stream.py [--size tiny|cpu|gpu] [--frames N]
[--chunks 256,1024,4096] [--results-dir DIR]`. The size defaults to the platform:
`gpu` is a recording of 10⁶ frames of the paper's switching system (D = 20, the
paper's model sizes r = 10, r2 = 5, M = 15), windows of 200 frames with stride 100,
inference up to 2 000 iterations with tol = 0.01 (the per-window mode); `cpu` and
`tiny` are reduced (`tiny` takes about a minute on a CPU, mostly compilation in
its three processes: a check that the script works).

Measured, each configuration in a process of its own (so that its peak memory is its
own: the device's `peak_bytes_in_use`, and the process's peak resident set size,
which is what a CPU run reports):

- `tidhy.evaluate_recording` over the whole recording with `chunk_size` windows per
  compiled call, for every chunk size: wall time (compilation separately: the first
  call), frames per second, peak memory;
- the one-shot evaluation (`chunk_size=None`: every window in one call) at the
  largest size that fits: the full recording, else halved until it runs (an
  out-of-memory failure is recorded as such); at that size the chunked evaluation
  runs too, and the largest difference of the latents between the two is reported
  (rounding only; the iteration counts must agree exactly).

The model is untrained (deterministic from a key): the inner loop's iteration counts,
and so the times, depend on the parameters; a trained model converges in fewer
iterations.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.random as jr
import numpy as np
from _harness import peak_device_bytes, Results, RESULTS_DIR

from eqx_models import tidhy


SIZES = {
    "tiny": dict(frames=2_000, length=50, stride=25, chunks=(8, 32), max_iter=50),
    "cpu": dict(frames=50_000, length=100, stride=50, chunks=(32, 128), max_iter=2000),
    "gpu": dict(
        frames=1_000_000,
        length=200,
        stride=100,
        chunks=(256, 1024, 4096),
        max_iter=2000,
    ),
}


def _recording(frames: int) -> np.ndarray:
    system = tidhy.SwitchingLDS(key=jr.key(10))
    # Sampled in pieces of at most 10⁵ steps, each re-drawn until both regimes of
    # every system occur (the generator's rule), then laid end to end.
    pieces, left, i = [], frames, 0
    while left > 0:
        n = min(left, 100_000)
        pieces.append(np.asarray(system.sample(n, key=jr.key(100 + i)).observations))
        left -= n
        i += 1
    return np.concatenate(pieces).astype(np.float32)


def _config(cfg) -> tidhy.InferenceConfig:
    return tidhy.InferenceConfig(max_iter=cfg["max_iter"], tol=0.01)


def worker(size: str, frames: int, chunk: int | None, compare: bool) -> dict:
    """Run one configuration; returns its measurements (printed as JSON)."""
    cfg = SIZES[size]
    x = _recording(frames)
    model = tidhy.TiDHy(20, key=jr.key(0))
    config = _config(cfg)

    def evaluate(chunk_size):
        return tidhy.evaluate_recording(
            model,
            x,
            length=cfg["length"],
            stride=cfg["stride"],
            config=config,
            chunk_size=chunk_size,
        )

    t0 = time.perf_counter()
    first = evaluate(chunk)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trajectory = evaluate(chunk)
    run_s = time.perf_counter() - t0
    out = {
        "frames": frames,
        "windows": int(trajectory.starts.size),
        "chunk_size": chunk,
        "first_call_s": first_s,
        "median_s": run_s,
        "frames_per_s": frames / run_s,
        "iterations_mean": float(trajectory.n_iter.mean()),
        "peak_device_bytes": peak_device_bytes(),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "finite": bool(np.all(np.isfinite(trajectory.r))),
    }
    del first
    if compare:
        chunked = evaluate(cfg["chunks"][0])
        out["max_abs_diff_r_vs_chunked"] = float(
            np.max(np.abs(chunked.r - trajectory.r))
        )
        out["same_iterations_as_chunked"] = bool(
            np.array_equal(chunked.n_iter, trajectory.n_iter)
        )
    return out


def _spawn(size: str, frames: int, chunk: int | None, compare: bool) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--size",
        size,
        "--frames",
        str(frames),
        "--chunk",
        "none" if chunk is None else str(chunk),
    ] + (["--compare"] if compare else [])
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        memory = any(
            "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower()
            for line in (done.stderr + done.stdout).splitlines()
        )
        return {"failed": "out of memory" if memory else " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument(
        "--chunks", default=None, help="comma-separated chunk sizes (windows per call)"
    )
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("cpu" if platform == "cpu" else "gpu")
    cfg = SIZES[size]
    frames = args.frames or cfg["frames"]
    if args.worker:
        chunk = None if args.chunk == "none" else int(args.chunk)
        print(json.dumps(worker(size, frames, chunk, args.compare)), flush=True)
        return
    chunks = (
        tuple(int(c) for c in args.chunks.split(",")) if args.chunks else cfg["chunks"]
    )
    results = Results(
        "tidhy_stream",
        "TiDHy: chunked (streaming) evaluation of a long recording against one-shot",
        f"`tidhy.evaluate_recording` over a recording of {frames} frames of the "
        f"switching system (windows of {cfg['length']}, stride {cfg['stride']}, "
        f"per-window inference up to {cfg['max_iter']} iterations, tol 0.01, an "
        "untrained model), with `chunk_size` windows per compiled call, against "
        "the one-shot evaluation (all windows in one call) at the largest size "
        "that fits. Each row ran in a process of its own; memory is that "
        "process's peak.",
    )
    sizes = dict(length=cfg["length"], stride=cfg["stride"], D=20)
    for chunk in chunks:
        row = _spawn(size, frames, chunk, compare=False)
        results.add(
            workload="evaluate_recording", impl=f"chunks of {chunk}", sizes=sizes, **row
        )
    n = frames
    while n >= cfg["length"] * 4:
        row = _spawn(size, n, None, compare=True)
        results.add(
            workload="evaluate_recording",
            impl="one-shot",
            sizes=sizes,
            **({"frames": n} | row),
        )
        if "failed" not in row:
            break
        n //= 2
    results.save(args.results_dir)


if __name__ == "__main__":
    main()
