"""`benchmarks/attribution.py` at a tiny size on the CPU: every row is measured, and
the missing peer is a row with its reason."""

import importlib.util
import json

import jax
import pytest

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def attribution():
    return load_benchmark("attribution")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k", "0"], "must be a positive integer, got 0"),
        (["--length", "256"], "more than the tiny model's context of 256"),
        (["--rows", "5", "--top-k", "10"], "--top-k 10 is more than --rows 5"),
    ],
)
def test_bad_arguments_are_refused(attribution, argv, message, capsys):
    with pytest.raises(SystemExit):
        attribution.parse(argv, "cpu")
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_run_measures_every_row(attribution, tmp_path):
    argv = ["--size", "tiny", "--k", "2", "--length", "8", "--batch", "4"]
    argv += ["--build-examples", "16", "--rows", "500", "--queries", "4"]
    argv += ["--repeats", "1", "--results-dir", str(tmp_path)]
    attribution.main(argv)
    # Named after the platform it ran on (attribution-gpu.json on a GPU).
    platform = jax.devices()[0].platform
    result = json.loads((tmp_path / f"attribution-{platform}.json").read_text())
    rows = {row["workload"].split(" ")[0]: row for row in result["rows"]}
    assert set(rows) == {"(a)", "(b)", "(c)", "(d)", "(e)"}
    assert rows["(b)"]["fallback"] == []
    assert rows["(b)"]["bytes_per_example"] == 4 * rows["(b)"]["dim"]
    assert rows["(d)"]["rows"] == 500 and rows["(d)"]["queries_per_s"] > 0
    if importlib.util.find_spec("dattri") is None:
        assert "dattri is not installed" in rows["(e)"]["skipped"]
    else:  # installed, the peer runs: its rows are timings, not an error
        assert rows["(e)"]["median_s"] > 0, rows["(e)"]
