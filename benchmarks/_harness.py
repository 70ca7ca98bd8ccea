"""The measuring harness the benchmark scripts share (not part of the library).

Every benchmark script builds a `Results`, adds one row per (workload, implementation)
measured with `time_jax`, `measure` or `time_callable` (in a child process of its own
with `run_worker` where memory figures or failures must not mix), and saves it as
JSON under `benchmarks/results/`; `python benchmarks/render.py` turns all result
files into `docs/benchmarks.md`.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
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


def _best_rate(program, sizes, make_args, work) -> tuple[float, int | None]:
    """The best `work(n) / median time` of `program(*make_args(n))` over `sizes`
    (ten timed calls each, after a first that compiles), with its `n`."""
    best, best_n = 0.0, None
    for n in sizes:
        args = make_args(n)
        jax.block_until_ready(program(*args))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(program(*args))
            times.append(time.perf_counter() - t0)
        rate = work(n) / statistics.median(times)
        if rate > best:
            best, best_n = rate, n
    return best, best_n


def matmul_ceiling(dtype, sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The best measured throughput of a square matmul in `dtype` on the first
    device over a few sizes (`flops_per_sec`, with its `n` and `dtype`): the
    ceiling that MFU and roofline times are quoted against in the same run."""
    import jax.numpy as jnp

    if sizes is None:
        gpu = jax.devices()[0].platform == "gpu"
        sizes = (4096, 8192, 16384) if gpu else (512, 1024)
    rate, n = _best_rate(
        jax.jit(lambda x, y: x @ y),
        sizes,
        lambda n: (jnp.ones((n, n), dtype),) * 2,
        lambda n: 2 * n**3,
    )
    return {"flops_per_sec": rate, "n": n, "dtype": jnp.dtype(dtype).name}


def bandwidth_ceiling(sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """The best measured memory throughput of the first device over a few sizes:
    `bytes_per_sec` of an elementwise float32 update (each element read and written
    once, so `2 * nbytes` moved per call), with its element count `n`. The ceiling
    that traffic floors (XLA's `accessed_bytes` over this rate) are quoted against
    in the same run."""
    import jax.numpy as jnp

    if sizes is None:
        gpu = jax.devices()[0].platform == "gpu"
        sizes = (1 << 26, 1 << 28) if gpu else (1 << 22, 1 << 24)
    rate, n = _best_rate(
        jax.jit(lambda x: x * 0.5 + 1.0),
        sizes,
        lambda n: (jnp.ones((n,), jnp.float32),),
        lambda n: 2 * 4 * n,
    )
    return {"bytes_per_sec": rate, "n": n}


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


def footprint(compiled) -> dict[str, Any]:
    """What XLA's analyses of a compiled executable report: `temp_bytes`, `peak_bytes`
    (arguments + outputs + temporaries - aliased), `flops` and `accessed_bytes` (its
    estimate of the memory traffic: with `flops`, the two floors a time is bounded
    by), where known."""
    out = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        out["temp_bytes"] = int(analysis.temp_size_in_bytes)
        out["peak_bytes"] = int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    if cost and "bytes accessed" in cost:
        out["accessed_bytes"] = float(cost["bytes accessed"])
    return out


def device_memory_limit() -> int | None:
    """The bytes the first device's allocator may use, where the backend says."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def _compile(fn: Callable, *args):
    """`fn` compiled for `args`, and its row so far: `compile_s` and the footprint."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, {"compile_s": time.perf_counter() - t0, **footprint(compiled)}


def _time_compiled(compiled, args, row: dict, repeats: int, keep: bool):
    last = {}

    def call():
        out = compiled(*args)
        if keep:
            last["out"] = out
        return out

    row = dict(row, **time_callable(call, warmup=1, repeats=repeats))
    row.pop("first_call_s")
    return row, last.get("out")


def measure(fn: Callable, *args, repeats: int, keep: bool = False):
    """Compile `fn` once, read its footprint, then time the compiled executable.

    **Returns:**

    The row (`compile_s`, the `footprint` and the timing), and the output of the last
    timed call when `keep` (else None).
    """
    compiled, row = _compile(fn, *args)
    return _time_compiled(compiled, args, row, repeats, keep)


def out_of_memory_row(error: RuntimeError, stage: str = "") -> dict[str, str]:
    """The row of a program that did not fit: the first line of XLA's message that
    says so, after `stage` (where it failed) if given. Any other error is raised
    again.

    A failure while compiling comes from the autotuner, which runs candidate kernels
    on buffers of the instruction's size: XLA's message then begins with a line on
    the autotuner ("NOT_FOUND: Failed to get configs ...") and names the failed
    allocation further down.
    """
    lines = str(error).strip().splitlines()
    says = [
        line.strip()
        for line in lines
        if "RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower()
    ]
    if not says:
        raise error
    return {"error": (stage + says[0])[:200]}


def measure_unless_out_of_memory(fn: Callable, *args, repeats: int, keep: bool = False):
    """`measure`, where a program that does not fit in the device's memory is a row
    whose `error` is the first line of XLA's message (a sweep records it and goes on).
    """
    try:
        return measure(fn, *args, repeats=repeats, keep=keep)
    except RuntimeError as error:  # XLA's out-of-memory error is one
        return out_of_memory_row(error), None


def measure_largest_first(
    programs: dict[str, tuple[Callable, tuple]],
    *,
    repeats: int,
    keep: tuple[str, ...] = (),
) -> dict[str, tuple[dict[str, Any], Any]]:
    """`measure_unless_out_of_memory` of each `name: (fn, args)`, all compiled first
    and then run in decreasing order of their temporary memory; a program that runs
    out of memory while compiling, or whose `peak_bytes` exceed the device's memory,
    is an out-of-memory row without a run.

    Without preallocation (the benchmarks leave the GPU to the PyTorch peers' child
    processes) JAX's pool grows by regions that are never merged: a large program run
    after smaller ones can fail although it fits in the device's memory (on an H100
    the plain GPT-2 step at B = 256, T = 128 did, after the B = 128 programs). Run
    first, the largest program grows the pool once and the others reuse that region.
    The autotuner's trial buffers, allocated while compiling, grow it too: on an
    H100 the DP steps at B = 256 (39.5 to 43.5 GB by XLA's analysis) once all failed
    at their first run after a program too large to run had been compiled. Only
    `XLA_PYTHON_CLIENT_PREALLOCATE=true` rules this out.

    **Returns:**

    `name: (row, output)` in the order of `programs`; the output of the last timed
    call for the names in `keep`, else None.
    """
    compiled, out = {}, {}
    for name, (fn, args) in programs.items():
        try:
            compiled[name] = _compile(fn, *args)
        except RuntimeError as error:
            # On an H100, the DP step by vmap(grad) at B = 512, T = 128.
            row = out_of_memory_row(error, "out of memory while compiling: ")
            out[name] = (row, None)
    order = sorted(compiled, key=lambda n: -compiled[n][1].get("temp_bytes", 0))
    limit = device_memory_limit()
    for name in order:
        executable, row = compiled[name]
        needs = row.get("peak_bytes", 0)
        if limit is not None and needs > limit:
            # Not tried: a failed allocation this large leaves the pool unable to
            # serve the smaller programs after it (seen on an H100: every DP step
            # failed after vmap(grad)'s 83 GB request).
            error = (
                f"out of memory (not run): XLA's memory analysis needs "
                f"{needs / 1e9:.1f} GB, the device holds {limit / 1e9:.1f} GB"
            )
            out[name] = (dict(row, error=error), None)
            continue
        try:
            out[name] = _time_compiled(
                executable, programs[name][1], row, repeats, name in keep
            )
        except RuntimeError as error:
            out[name] = (dict(row, **out_of_memory_row(error)), None)
    return {name: out[name] for name in programs}


def run_worker(
    command: list[str],
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    tail: int = 3,
) -> dict[str, Any]:
    """Run `python *command` in a child process and return its result: the last line
    of its output that is a JSON object, raw `times` replaced by their summary.

    A child has memory figures of its own, and its failure does not stop the parent:
    a timeout, a non-zero exit or no result is `{"error": ...}` with the last `tail`
    lines of the child's output.
    """
    try:
        done = subprocess.run(
            [sys.executable, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr or done.stdout).strip().splitlines()[-tail:]
        return {"error": f"exit {done.returncode}: " + " | ".join(last)}
    result = json.loads(lines[-1])
    if "times" in result:
        result.update(_summary(result.pop("times")))
    return result


def not_installed(module: str) -> bool:
    """Whether `module` cannot be imported here (an optional peer's package)."""
    return importlib.util.find_spec(module) is None


def positive_int(text: str) -> int:
    """An `argparse` type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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
        # The whole row, so a run cut short (a device call's time limit) leaves
        # every row it measured in its log.
        print(json.dumps(row, default=str), flush=True)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def previous(self, path: str) -> dict[str, Any] | None:
        """The result file at `path` to fold this run into, or `None` where there is
        none or it was measured on another device (a file names one device: its rows
        cannot be set beside this run's, and this run replaces it)."""
        if not os.path.exists(path):
            return None
        with open(path) as f:
            old = json.load(f)
        if old["environment"].get("device") != self.environment["device"]:
            print(f"{path} was measured on another device: replaced")
            return None
        return old

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
        new notes are appended. A file measured on another device is replaced:
        its rows cannot be set beside this run's under one environment.
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
        old = self.previous(path) if merge_key is not None else None
        if merge_key is not None and old is not None:
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
