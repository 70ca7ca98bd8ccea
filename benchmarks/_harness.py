"""Shared timing helpers for the benchmark scripts (not part of the library).

Every benchmark script builds a `Results`, adds one row per (workload, implementation)
measured with `time_jax` or `time_callable`, and saves it as JSON under
`benchmarks/results/`; `python benchmarks/render.py` turns all result files into
`docs/benchmarks.md`.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Date, device and package versions, recorded with every result file."""
    device = jax.devices()[0]
    packages = ["jax", "jaxlib", "equinox", "optax", "numpy", "torch", "dynamax"]
    return {
        "date": datetime.date.today().isoformat(),
        "platform": device.platform,
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: v for p in packages if (v := _version(p)) is not None},
    }


def _summary(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": times[0],
        "max_s": times[-1],
        "iqr_s": q[2] - q[0],
        "repeats": len(times),
    }


def peak_device_bytes() -> int | None:
    """Peak bytes in use on the first device since the process started, if known."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def time_jax(
    fn: Callable, *args, warmup: int = 2, repeats: int = 10, **kwargs
) -> dict[str, Any]:
    """Time a JAX function: compile time, then the median of `repeats` calls.

    `fn` is jitted with `jax.jit` unless it already is (anything with `.lower`), so
    compilation is measured on its own (`compile_s`) and the compiled executable's
    memory analysis is reported (`temp_bytes`, `argument_bytes`, `output_bytes`).
    Each timed call ends with `jax.block_until_ready`.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    memory = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        memory = {
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
        }
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args, **kwargs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args, **kwargs))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, **_summary(times), **memory}


def matmul_ceiling(dtype, sizes: tuple[int, ...] | None = None) -> float:
    """The best measured throughput (FLOP/s) of a square matmul in `dtype` on the
    first device, over a few sizes: the ceiling that MFU and roofline times are
    quoted against in the same run."""
    import jax.numpy as jnp

    if sizes is None:
        gpu = jax.devices()[0].platform == "gpu"
        sizes = (4096, 8192, 16384) if gpu else (512, 1024)
    matmul = jax.jit(lambda x, y: x @ y)
    best = 0.0
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        jax.block_until_ready(matmul(a, a))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(matmul(a, a))
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def time_callable(
    fn: Callable[[], Any],
    *,
    sync: Callable[[Any], Any] = jax.block_until_ready,
    warmup: int = 2,
    repeats: int = 10,
) -> dict[str, Any]:
    """Time any zero-argument callable (e.g. a PyTorch peer).

    `sync(result)` must wait for the work to finish (for torch on a GPU:
    `lambda _: torch.cuda.synchronize()`). The first call is reported as
    `first_call_s` (it includes any compilation).
    """
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, **_summary(times)}


class Results:
    """Rows of one benchmark, saved as `benchmarks/results/<name>-<platform>.json`."""

    def __init__(self, name: str, title: str, description: str = ""):
        self.name = name
        self.title = title
        self.description = description
        self.environment = environment()
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(json.dumps(shown, default=str), flush=True)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def save(
        self,
        directory: str | None = None,
        *,
        merge_key: Callable[[dict[str, Any]], Any] | None = None,
    ) -> str:
        """Write `<directory>/<name>-<platform>.json` (default `benchmarks/results/`).

        Without `merge_key` the file is replaced. With it, this run is folded into
        the file already there (a sweep added to a full run): a row of the file is
        replaced by this run's row with the same `merge_key(row)`, the other rows,
        the description, environment and notes are kept, and this run's rows and
        new notes are appended.
        """
        directory = directory or RESULTS_DIR
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(
            directory, f"{self.name}-{self.environment['platform']}.json"
        )
        result = {
            "benchmark": self.name,
            "title": self.title,
            "description": self.description,
            "environment": self.environment,
            "rows": self.rows,
            "notes": self.notes,
        }
        if merge_key is not None and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            measured = {merge_key(row) for row in self.rows}
            kept = [row for row in old["rows"] if merge_key(row) not in measured]
            notes = old.get("notes", [])
            result = {
                **old,
                "rows": kept + self.rows,
                "notes": notes + [n for n in self.notes if n not in notes],
            }
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {path}")
        return path
