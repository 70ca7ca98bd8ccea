"""`benchmarks/compile_options.py` at its tiny size on a CPU: every compilation in a
process of its own, with the options it names, and the program it times computes
what the library computes."""

import json

import jax
import numpy as np
import pytest

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("compile_options")


def test_a_run_writes_one_row_per_workload_and_variant(bench, tmp_path):
    bench.main(
        [
            "--tiny",
            "--workloads",
            "chmm large forward",
            "--variants",
            "default",
            "autotune level 0",
            "--repeats",
            "1",
            "--results-dir",
            str(tmp_path),
        ]
    )
    (path,) = tmp_path.glob("compile_options-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["workload"], r["impl"]) for r in rows] == [
        ("chmm large forward", "default"),
        ("chmm large forward", "autotune level 0"),
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["compile_s"] > 0 and row["median_s"] > 0
    assert json.loads(rows[1]["compiler_options"]) == {"xla_gpu_autotune_level": 0}
    # A later run of one variant replaces its row and keeps the other's.
    first_default = rows[0]["median_s"]
    bench.main(
        ["--tiny", "--workloads", "chmm large forward", "--variants", "default"]
        + ["--repeats", "1", "--results-dir", str(tmp_path)]
    )
    again = json.loads(path.read_text())
    assert [(r["workload"], r["impl"]) for r in again["rows"]] == [
        ("chmm large forward", "autotune level 0"),
        ("chmm large forward", "default"),
    ]
    assert again["rows"][0] == rows[1]
    assert again["rows"][1]["median_s"] != first_default
    assert len(again["notes"]) == 1


def test_the_timed_programs_compute_the_library_results(bench):
    from eqx_models.chmm import log_likelihood

    fn, (model, x, a) = bench.WORKLOADS["chmm large forward"]("tiny")
    np.testing.assert_allclose(
        jax.jit(fn)(model, x, a), log_likelihood(model, x, a, method="scan"), rtol=1e-5
    )
    fn, (model, data) = bench.WORKLOADS["causal inference bfloat16"]("tiny")
    assert fn(model, data).shape[0] == data.shape[0]
