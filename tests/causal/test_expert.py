import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqx_models.causal import (
    candidate_variables,
    edge_marginals,
    exact_parent_posterior,
    MAX_CANDIDATE_SETS,
)
from tests.causal._reference import (
    brute_force_posterior,
    make_data,
    nig_log_marginal,
    r_squared,
)


def _sets_of(target, d, k):
    return [
        tuple(int(v) for v in row if v >= 0)
        for row in candidate_variables(target, d, k)
    ]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_matches_brute_force(linear_data, k, x64):
    data = linear_data(n=40, d=5)
    sets, log_post, marginals, n = brute_force_posterior(data, k)
    posterior = exact_parent_posterior(data, k)
    assert _sets_of(3, 5, k) == sets  # the canonical order of the table
    np.testing.assert_allclose(posterior.log_probs, log_post, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(posterior.edge_probs, marginals, atol=1e-10)
    assert int(posterior.n_rows) == n == 32
    assert int(posterior.target) == 3
    assert not bool(posterior.degenerate)


def _quadratic_data(n, seed=0):
    """Target 3 = x0² - sin(2·x2) + noise: x0's effect is even, so its linear
    correlation with the target is about 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    x[:, 1] += 0.8 * x[:, 0]
    x[:, 3] = x[:, 0] ** 2 - np.sin(2 * x[:, 2]) + 0.3 * rng.normal(size=n)
    x[:, 4] += 0.5 * x[:, 3]
    return make_data(x, 3)


@pytest.mark.parametrize("degree, k", [(2, 1), (2, 2), (3, 2), (4, 3)])
def test_polynomial_degree_matches_brute_force(degree, k, x64):
    data = _quadratic_data(60)
    sets, log_post, marginals, n = brute_force_posterior(data, k, degree)
    posterior = exact_parent_posterior(data, k, degree=degree)
    assert _sets_of(3, 5, k) == sets
    np.testing.assert_allclose(posterior.log_probs, log_post, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(posterior.edge_probs, marginals, atol=1e-9)
    assert not bool(posterior.degenerate)


def test_polynomial_degree_finds_an_even_effect_the_linear_model_misses(x64):
    data = _quadratic_data(300)
    linear = exact_parent_posterior(data, 2)
    cubic = exact_parent_posterior(data, 2, degree=3)
    assert float(linear.edge_probs[0]) < 0.5
    assert float(cubic.edge_probs[0]) > 0.999
    assert float(cubic.edge_probs[2]) > 0.999
    assert float(cubic.edge_probs[1]) < 0.05  # x1 only through x0


def test_polynomial_degree_needs_rows_and_distinct_values(x64):
    data = _quadratic_data(60)
    with pytest.raises(ValueError, match=r"need N >= degree·K \+ 2 = 11\)"):
        exact_parent_posterior(data[:10], 3, degree=3)
    binary = data.at[:, 1, 0].set(jnp.where(data[:, 1, 0] > 0, 1.0, -1.0))
    # Two values: He_2 of a ±1 variable is constant; linear is fine.
    assert not bool(exact_parent_posterior(binary, 2).degenerate)
    flagged = exact_parent_posterior(binary, 2, degree=2, on_degenerate="flag")
    assert bool(flagged.degenerate)
    with pytest.raises(ValueError, match="constant variable or basis column"):
        exact_parent_posterior(binary, 2, degree=2)


def test_closed_form_equals_nig_marginal_likelihood(linear_data, x64):
    data = np.asarray(linear_data(n=30, d=5))
    rows = data[:, 3, 1] == 0
    X, y = data[rows, :, 0], data[rows, 3, 0]
    n = len(y)
    posterior = exact_parent_posterior(jnp.asarray(data), 2)
    sets = _sets_of(3, 5, 2)
    base = nig_log_marginal(X, y, (), float(n))
    for S, log_bf in zip(sets, np.asarray(posterior.log_bayes_factors)):
        expected = nig_log_marginal(X, y, S, float(n)) - base
        np.testing.assert_allclose(log_bf, expected, rtol=1e-8, atol=1e-8)


def test_posterior_finds_the_true_parents_with_enough_data(linear_data, x64):
    posterior = exact_parent_posterior(linear_data(n=400, d=4), 3)
    best = _sets_of(3, 4, 3)[int(jnp.argmax(posterior.log_probs))]
    assert {0, 2} <= set(best)
    assert float(posterior.edge_probs[0]) > 0.999
    assert float(posterior.edge_probs[2]) > 0.999


def test_invariant_to_affine_rescaling(linear_data, x64):
    data = linear_data(n=40, d=5)
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.1, 10.0, size=5) * rng.choice([-1, 1], size=5)
    shift = rng.normal(size=5) * 100
    rescaled = data.at[..., 0].set(data[..., 0] * scale + shift)
    a = exact_parent_posterior(data, 3)
    b = exact_parent_posterior(rescaled, 3)
    np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-8)


def test_invariant_to_values_of_rows_with_target_intervened(linear_data):
    data = linear_data(n=40, d=5, dtype=np.float32)
    hit = np.asarray(data[:, 3, 1] == 1)
    assert hit.any()
    noise = np.random.default_rng(2).normal(size=(40, 5)).astype(np.float32) * 1e3
    changed = data.at[..., 0].set(jnp.where(hit[:, None], noise, data[..., 0]))
    a = exact_parent_posterior(data, 3)
    b = exact_parent_posterior(changed, 3)
    np.testing.assert_array_equal(a.log_probs, b.log_probs)


def test_float32_close_to_float64(linear_data):
    data = linear_data(n=200, d=5, dtype=np.float32)
    with jax.enable_x64(True):
        exact = np.asarray(
            exact_parent_posterior(jnp.asarray(data, jnp.float64), 3).log_probs
        )
    approx = np.asarray(exact_parent_posterior(data, 3).log_probs)
    p = np.exp(exact)
    assert np.sum(p * (exact - approx)) < 1e-3  # KL in nats


def test_masks_give_the_unpadded_posterior(linear_data, x64):
    data = linear_data(n=30, d=4)
    small = exact_parent_posterior(data, 2)
    # Pad two rows (garbage values) and two variables.
    padded = jnp.concatenate([data, jnp.full((2, 4, 3), 7.0)], axis=0)
    padded = jnp.concatenate(
        [
            padded,
            jnp.zeros((32, 2, 3))
            .at[..., 0]
            .set(np.random.default_rng(3).normal(size=(32, 2))),
        ],
        axis=1,
    )
    sample_mask = jnp.arange(32) < 30
    variable_mask = jnp.arange(6) < 4
    big = exact_parent_posterior(
        padded, 2, sample_mask=sample_mask, variable_mask=variable_mask
    )
    small_sets = dict(zip(_sets_of(3, 4, 2), np.asarray(small.log_probs)))
    for S, lp in zip(_sets_of(3, 6, 2), np.asarray(big.log_probs)):
        if any(i >= 4 for i in S):
            assert lp == -np.inf
        else:
            np.testing.assert_allclose(lp, small_sets[S], atol=1e-10)
    np.testing.assert_allclose(big.edge_probs[:4], small.edge_probs, atol=1e-10)
    np.testing.assert_array_equal(big.edge_probs[4:], 0.0)


def test_jit_vmap_grad_and_single_trace(linear_data, x64):
    data = jnp.stack([linear_data(n=30, d=4, seed=s) for s in range(3)])
    eager = [exact_parent_posterior(x, 2).log_probs for x in data]

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def batched(data):
        return jax.vmap(lambda x: exact_parent_posterior(x, 2).log_probs)(data)

    np.testing.assert_allclose(batched(data), jnp.stack(eager), atol=1e-12)
    batched(data.at[..., 0].add(1.0))  # same shape: no retrace
    # Gradient of a log-probability with respect to the data, against central
    # differences.
    f = lambda v: exact_parent_posterior(data[0].at[..., 0].set(v), 2).log_probs[4]
    v = data[0, :, :, 0]
    grad = jax.grad(f)(v)
    direction = jnp.asarray(np.random.default_rng(4).normal(size=v.shape))
    h = 1e-6
    fd = (f(v + h * direction) - f(v - h * direction)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=1e-5)


def test_edge_marginals_helper(linear_data, x64):
    data = linear_data(n=40, d=5)
    posterior = exact_parent_posterior(data, 2)
    np.testing.assert_allclose(
        edge_marginals(posterior.log_probs, 3, 5, 2), posterior.edge_probs, atol=1e-12
    )
    with pytest.raises(
        ValueError, match=r"edge_marginals: `log_probs` must have shape \(11,\)"
    ):
        edge_marginals(posterior.log_probs[:5], 3, 5, 2)


def test_degenerate_cases_are_flagged(linear_data, x64):
    data = linear_data(n=30, d=4)
    constant = data.at[:, 1, 0].set(2.5)
    duplicate = data.at[:, 1, 0].set(data[:, 0, 0] * 2.0 + 1.0)
    # Only 2 rows without an intervention on the target: too few for sets of size 2.
    few = data.at[2:, 3, 1].set(1.0)
    good = exact_parent_posterior(data, 2, on_degenerate="flag")
    assert not bool(good.degenerate)
    for bad in (constant, duplicate, few):
        flagged = exact_parent_posterior(bad, 2, on_degenerate="flag")
        assert bool(flagged.degenerate)
        assert bool(jnp.all(jnp.isnan(flagged.log_probs)))
        # Concrete data: a plain `ValueError`; traced: the compiled check.
        with pytest.raises(ValueError, match="the posterior is degenerate"):
            exact_parent_posterior(bad, 2)
        with pytest.raises(eqx.EquinoxRuntimeError, match="posterior is degenerate"):
            jax.block_until_ready(
                eqx.filter_jit(lambda x: exact_parent_posterior(x, 2).log_probs)(bad)
            )


def test_bad_input_errors(linear_data):
    data = linear_data(n=12, d=4, dtype=np.float32)
    name = "exact_parent_posterior"
    # A wrong shape is caught by the signature's jaxtyping annotation first.
    with pytest.raises(TypeCheckError, match="data"):
        exact_parent_posterior(data[..., :2], 2)
    with pytest.raises(ValueError, match=rf"{name}: `data` has N = 4 rows, too few"):
        exact_parent_posterior(data[:4], 3)
    wide = make_data(np.zeros((5, 60), np.float32), 0)
    count = sum(math.comb(59, k) for k in range(5))
    with pytest.raises(
        ValueError,
        match=rf"{name}: \(d, K\) = \(60, 4\) has {count} candidate parent sets, "
        "beyond the enumeration limit of 100000",
    ):
        exact_parent_posterior(wide, 4)
    assert MAX_CANDIDATE_SETS == 100_000
    with pytest.raises(ValueError, match="`on_degenerate` must be"):
        exact_parent_posterior(data, 2, on_degenerate="ignore")
    runtime = [
        (data.at[0, 1, 0].set(jnp.nan), "non-finite values"),
        (data.at[0, 1, 1].set(0.5), "must be 0 or 1"),
        (data.at[0, :, 2].set(0.0), "exactly one variable in every row"),
        (data.at[0, 0, 2].set(1.0), "exactly one variable in every row"),
        (
            data.at[0, 3, 2].set(0.0).at[0, 0, 2].set(1.0),
            "the same variable in every row",
        ),
    ]
    for bad, message in runtime:
        # Concrete data are checked at once: the library's plain `ValueError`.
        with pytest.raises(ValueError, match=message):
            exact_parent_posterior(bad, 2)
        # Under the caller's own `jax.jit` the check is an `eqx.error_if`: on a GPU
        # it surfaces when the result is awaited, so the test blocks on it.
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(
                eqx.filter_jit(lambda x: exact_parent_posterior(x, 2).log_probs)(bad)
            )


def test_table_order_matches_itertools():
    for d, k in [(1, 2), (2, 3), (5, 2), (6, 3)]:
        others = list(range(d - 1))
        expected = [
            s
            for size in range(min(k, d - 1) + 1)
            for s in itertools.combinations(others, size)
        ]
        # Target 0: variable i is relative index i - 1.
        got = [tuple(i - 1 for i in S) for S in _sets_of(0, d, k)]
        assert got == expected


def test_r_squared_reference_sanity():
    # The reference itself: a perfect fit has R² = 1.
    x = np.random.default_rng(0).normal(size=(10, 2))
    assert abs(r_squared(x, 3 * x[:, 0] + 1, (0,)) - 1.0) < 1e-12
