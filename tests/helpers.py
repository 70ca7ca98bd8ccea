import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import types
from unittest import mock

import equinox as eqx
import jax
import numpy as np
import pytest

from .cpu_test_flags import cpu_test_flags


ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
EXAMPLES = ROOT / "examples"


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Whether two pytrees have the same structure and allclose array leaves."""
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def assert_tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    """Like `tree_allclose`, but names the first differing leaf and by how much."""
    x_leaves, x_def = jax.tree_util.tree_flatten_with_path(x)
    y_leaves, y_def = jax.tree_util.tree_flatten_with_path(y)
    assert x_def == y_def, f"tree structures differ:\n{x_def}\n{y_def}"
    for (path, a), (_, b) in zip(x_leaves, y_leaves):
        if eqx.is_array_like(a) and eqx.is_array_like(b):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, f"{jax.tree_util.keystr(path)}: shapes differ"
            np.testing.assert_allclose(
                a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
            )
        else:
            assert a == b, f"{jax.tree_util.keystr(path)}: {a!r} != {b!r}"


def import_optional(name: str, extra: str | None = None) -> types.ModuleType:
    """Import an optional dependency (an extra of `pyproject.toml`) for a test.

    Without it the test is skipped, or the whole module when called at module level.
    CI installs every extra and sets `EQX_MODELS_REQUIRE_OPTIONAL=1`, where a missing
    dependency fails instead, so that a broken install never passes as a skip. Every
    test that needs an extra goes through here (directly or through a marker that
    `conftest.py` maps to it), so the two behaviours cannot drift apart.

    **Arguments:**

    - `name`: the module to import.
    - `extra`: the extra that installs it, when its name differs from the module's
        (`import_optional("dp_accounting", extra="dp")`).

    **Returns:**

    The imported module.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        error = e
    # Out of the `except` block, so the report is one message, not a chained traceback.
    if os.environ.get("EQX_MODELS_REQUIRE_OPTIONAL") == "1":
        pytest.fail(
            f"this test needs {name} ({error}), and EQX_MODELS_REQUIRE_OPTIONAL=1",
            pytrace=False,
        )
    extra = extra or name
    pytest.skip(
        f'needs the optional {extra} extra (pip install -e ".[{extra}]")',
        allow_module_level=True,
    )


def _load_script(folder: pathlib.Path, name: str) -> types.ModuleType:
    """Import the script `<folder>/<name>.py` as a module.

    The scripts import their siblings from their own folder and may set
    variables in their own process's environment: the folder is on `sys.path`,
    and the environment as the script leaves it, only while the module loads.
    """
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ), mock.patch.object(sys, "path", list(sys.path)):
        sys.path.insert(0, str(folder))
        spec.loader.exec_module(module)
    return module


def load_benchmark(name: str) -> types.ModuleType:
    """Import the script `benchmarks/<name>.py` as a module, for a test to call into
    (its siblings such as `_harness` import; XLA's allocator variables it sets stay
    out of this process)."""
    return _load_script(BENCHMARKS, name)


def load_example(name: str) -> types.ModuleType:
    """Import the module `examples/<name>.py` (e.g. `_processes`) for a test."""
    return _load_script(EXAMPLES, name)


def run_script(
    script: str, *args: str, devices: int | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run `script` (Python source) in a fresh process on the CPU and require it to
    succeed and to print `OK` last; returns the finished process.

    A fresh process because JAX fixes its devices at start-up: `devices` fake CPU
    devices (XLA's host device count), also on a machine with a GPU, which JAX would
    pick first. The repository is on the path; XLA's other flags are kept, and the
    suite's CPU compile settings added (`cpu_test_flags`).
    """
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    flags = [cpu_test_flags(env)]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK"), done.stdout[-3000:]
    return done
