import itertools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

from eqx_models.chmm import CHMM, plan, sample, viterbi

from . import reference as ref
from .test_inference import ACTIONS, as_model, BLOCKS, case, close, UNEVEN


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
def test_viterbi_matches_brute_force(x64, layout):
    T, Pi, x, a = case(layout)
    truth = ref.brute_force(T, Pi, ref.emission_weights(layout, x), a)
    path, log_prob = viterbi(as_model(layout, T, Pi), x, a)
    np.testing.assert_array_equal(path, truth["best_path"])
    close(log_prob, truth["best_log_prob"])
    np.testing.assert_array_equal(ref.symbols(layout)[path], x)


@given(layout=st.sampled_from([BLOCKS, UNEVEN]), seed=st.integers(0, 2**16))
def test_property_viterbi_matches_reference(layout, seed):
    with jax.enable_x64(True):
        T, Pi, x, a = case(layout, seed=seed, zeros=0.3)
        expected, best = ref.viterbi(T, Pi, ref.emission_weights(layout, x), a)
        path, log_prob = viterbi(as_model(layout, T, Pi), x, a)
        close(log_prob, best)
        if np.isfinite(best):
            np.testing.assert_array_equal(path, expected)


def test_viterbi_ties_go_to_the_lowest_clone(x64):
    # Every path has the same probability: the decoding takes the first clone of
    # each symbol.
    n = sum(BLOCKS)
    model = CHMM(BLOCKS, jnp.full((ACTIONS, n, n), 1 / n))
    x = jnp.array([1, 0, 2, 1, 1])
    path, log_prob = viterbi(model, x, jnp.zeros(5, jnp.int32))
    np.testing.assert_array_equal(path, [2, 0, 5, 2, 2])
    close(log_prob, np.log(1 / n) * 5)


def test_viterbi_with_evidence_and_emissions(x64):
    rng = np.random.default_rng(2)
    T, Pi, x, a = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)
    evidence = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(5, 3))))
    e = ref.emission_weights(BLOCKS, np.asarray(evidence))
    expected, best = ref.viterbi(T, Pi, e, a)
    path, log_prob = viterbi(model, evidence, a)
    np.testing.assert_array_equal(path, expected)
    close(log_prob, best)
    E = rng.random((6, 3))
    E /= E.sum(-1, keepdims=True)
    expected, best = ref.viterbi(T, Pi, E[:, x].T, a)
    path, log_prob = viterbi(model, x, a, emissions=jnp.asarray(E))
    np.testing.assert_array_equal(path, expected)
    close(log_prob, best)


def test_viterbi_jit_vmap_and_single_trace():
    T, Pi, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi, jnp.float32)
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.integers(0, 3, (3, 5)))
    as_ = jnp.asarray(rng.integers(0, ACTIONS, (3, 5)))
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(viterbi, max_traces=1))
    paths, log_probs = jax.vmap(lambda x, a: viterbi(model, x, a))(xs, as_)
    for i in range(3):
        path, log_prob = counted(model, xs[i], as_[i])
        np.testing.assert_array_equal(paths[i], path)
        np.testing.assert_allclose(log_probs[i], log_prob)


def _all_plans(T, start, goal, length):
    """Brute force: the most probable action/state sequence of a given length."""
    n_actions, n, _ = T.shape
    best, best_p = None, 0.0
    for actions in itertools.product(range(n_actions), repeat=length):
        for middle in itertools.product(range(n), repeat=length - 1):
            states = (start,) + middle + (goal,)
            p = np.prod([T[u, i, j] for u, i, j in zip(actions, states, states[1:])])
            if p > best_p:
                best, best_p = (actions, states), p
    return best, best_p


def _line_model(n=4):
    """States on a line; action 0 moves left, 1 right, 2 is noisy."""
    T = np.zeros((3, n, n))
    for i in range(n):
        T[0, i, max(i - 1, 0)] = 1
        T[1, i, min(i + 1, n - 1)] = 1
        T[2, i] = 1 / n
    return T


def test_plan_is_shortest_and_most_probable(x64):
    T = _line_model()
    model = CHMM((1, 1, 2), jnp.asarray(T))
    route = plan(model, 0, 3, max_steps=6)
    # The noisy action reaches 3 in one step with probability 1/4; nothing shorter.
    assert route.length == 1
    np.testing.assert_array_equal(route.actions[:1], [2])
    close(route.log_prob, np.log(1 / 4))
    # Without the noisy action the route is three steps right.
    model = CHMM((1, 1, 2), jnp.asarray(T[:2]))
    route = plan(model, 0, 3, max_steps=6)
    assert route.length == 3
    np.testing.assert_array_equal(route.actions, [1, 1, 1, -1, -1, -1])
    np.testing.assert_array_equal(route.states, [0, 1, 2, 3, -1, -1, -1])
    close(route.log_prob, 0.0)
    # Start at the goal.
    route = plan(model, 2, 2, max_steps=6)
    assert route.length == 0 and route.states[0] == 2


@given(seed=st.integers(0, 2**16))
def test_property_plan_matches_brute_force(seed):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        T, _ = ref.random_model(rng, (2, 1), 2, zero_fraction=0.6)
        start, goal = rng.integers(0, 3, 2)
        model = CHMM((2, 1), jnp.asarray(T))
        reachable = [
            k
            for k in range(4)
            if k == 0 and start == goal or k and _all_plans(T, start, goal, k)[0]
        ]
        if not reachable:
            with pytest.raises(eqx.EquinoxRuntimeError, match="cannot be reached"):
                plan(model, int(start), int(goal), max_steps=3)
            return
        route = plan(model, jnp.asarray(start), jnp.asarray(goal), max_steps=3)
        length = reachable[0]
        assert route.length == length
        if length:
            (actions, states), p = _all_plans(T, start, goal, length)
            close(route.log_prob, np.log(p))
            path_p = np.prod(
                [
                    T[u, i, j]
                    for u, i, j in zip(
                        route.actions[:length],
                        route.states[:length],
                        route.states[1 : length + 1],
                    )
                ]
            )
            close(path_p, p)


def test_plan_from_an_observation_and_errors(x64):
    T = _line_model()[:2]
    model = CHMM((1, 1, 2), jnp.asarray(T))
    # Symbol 2 owns states 2 and 3: starting anywhere among them, state 0 is two
    # steps away from state 2.
    route = plan(model, 2, 0, max_steps=5, start_is="observation")
    assert route.length == 2 and route.states[0] == 2
    with pytest.raises(eqx.EquinoxRuntimeError, match="cannot be reached"):
        plan(model, 0, 3, max_steps=2)
    with pytest.raises(ValueError, match=r"`goal` must be integer ids in \[0, N\)"):
        plan(model, 0, 9, max_steps=2)
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=r"`goal` must be integer ids in \[0, N\)"
    ):
        jax.block_until_ready(
            eqx.filter_jit(lambda g: plan(model, 0, g, max_steps=2).length)(
                jnp.asarray(9)
            )
        )
    with pytest.raises(ValueError, match="`start_is` must be"):
        plan(model, 0, 1, max_steps=2, start_is="symbol")
    with pytest.raises(ValueError, match="`max_steps` must be an integer >= 0"):
        plan(model, 0, 1, max_steps=-1)


def test_plan_vmaps_and_compiles_once():
    model = CHMM((1, 1, 2), jnp.asarray(_line_model(), jnp.float32)[:2])
    starts, goals = jnp.array([0, 3, 1]), jnp.array([3, 0, 1])
    routes = jax.vmap(lambda s, g: plan(model, s, g, max_steps=4))(starts, goals)
    np.testing.assert_array_equal(routes.length, [3, 3, 0])
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(plan, max_traces=1))
    for s, g in zip(starts, goals):
        counted(model, s, g, max_steps=4)


def test_sample_follows_the_model(x64):
    T, Pi, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)
    a = jnp.asarray(np.random.default_rng(4).integers(0, ACTIONS, 4000))
    x, states = sample(model, a, key=jr.key(0))
    np.testing.assert_array_equal(ref.symbols(BLOCKS)[states], x)
    x2, states2 = sample(model, a, key=jr.key(0))
    np.testing.assert_array_equal(states, states2)
    # Empirical transition frequencies of the most visited (action, state) rows.
    states, a = np.asarray(states), np.asarray(a)
    pairs = [(u, i) for u in range(ACTIONS) for i in range(6)]
    visits = {
        p: np.flatnonzero((a[:-1] == p[0]) & (states[:-1] == p[1])) for p in pairs
    }
    for (u, i), idx in sorted(visits.items(), key=lambda kv: -len(kv[1]))[:3]:
        freq = np.bincount(states[idx + 1], minlength=6) / len(idx)
        # Binomial standard errors are below 0.035 with over 200 visits.
        assert len(idx) > 200
        np.testing.assert_allclose(freq, T[u, i], atol=0.12)
    batch = jax.vmap(lambda k: sample(model, jnp.asarray(a[:10]), key=k))(
        jr.split(jr.key(1), 3)
    )
    assert batch[0].shape == (3, 10)
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(sample, max_traces=1))
    for seed in range(2):
        counted(model, jnp.asarray(a[:10]), key=jr.key(seed))


def test_sample_errors_on_a_dead_end(x64):
    T = np.zeros((1, 2, 2))
    T[0, 0, 1] = 1
    model = CHMM((1, 1), jnp.asarray(T), jnp.array([1.0, 0.0]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="no transition"):
        sample(model, jnp.zeros(3, jnp.int32), key=jr.key(0))
    model = CHMM((1, 1), jnp.full((1, 2, 2), 0.5))
    with pytest.raises(ValueError, match=r"`a\[:-1\]` must be integer ids"):
        sample(model, jnp.array([0, 3, 0]), key=jr.key(0))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`a\[:-1\]` must be integer"):
        jax.block_until_ready(
            eqx.filter_jit(lambda a: sample(model, a, key=jr.key(0)))(
                jnp.array([0, 3, 0])
            )
        )
