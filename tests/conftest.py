import gc
import os

import jax
import jax.random as jr
import pytest
from hypothesis import settings

from .cpu_test_flags import cpu_test_flags
from .helpers import import_optional


# XLA reads its flags when the backend starts, before any test creates an array;
# subprocesses inherit them.
os.environ["XLA_FLAGS"] = cpu_test_flags()


# JAX compiles on the first example of each shape, so per-example deadlines would
# measure compilation; a fixed seed keeps CI reproducible.
settings.register_profile(
    "eqx_models", deadline=None, max_examples=20, derandomize=True
)
settings.load_profile("eqx_models")


@pytest.fixture
def getkey():
    """A function returning a fresh PRNG key each call, deterministic per test."""
    key = jr.key(0)

    def _getkey():
        nonlocal key
        key, subkey = jr.split(key)
        return subkey

    return _getkey


@pytest.fixture
def x64():
    """Run the test with 64-bit floats; the setting is restored afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def highest_precision():
    """Run float32 matrix products in full float32 for the test.

    On a GPU, JAX's default matmul precision for float32 is TF32 (inputs rounded to
    10 mantissa bits, relative error about 5e-4 per product); a CPU computes in full
    float32. Tests that compare float32 code with a float64 reference at float32
    tolerances claim exactness, so they state the precision they need; the default
    path is checked against TF32-derived bounds (e.g. `test_cross_entropy.py`'s
    `test_default_precision_within_tf32_bounds`).
    """
    with jax.default_matmul_precision("highest"):
        yield


def _memory_mappings() -> tuple[int, int] | None:
    """(mappings this process holds, the kernel's per-process limit), where Linux
    tells them."""
    try:
        with open("/proc/self/maps") as maps:
            held = sum(1 for _ in maps)
        with open("/proc/sys/vm/max_map_count") as limit:
            return held, int(limit.read())
    except (OSError, ValueError):
        return None


def pytest_runtest_teardown(item, nextitem):
    # XLA's CPU backend keeps the machine code of every program it compiles in
    # memory mappings of its own (a few per kernel), freed only with the executable,
    # and JAX's caches keep executables for the life of the process. A suite worker
    # that compiles for hundreds of tests passes Linux's limit on mappings per
    # process (vm.max_map_count, 65 530 by default), and the next compilation dies
    # inside XLA (an abort or a segfault, in whichever test compiles then). Emptying
    # the caches at half the limit frees them; tests only pay a recompilation.
    mappings = _memory_mappings()
    if mappings is not None and mappings[0] > mappings[1] // 2:
        jax.clear_caches()
        gc.collect()


def pytest_runtest_setup(item):
    # Tests that reach torch (or privacy accounting) only inside their body, through
    # an interop module or a documentation snippet, carry the marker; the
    # skip-or-fail rule is the one of module-level imports.
    if item.get_closest_marker("torch"):
        import_optional("torch")
    if item.get_closest_marker("dp"):
        import_optional("dp_accounting", extra="dp")


def pytest_runtest_logreport(report):
    # With EQX_MODELS_FAILURE_LOG set (benchmarks/suite_on_device.sh sets it), every
    # failure is appended to that file when it happens, from the worker that ran
    # it: a run cut short by a time limit still tells what failed and why.
    path = os.environ.get("EQX_MODELS_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
