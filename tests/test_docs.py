import importlib
import inspect
import pathlib
import pkgutil
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"


def _public_packages():
    import eqx_models

    names = ["transforms"]
    for info in pkgutil.iter_modules(eqx_models.__path__):
        if info.ispkg and not info.name.startswith("_"):
            names.append(f"eqx_models.{info.name}")
    return names


def _documented() -> set[str]:
    found = set()
    for page in API.glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE))
    return found


@pytest.mark.parametrize("package", _public_packages())
def test_every_public_name_has_an_api_entry_and_a_docstring(package):
    module = importlib.import_module(package)
    public = [n for n in vars(module) if not n.startswith("_")]
    public = [n for n in public if not inspect.ismodule(getattr(module, n))]
    documented = _documented()
    missing = sorted(
        f"{package}.{n}" for n in public if f"{package}.{n}" not in documented
    )
    assert not missing, f"public names without a `:::` API entry: {missing}"
    undocumented = sorted(n for n in public if not inspect.getdoc(getattr(module, n)))
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_api_entries_name_existing_objects():
    for name in sorted(_documented()):
        module_name, _, attr = name.rpartition(".")
        module = importlib.import_module(module_name)
        assert hasattr(module, attr), f"docs/api names {name}, which does not exist"
