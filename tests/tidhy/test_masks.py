"""Observation masks (missing entries drop their terms, empty windows are skipped)
and the original's per-window stopping rule (`batch_converge=False`), against the
float64 reference of `reference.py`, which drops the masked terms explicitly
(index sets, not multiplications by 0)."""

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy

from . import reference
from .helpers import random_temporal, small_model, step_inputs


def _observed(mask):
    """Per row (and step) the indices of the observed features."""
    mask = np.asarray(mask)
    if mask.ndim == 2:
        return [np.flatnonzero(row) for row in mask]
    return [[np.flatnonzero(step) for step in window] for window in mask]


def _with_nan(x, mask):
    return jnp.where(mask, x, jnp.nan)


def test_per_window_stopping_reproduces_the_reference_iteration_counts(x64, getkey):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    x, r_prev, r2_prev = step_inputs(getkey(), B=4)
    # Windows of different scales converge at different iterations, so the
    # batch-Frobenius and the per-window rules stop at different counts.
    x = x * jnp.array([0.1, 1.0, 3.0, 0.5])[:, None]
    p = reference.Params(model)
    args = (p, np.asarray(x), np.asarray(r_prev), np.asarray(r2_prev))
    counts = {}
    for batch_converge in (True, False):
        cfg = tidhy.InferenceConfig(
            lr_r=0.3,
            lr_r2=0.3,
            max_iter=400,
            tol=0.01,
            batch_mode="reference",
            batch_converge=batch_converge,
        )
        r, r2, stats = tidhy.infer(model, x, r_prev, r2_prev, cfg)
        ref_r, ref_r2, n = reference.infer(
            *args,
            lr_r=0.3,
            lr_r2=0.3,
            max_iter=400,
            tol=0.01,
            batch_converge=batch_converge,
        )
        assert 1 < n < cfg.max_iter, "the tolerance must be what stops the loop"
        np.testing.assert_array_equal(stats.n_iter, [n] * 4)
        assert bool(jnp.all(stats.converged))
        np.testing.assert_allclose(r, ref_r, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(r2, ref_r2, rtol=1e-7, atol=1e-9)
        counts[batch_converge] = n
    assert counts[True] != counts[False], counts


def test_batch_converge_changes_nothing_by_default_or_per_window(getkey):
    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=3)
    base = tidhy.InferenceConfig(max_iter=50)
    off = tidhy.InferenceConfig(max_iter=50, batch_converge=False)
    out_base = tidhy.infer(model, x, r_prev, r2_prev, base)
    out_off = tidhy.infer(model, x, r_prev, r2_prev, off)
    for a, b in zip(out_base[:2], out_off[:2]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out_base[2].n_iter, out_off[2].n_iter)


@pytest.mark.parametrize("mode", ["reference", "per_window"])
def test_masked_inference_equals_explicit_term_dropping(x64, getkey, mode):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    x, r_prev, r2_prev = step_inputs(getkey(), B=3)
    # Row 0 partly observed, row 1 fully missing (temporal prior only), row 2 full.
    mask = jnp.array([[True, False, True, False], [False] * 4, [True] * 4], dtype=bool)
    cfg = tidhy.InferenceConfig(
        lr_r=0.1, lr_r2=0.1, max_iter=300, tol=0.01, batch_mode=mode
    )
    r, r2, stats = tidhy.infer(
        model, _with_nan(x, mask), r_prev, r2_prev, cfg, mask=mask
    )
    p = reference.Params(model)
    kwargs = dict(lr_r=0.1, lr_r2=0.1, max_iter=300, tol=0.01)
    obs = _observed(mask)
    if mode == "reference":
        ref_r, ref_r2, n = reference.infer(
            p,
            np.asarray(x),
            np.asarray(r_prev),
            np.asarray(r2_prev),
            observed=obs,
            **kwargs,
        )
        np.testing.assert_array_equal(stats.n_iter, [n] * 3)
    else:
        rows = [
            reference.infer(
                p,
                np.asarray(x[b : b + 1]),
                np.asarray(r_prev[b : b + 1]),
                np.asarray(r2_prev[b : b + 1]),
                observed=[obs[b]],
                **kwargs,
            )
            for b in range(3)
        ]
        ref_r = np.concatenate([row[0] for row in rows])
        ref_r2 = np.concatenate([row[1] for row in rows])
        np.testing.assert_array_equal(stats.n_iter, [row[2] for row in rows])
    np.testing.assert_allclose(r, ref_r, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(r2, ref_r2, rtol=1e-7, atol=1e-9)
    # The fully missing row still moved: the temporal prior alone drives it.
    assert float(jnp.max(jnp.abs(r[1]))) > 0


def test_masked_first_step_equals_explicit_term_dropping(x64, getkey):
    model = small_model(getkey())
    x, _, _ = step_inputs(getkey(), B=2)
    mask = jnp.array([[True, True, False, True], [False, True, True, False]])
    cfg = tidhy.InferenceConfig(lr_r=0.05, max_iter=300, tol=1e-3)
    r, stats = tidhy.infer_first_step(model, _with_nan(x, mask), cfg, mask=mask)
    p = reference.Params(model)
    for b in range(2):
        ref, n = reference.infer_first_step(
            p,
            np.asarray(x[b : b + 1]),
            lr=0.05,
            max_iter=300,
            tol=1e-3,
            observed=[_observed(mask)[b]],
        )
        assert int(stats.n_iter[b]) == n
        np.testing.assert_allclose(r[b], ref[0], rtol=1e-9, atol=1e-11)


def _reference_record(model, X, mask, cfg):
    """evaluate_record's latents and losses from the per-step reference, window by
    window (per-window mode: each window alone is a batch of one)."""
    p = reference.Params(model)
    X = np.asarray(X)
    obs = _observed(mask)
    B, T, _ = X.shape
    kwargs = dict(lr_r=cfg.lr_r, lr_r2=cfg.lr_r2, max_iter=cfg.max_iter, tol=cfg.tol)
    R = np.zeros((B, T, model.r_dim))
    R2 = np.zeros((B, T, model.r2_dim))
    hat = np.zeros(B)
    for b in range(B):
        R[b, 0] = reference.infer_first_step(
            p,
            X[b, :1],
            lr=cfg.lr_r,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            observed=[obs[b][0]],
        )[0][0]
        for t in range(1, T):
            r, r2, _ = reference.infer(
                p,
                X[b, t : t + 1],
                R[b, t - 1 : t],
                R2[b, t - 1 : t],
                observed=[obs[b][t]],
                **kwargs,
            )
            R[b, t], R2[b, t] = r[0], r2[0]
        for t in range(T):
            idx = obs[b][t]
            e = p.W[idx] @ R[b, t] + p.c[idx] - X[b, t, idx]
            hat[b] += e @ e
    return R, R2, hat


def test_masked_evaluate_record_equals_explicit_term_dropping(x64, getkey):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    X = jr.normal(getkey(), (2, 5, 4))
    mask = jr.bernoulli(getkey(), 0.7, X.shape)
    mask = mask.at[0, 2].set(False)  # a whole frame missing
    cfg = tidhy.InferenceConfig(lr_r=0.1, lr_r2=0.1, max_iter=200, tol=0.01)
    record = tidhy.evaluate_record(model, _with_nan(X, mask), cfg, mask=mask)
    R, R2, hat = _reference_record(model, X, mask, cfg)
    np.testing.assert_allclose(record.r, R, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(record.r2, R2, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(record.loss_hat, hat.mean(), rtol=1e-7)
    assert float(jnp.max(jnp.abs(jnp.where(mask, 0, record.spatial_loss_hat)))) == 0
    # The reconstruction is given at missing entries too (the imputation).
    assert bool(jnp.all(jnp.isfinite(record.x_hat)))


def test_masked_task_losses_equal_explicit_term_dropping(x64, getkey):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    X = jr.normal(getkey(), (3, 4, 4))
    R = jr.normal(getkey(), (3, 4, 3))
    R2 = jr.normal(getkey(), (3, 4, 2))
    mask = jr.bernoulli(getkey(), 0.6, X.shape).at[1].set(False)
    losses = tidhy.task_losses_from_latents(model, _with_nan(X, mask), R, R2, mask)
    ref = reference.task_losses(
        reference.Params(model),
        np.asarray(X),
        np.asarray(R),
        np.asarray(R2),
        observed=_observed(mask),
    )
    np.testing.assert_allclose(losses, ref, rtol=1e-10)


def test_an_entirely_missing_window_is_skipped(getkey):
    model = small_model(getkey())
    X = jr.normal(getkey(), (3, 4, 4))
    mask = jnp.ones(X.shape, bool).at[1].set(False)
    cfg = tidhy.InferenceConfig(max_iter=50)
    record = tidhy.evaluate_record(model, X.at[1].set(jnp.nan), cfg, mask=mask)
    kept = tidhy.evaluate_record(model, X[jnp.array([0, 2])], cfg)
    np.testing.assert_allclose(record.loss_hat, kept.loss_hat, rtol=1e-6)
    np.testing.assert_allclose(record.loss_temp, kept.loss_temp, rtol=1e-6)
    np.testing.assert_allclose(
        record.r[jnp.array([0, 2])], kept.r, rtol=1e-6, atol=1e-7
    )
    assert float(jnp.max(jnp.abs(record.r[1]))) == 0
    assert int(jnp.max(record.n_iter[1])) == 0
    learner = tidhy.init_learner(
        model, X, inference=cfg, train=tidhy.TiDHyTrainConfig(grad_norm=False)
    )
    train = tidhy.TiDHyTrainConfig(grad_norm=False)
    loss, _ = tidhy.training_loss(
        learner, (X.at[1].set(jnp.nan), mask), inference=cfg, train=train
    )
    loss_kept, _ = tidhy.training_loss(
        learner, X[jnp.array([0, 2])], inference=cfg, train=train
    )
    np.testing.assert_allclose(loss, loss_kept, rtol=1e-6)


def test_a_full_mask_equals_no_mask(getkey):
    model = small_model(getkey())
    X = jr.normal(getkey(), (2, 4, 4))
    cfg = tidhy.InferenceConfig(max_iter=50)
    full = jnp.ones(X.shape, bool)
    a = tidhy.evaluate_record(model, X, cfg)
    b = tidhy.evaluate_record(model, X, cfg, mask=full)
    np.testing.assert_allclose(a.r, b.r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.loss_bar, b.loss_bar, rtol=1e-6)
    frames = tidhy.evaluate_record(model, X, cfg, mask=jnp.ones(X.shape[:2], bool))
    np.testing.assert_array_equal(frames.r, b.r)


def test_bad_masks_raise(getkey):
    model = small_model(getkey())
    X = jr.normal(getkey(), (2, 4, 4))
    with pytest.raises(
        ValueError, match="evaluate_record: `mask` must be a bool array of shape"
    ):
        tidhy.evaluate_record(model, X, mask=jnp.ones((2, 4, 3), bool))
    with pytest.raises(TypeError, match="`mask`"):
        tidhy.evaluate_record(model, X, mask=jnp.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="infer: `mask`"):
        tidhy.infer(
            model,
            X[:, 0],
            jnp.zeros((2, 3)),
            jnp.zeros((2, 2)),
            mask=jnp.ones((3, 4), bool),
        )
    with pytest.raises(ValueError, match="`X` must be all finite"):
        # NaN where the mask says observed
        tidhy.evaluate_record(
            model, X.at[0, 0, 0].set(jnp.nan), mask=jnp.ones(X.shape, bool)
        )
