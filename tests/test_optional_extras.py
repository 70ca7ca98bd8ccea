"""Without torch, the README's commands still succeed: the tour skips the torch example
and says how to enable it, and the tests that need torch skip (or fail in CI)."""

import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent

# The path finder (site-packages) is told that torch is not there, as on a machine
# without it: `import torch` raises ModuleNotFoundError, `find_spec("torch")` is None.
# Not a `None` entry in `sys.modules` (jaxtyping's pretty-printer then reads
# `sys.modules["torch"].Tensor`), nor a finder of another class in `sys.meta_path`
# (jaxtyping's import hook looks for the `PathFinder` there). The working directory is
# the repository root, so this checkout is the one imported.
HIDE_TORCH = """\
import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec

def _find_spec_without_torch(cls, name, path=None, target=None):
    if name.partition(".")[0] == "torch":
        return None
    return _find_spec(name, path, target)

importlib.machinery.PathFinder.find_spec = classmethod(_find_spec_without_torch)
"""


def _run_without_torch(code: str, *args: str, require_optional: bool = False):
    # The failures of the inner run are expected ones: kept out of the outer run's
    # failure log (tests/conftest.py).
    inherited = ("EQX_MODELS_REQUIRE_OPTIONAL", "EQX_MODELS_FAILURE_LOG")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    if require_optional:
        env["EQX_MODELS_REQUIRE_OPTIONAL"] = "1"
    return subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _pytest_without_torch(*args: str, require_optional: bool):
    # In-process (`-n 0`), so that the tests run where torch is hidden.
    code = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"
    return _run_without_torch(
        code, "-n", "0", "-rs", *args, require_optional=require_optional
    )


def test_the_tour_lists_the_torch_example_as_skipped_with_its_install_command():
    result = _run_without_torch(
        "import runpy; runpy.run_path('examples/tour.py', run_name='__main__')",
        "--list",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = sorted(
        p.name
        for p in (ROOT / "examples").glob("*.py")
        if not p.name.startswith("_") and p.name != "tour.py"
    )
    status = {}
    for line in result.stdout.splitlines():
        for script in scripts:
            if f" {script} " in line:
                status[script] = line
    assert sorted(status) == scripts, result.stdout
    for script, line in status.items():
        if script == "hybrid_chmm.py":
            assert "SKIPPED" in line and 'pip install -e ".[torch]"' in line, line
        else:
            assert "would run" in line, line
    assert "== " not in result.stdout, "--list ran an example"


@pytest.mark.slow
def test_the_docs_api_checks_pass_without_torch():
    result = _pytest_without_torch("tests/test_docs.py", require_optional=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "needs the optional torch extra" in output, output
    assert " passed" in output, output


@pytest.mark.slow
def test_a_missing_torch_fails_the_docs_api_checks_in_ci():
    result = _pytest_without_torch(
        "tests/test_docs.py", "-k", "api_entries", require_optional=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "EQX_MODELS_REQUIRE_OPTIONAL=1" in output, output
    assert " passed" in output, output  # the entries that do not need torch
