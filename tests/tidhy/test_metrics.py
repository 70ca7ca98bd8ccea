import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given

from eqx_models import tidhy


def test_r2_score_matches_its_definition():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 50, 3))
    p = y + 0.3 * rng.normal(size=y.shape)
    flat_y, flat_p = y.reshape(-1, 3), p.reshape(-1, 3)
    per_feature = 1 - ((flat_y - flat_p) ** 2).sum(0) / (
        (flat_y - flat_y.mean(0)) ** 2
    ).sum(0)
    got = tidhy.r2_score(jnp.asarray(y, jnp.float32), jnp.asarray(p, jnp.float32))
    assert float(got) == pytest.approx(per_feature.mean(), rel=1e-5)
    assert float(tidhy.r2_score(jnp.asarray(y), jnp.asarray(y))) == 1.0
    mean = jnp.broadcast_to(jnp.asarray(flat_y.mean(0)), flat_y.shape)
    assert float(tidhy.r2_score(jnp.asarray(flat_y), mean)) == pytest.approx(
        0, abs=1e-6
    )
    batched = jax.vmap(tidhy.r2_score)(jnp.asarray(y), jnp.asarray(p))
    assert batched.shape == (2,)
    with pytest.raises(TypeError, match="y_pred"):
        tidhy.r2_score(jnp.ones((4, 3)), jnp.ones((4, 2)))


def test_fit_linear_dynamics_recovers_each_regime(x64):
    rng = np.random.default_rng(1)
    A = [np.array([[0.9, -0.2], [0.2, 0.9]]), np.array([[0.5, 0.1], [0.0, 0.6]])]
    c = [np.array([0.1, -0.2]), np.array([0.3, 0.0])]
    T = 300
    states = (rng.random(T) < 0.5).astype(int)
    z = np.zeros((T, 2))
    z[0] = rng.normal(size=2)
    for t in range(1, T):
        # Noise-free, with occasional kicks so every regime is excited.
        z[t] = A[states[t]] @ z[t - 1] + c[states[t]]
        if t % 17 == 0:
            z[t] += rng.normal(size=2)
    kicked = np.zeros(T, bool)
    kicked[::17] = True
    for k in range(2):
        # A transition t-1 -> t is used when both ends are selected; selecting the
        # steps of regime k (and no kicked step) keeps exactly its transitions.
        mask = (states == k) & ~kicked
        got_A, got_c = tidhy.fit_linear_dynamics(jnp.asarray(z), jnp.asarray(mask))
        np.testing.assert_allclose(got_A, A[k], atol=1e-9)
        np.testing.assert_allclose(got_c, c[k], atol=1e-9)
    # Leading axes are separate sequences: no transition across them.
    pairs = np.stack([z[:-1], z[:-1] @ A[0].T + c[0]], axis=1)
    got_A, _ = tidhy.fit_linear_dynamics(jnp.asarray(pairs))
    np.testing.assert_allclose(got_A, A[0], atol=1e-9)
    with pytest.raises(TypeError, match="mask"):
        tidhy.fit_linear_dynamics(jnp.asarray(z), jnp.ones(T - 1, bool))
    with pytest.raises(
        ValueError,
        match="fit_linear_dynamics: `z` must be an array of at least 2 time steps",
    ):
        tidhy.fit_linear_dynamics(jnp.ones((1, 2)))


def test_timescales_of_known_matrices(x64):
    A = jnp.diag(jnp.array([0.5, 0.9]))
    np.testing.assert_allclose(
        tidhy.timescales(A), [1 / abs(np.log(0.9)), 1 / abs(np.log(0.5))], rtol=1e-12
    )
    rho, theta = 0.95, 0.3
    R = rho * jnp.array(
        [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    )
    np.testing.assert_allclose(
        tidhy.timescales(R), [1 / abs(np.log(rho))] * 2, rtol=1e-10
    )
    with pytest.raises(TypeError, match="timescales: `A` must be Float"):
        tidhy.timescales(jnp.ones((2, 3)))


@given(st.integers(0, 10_000), st.integers(1, 5))
def test_knn_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    train_x = rng.normal(size=(12, 2)).astype(np.float32)
    train_y = rng.integers(0, 3, size=12)
    test_x = rng.normal(size=(7, 2)).astype(np.float32)
    got = tidhy.knn_classify(
        jnp.asarray(train_x),
        jnp.asarray(train_y),
        jnp.asarray(test_x),
        n_classes=3,
        k=k,
    )
    for i, point in enumerate(test_x):
        nearest = np.argsort(((train_x - point) ** 2).sum(1), kind="stable")[:k]
        votes = np.bincount(train_y[nearest], minlength=3)
        assert int(got[i]) == int(np.argmax(votes))  # ties: the smallest label


def test_blocks_of_time_stay_on_one_side_of_the_split():
    # States in runs of 20 steps; the feature is the time itself, which carries no
    # state beyond "near in time". Single steps split at random decode it (the
    # neighbours in time are reference points); whole runs held out do not.
    runs = jr.randint(jr.key(0), (30,), 0, 4)
    labels = jnp.repeat(runs, 20)
    time = jnp.arange(600.0)[:, None]
    by_step = tidhy.state_decoding_accuracy(time, labels, key=jr.key(1), n_classes=4)
    by_run = tidhy.state_decoding_accuracy(
        time, labels, key=jr.key(1), n_classes=4, block=20
    )
    assert float(by_step) > 0.9
    assert float(by_run) < 0.5
    with pytest.raises(ValueError, match=r"of 2 blocks of 300 samples leaves an"):
        tidhy.state_decoding_accuracy(
            time, labels, key=jr.key(1), n_classes=4, block=300, train_fraction=0.9
        )


def test_knn_and_decoding_accuracy(getkey):
    centres = jnp.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    labels = jnp.repeat(jnp.arange(3), 40)
    features = centres[labels] + 0.3 * jr.normal(getkey(), (120, 2))
    accuracy = tidhy.state_decoding_accuracy(
        features, labels, key=getkey(), n_classes=3
    )
    assert float(accuracy) == 1.0
    shuffled = jr.permutation(getkey(), labels)
    chance = tidhy.state_decoding_accuracy(
        features, shuffled, key=getkey(), n_classes=3
    )
    assert float(chance) < 0.6
    with pytest.raises(
        ValueError, match=r"knn_classify: `k` must be an integer in \[1, "
    ):
        tidhy.knn_classify(features, labels, features, n_classes=3, k=500)
    with pytest.raises(ValueError, match=r"`train_fraction` must be .* in \(0, 1\)"):
        tidhy.state_decoding_accuracy(
            features, labels, key=getkey(), n_classes=3, train_fraction=1.0
        )
