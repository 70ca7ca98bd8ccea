"""Every method gives the same numbers on every model of the list (float64)."""

import warnings

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

from transforms import (
    clipped_grad_sum,
    grad_dot_products,
    make_attribution_step,
    make_dp_train_step,
    per_sample_grad_norms,
    projected_grads,
)

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


def _scans(jaxpr):
    """The `scan` equations of `jaxpr` and of every jaxpr inside its equations."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _scans(inner)


@pytest.mark.parametrize(
    "backend, unroll_layers, unrolled",
    [
        ("cpu", "auto", False),
        ("gpu", "auto", True),
        ("cpu", True, True),
        ("gpu", False, False),
    ],
)
def test_unroll_layers_sets_the_scan_over_a_stack_of_layers(
    backend, unroll_layers, unrolled, monkeypatch, x64
):
    """Every pass unrolls the scan over the model's stacked layers, the plain
    gradients a step takes beside its ghost pass included, where `unroll_layers`
    says so (`"auto"`: on a GPU or TPU); otherwise it keeps the loss's rolled scan.
    The results are the same either way."""
    from .test_dp_step import reference_clipped_sum

    model, loss, train, val = make_case("gpt_tied_scan")
    ref = Reference(model, loss, train, val)
    C = float(np.median(ref.norms()))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)

    mask = jax.numpy.ones(3, bool)
    optimizer = optax.sgd(0.0)
    switch = dict(unroll_layers=unroll_layers)
    attribution = make_attribution_step(
        loss, optimizer, method="ghost", donate=False, **switch
    )
    dp_step = make_dp_train_step(
        loss, optimizer, clip_norm=C, noise_multiplier=0.0, donate=False, **switch
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    passes = {
        "norms": lambda m, t, v: per_sample_grad_norms(loss, method="ghost", **switch)(
            m, t
        ),
        "dots": lambda m, t, v: grad_dot_products(loss, method="ghost", **switch)(
            m, t, v
        ),
        "matrix": lambda m, t, v: grad_dot_products(
            loss, method="ghost", full_matrix=True, **switch
        )(m, t, v),
        "clip": lambda m, t, v: clipped_grad_sum(
            loss, clip_norm=C, method="one_pass", **switch
        )(m, t, mask),
        "attribution": lambda m, t, v: attribution(m, opt_state, t, v)[3],
        "dp step": lambda m, t, v: dp_step(m, opt_state, t, jax.random.key(0))[2],
        "projection": lambda m, t, v: projected_grads(loss, k_out=2, k_in=2, **switch)(
            m, t
        ),
    }
    n_layers = 2
    # A forward and a backward scan per ghost pass, two more in the clip passes (their
    # derivative along the clip directions) and in the steps that take a plain
    # validation gradient beside their ghost pass (dot products, the attribution step).
    counts = dict(norms=2, dots=4, matrix=4, clip=4, attribution=4, projection=2)
    counts["dp step"] = 4
    for name, fn in passes.items():
        closed = eqx.filter_make_jaxpr(fn)(model, train, val)[0]
        scans = list(_scans(closed.jaxpr))
        assert all(e.params["length"] == n_layers for e in scans)
        unroll = [e.params["unroll"] for e in scans]
        expected = [n_layers if unrolled else 1] * counts[name]
        assert unroll == expected, (name, unroll)
    if unroll_layers != "auto":
        return  # the values of both settings are checked by the "auto" cases

    expected_sum, _ = reference_clipped_sum(model, loss, train, np.ones(3, bool), C)
    # The DP step and the projection share the clip and ghost passes checked here.
    checked = ("norms", "dots", "matrix", "clip", "attribution")

    def everything(model, train, val):
        return tuple(passes[name](model, train, val) for name in checked)

    norms, dots, matrix, (clipped, _, _), attributed = eqx.filter_jit(everything)(
        model, train, val
    )
    _close(norms, ref.norms())
    _close(dots, ref.dots())
    _close(matrix, ref.matrix())
    _close(attributed, ref.dots())
    got = jax.tree.leaves(eqx.filter(clipped, eqx.is_inexact_array))
    for g, want in zip(got, expected_sum):
        _close(g, want)
