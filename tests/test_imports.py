import subprocess
import sys

import pytest


def _run(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_import_loads_no_torch():
    _run(
        "import sys, eqx_models, transforms\n"
        "assert 'torch' not in sys.modules, 'importing the library loaded torch'\n"
    )


def test_transforms_does_not_import_eqx_models():
    _run(
        "import sys, transforms\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'eqx_models']\n"
        "assert not bad, bad\n"
    )


def test_every_module_imports_without_torch():
    # Walks both packages so a new subpackage is covered as soon as it exists; the
    # optional torch adapters are the only modules allowed to need torch.
    _run(
        "import importlib, pkgutil, sys, eqx_models, transforms\n"
        "for pkg in (eqx_models, transforms):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if '.interop' in info.name:\n"
        "            continue\n"
        "        importlib.import_module(info.name)\n"
        "assert 'torch' not in sys.modules\n"
    )


def test_privacy_accounting_is_imported_on_first_use():
    # `dp-accounting` is the optional `dp` extra: no module imports it at import time.
    _run(
        "import importlib, pkgutil, sys, eqx_models, transforms\n"
        "for pkg in (eqx_models, transforms):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if '.interop' in info.name:\n"
        "            continue\n"
        "        importlib.import_module(info.name)\n"
        "assert 'dp_accounting' not in sys.modules\n"
    )


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
