"""Every method gives the same numbers on every model of the list (float64)."""

import warnings

import equinox as eqx
import jax
import numpy as np
import pytest

from transforms import grad_dot_products, per_sample_grad_norms

from ._ghost_models import CASES, make_case
from ._reference import Reference


def _close(got, expected, rtol=1e-10):
    expected = np.asarray(expected)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("case", CASES)
def test_every_method_is_exact(case, x64):
    model, loss, train, val = make_case(case)
    ref = Reference(model, loss, train, val)
    # The transformers are the slowest to compile: their full matrix and jvp products
    # are left to the smaller models (the rules involved are the same).
    small = not case.startswith("gpt")

    @eqx.filter_jit
    def everything(model, train, val):
        norms = per_sample_grad_norms(loss, method="ghost", per_leaf=True)
        dots = grad_dot_products(loss, method="ghost", per_leaf=True)
        out = [norms(model, train), dots(model, train, val)]
        if small:
            out.append(
                grad_dot_products(loss, method="ghost", full_matrix=True)(
                    model, train, val
                )
            )
            out.append(grad_dot_products(loss, method="jvp")(model, train, val))
        return out

    with warnings.catch_warnings():
        # Every leaf of these models is inside the layer rules: no fallback warning.
        warnings.simplefilter("error")
        (norms, leaf_norms), (dots, leaf_dots), *rest = everything(model, train, val)
    _close(norms, ref.norms())
    for got, expected in zip(jax.tree.leaves(leaf_norms), ref.leaf_sq_norms()):
        _close(np.asarray(got) ** 2, expected)
    _close(dots, ref.dots())
    for got, expected in zip(jax.tree.leaves(leaf_dots), ref.leaf_dots()):
        _close(got, expected, rtol=1e-9)
    if small:
        matrix, jvp = rest
        _close(matrix, ref.matrix())
        _close(jvp, ref.dots())


def test_vmap_methods_and_sum_reduction(x64):
    model, loss, train, val = make_case("mlp", n_val=3)
    ref = Reference(model, loss, train, val)

    @eqx.filter_jit
    def everything(model, train, val):
        out = {"norms": per_sample_grad_norms(loss, method="vmap")(model, train)}
        for method in ("vmap", "jvp", "ghost"):
            fn = grad_dot_products(loss, method=method, val_reduction="sum")
            out[method] = fn(model, train, val)
            out[method + "_per_leaf"] = grad_dot_products(
                loss, method=method, per_leaf=True
            )(model, train, val)[1]
            fn = grad_dot_products(loss, method=method, full_matrix=True)
            out[method + "_matrix"] = fn(model, train, val)
        return out

    out = everything(model, train, val)
    _close(out["norms"], ref.norms())
    for method in ("vmap", "jvp", "ghost"):
        _close(out[method], ref.dots("sum"))
        _close(out[method + "_matrix"], ref.matrix())
        for got, expected in zip(
            jax.tree.leaves(out[method + "_per_leaf"]), ref.leaf_dots()
        ):
            _close(got, expected)
