import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, strategies as st

from transforms import sample_positions


def _check(indices, valid, where, k):
    indices, valid, where = map(np.asarray, (indices, valid, where))
    n_valid = int(where.sum())
    assert indices.shape == valid.shape == (min(k, where.size),)
    assert valid.sum() == min(k, n_valid)
    picked = indices[valid]
    assert np.all(where[picked]), "an unselected position was sampled"
    assert len(set(picked.tolist())) == len(picked), "a position was sampled twice"
    return picked


@given(
    st.lists(st.booleans(), min_size=12, max_size=12),
    st.sampled_from([1, 3, 5, 12, 20]),
    st.integers(0, 2**31 - 1),
)
def test_sample_positions_invariants(mask, k, seed):
    where = jnp.asarray(mask)
    indices, valid = sample_positions(jr.key(seed), where, k)
    picked = _check(indices, valid, where, k)
    if k >= where.sum():
        assert set(picked.tolist()) == set(np.flatnonzero(mask).tolist())


def test_sample_positions_is_uniform_without_replacement():
    # 6 valid positions out of 10, k = 3: every valid position is included with
    # probability 1/2 and every pair with probability (3*2)/(6*5) = 1/5, as for a
    # uniformly random 3-subset.
    where = jnp.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 1], bool)
    n_draws = 4000
    keys = jr.split(jr.key(0), n_draws)
    indices, valid = jax.jit(jax.vmap(lambda key: sample_positions(key, where, 3)))(
        keys
    )
    included = np.zeros((n_draws, 10), bool)
    for row, (idx, ok) in enumerate(zip(np.asarray(indices), np.asarray(valid))):
        picked = _check(idx, ok, where, 3)
        included[row, picked] = True
    frequency = included.mean(axis=0)
    valid_positions = np.flatnonzero(np.asarray(where))
    # Standard error sqrt(0.25 / 4000) = 0.008; allow five of them.
    np.testing.assert_allclose(frequency[valid_positions], 0.5, atol=0.04)
    assert np.all(frequency[~np.asarray(where)] == 0)
    for i, j in itertools.combinations(valid_positions, 2):
        both = np.mean(included[:, i] & included[:, j])
        assert abs(both - 0.2) < 0.035, (i, j, both)


def test_sample_positions_under_jit_and_different_keys():
    where = jnp.ones(50, bool)
    f = jax.jit(sample_positions, static_argnums=2)
    a, _ = f(jr.key(1), where, 10)
    b, _ = f(jr.key(2), where, 10)
    c, _ = f(jr.key(1), where, 10)
    assert np.array_equal(a, c) and not np.array_equal(a, b)
    indices, valid = f(jr.key(3), jnp.zeros(50, bool), 10)
    assert indices.shape == (10,) and not np.any(valid)


def test_sample_positions_k_larger_than_n_and_errors():
    where = jnp.array([True, False, True])
    indices, valid = sample_positions(jr.key(0), where, 10)
    assert indices.shape == (3,)
    assert sorted(np.asarray(indices)[np.asarray(valid)].tolist()) == [0, 2]
    with pytest.raises(ValueError, match="`k` must be a positive integer, got 0"):
        sample_positions(jr.key(0), where, 0)
    with pytest.raises(TypeError, match="`k` must be a positive integer, got True"):
        sample_positions(jr.key(0), where, True)
