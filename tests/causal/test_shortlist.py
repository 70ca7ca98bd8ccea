import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.causal import (
    exact_parent_posterior,
    ParentSetPredictionModel,
    shortlist_parent_posterior,
)
from tests.causal._reference import brute_force_posterior, make_data


def test_full_shortlist_is_the_exact_posterior(linear_data, x64):
    data = linear_data(n=40, d=5)
    full = exact_parent_posterior(data, 2)
    short = shortlist_parent_posterior(data, 2, shortlist_size=4)
    np.testing.assert_allclose(short.log_probs, full.log_probs, rtol=1e-10)
    np.testing.assert_allclose(short.edge_probs, full.edge_probs, atol=1e-12)
    np.testing.assert_array_equal(short.shortlist, [0, 1, 2, 4])


def test_shortlist_posterior_against_brute_force(x64):
    # Target 6 with parents {1, 4}; the shortlist of 3 must hold them, and the
    # posterior is the brute-force one on the sub-data of the shortlist.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    x[:, 6] = 1.5 * x[:, 1] - 1.2 * x[:, 4] + 0.5 * rng.normal(size=60)
    data = make_data(x, 6)
    short = shortlist_parent_posterior(data, 2, shortlist_size=3)
    listed = np.asarray(short.shortlist).tolist()
    assert {1, 4} <= set(listed)
    # Independent screening: |correlation| ranks the singletons like their
    # Bayes factors (monotone in R²).
    corr = np.abs(np.corrcoef(x.T)[6])
    corr[6] = -1
    assert set(np.argsort(-corr)[:3].tolist()) == set(listed)
    keep = sorted(listed + [6])
    _, log_post, marginals, _ = brute_force_posterior(np.asarray(data)[:, keep], 2)
    np.testing.assert_allclose(short.log_probs, log_post, rtol=1e-8, atol=1e-10)
    expected = np.zeros(8)
    expected[keep] = marginals
    np.testing.assert_allclose(short.edge_probs, expected, atol=1e-10)


def test_polynomial_screening_keeps_an_even_parent(x64):
    # Target 6 = x1² + x4 + noise among 10 variables: x1 has no linear
    # correlation with the target, so linear screening drops it; cubic screening
    # keeps it, and the posterior on the shortlist is the brute-force cubic one.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 10))
    x[:, 6] = x[:, 1] ** 2 + 0.8 * x[:, 4] + 0.3 * rng.normal(size=200)
    data = make_data(x, 6)
    linear = shortlist_parent_posterior(data, 2, shortlist_size=3)
    cubic = shortlist_parent_posterior(data, 2, shortlist_size=3, degree=3)
    assert 1 not in np.asarray(linear.shortlist).tolist()
    listed = np.asarray(cubic.shortlist).tolist()
    assert {1, 4} <= set(listed)
    keep = sorted(listed + [6])
    _, log_post, _, _ = brute_force_posterior(np.asarray(data)[:, keep], 2, 3)
    np.testing.assert_allclose(cubic.log_probs, log_post, rtol=1e-8, atol=1e-10)
    assert float(cubic.edge_probs[1]) > 0.999


def test_beyond_the_enumeration_cap_and_the_trained_range():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 100)).astype(np.float32)
    data = make_data(x, 0)
    with pytest.raises(ValueError, match="`shortlist_size`.*MAX_CANDIDATE_SETS"):
        shortlist_parent_posterior(data, 3, shortlist_size=None)
    small = make_data(x[:, :6], 0)
    model = ParentSetPredictionModel(2, width=4, n_layers=1, n_heads=2, key=jr.key(0))
    with pytest.raises(ValueError, match="`shortlist_size`.*trained range"):
        shortlist_parent_posterior(
            small, 2, shortlist_size=None, model=model, max_model_vars=5
        )
    with pytest.raises(ValueError, match="`shortlist_size`"):
        shortlist_parent_posterior(small, 2, shortlist_size=6)
    with pytest.raises(ValueError, match="`max_parents`"):
        shortlist_parent_posterior(small, 3, model=model, shortlist_size=3)
    out = shortlist_parent_posterior(
        data, 2, shortlist_size=4, model=model, max_model_vars=5
    )
    assert out.log_probs.shape == (11,)
    np.testing.assert_allclose(jnp.exp(out.log_probs).sum(), 1.0, rtol=1e-5)
    assert out.edge_probs.shape == (100,)
