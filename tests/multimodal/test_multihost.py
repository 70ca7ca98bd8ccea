"""The LM trained by two processes that form one JAX runtime (`jax.distributed`,
two CPU devices each, collectives over gloo) against one process of four devices:
`examples/multihost_train.py` run as documented."""

import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_train_as_one_process_of_four_devices():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "multihost_train.py"), "--smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path),
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    # The example prints its summary as `  key: value` lines.
    summary = dict(
        line.strip().split(": ", 1)
        for line in done.stdout.splitlines()
        if line.startswith("  ") and ": " in line
    )
    assert summary["processes"] == "2" and summary["devices"] == "4", summary
    # Every step's loss, with data parallelism and with FSDP, as one process gives
    # it; float32 sums split over devices may differ in their last bits.
    assert float(summary["max_rel_diff_data_parallel"]) <= 1e-6, summary
    assert float(summary["max_rel_diff_fsdp"]) <= 1e-6, summary
