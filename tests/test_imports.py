import json
import subprocess
import sys

import pytest


# One process imports the packages step by step, as a user's would, and reports the
# modules loaded after each step: `transforms` alone, then `eqx_models`, then every
# module of both (a new subpackage is covered as soon as it exists; the optional
# torch adapters are the only modules allowed to need torch).
_IMPORTS = """
import importlib, json, pkgutil, sys

loaded = {}
import transforms
loaded["transforms"] = sorted(sys.modules)
import eqx_models
loaded["packages"] = sorted(sys.modules)
for pkg in (eqx_models, transforms):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if ".interop" in info.name:
            continue
        importlib.import_module(info.name)
loaded["every module"] = sorted(sys.modules)
print(json.dumps(loaded))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    """The modules loaded after each step of `_IMPORTS`, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    steps = json.loads(result.stdout.splitlines()[-1])
    return {step: set(modules) for step, modules in steps.items()}


def _top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_import_loads_no_torch(loaded):
    assert "torch" not in _top_level(loaded["packages"]), (
        "importing the library loaded torch"
    )


def test_transforms_does_not_import_eqx_models(loaded):
    bad = sorted(m for m in loaded["transforms"] if m.split(".")[0] == "eqx_models")
    assert not bad, bad


def test_every_module_imports_without_torch(loaded):
    assert "torch" not in _top_level(loaded["every module"])


def test_privacy_accounting_is_imported_on_first_use(loaded):
    # `dp-accounting` is the optional `dp` extra: no module imports it at import time.
    assert "dp_accounting" not in _top_level(loaded["every module"])


def test_version_is_set():
    import eqx_models

    assert isinstance(eqx_models.__version__, str) and eqx_models.__version__


@pytest.mark.parametrize("package", ["eqx_models", "transforms"])
def test_packages_are_typed(package):
    import importlib.resources

    assert importlib.resources.files(package).joinpath("py.typed").is_file()


FAMILIES = ("chmm", "tidhy", "causal", "multimodal")


def _imported_modules(path) -> set[str]:
    """The absolute module names a source file imports (relative ones resolved)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    path = pathlib.Path(path).resolve()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def test_families_do_not_import_each_other():
    # The architecture's arrow: a family builds on `transforms` (and the shared
    # layer ops), never on another family; only the interop adapters span them.
    import pathlib

    for family in FAMILIES:
        others = {f"eqx_models.{f}" for f in FAMILIES if f != family}
        root = pathlib.Path(__file__).resolve().parents[1]
        for path in (root / "eqx_models" / family).rglob("*.py"):
            bad = {
                m
                for m in _imported_modules(path)
                if any(m == o or m.startswith(o + ".") for o in others)
            }
            assert not bad, f"{path} imports another family: {sorted(bad)}"
