import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from eqx_models.chmm import (
    _learning,
    CHMM,
    em,
    expected_counts,
    learn_emissions,
    log_likelihood,
    viterbi_em,
)

from . import reference as ref
from .test_inference import ACTIONS, as_model, BLOCKS, case, close, METHODS, UNEVEN


def _reference_counts(layout, T, Pi, xs, as_):
    return sum(
        ref.expected_counts(T, Pi, ref.emission_weights(layout, x), a)
        for x, a in zip(xs, as_)
    )


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
@pytest.mark.parametrize("method", METHODS)
def test_expected_counts_match_brute_force(x64, layout, method):
    T, Pi, x, a = case(layout)
    truth = ref.brute_force(T, Pi, ref.emission_weights(layout, x), a)
    counts, lnl = expected_counts(as_model(layout, T, Pi), x, a, method=method)
    close(counts, truth["counts"])
    close(counts, _reference_counts(layout, T, Pi, [x], [a]))
    close(lnl, truth["log_likelihood"])
    close(counts.sum(), len(x) - 1)


@pytest.mark.parametrize("method", METHODS)
def test_counts_of_batches_and_lists_are_sums(x64, method):
    rng = np.random.default_rng(1)
    T, Pi, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)
    lengths = [5, 2, 4]
    xs = [rng.integers(0, 3, n) for n in lengths]
    as_ = [rng.integers(0, ACTIONS, n) for n in lengths]
    # A placeholder in the unused last action of a sequence is accepted.
    as_[1][-1] = -1
    counts, lnl = expected_counts(
        model,
        [jnp.asarray(v) for v in xs],
        [jnp.asarray(v) for v in as_],
        method=method,
    )
    close(counts, _reference_counts(BLOCKS, T, Pi, xs, as_))
    close(counts.sum(), sum(lengths) - len(lengths))
    singles = [
        ref.forward(T, Pi, ref.emission_weights(BLOCKS, x), a)[0].sum()
        for x, a in zip(xs, as_)
    ]
    close(lnl, sum(singles))
    x2 = rng.integers(0, 3, (2, 5))
    a2 = rng.integers(0, ACTIONS, (2, 5))
    counts2, _ = expected_counts(model, jnp.asarray(x2), jnp.asarray(a2), method=method)
    close(counts2, _reference_counts(BLOCKS, T, Pi, x2, a2))


@pytest.mark.parametrize("method", METHODS)
def test_em_matches_reference(x64, method):
    rng = np.random.default_rng(2)
    T, Pi, _, _ = case(BLOCKS)
    xs = rng.integers(0, 3, (2, 5))
    as_ = rng.integers(0, ACTIONS, (2, 5))
    model, curve = em(
        as_model(BLOCKS, T, Pi),
        jnp.asarray(xs),
        jnp.asarray(as_),
        n_iter=3,
        pseudocount=0.1,
        method=method,
    )
    T_ref, expected_curve = T, []
    for _ in range(3):
        expected_curve.append(
            sum(
                ref.forward(T_ref, Pi, ref.emission_weights(BLOCKS, x), a)[0].sum()
                for x, a in zip(xs, as_)
            )
        )
        C = _reference_counts(BLOCKS, T_ref, Pi, xs, as_) + 0.1
        T_ref = C / C.sum(-1, keepdims=True)
    close(model.T, T_ref, 1e-10)
    close(model.Pi, Pi)
    close(curve[:-1], expected_curve, 1e-10)
    close(
        curve[-1],
        log_likelihood(model, xs[0], as_[0]) + log_likelihood(model, xs[1], as_[1]),
    )


def test_em_with_zero_rows_and_no_pseudocount(x64):
    # Clones that are never visited keep rows of zeros; no NaN appears.
    rng = np.random.default_rng(3)
    layout = (3, 2, 1)
    model = CHMM.random(layout, 2, key=jax.random.key(0))
    x = jnp.asarray(rng.integers(0, 2, 30))
    a = jnp.asarray(rng.integers(0, 2, 30))
    model, curve = em(model, x, a, n_iter=4)
    assert np.all(np.isfinite(curve))
    assert np.all(np.diff(curve) >= -1e-9)
    sums = np.asarray(model.T.sum(-1))
    assert np.all(np.isclose(sums, 1) | (sums == 0))
    np.testing.assert_array_equal(model.T[:, -1], 0)


@pytest.mark.parametrize("pseudocount", [0.0, 0.5])
@given(seed=st.integers(0, 2**16))
def test_em_never_decreases_its_objective(pseudocount, seed):
    with jax.enable_x64(True):
        T, Pi, x, a = case(BLOCKS, seed=seed)

        # With a pseudocount the update is a MAP step under a Dirichlet prior:
        # lnL + pseudocount * sum(log T) is what never decreases.
        def prior(T):
            return pseudocount * np.sum(np.log(T)) if pseudocount else 0.0

        model = as_model(BLOCKS, T, Pi)
        objective = []
        for _ in range(3):
            model, c = em(model, x, a, n_iter=1, pseudocount=pseudocount)
            if not objective:
                objective.append(c[0] + prior(T))
            objective.append(c[-1] + prior(model.T))
        assert np.all(np.diff(objective) >= -1e-9 * np.abs(objective[0]))


def test_viterbi_em_matches_reference(x64):
    rng = np.random.default_rng(4)
    T, Pi, _, _ = case(BLOCKS)
    xs = rng.integers(0, 3, (2, 5))
    as_ = rng.integers(0, ACTIONS, (2, 5))
    model, curve = viterbi_em(
        as_model(BLOCKS, T, Pi),
        jnp.asarray(xs),
        jnp.asarray(as_),
        n_iter=2,
        pseudocount=0.1,
    )
    T_ref, expected = _hard_em_reference(T, Pi, xs, as_, 2, 0.1)
    close(model.T, T_ref, 1e-10)
    close(curve, expected, 1e-10)


def _hard_em_reference(T, Pi, xs, as_, n_iter, pseudocount):
    T_ref, curve = T, []
    for i in range(n_iter + 1):
        C = np.zeros_like(T)
        total = 0.0
        for x, a in zip(xs, as_):
            path, best = ref.viterbi(T_ref, Pi, ref.emission_weights(BLOCKS, x), a)
            total += best
            for t in range(1, len(x)):
                C[a[t - 1], path[t - 1], path[t]] += 1
        curve.append(total)
        if i < n_iter:
            C = C + pseudocount
            s = C.sum(-1, keepdims=True)
            T_ref = np.where(s > 0, C / np.where(s > 0, s, 1), 0)
    return T_ref, np.array(curve)


def test_viterbi_em_on_lists_matches_reference_and_never_decreases(x64):
    rng = np.random.default_rng(5)
    T, Pi, _, _ = case(BLOCKS)
    lengths = [5, 3]
    xs = [rng.integers(0, 3, n) for n in lengths]
    as_ = [rng.integers(0, ACTIONS, n) for n in lengths]
    trained, curve = viterbi_em(
        as_model(BLOCKS, T, Pi),
        [jnp.asarray(v) for v in xs],
        [jnp.asarray(v) for v in as_],
        n_iter=3,
    )
    T_ref, expected = _hard_em_reference(T, Pi, xs, as_, 3, 0.0)
    close(trained.T, T_ref, 1e-10)
    close(curve, expected, 1e-10)
    assert np.all(np.diff(curve) >= -1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_learn_emissions_matches_reference(x64, method):
    T, Pi, x, a = case(BLOCKS, n_steps=8)
    model = as_model(BLOCKS, T, Pi)
    E, curve = learn_emissions(model, x, a, n_iter=2, pseudocount=0.05, method=method)
    sym = ref.symbols(BLOCKS)
    E_ref = (sym[:, None] == np.arange(3)[None, :]).astype(float)
    expected = []
    for _ in range(3):
        e = E_ref[:, x].T
        lnl, _, smoothed, _ = ref.posteriors(T, Pi, e, a)
        expected.append(lnl)
        if len(expected) < 3:
            CE = smoothed.T @ (x[:, None] == np.arange(3)[None, :]) + 0.05
            E_ref = CE / CE.sum(-1, keepdims=True)
    close(E, E_ref, 1e-10)
    close(curve, expected, 1e-10)
    # The deterministic emission reproduces the model's own likelihood.
    close(curve[0], log_likelihood(model, x, a))


class TestErrors:
    def setup_method(self):
        self.model = CHMM((2, 1), jnp.full((2, 3, 3), 1 / 3))
        self.ids = jnp.zeros(4, jnp.int32)

    def test_arguments(self):
        with pytest.raises(ValueError, match="em: `n_iter` must be an integer >= 0"):
            em(self.model, self.ids, self.ids, n_iter=-1)
        with pytest.raises(ValueError, match="viterbi_em: `pseudocount` must be"):
            viterbi_em(self.model, self.ids, self.ids, n_iter=1, pseudocount=-1.0)
        with pytest.raises(
            ValueError, match=r"`method` must be one of \('auto', 'scan', 'parallel'\)"
        ):
            expected_counts(self.model, self.ids, self.ids, method="fast")

    def test_sequences(self):
        with pytest.raises(ValueError, match="same number of sequences"):
            em(self.model, [self.ids, self.ids], [self.ids], n_iter=1)
        with pytest.raises(TypeError, match="both as lists"):
            em(self.model, [self.ids], self.ids, n_iter=1)
        with pytest.raises(ValueError, match=r"`x` and `a` must have the same length"):
            em(self.model, [self.ids], [self.ids[:3]], n_iter=1)
        with pytest.raises(ValueError, match=r"shape \(T,\) or \(batch, T\)"):
            em(
                self.model,
                jnp.zeros((2, 4), jnp.int32),
                jnp.zeros((4,), jnp.int32),
                n_iter=1,
            )
        with pytest.raises(
            ValueError, match=r"`x` must be integer ids in \[0, n_obs\)"
        ):
            em(self.model, jnp.full((2, 4), 5), jnp.zeros((2, 4), jnp.int32), n_iter=1)
        with pytest.raises(ValueError, match=r"em \(sequence 1\): `x` must be integer"):
            em(self.model, [self.ids, self.ids.at[1].set(7)], [self.ids] * 2, n_iter=1)

    def test_emissions(self):
        with pytest.raises(ValueError, match="`emissions` must be probabilities"):
            learn_emissions(
                self.model, self.ids, self.ids, n_iter=1, emissions=jnp.ones((3, 2))
            )


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_float32_counts_of_a_long_sequence_are_accurate(method):
    # One symbol: every count entry collects thousands of contributions, the worst
    # case for a float32 running sum; both strategies accumulate in chunks.
    layout = (3,)
    rng = np.random.default_rng(6)
    T, Pi = ref.random_model(rng, layout, 2)
    n_steps = 20_000
    x = np.zeros(n_steps, int)
    a = rng.integers(0, 2, n_steps)
    expected = ref.expected_counts(T, Pi, ref.emission_weights(layout, x), a)
    model = as_model(layout, T, Pi, jnp.float32)
    counts, _ = expected_counts(model, x, a, method=method)
    np.testing.assert_allclose(counts, expected, rtol=1e-5)
    np.testing.assert_allclose(counts.sum(), n_steps - 1, rtol=1e-6)


def test_em_vmaps_over_initial_models():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.integers(0, 3, 20))
    a = jnp.asarray(rng.integers(0, ACTIONS, 20))
    keys = jax.random.split(jax.random.key(0), 2)
    models = eqx.filter_vmap(lambda k: CHMM.random(BLOCKS, ACTIONS, key=k))(keys)
    trained, curves = eqx.filter_vmap(
        lambda m: em(m, x, a, n_iter=1, pseudocount=0.1), in_axes=(eqx.if_array(0),)
    )(models)
    for i in range(2):
        single = CHMM(BLOCKS, models.T[i])
        expected, curve = em(single, x, a, n_iter=1, pseudocount=0.1)
        np.testing.assert_allclose(trained.T[i], expected.T, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(curves[i], curve, rtol=1e-5)


@pytest.mark.parametrize(
    "train",
    [
        lambda m, x, a: expected_counts(m, x, a),
        lambda m, x, a: em(m, x, a, n_iter=1),
        lambda m, x, a: viterbi_em(m, x, a, n_iter=1),
        lambda m, x, a: learn_emissions(m, x, a, n_iter=1),
    ],
    ids=["expected_counts", "em", "viterbi_em", "learn_emissions"],
)
def test_learning_compiles_once_per_shape(train):
    T, _, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, None, jnp.float32)
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(train, max_traces=1))
    rng = np.random.default_rng(12)
    for _ in range(2):
        x = jnp.asarray(rng.integers(0, 3, (2, 5)))
        a = jnp.asarray(rng.integers(0, ACTIONS, (2, 5)))
        counted(model, x, a)


@pytest.mark.parametrize("train", [em, viterbi_em, learn_emissions])
def test_changing_the_pseudocount_does_not_recompile(train, monkeypatch):
    # Tracing a learning loop maps over the sequences twice (the iterations and
    # the final evaluation); the eager argument checks never do. Count the maps.
    traces = []
    batch_map = _learning._map

    def counted(f, batch):
        traces.append(None)
        return batch_map(f, batch)

    monkeypatch.setattr(_learning, "_map", counted)
    T, _, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, None, jnp.float32)
    rng = np.random.default_rng(13)
    # A length no other test uses, so that the first call compiles here.
    x = jnp.asarray(rng.integers(0, 3, (1, 23)))
    a = jnp.asarray(rng.integers(0, ACTIONS, (1, 23)))
    results = [
        train(model, x, a, n_iter=1, pseudocount=p)[0]
        for p in (1e-3, 0.5, jnp.asarray(2.0))
    ]
    assert len(traces) == 2  # one compilation
    # The value still reaches the update: different pseudocounts, different results.
    first, last = (jax.tree.leaves(eqx.filter(r, eqx.is_array)) for r in results[::2])
    assert any(not np.allclose(u, v) for u, v in zip(first, last))
