import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy

from . import reference
from .helpers import random_temporal, small_model


CFG = tidhy.InferenceConfig(
    lr_r=0.3, lr_r2=0.3, max_iter=40, tol=0.01, batch_mode="reference"
)


def test_record_matches_the_numpy_reference(x64, getkey):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.5)
    X = jr.normal(getkey(), (2, 4, 4))
    rec = tidhy.evaluate_record(model, X, CFG)
    p = reference.Params(model)
    Xn = np.asarray(X)
    r, n0 = reference.infer_first_step(
        p, Xn[:, 0], lr=CFG.lr_r, max_iter=CFG.max_iter, tol=CFG.tol
    )
    r2 = np.zeros((2, 2))
    R, R2, R_bar, n = [r], [r2], [np.zeros((2, 3))], [n0]
    for t in range(1, 4):
        # The prediction is made before x_t is seen, with the previous r2.
        R_bar.append(np.stack([reference.predict(p, r[b], r2[b]) for b in range(2)]))
        r, r2, k = reference.infer(
            p,
            Xn[:, t],
            r,
            r2,
            lr_r=CFG.lr_r,
            lr_r2=CFG.lr_r2,
            max_iter=CFG.max_iter,
            tol=CFG.tol,
        )
        R.append(r)
        R2.append(r2)
        n.append(k)
    R, R2, R_bar = (np.stack(a, axis=1) for a in (R, R2, R_bar))
    rtol = 1e-7  # tolerance-stopped inner loops (see test_inference)
    np.testing.assert_allclose(rec.r, R, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(rec.r2, R2, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(rec.r_bar, R_bar, rtol=rtol, atol=1e-9)
    np.testing.assert_array_equal(rec.n_iter, np.broadcast_to(n, (2, 4)))
    x_hat = R @ p.W.T + p.c
    x_bar = R_bar @ p.W.T + p.c
    np.testing.assert_allclose(rec.x_hat, x_hat, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(rec.x_bar, x_bar, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(rec.spatial_loss_hat, (x_hat - Xn) ** 2, rtol=1e-6)
    np.testing.assert_allclose(rec.spatial_loss_bar, (x_bar - Xn) ** 2, rtol=1e-6)
    temporal = (R - R_bar) ** 2
    temporal[:, 0] = 0
    np.testing.assert_allclose(rec.temporal_loss, temporal, rtol=1e-6, atol=1e-12)
    W = np.stack(
        [[reference.hyper_forward(p, R2[b, t])[0] for t in range(4)] for b in range(2)]
    )
    np.testing.assert_allclose(rec.w, W, rtol=1e-6, atol=1e-12)
    assert rec.gains is None
    assert float(rec.loss_hat) == pytest.approx(((x_hat - Xn) ** 2).sum() / 2, rel=1e-6)
    assert float(rec.loss_bar) == pytest.approx(((x_bar - Xn) ** 2).sum() / 2, rel=1e-6)
    assert float(rec.loss_temp) == pytest.approx(2.0 * temporal.sum() / 2, rel=1e-6)
    assert bool(jnp.all(rec.converged[:, 1:])) and bool(jnp.all(rec.finite))


def test_compiles_once_and_vmaps(getkey):
    model = small_model(getkey())
    X = jr.normal(getkey(), (3, 5, 4))
    counted = eqx.filter_jit(
        eqx.debug.assert_max_traces(tidhy.evaluate_record, max_traces=1)
    )
    a = counted(model, X, CFG)
    b = counted(model, 0.5 * X, CFG)
    assert a.x_hat.shape == (3, 5, 4) and a.w.shape == (3, 5, 4)
    assert not np.allclose(a.r, b.r)
    # Windows are independent in the per-window mode: a vmap over groups of
    # windows equals one call on all of them.
    per_window = tidhy.InferenceConfig(lr_r=0.1, lr_r2=0.1, max_iter=40)
    whole = tidhy.evaluate_record(model, X, per_window)
    grouped = jax.vmap(lambda x: tidhy.evaluate_record(model, x, per_window).r)(
        X.reshape(3, 1, 5, 4)
    )
    np.testing.assert_allclose(grouped.reshape(3, 5, 3), whole.r, rtol=1e-5, atol=1e-6)


def test_bad_records_raise(getkey):
    model = small_model(getkey())
    with pytest.raises(ValueError, match="evaluate_record: `X` must have feature"):
        tidhy.evaluate_record(model, jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="at least 2 time steps"):
        tidhy.evaluate_record(model, jnp.ones((2, 1, 4)))
    with pytest.raises(ValueError, match="evaluate_record: `X` must be all finite"):
        tidhy.evaluate_record(model, jnp.ones((2, 3, 4)).at[1, 2, 0].set(jnp.nan))
