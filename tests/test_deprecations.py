"""Renamed public names still work for one release, warning with the new name."""

import importlib

import pytest


RENAMED = [
    ("eqx_models.tidhy", "fit", "train"),
    ("eqx_models.tidhy", "TrainConfig", "TiDHyTrainConfig"),
    ("eqx_models.multimodal", "TrainConfig", "MultimodalTrainConfig"),
    ("eqx_models.causal", "train_surrogate", "train"),
    ("eqx_models.causal", "surrogate_optimizer", "make_optimizer"),
]


@pytest.mark.parametrize("module_name, old, new", RENAMED)
def test_old_names_warn_and_are_the_new_objects(module_name, old, new):
    module = importlib.import_module(module_name)
    with pytest.warns(
        DeprecationWarning,
        match=rf"{module_name}\.{old} is deprecated .* use "
        rf"{module_name}\.{new}\.$",
    ):
        value = getattr(module, old)
    assert value is getattr(module, new)
    # Old names are not public names: not listed, not on the API pages.
    assert old not in dir(module) and old not in vars(module)


def test_from_import_of_an_old_name_warns():
    with pytest.warns(DeprecationWarning, match="use eqx_models.tidhy.train"):
        from eqx_models.tidhy import fit  # noqa: F401


def test_unknown_names_still_raise():
    import eqx_models.causal

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eqx_models.causal.nope  # pyright: ignore[reportAttributeAccessIssue]
