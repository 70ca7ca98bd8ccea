"""`benchmarks/layer_stack.py` at the tiny size on a CPU: a row per pass and setting,
the library's own choice restored afterwards, and the summary's comparison."""

import json

import pytest

from transforms._grad import _ghost_eval

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("layer_stack")


def test_a_run_measures_every_pass_both_ways(bench, tmp_path):
    library_choice = _ghost_eval._unroll
    argv = ["--size", "tiny", "--batch", "2", "--length", "8", "--repeats", "1"]
    bench.main(argv + ["--results-dir", str(tmp_path)])
    assert _ghost_eval._unroll is library_choice
    (path,) = tmp_path.glob("layer_stack-*.json")
    result = json.loads(path.read_text())
    rows = {(r["workload"], r["impl"]): r for r in result["rows"]}
    expected = {
        ("plain step, B", "the loss's scan"),
        ("plain step, 2B", "the loss's scan"),
    }
    expected |= {
        (w, s) for w in bench.WORKLOADS.values() for s in ("rolled", "unrolled")
    }
    assert set(rows) == expected
    for row in rows.values():
        assert "error" not in row, row
        assert row["compile_s"] > 0 and row["median_s"] > 0
        assert row["sizes"]["batch"] == 2 and row["sizes"]["length"] == 8
    # The settings differ in what they compile: the one-pass step's rolled scans
    # stack the saved values of its forward pass twice.
    one_pass = "DP step, one_pass"
    assert (
        rows[one_pass, "unrolled"]["temp_bytes"]
        < rows[one_pass, "rolled"]["temp_bytes"]
    )

    summary = load_benchmark("render")._summary_layer_stack(result)
    assert [c.workload.split(" (")[0] for c in summary] == list(
        bench.WORKLOADS.values()
    )
    for c in summary:
        assert c.ours.startswith("unrolled: ") and c.peer.startswith("rolled: ")
        assert "faster" in c.ratio or "slower" in c.ratio


def test_passes_chooses_the_rows(bench, tmp_path):
    argv = ["--size", "tiny", "--batch", "2", "--length", "8", "--repeats", "1"]
    bench.main(argv + ["--passes", "norms", "--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("layer_stack-*.json")
    rows = json.loads(path.read_text())["rows"]
    # The plain step on 2B examples is measured for the attribution step only.
    assert [(r["workload"], r["impl"]) for r in rows] == [
        ("plain step, B", "the loss's scan"),
        ("per-sample norms, ghost", "rolled"),
        ("per-sample norms, ghost", "unrolled"),
    ]
