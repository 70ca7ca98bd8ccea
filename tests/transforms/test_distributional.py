import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from transforms import hl_gauss, soft_cross_entropy, two_hot


CENTRES = np.array([-1.0, -0.2, 0.0, 0.7, 2.0])


def _two_hot_reference(x, centres):
    """From the definition: weights on the two bracketing centres, linear in x."""
    out = np.zeros(len(centres))
    x = min(max(x, centres[0]), centres[-1])
    for j in range(len(centres) - 1):
        lo, hi = centres[j], centres[j + 1]
        if lo <= x <= hi:
            out[:] = 0
            out[j] = (hi - x) / (hi - lo)
            out[j + 1] = (x - lo) / (hi - lo)
            break
    return out


def _hl_gauss_reference(x, edges, sigma):
    x = min(max(x, edges[0]), edges[-1])
    cdf = np.array(
        [0.5 * (1 + math.erf((e - x) / (sigma * math.sqrt(2)))) for e in edges]
    )
    mass = np.diff(cdf)
    return mass / (cdf[-1] - cdf[0])


def test_two_hot_matches_the_definition():
    xs = np.array([-3.0, -1.0, -0.5, 0.0, 0.35, 1.9, 2.0, 5.0])
    got = jax.jit(two_hot)(
        jnp.asarray(xs, jnp.float32), jnp.asarray(CENTRES, jnp.float32)
    )
    want = np.stack([_two_hot_reference(x, CENTRES) for x in xs])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Batched input, and the same under vmap.
    grid = jnp.asarray(xs.reshape(2, 4), jnp.float32)
    np.testing.assert_allclose(
        two_hot(grid, jnp.asarray(CENTRES, jnp.float32)),
        want.reshape(2, 4, 5),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jax.vmap(two_hot, in_axes=(0, None))(grid, jnp.asarray(CENTRES, jnp.float32)),
        want.reshape(2, 4, 5),
        atol=1e-6,
    )


@given(st.floats(-1.0, 2.0, allow_nan=False))
def test_two_hot_mean_is_the_value(x):
    centres = jnp.asarray(CENTRES, jnp.float32)
    probs = np.asarray(two_hot(jnp.asarray(x, jnp.float32), centres), np.float64)
    assert np.all(probs >= 0) and abs(probs.sum() - 1) < 1e-6
    assert abs(probs @ CENTRES - np.float32(x)) < 1e-5


def test_two_hot_repeated_centres_and_errors(x64):
    centres = jnp.array([0.0, 1.0, 1.0, 2.0])
    probs = two_hot(jnp.array([0.5, 1.0, 1.5]), centres)
    assert np.all(np.isfinite(np.asarray(probs)))
    np.testing.assert_allclose(np.asarray(probs) @ np.asarray(centres), [0.5, 1.0, 1.5])
    with pytest.raises(ValueError, match="at least 2 bins"):
        two_hot(jnp.array([0.5]), jnp.array([1.0]))


def test_hl_gauss_matches_the_definition(x64):
    edges = np.array([-1.0, -0.5, 0.2, 0.6, 1.5])
    xs = np.array([-1.2, -0.3, 0.4, 1.0])
    got = jax.jit(hl_gauss)(jnp.asarray(xs), jnp.asarray(edges), 0.3)
    want = np.stack([_hl_gauss_reference(x, edges, 0.3) for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    # Per-value sigma.
    sigmas = np.array([0.1, 0.2, 0.3, 0.4])
    got = hl_gauss(jnp.asarray(xs), jnp.asarray(edges), jnp.asarray(sigmas))
    want = np.stack(
        [_hl_gauss_reference(x, e, s) for x, e, s in zip(xs, [edges] * 4, sigmas)]
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2 entries"):
        hl_gauss(jnp.array([0.5]), jnp.array([1.0]), 0.1)


def test_hl_gauss_concentrates_for_small_sigma_and_clips():
    edges = jnp.linspace(0.0, 1.0, 11)
    probs = hl_gauss(jnp.array([0.55, 40.0, -jnp.inf]), edges, 1e-3)
    assert np.all(np.isfinite(np.asarray(probs)))
    assert np.argmax(probs, axis=1).tolist() == [5, 9, 0]
    assert float(probs[0, 5]) > 0.999


def test_soft_cross_entropy_matches_numpy_and_its_gradient():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5))
    targets = rng.dirichlet(np.ones(5), size=6)
    where = np.array([1, 1, 0, 1, 0, 1], bool)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    per = -(targets * log_p).sum(1)
    f = jax.jit(
        jax.value_and_grad(
            lambda z: soft_cross_entropy(
                z, jnp.asarray(targets, jnp.float32), where=jnp.asarray(where)
            )
        )
    )
    value, grad = f(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(value, per[where].mean(), rtol=1e-5)
    # d/dz (-t . log_softmax(z)) = softmax(z) - t (targets sum to 1), averaged.
    want = (np.exp(log_p) - targets) * where[:, None] / where.sum()
    np.testing.assert_allclose(grad, want, atol=1e-6)
    # A one-hot target is the ordinary cross-entropy.
    onehot = np.eye(5)[[1, 0, 3, 2, 4, 4]]
    got = soft_cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(onehot, jnp.float32)
    )
    np.testing.assert_allclose(
        got, -log_p[np.arange(6), [1, 0, 3, 2, 4, 4]].mean(), rtol=1e-5
    )
