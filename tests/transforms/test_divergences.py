import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from transforms import (
    entropy,
    kl_divergence,
    total_variation,
    uncertainty_weighted,
    UncertaintyWeighted,
)


def _random_log_probs(rng, shape, zeros=0):
    p = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    if zeros:
        p[..., :zeros] = 0.0
        p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.log(p)


def _np_entropy(log_p):
    p = np.exp(log_p)
    return -np.sum(np.where(p > 0, p * np.where(p > 0, log_p, 0), 0), -1)


def _np_kl(log_p, log_q):
    p = np.exp(log_p)
    safe = lambda x: np.where(p > 0, x, 0.0)
    return np.sum(np.where(p > 0, p * (safe(log_p) - safe(log_q)), 0.0), -1)


def test_entropy_matches_numpy(x64):
    rng = np.random.default_rng(0)
    log_p = _random_log_probs(rng, (4, 7), zeros=2)
    got = entropy(jnp.asarray(log_p))
    np.testing.assert_allclose(got, _np_entropy(log_p), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(entropy)(log_p), _np_entropy(log_p), rtol=1e-12)
    np.testing.assert_allclose(
        jax.vmap(entropy)(jnp.asarray(log_p)), _np_entropy(log_p), rtol=1e-12
    )
    # Uniform over n has entropy log n.
    np.testing.assert_allclose(entropy(jnp.full((5,), -np.log(5.0))), np.log(5.0))


def test_entropy_gradient_is_finite_and_correct(x64):
    rng = np.random.default_rng(1)
    log_p = _random_log_probs(rng, (6,), zeros=1)
    grad = jax.grad(lambda x: entropy(x))(jnp.asarray(log_p))
    p = np.exp(log_p)
    # dH/dlog p_i = -p_i (log p_i + 1), and 0 where p_i = 0.
    expected = np.where(p > 0, -p * (np.where(p > 0, log_p, 0) + 1), 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)


def test_entropy_axis():
    rng = np.random.default_rng(2)
    log_p = _random_log_probs(rng, (3, 5)).T
    np.testing.assert_allclose(
        entropy(jnp.asarray(log_p, jnp.float32), axis=0),
        _np_entropy(log_p.T),
        rtol=1e-5,
    )


def test_kl_matches_numpy_plain_jit_vmap(x64):
    rng = np.random.default_rng(3)
    log_p = _random_log_probs(rng, (5, 8), zeros=3)
    log_q = _random_log_probs(rng, (5, 8))
    expected = _np_kl(log_p, log_q)
    np.testing.assert_allclose(kl_divergence(log_p, log_q), expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(kl_divergence)(log_p, log_q), expected, rtol=1e-12
    )
    np.testing.assert_allclose(
        jax.vmap(kl_divergence)(jnp.asarray(log_p), jnp.asarray(log_q)),
        expected,
        rtol=1e-12,
    )


def test_kl_infinite_where_q_misses_mass():
    log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    log_q = jnp.log(jnp.array([1.0, 0.0, 0.0]))
    assert kl_divergence(log_p, log_q) == jnp.inf
    # ... but q = 0 where p = 0 is fine.
    assert jnp.isfinite(kl_divergence(log_q, log_p))


def test_kl_gradients(x64):
    rng = np.random.default_rng(4)
    log_p = jnp.asarray(_random_log_probs(rng, (6,), zeros=2))
    logits = jnp.asarray(rng.normal(size=6))
    # d KL(p || softmax(z)) / dz = softmax(z) - p.
    grad_z = jax.grad(lambda z: kl_divergence(log_p, jax.nn.log_softmax(z)))(logits)
    np.testing.assert_allclose(
        grad_z, jax.nn.softmax(logits) - jnp.exp(log_p), atol=1e-12
    )
    # The gradient with respect to log p is finite at p = 0 (the -inf entries).
    grad_p = jax.grad(lambda lp: kl_divergence(lp, jax.nn.log_softmax(logits)))(log_p)
    assert jnp.all(jnp.isfinite(grad_p))
    np.testing.assert_array_equal(grad_p[:2], 0.0)


def test_total_variation_matches_numpy(x64):
    rng = np.random.default_rng(5)
    log_p = _random_log_probs(rng, (4, 6), zeros=1)
    log_q = _random_log_probs(rng, (4, 6))
    expected = 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(-1)
    np.testing.assert_allclose(total_variation(log_p, log_q), expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.vmap(jax.jit(total_variation))(jnp.asarray(log_p), jnp.asarray(log_q)),
        expected,
        rtol=1e-12,
    )


def test_uncertainty_weighted_value_and_gradient(x64):
    rng = np.random.default_rng(6)
    log_p = _random_log_probs(rng, (3, 5), zeros=1)
    logits = jnp.asarray(rng.normal(size=(3, 5)))
    weighted = uncertainty_weighted(kl_divergence, 0.7)
    assert isinstance(weighted, UncertaintyWeighted)
    log_q = jax.nn.log_softmax(logits)
    weight = np.exp(-0.7 * _np_entropy(log_p))
    expected = weight * _np_kl(log_p, np.asarray(log_q))
    np.testing.assert_allclose(weighted(log_p, log_q), expected, rtol=1e-12)
    call = eqx.filter_jit(lambda w, a, b: w(a, b))
    np.testing.assert_allclose(call(weighted, log_p, log_q), expected, rtol=1e-12)
    grad = jax.grad(lambda z: jnp.sum(weighted(log_p, jax.nn.log_softmax(z))))(logits)
    np.testing.assert_allclose(
        grad, weight[:, None] * (jax.nn.softmax(logits) - np.exp(log_p)), atol=1e-12
    )
    # scale 0 is the plain divergence.
    plain = uncertainty_weighted(kl_divergence, 0.0)(log_p, log_q)
    np.testing.assert_allclose(plain, _np_kl(log_p, np.asarray(log_q)), rtol=1e-12)


def test_uncertainty_weighted_scale_is_a_leaf():
    # A changed scale reuses the compiled function (the scale is an array leaf).
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(w, a, b):
        return w(a, b)

    a = jnp.log(jnp.array([0.25, 0.75]))
    b = jnp.log(jnp.array([0.5, 0.5]))
    one = f(uncertainty_weighted(scale=1.0), a, b)
    two = f(uncertainty_weighted(scale=2.0), a, b)
    assert float(two) < float(one)


def test_errors():
    a = jnp.zeros((3,))
    with pytest.raises(ValueError, match="kl_divergence: `log_q` must be of the shape"):
        kl_divergence(a, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="total_variation: `axis` must be an axis"):
        total_variation(a, a, axis=1)
    with pytest.raises(ValueError, match="entropy: `axis` must be an axis"):
        entropy(jnp.zeros((2, 3)), axis=2)
    with pytest.raises(ValueError, match="`scale` must be a finite real number >= 0"):
        uncertainty_weighted(kl_divergence, -1.0)
    with pytest.raises(ValueError, match="`scale` must be a finite real number >= 0"):
        uncertainty_weighted(kl_divergence, float("nan"))
    # Unnormalised distributions would give a negative divergence.
    with pytest.raises(ValueError, match="`log_p` must be log-probabilities"):
        kl_divergence(jnp.log(jnp.array([1.0, 1.0])), jnp.log(jnp.array([0.5, 0.5])))
    with pytest.raises(ValueError, match="`log_q` must be log-probabilities"):
        total_variation(jnp.log(jnp.array([0.5, 0.5])), jnp.zeros(2))
    with pytest.raises(TypeError, match="divergence"):
        uncertainty_weighted(3.0)  # pyright: ignore[reportArgumentType]


def test_compiled_checks_name_the_argument_and_share_one_conditional():
    good = jnp.log(jnp.array([0.5, 0.5]))
    bad = jnp.log(jnp.array([1.0, 1.0]))
    compiled = jax.jit(kl_divergence)
    for log_p, log_q, arg in ((bad, good, "log_p"), (good, bad, "log_q")):
        with pytest.raises(Exception, match=f"`{arg}` must be log-probabilities"):
            jax.block_until_ready(compiled(log_p, log_q))
    # Each conditional is a device-to-host synchronisation on a GPU: the checks of
    # both arguments share one.
    for fn in (kl_divergence, total_variation):
        assert str(jax.make_jaxpr(fn)(good, good)).count("cond[") == 1


_probs = hnp.arrays(
    np.float64,
    st.integers(1, 6),
    elements=st.floats(0.0, 1.0, allow_nan=False),
)


@given(_probs, st.integers(0, 1000))
def test_properties(raw, seed):
    raw = raw + 1e-3
    rng = np.random.default_rng(seed)
    p = raw / raw.sum()
    q = rng.dirichlet(np.ones(p.shape[0]))
    log_p, log_q = (
        jnp.log(jnp.asarray(p, jnp.float32)),
        jnp.log(jnp.asarray(q, jnp.float32)),
    )
    kl = float(kl_divergence(log_p, log_q))
    tv = float(total_variation(log_p, log_q))
    assert kl >= -1e-6
    assert abs(float(kl_divergence(log_p, log_p))) < 1e-6
    assert -1e-6 <= tv <= 1 + 1e-6
    assert tv <= np.sqrt(max(kl, 0.0) / 2) + 1e-5  # Pinsker's inequality
    assert 0 <= float(entropy(log_p)) <= np.log(p.shape[0]) + 1e-5
