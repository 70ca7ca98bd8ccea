"""Padded batches with lengths (masks) equal per-sequence calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.chmm import (
    CHMM,
    em,
    expected_counts,
    forward,
    learn_emissions,
    log_likelihood,
    posteriors,
    seen_transitions,
    SparseCHMM,
    viterbi,
    viterbi_em,
)

from . import reference as ref
from .test_inference import ACTIONS, close, METHODS, UNEVEN


LENGTHS = (9, 4, 1)


def _batch(layout, seed=0):
    rng = np.random.default_rng(seed)
    T, Pi = ref.random_model(rng, layout, ACTIONS)
    X = rng.integers(0, len(layout), (len(LENGTHS), max(LENGTHS)))
    A = rng.integers(0, ACTIONS, X.shape)
    model = CHMM(layout, jnp.asarray(T), jnp.asarray(Pi))
    # Garbage (an id out of range) in the padding: it must be ignored.
    padded = X.copy()
    padded[1, 6] = -7
    return model, jnp.asarray(X), jnp.asarray(padded), jnp.asarray(A)


def _truncated(X, A):
    return [X[i, :n] for i, n in enumerate(LENGTHS)], [
        A[i, :n] for i, n in enumerate(LENGTHS)
    ]


@pytest.mark.parametrize("layout", [(2, 3, 1), UNEVEN])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_inference_equals_per_sequence_calls(x64, layout, method, sparse):
    model, X, padded, A = _batch(layout)
    if sparse:
        xs, as_ = _truncated(X, A)
        model = SparseCHMM.from_dense(model, seen_transitions(xs, as_))
    lengths = jnp.asarray(LENGTHS)

    def each(x, a, n):
        return (
            posteriors(model, x, a, method=method, length=n),
            viterbi(model, x, a, length=n),
            log_likelihood(model, x, a, method=method, length=n),
        )

    post, (paths, log_probs), lnls = jax.vmap(each)(padded, A, lengths)
    for i, n in enumerate(LENGTHS):
        x, a = X[i, :n], A[i, :n]
        want = posteriors(model, x, a, method=method)
        close(post.log_likelihood[i], want.log_likelihood)
        close(lnls[i], want.log_likelihood)
        for got, full in (
            (post.log_normalizers, want.log_normalizers),
            (post.filtered, want.filtered),
            (post.smoothed, want.smoothed),
        ):
            close(got[i, :n], full)
            assert not np.any(np.asarray(got[i, n:]))
        want_path, want_prob = viterbi(model, x, a)
        np.testing.assert_array_equal(paths[i, :n], want_path)
        assert np.all(np.asarray(paths[i, n:]) == -1)
        close(log_probs[i], want_prob)
    # Eager calls with a length take the same path.
    close(forward(model, padded[1], A[1], length=4)[0][:4], post.log_normalizers[1, :4])


@pytest.mark.parametrize("method", METHODS)
def test_masked_learning_equals_lists(x64, method):
    model, X, padded, A = _batch((2, 3, 1))
    xs, as_ = _truncated(X, A)
    lengths = jnp.asarray(LENGTHS)
    got = expected_counts(model, padded, A, method=method, lengths=lengths)
    want = expected_counts(model, xs, as_, method=method)
    close(got[0], want[0])
    close(got[1], want[1])
    got = em(model, padded, A, n_iter=2, method=method, lengths=lengths)
    want = em(model, xs, as_, n_iter=2, method=method)
    close(got[0].T, want[0].T)
    close(got[1], want[1])
    got = viterbi_em(model, padded, A, n_iter=2, lengths=lengths)
    want = viterbi_em(model, xs, as_, n_iter=2)
    close(got[0].T, want[0].T)
    close(got[1], want[1])
    got = learn_emissions(model, padded, A, n_iter=1, lengths=lengths)
    want = learn_emissions(model, xs, as_, n_iter=1)
    close(got[0], want[0])
    close(got[1], want[1])


def test_bad_lengths():
    model, X, _, A = _batch((2, 3, 1))
    for bad in (0, 10, -1):
        with pytest.raises(ValueError, match="`length`"):
            log_likelihood(model, X[0], A[0], length=bad)
    with pytest.raises(ValueError, match="`lengths`"):
        em(model, X, A, n_iter=1, lengths=jnp.asarray([0, 3, 3]))
    with pytest.raises(ValueError, match="`lengths`"):
        expected_counts(model, X, A, lengths=jnp.asarray([3, 3]))
    with pytest.raises(TypeError, match="`lengths`"):
        expected_counts(model, [X[0]], [A[0]], lengths=jnp.asarray([3]))
    # Under jit the check runs on the device (on a GPU, raised when waited for).
    with pytest.raises(Exception, match="`length`"):
        jax.block_until_ready(
            jax.jit(log_likelihood)(model, X[0], A[0], length=jnp.asarray(12))
        )
