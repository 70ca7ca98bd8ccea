"""`benchmarks/_harness.py`: how a run's rows are written and merged."""

import json

import pytest

from .helpers import load_benchmark


_harness = load_benchmark("_harness")


def _run(device, rows, tmp_path, merge=True):
    results = _harness.Results("sweep", "A sweep")
    results.environment = {**results.environment, "device": device}
    for row in rows:
        results.add(**row)
    path = results.save(
        str(tmp_path), merge_key=(lambda row: row["x"]) if merge else None
    )
    with open(path) as file:
        return json.load(file)


def test_a_merge_replaces_rows_measured_again_and_keeps_the_others(tmp_path):
    _run("GPU A", [{"x": 1, "t": 1.0}, {"x": 2, "t": 2.0}], tmp_path)
    merged = _run("GPU A", [{"x": 2, "t": 5.0}, {"x": 3, "t": 3.0}], tmp_path)
    assert merged["rows"] == [
        {"x": 1, "t": 1.0},
        {"x": 2, "t": 5.0},
        {"x": 3, "t": 3.0},
    ]
    assert merged["environment"]["device"] == "GPU A"


def test_a_merge_into_another_devices_file_replaces_it(tmp_path):
    # Rows of two devices cannot stand under one environment.
    _run("GPU A", [{"x": 1, "t": 1.0}, {"x": 2, "t": 2.0}], tmp_path)
    merged = _run("GPU B", [{"x": 2, "t": 5.0}], tmp_path)
    assert merged["rows"] == [{"x": 2, "t": 5.0}]
    assert merged["environment"]["device"] == "GPU B"


def _fake_programs(monkeypatch, temp_bytes, fail=None, limit=None):
    """Programs whose compile reports `temp_bytes[name]` (and as much peak memory)
    and whose run records the order of the runs (and raises `fail[name]`, where
    given), on a device of `limit` bytes (None: the backend does not say)."""
    ran = []

    def compile_(fn, *args):
        return fn, {"temp_bytes": temp_bytes[fn], "peak_bytes": temp_bytes[fn]}

    def time_compiled(compiled, args, row, repeats, keep):
        ran.append(compiled)
        if fail and compiled in fail:
            raise fail[compiled]
        return dict(row, median_s=1.0), (compiled if keep else None)

    monkeypatch.setattr(_harness, "_compile", compile_)
    monkeypatch.setattr(_harness, "_time_compiled", time_compiled)
    monkeypatch.setattr(_harness, "device_memory_limit", lambda: limit)
    return {name: (name, ()) for name in temp_bytes}, ran


def test_programs_run_largest_first_and_come_back_in_order(monkeypatch):
    programs, ran = _fake_programs(monkeypatch, {"a": 10, "b": 30, "c": 20})
    out = _harness.measure_largest_first(programs, repeats=1, keep=("c",))
    assert ran == ["b", "c", "a"]
    assert list(out) == ["a", "b", "c"]
    assert out["c"] == ({"temp_bytes": 20, "peak_bytes": 20, "median_s": 1.0}, "c")
    assert out["a"][1] is None


def test_a_program_out_of_memory_is_a_row_and_the_others_run(monkeypatch):
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    programs, ran = _fake_programs(monkeypatch, {"a": 1, "b": 2}, fail={"b": oom})
    out = _harness.measure_largest_first(programs, repeats=1)
    assert ran == ["b", "a"]
    assert out["b"][0]["temp_bytes"] == 2
    assert out["b"][0]["error"].startswith("RESOURCE_EXHAUSTED")
    assert "median_s" not in out["b"][0]
    assert out["a"][0]["median_s"] == 1.0


def test_a_program_larger_than_the_device_is_not_run(monkeypatch):
    programs, ran = _fake_programs(monkeypatch, {"a": 1, "b": 3e9, "c": 2}, limit=2e9)
    out = _harness.measure_largest_first(programs, repeats=1)
    assert ran == ["c", "a"]
    assert out["b"][0]["error"] == (
        "out of memory (not run): XLA's memory analysis needs 3.0 GB, "
        "the device holds 2.0 GB"
    )
    assert "median_s" not in out["b"][0]
    assert out["a"][0]["median_s"] == out["c"][0]["median_s"] == 1.0


def test_a_program_out_of_memory_while_compiling_is_a_row_and_the_others_run(
    monkeypatch,
):
    programs, ran = _fake_programs(monkeypatch, {"a": 1, "b": 2})
    compile_ = _harness._compile

    def compile_or_fail(fn, *args):
        if fn == "b":
            # XLA's message when the autotuner's trial buffers do not fit.
            raise RuntimeError(
                "NOT_FOUND: Failed to get configs for: 2 out of 226 instructions.\n"
                "All configs failed during profiling.\n"
                "EXECUTION FAILED: RESOURCE_EXHAUSTED: Out of memory while trying "
                "to allocate 54.02GiB with allocator GPU_0_bfc on device 0."
            )
        return compile_(fn, *args)

    monkeypatch.setattr(_harness, "_compile", compile_or_fail)
    out = _harness.measure_largest_first(programs, repeats=1)
    assert ran == ["a"]
    assert list(out) == ["a", "b"]
    assert out["b"] == (
        {
            "error": "out of memory while compiling: EXECUTION FAILED: "
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 54.02GiB "
            "with allocator GPU_0_bfc on device 0."
        },
        None,
    )
    assert out["a"][0]["median_s"] == 1.0


def test_another_compile_error_is_raised(monkeypatch):
    programs, _ = _fake_programs(monkeypatch, {"a": 1})

    def compile_(fn, *args):
        raise RuntimeError("INVALID_ARGUMENT: shapes")

    monkeypatch.setattr(_harness, "_compile", compile_)
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        _harness.measure_largest_first(programs, repeats=1)


def test_another_runtime_error_is_raised(monkeypatch):
    programs, _ = _fake_programs(
        monkeypatch, {"a": 1}, fail={"a": RuntimeError("INVALID_ARGUMENT: shapes")}
    )
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        _harness.measure_largest_first(programs, repeats=1)


def test_measure_times_a_real_program():
    import jax.numpy as jnp

    row, out = _harness.measure(lambda x: x * 2, jnp.ones(3), repeats=2, keep=True)
    assert {"compile_s", "median_s"} <= set(row) and "first_call_s" not in row
    assert out.tolist() == [2.0, 2.0, 2.0]


def test_the_bandwidth_ceiling_counts_a_read_and_a_write_per_element(monkeypatch):
    # A clock that advances 1 ms per reading: every timed call takes 1 ms, so the
    # rate is the bytes moved per call over 1 ms, and the larger size wins.
    ticks = iter(range(10_000))
    monkeypatch.setattr(_harness.time, "perf_counter", lambda: next(ticks) * 1e-3)
    best = _harness.bandwidth_ceiling(sizes=(1 << 10, 1 << 12))
    assert best["n"] == 1 << 12
    assert best["bytes_per_sec"] == pytest.approx(2 * 4 * (1 << 12) / 1e-3)


def test_the_matmul_ceiling_counts_two_flops_per_multiply_add(monkeypatch):
    ticks = iter(range(10_000))
    monkeypatch.setattr(_harness.time, "perf_counter", lambda: next(ticks) * 1e-3)
    best = _harness.matmul_ceiling("float32", sizes=(8, 16))
    assert (best["n"], best["dtype"]) == (16, "float32")
    assert best["flops_per_sec"] == pytest.approx(2 * 16**3 / 1e-3)
