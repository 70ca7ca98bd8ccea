"""The suite's CPU compile settings (`tests/cpu_test_flags.py`)."""

import pytest

from . import cpu_test_flags as module


@pytest.mark.parametrize(
    "jaxlib, expected",
    [
        (
            (0, 10),
            "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false",
        ),
        # XLA 0.11 aborts on the emitter flag: it must not be added there.
        ((0, 11), "--xla_backend_optimization_level=1"),
    ],
)
def test_the_flags_follow_the_jaxlib_version(monkeypatch, jaxlib, expected):
    monkeypatch.setattr(module, "_jaxlib_version", lambda: jaxlib)
    assert module.cpu_test_flags({"JAX_PLATFORMS": "cpu"}) == expected


def test_the_callers_flags_are_kept_and_win(monkeypatch):
    monkeypatch.setattr(module, "_jaxlib_version", lambda: (0, 10))
    environ = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_dump_to=/tmp/x",
    }
    assert module.cpu_test_flags(environ) == (
        "--xla_backend_optimization_level=0 --xla_dump_to=/tmp/x "
        "--xla_cpu_use_fusion_emitters=false"
    )


def test_nothing_is_added_where_an_accelerator_runs(monkeypatch):
    monkeypatch.setattr(module, "_cpu_only", lambda environ: False)
    assert module.cpu_test_flags({"XLA_FLAGS": "--a=1"}) == "--a=1"
    assert module.cpu_test_flags({}) == ""


def test_the_installed_jaxlib_version_is_read():
    import jaxlib

    major, minor = module._jaxlib_version()
    assert jaxlib.__version__.startswith(f"{major}.{minor}.")
