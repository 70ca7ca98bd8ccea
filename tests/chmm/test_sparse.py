"""`SparseCHMM`: the same numbers as the dense model and the float64 references."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.chmm import (
    backward,
    CHMM,
    em,
    expected_counts,
    forward,
    log_likelihood,
    plan,
    posteriors,
    sample,
    seen_transitions,
    SparseCHMM,
    viterbi,
    viterbi_em,
)
from eqx_models.chmm._sparse import dense_transitions

from . import reference as ref
from .test_inference import ACTIONS, BLOCKS, close, METHODS, UNEVEN


STEPS = 12


def as_dense(model, blocks):
    """Block-layout values (e.g. counts) as an `(n_actions, N, N)` tensor."""
    return dense_transitions(eqx.tree_at(lambda m: m.blocks, model, blocks))


def sparse_case(layout, seed=0):
    """A sequence, and a sparse model over the triples it uses only (so every other
    triple is disallowed and never occurs), with its dense float64 tensor."""
    rng = np.random.default_rng(seed)
    T, Pi = ref.random_model(rng, layout, ACTIONS)
    x = rng.integers(0, len(layout), STEPS)
    a = rng.integers(0, ACTIONS, STEPS)
    keys = seen_transitions(x, a)
    dense = CHMM(layout, jnp.asarray(T), jnp.asarray(Pi))
    model = SparseCHMM.from_dense(dense, keys)
    return model, np.asarray(model.to_dense().T), Pi, jnp.asarray(x), jnp.asarray(a)


def test_seen_transitions_and_the_layout(x64):
    model, T, _, x, a = sparse_case(UNEVEN)
    triples = {(int(a[t]), int(x[t]), int(x[t + 1])) for t in range(STEPS - 1)}
    assert {tuple(k) for k in np.asarray(model.keys).tolist()} == triples
    assert model.n_blocks == len(triples) < ACTIONS * len(UNEVEN) ** 2
    width = max(UNEVEN)
    assert model.blocks.shape == (len(triples), width, width)
    # Padding past each block's clone counts holds exact zeros.
    assert not np.any(np.asarray(model.blocks)[~np.asarray(model.mask)])
    # Rows of the dense tensor: 1 where some allowed block leaves the clone, else 0.
    sums = T.sum(-1)
    assert np.allclose(sums[sums > 0], 1)
    # Outside the allowed triples the dense tensor is zero.
    sym = ref.symbols(UNEVEN)
    allowed = np.zeros((ACTIONS, len(UNEVEN), len(UNEVEN)), bool)
    allowed[tuple(np.asarray(model.keys).T)] = True
    assert not np.any(T[~allowed[:, sym][:, :, sym]])


def test_conversions_round_trip(x64):
    rng = np.random.default_rng(3)
    T, Pi = ref.random_model(rng, UNEVEN, 2, zero_fraction=0.5)
    dense = CHMM(UNEVEN, jnp.asarray(T), jnp.asarray(Pi))
    for allowed in ("all", "nonzero"):
        sparse = SparseCHMM.from_dense(dense, allowed)
        close(sparse.to_dense().T, T)
        close(sparse.Pi, Pi)
    assert SparseCHMM.from_dense(dense, "all").n_blocks == 2 * len(UNEVEN) ** 2
    # Keys are stored sorted whatever order they are given in, blocks following.
    sparse = SparseCHMM.from_dense(dense, "all")
    order = np.random.default_rng(0).permutation(sparse.n_blocks)
    shuffled = SparseCHMM(
        UNEVEN, sparse.blocks[order], np.asarray(sparse.keys)[order], 2, sparse.Pi
    )
    close(shuffled.to_dense().T, T)


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
@pytest.mark.parametrize("method", METHODS)
def test_inference_matches_the_dense_reference(x64, layout, method):
    model, T, Pi, x, a = sparse_case(layout)
    e = ref.emission_weights(layout, np.asarray(x))
    lnl, alphas, gammas, _ = ref.posteriors(T, Pi, e, np.asarray(a))
    u = e * ref.backward(T, e, np.asarray(a))
    close(log_likelihood(model, x, a, method=method), lnl)
    log_norms, filtered = forward(model, x, a, method=method)
    close(log_norms, ref.forward(T, Pi, e, np.asarray(a))[0])
    close(filtered, alphas)
    close(backward(model, x, a, method=method), u / u.sum(-1, keepdims=True))
    post = posteriors(model, x, a, method=method)
    close(post.smoothed, gammas)
    close(post.log_likelihood, lnl)
    counts, total = expected_counts(model, x, a, method=method)
    dense_counts, _ = expected_counts(model.to_dense(), x, a, method=method)
    close(as_dense(model, counts), dense_counts)
    close(counts.sum(), STEPS - 1)
    close(total, lnl)


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
def test_viterbi_matches_the_reference(x64, layout):
    model, T, Pi, x, a = sparse_case(layout)
    path, log_prob = viterbi(model, x, a)
    want_path, want = ref.viterbi(T, Pi, ref.emission_weights(layout, x), np.asarray(a))
    np.testing.assert_array_equal(path, want_path)
    close(log_prob, want)


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
@pytest.mark.parametrize("method", METHODS)
def test_em_matches_the_reference(x64, layout, method):
    model, T, Pi, x, a = sparse_case(layout)
    e = ref.emission_weights(layout, np.asarray(x))
    trained, curve = em(model, x, a, n_iter=3, method=method)
    assert isinstance(trained, SparseCHMM)
    want = T
    for _ in range(3):
        want = ref.em_step(want, Pi, e, np.asarray(a), 0.0)
    close(trained.to_dense().T, want)
    close(curve[-1], ref.posteriors(want, Pi, e, np.asarray(a))[0])
    # Transitions outside the allowed blocks were never read and stay impossible.
    dense_trained, dense_curve = em(model.to_dense(), x, a, n_iter=3, method=method)
    close(dense_trained.T, trained.to_dense().T)
    close(dense_curve, curve)


def test_em_with_every_block_allowed_is_dense_em(x64):
    rng = np.random.default_rng(1)
    T, Pi = ref.random_model(rng, UNEVEN, ACTIONS)
    dense = CHMM(UNEVEN, jnp.asarray(T), jnp.asarray(Pi))
    x = jnp.asarray(rng.integers(0, len(UNEVEN), STEPS))
    a = jnp.asarray(rng.integers(0, ACTIONS, STEPS))
    sparse = SparseCHMM.from_dense(dense, "all")
    for pseudocount in (0.0, 0.3):
        d, dc = em(dense, x, a, n_iter=2, pseudocount=pseudocount)
        s, sc = em(sparse, x, a, n_iter=2, pseudocount=pseudocount)
        close(s.to_dense().T, d.T)
        close(sc, dc)
    d, dc = viterbi_em(dense, x, a, n_iter=2, pseudocount=0.1)
    s, sc = viterbi_em(sparse, x, a, n_iter=2, pseudocount=0.1)
    close(s.to_dense().T, d.T)
    close(sc, dc)


def test_batches_of_unequal_length(x64):
    model, _, _, x, a = sparse_case(BLOCKS)
    xs, as_ = [x, x[:7]], [a, a[:7]]
    counts, lnl = expected_counts(model, xs, as_)
    dense_counts, dense_lnl = expected_counts(model.to_dense(), xs, as_)
    close(lnl, dense_lnl)
    close(counts.sum(), dense_counts.sum())
    close(counts.sum(), STEPS - 1 + 6)
    s, curve = viterbi_em(model, xs, as_, n_iter=2)
    d, dense_curve = viterbi_em(model.to_dense(), xs, as_, n_iter=2)
    close(s.to_dense().T, d.T)
    close(curve, dense_curve)


def test_sampling_and_planning_match_the_dense_model(x64):
    model, _, _, x, a = sparse_case(BLOCKS, seed=2)
    dense = model.to_dense()
    # Sampling needs every row to have somewhere to go: every block allowed.
    full = SparseCHMM.from_dense(CHMM.random(BLOCKS, ACTIONS, key=jr.key(4)), "all")
    for seed in range(3):
        want = sample(full.to_dense(), a, key=jr.key(seed))
        got = sample(full, a, key=jr.key(seed))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    reached = 0
    for goal in range(model.n_states):
        try:
            want = plan(dense, 0, goal, max_steps=4)
        except Exception:
            with pytest.raises(Exception, match="cannot be reached"):
                plan(model, 0, goal, max_steps=4)
            continue
        reached += 1
        got = plan(model, 0, goal, max_steps=4)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert reached > 1


def test_random_sparse_model(x64):
    keys = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 1]])
    model = SparseCHMM.random((2, 3), 2, key=jr.key(0), allowed=keys)
    T = np.asarray(model.to_dense().T)
    sums = T.sum(-1)
    close(sums[0], np.ones(5))  # both symbols leave under action 0
    close(sums[1], np.array([0, 0, 1, 1, 1]))  # symbol 0 has no block under 1
    assert jnp.all(jnp.where(model.mask, True, model.blocks == 0))


def test_compiles_once_per_shape():
    model, _, _, x, a = sparse_case(BLOCKS)
    model = jax.tree.map(
        lambda v: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v,
        model,
    )

    @jax.jit
    def f(model, x, a):
        return log_likelihood(model, x, a)

    f(model, x, a)
    f(eqx.tree_at(lambda m: m.Pi, model, jnp.roll(model.Pi, 1)), x, a)
    assert f._cache_size() == 1


# Bad inputs ---------------------------------------------------------------------


def test_a_disallowed_transition_names_x_and_the_position():
    model, _, _, x, a = sparse_case(BLOCKS)
    allowed = {tuple(k) for k in np.asarray(model.keys).tolist()}
    bad = next(
        (u, i, j)
        for u in range(ACTIONS)
        for i in range(3)
        for j in range(3)
        if (u, i, j) not in allowed
    )
    xb = np.asarray(x).copy()
    ab = np.asarray(a).copy()
    ab[4], xb[4], xb[5] = bad
    # Keep the step after position 5 allowed if possible, so t=4 is the first bad one.
    for fn in (log_likelihood, posteriors, viterbi):
        with pytest.raises(ValueError, match=r"`x`.*at t=4"):
            fn(model, jnp.asarray(xb), jnp.asarray(ab))
    with pytest.raises(ValueError, match=r"`x`.*sequence 1, t=4"):
        em(
            model,
            jnp.stack([x, jnp.asarray(xb)]),
            jnp.stack([a, jnp.asarray(ab)]),
            n_iter=1,
        )
    # Under jit the check runs on the device: on a GPU the error arrives when the
    # result is waited for.
    with pytest.raises(Exception, match="outside the allowed"):
        jax.block_until_ready(
            jax.jit(log_likelihood)(model, jnp.asarray(xb), jnp.asarray(ab))
        )


def test_bad_construction():
    blocks = jnp.full((1, 2, 2), 0.5)
    with pytest.raises(ValueError, match="`blocks`.*zero past"):
        SparseCHMM((2, 1), blocks, [[0, 0, 1]], 1)
    with pytest.raises(ValueError, match=r"`keys\[0, 1\]`"):
        SparseCHMM((2, 2), blocks, [[0, 5, 1]], 1)
    with pytest.raises(ValueError, match="`keys`.*distinct"):
        SparseCHMM((2, 2), jnp.full((2, 2, 2), 0.25), [[0, 0, 1], [0, 0, 1]], 1)
    with pytest.raises(ValueError, match="`blocks`.*rows summing"):
        SparseCHMM((2, 2), jnp.full((1, 2, 2), 0.3), [[0, 0, 1]], 1)
    with pytest.raises(ValueError, match="`blocks`.*shape"):
        SparseCHMM((2, 2), jnp.full((2, 2, 2), 0.5), [[0, 0, 1]], 1)
    with pytest.raises(ValueError, match="`allowed`"):
        SparseCHMM.from_dense(CHMM.random((2,), 1, key=jr.key(0)), "some")


def test_soft_evidence_and_emissions_are_refused():
    model, _, _, x, a = sparse_case(BLOCKS)
    with pytest.raises(TypeError, match="to_dense"):
        log_likelihood(model, jnp.zeros((STEPS, 3)), a)
    with pytest.raises(TypeError, match="to_dense"):
        log_likelihood(model, x, a, emissions=jnp.full((6, 3), 1 / 3))
