"""`benchmarks/tidhy_pallas_tuning.py --quick` on a CPU (the kernels in Pallas'
interpreter, where every precision computes in full float32): one row per
combination, each agreeing with the XLA loop, and the module's defaults restored."""

import json

from eqx_models.tidhy import _fused

from .helpers import load_benchmark


def test_a_quick_run_writes_a_row_per_combination(tmp_path):
    bench = load_benchmark("tidhy_pallas_tuning")
    defaults = (_fused.BLOCK_WINDOWS, _fused._NUM_WARPS, _fused._PRECISION)
    bench.main(["--quick", "--results-dir", str(tmp_path)])
    assert (_fused.BLOCK_WINDOWS, _fused._NUM_WARPS, _fused._PRECISION) == defaults
    (path,) = tmp_path.glob("tidhy_pallas_tuning-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 2 * 4
    for row in rows:
        assert "error" not in row, row
        assert row["median_s"] > 0 and row["iterations"] > 0
    xla, highest, full, tf32 = rows[:4]  # the reference mode's, 200 iterations
    assert "max_abs_diff_from_xla" not in xla
    assert (full["block_windows"], full["num_warps"]) == (16, 4)
    # Against XLA's loop in full float32 (on a GPU XLA's default is TF32).
    assert full["max_abs_diff_from_xla_highest"] < 1e-4
    assert full["windows_n_iter_differs_from_xla_highest"] == 0
    assert tf32["precision"] == "TF32 (DEFAULT)"
