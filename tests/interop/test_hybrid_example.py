import importlib
import pathlib
import sys

import numpy as np
import pytest

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_hybrid_example_trains_and_reaches_the_encoder(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    hybrid = importlib.import_module("hybrid_chmm")
    try:
        sizes = dict(height=3, width=3, colours=2, clones=2, length=12, batch=2)
        history, model, _ = hybrid.train(dict(sizes, steps=8), lr=0.05)
    finally:
        sys.modules.pop("hybrid_chmm", None)
    loss = np.asarray(history["loss"])
    assert np.all(np.isfinite(loss))
    assert loss[-1] < loss[0]
    # Gradients reached the torch encoder through the JAX HMM at every step.
    assert min(history["encoder_grad_norm"]) > 0
    assert model.chmm.logits.grad is not None
    assert model.chmm.logits.grad.abs().sum() > 0
