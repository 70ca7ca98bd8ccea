"""`benchmarks/layer_stack.py` at the tiny size on a CPU: a row per pass and setting,
and the summary's comparison."""

import json
import re

import pytest

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("layer_stack")


def test_a_run_measures_every_pass_in_every_setting(bench, tmp_path):
    argv = ["--size", "tiny", "--batch", "2", "--length", "8", "--repeats", "1"]
    bench.main(argv + ["--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("layer_stack-*.json")
    result = json.loads(path.read_text())
    rows = {(r["workload"], r["impl"]): r for r in result["rows"]}
    workloads = ["plain step, B", "plain step, 2B", *bench.WORKLOADS.values()]
    expected = {(w, s) for w in workloads for s in ("rolled", "unrolled")}
    expected |= {(w, "loss unrolled") for w in bench.WORKLOADS.values()}
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
    # So do the plain steps of the two losses (the same program would say the
    # model's `unroll` never reached the step).
    for workload in ("plain step, B", "plain step, 2B"):
        rolled, unrolled = rows[workload, "rolled"], rows[workload, "unrolled"]
        assert rolled["temp_bytes"] != unrolled["temp_bytes"]

    summary = load_benchmark("render")._summary_layer_stack(result)
    settings, against_plain = summary[: len(workloads)], summary[len(workloads) :]
    assert [c.workload.split(" (")[0] for c in settings] == workloads
    for c in settings:
        assert c.ours.startswith("unrolled: ") and c.peer.startswith("rolled: ")
        assert "faster" in c.ratio or "slower" in c.ratio
    # Each pass in each setting against the plain step of the same loss.
    assert len(against_plain) == len(bench.SETTINGS) * len(bench.WORKLOADS)
    for c in against_plain:
        workload, impl, rest = re.fullmatch(
            r"(.*) \[(.*)\] (vs .*)", c.workload
        ).groups()
        examples = "2B" if workload.startswith("attribution") else "B"
        loss, *_ = bench.SETTINGS[impl]
        assert rest.startswith(f"vs plain step on {examples} [loss {loss}] (")
        expected_ratio = (
            rows[workload, impl]["median_s"]
            / rows[f"plain step, {examples}", loss]["median_s"]
        )
        assert c.ratio.startswith(f"{expected_ratio:.2f}× the plain step's time")


def test_passes_and_settings_choose_the_rows(bench, tmp_path):
    argv = ["--size", "tiny", "--batch", "2", "--length", "8", "--repeats", "1"]
    argv += ["--passes", "norms", "--settings", "rolled", "loss unrolled"]
    bench.main(argv + ["--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("layer_stack-*.json")
    rows = json.loads(path.read_text())["rows"]
    # The plain steps of the losses the chosen settings run, then the chosen pass.
    assert [(r["workload"], r["impl"]) for r in rows] == [
        ("plain step, B", "rolled"),
        ("plain step, 2B", "rolled"),
        ("plain step, B", "unrolled"),
        ("plain step, 2B", "unrolled"),
        ("per-sample norms, ghost", "rolled"),
        ("per-sample norms, ghost", "loss unrolled"),
    ]


def test_passes_may_be_left_empty_to_measure_the_plain_steps(bench, tmp_path):
    argv = ["--size", "tiny", "--batch", "2", "--length", "8", "--repeats", "1"]
    bench.main(
        argv + ["--passes", "--settings", "rolled", "--results-dir", str(tmp_path)]
    )
    (path,) = tmp_path.glob("layer_stack-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["workload"], r["impl"]) for r in rows] == [
        ("plain step, B", "rolled"),
        ("plain step, 2B", "rolled"),
    ]


@pytest.mark.parametrize("unroll", [1, True])
def test_the_plain_steps_scan_is_set_by_the_model(bench, unroll):
    """The plain step's two settings trace the GPT's layer scan with its `unroll`."""
    import jax

    cfg = dict(vocab=64, dim=16, heads=2, layers=3, context=16)
    params, static, _ = bench.plain_inputs(cfg, bench.optax.adamw(1e-3), unroll)
    model = bench.eqx.combine(params, static)
    jaxpr = jax.make_jaxpr(model)(jax.numpy.zeros(8, int))
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert scan.params["unroll"] == (3 if unroll is True else 1)
