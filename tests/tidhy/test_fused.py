"""The inner loop as Pallas kernels (`InferenceConfig(implementation="pallas")`)
against the XLA loop: the same iterates, iteration counts and diagnostics in
float64 for every option the kernels implement, more windows than one block
(padding rows), training losses and gradients; the kernels lower to Triton; models
they do not implement are refused. The float64 NumPy equations check both loops in
test_inference.py."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy
from eqx_models.tidhy import _fused

from .helpers import random_temporal


def _model(key, **kwargs):
    # Sizes that pad differently in every dimension (D 20 -> 32, r 10 -> 16,
    # r2 5 -> 16, M 15 -> 16, H 50 -> 64).
    return random_temporal(tidhy.TiDHy(20, key=key, **kwargs), key, scale=0.3)


def _inputs(key, B, loss="mse", missing=False):
    kx, kr, kq, km = jr.split(key, 4)
    x = jr.normal(kx, (B, 20))
    if loss == "poisson":
        x = jnp.round(jnp.exp(x))
    elif loss == "bce":
        x = (x > 0).astype(x.dtype)
    mask = present = None
    if missing:
        mask = jr.uniform(km, (B, 20)) > 0.2
        x = jnp.where(mask, x, 0)
        present = jnp.arange(B) % 7 != 3  # a few windows with nothing observed
    return x, 0.5 * jr.normal(kr, (B, 10)), 0.3 * jr.normal(kq, (B, 5)), mask, present


CASES = {
    "per-window": ("per_window", "mse", False, {}, "tol"),
    "per-window, Poisson, masks, L1 and thresholds": (
        "per_window",
        "poisson",
        True,
        dict(l1_r=0.01, l1_r2=0.02, l1_w=0.01, lmda_r=1e-3, lmda_r2=1e-3),
        "tol",
    ),
    "per-window, fixed iterations": (
        "per_window",
        "mse",
        False,
        dict(tol=0.0, max_iter=30),
        "cap",
    ),
    # The reference mode's step is `lr / B` per window: 2 / 40 = 0.05.
    "reference": ("reference", "mse", False, dict(lr_r=2.0, lr_r2=2.0), "tol"),
    "reference, per-window test": (
        "reference",
        "mse",
        False,
        dict(lr_r=2.0, lr_r2=2.0, batch_converge=False),
        "tol",
    ),
    "reference, BCE, masks, no momentum, no halving": (
        "reference",
        "bce",
        True,
        dict(
            lr_r=2.0,
            lr_r2=2.0,
            l1_r=0.01,
            l1_w=0.01,
            momentum=0.0,
            halve_lr_r=False,
            max_iter=300,
        ),
        "cap",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_loop_equals_the_xla_loop(x64, getkey, case):
    mode, loss, missing, options, stops = CASES[case]
    model = _model(getkey(), loss_type=loss)
    # 40 windows: two blocks of 32, the second one mostly padding.
    x, r_prev, r2_prev, mask, present = _inputs(getkey(), 40, loss, missing)
    xla = tidhy.InferenceConfig(batch_mode=mode, **options)
    pallas = dataclasses.replace(xla, implementation="pallas")
    run = jax.jit(tidhy._inference.infer_impl, static_argnums=4)
    r, r2, stats = run(model, x, r_prev, r2_prev, xla, mask, present)
    r_p, r2_p, stats_p = run(model, x, r_prev, r2_prev, pallas, mask, present)
    # Each case stops its loops one way: on the tolerance (at different iterations
    # per window in the per-window mode) or at the cap.
    if stops == "tol":
        assert bool(jnp.all(stats.converged))
        assert mode == "reference" or len(set(np.asarray(stats.n_iter).tolist())) > 1
    else:
        np.testing.assert_array_equal(stats.n_iter, xla.max_iter)
    np.testing.assert_array_equal(stats_p.n_iter, stats.n_iter)
    np.testing.assert_array_equal(stats_p.converged, stats.converged)
    np.testing.assert_array_equal(stats_p.finite, stats.finite)
    # The gradient differs from `jax.grad`'s in the order of its sums only.
    np.testing.assert_allclose(r_p, r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r2_p, r2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats_p.rel_change, stats.rel_change, rtol=1e-9)
    np.testing.assert_allclose(stats_p.energy, stats.energy, rtol=1e-10)
    if missing:
        # A window with nothing observed is skipped: its `r` stays at 0.
        np.testing.assert_array_equal(np.asarray(r_p)[~np.asarray(present)], 0)


def test_training_loss_and_gradients_equal_the_xla_loop(x64, getkey):
    model = _model(getkey())
    windows = jr.normal(getkey(), (5, 6, 20))
    learner = tidhy.Learner(model, None)
    train = tidhy.TiDHyTrainConfig(grad_norm=False)

    def loss_and_grad(implementation):
        inference = tidhy.InferenceConfig(max_iter=200, implementation=implementation)

        def loss(learner):
            return tidhy.training_loss(
                learner, windows, inference=inference, train=train
            )

        return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(learner)

    (value, metrics), grads = loss_and_grad("xla")
    (value_p, metrics_p), grads_p = loss_and_grad("pallas")
    assert 1 < float(metrics["inference_iters_mean"]) < 200
    assert float(metrics_p["inference_iters_mean"]) == float(
        metrics["inference_iters_mean"]
    )
    np.testing.assert_allclose(value_p, value, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["per_window", "reference"])
def test_the_kernels_lower_to_triton(monkeypatch, getkey, mode, dtype):
    # Lowering for CUDA needs no GPU: it checks what Triton accepts (block shapes,
    # operations), which Pallas' interpreter does not.
    with jax.enable_x64(dtype == "float64"):
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        model = _model(getkey(), loss_type="poisson")
        x, r_prev, r2_prev, mask, present = _inputs(getkey(), 40, "poisson", True)
        config = tidhy.InferenceConfig(
            batch_mode=mode,
            implementation="pallas",
            check_every=3,
            l1_r=0.01,
            l1_r2=0.01,
            l1_w=0.01,
            lmda_r=1e-3,
            lmda_r2=1e-3,
        )
        lowered = (
            jax.jit(tidhy._inference.infer_impl, static_argnums=4)
            .trace(model, x, r_prev, r2_prev, config, mask, present)
            .lower(lowering_platforms=("cuda",))
        )
    calls = lowered.as_text().count("__gpu$xla.gpu.triton")
    # Per window: one launch runs the loops; reference: two launches per
    # iteration, three iterations per test.
    assert calls == (1 if mode == "per_window" else 6)


@pytest.mark.parametrize(
    "option, phrase",
    [
        ("nonlinear_decoder", "a nonlinear decoder"),
        ("dyn_bias", "the gated dynamics bias"),
    ],
)
def test_models_the_kernels_do_not_implement_are_refused(getkey, option, phrase):
    model = tidhy.TiDHy(6, key=getkey(), **{option: True})
    x = jnp.zeros((2, 6))
    config = tidhy.InferenceConfig(implementation="pallas")
    with pytest.raises(
        ValueError, match=f"`implementation` must be 'xla' for a model with {phrase}"
    ):
        tidhy.infer(model, x, jnp.zeros((2, 10)), jnp.zeros((2, 5)), config)
    assert _fused.unsupported_reason(model) is not None


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="`implementation`.*'triton'"):
        tidhy.InferenceConfig(implementation="triton")
