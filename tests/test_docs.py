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
        if info.ispkg and not info.name.startswith("_") and info.name != "interop":
            names.append(f"eqx_models.{info.name}")
    # The optional torch adapters are public modules of their own.
    for module in ("transforms.interop.torch", "eqx_models.interop.torch"):
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if path.exists():
            names.append(module)
    return names


def _documented() -> set[str]:
    found = set()
    for page in API.glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE))
    return found


@pytest.mark.parametrize("package", _public_packages())
def test_every_public_name_has_an_api_entry_and_a_docstring(package):
    if ".interop." in package:
        pytest.importorskip("torch")  # CI installs torch and fails on any skip
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
