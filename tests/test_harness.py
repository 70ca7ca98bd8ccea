"""`benchmarks/_harness.py`: how a run's rows are written and merged."""

import json

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
