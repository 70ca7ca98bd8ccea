import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.causal import (
    AdditiveFourierSCM,
    candidate_variables,
    Channel,
    MLPSCM,
    sample_nonlinear_scm,
    sample_task,
    sample_training_batch,
    simulate,
    TaskConfig,
)


# An independent float64 NumPy evaluation of the mechanisms, written from the
# formulas in the docstrings.


def _np_fields(scm):
    return {k: np.asarray(v, np.float64) for k, v in vars(scm).items()}


def _np_mean(scm, x, j):
    p = _np_fields(scm)
    parents = np.flatnonzero(p["adjacency"][:, j])
    if isinstance(scm, MLPSCM):
        pre = p["b_in"][j] + sum(
            (np.outer(x[:, i], p["w_in"][i, j]) for i in parents),
            np.zeros((x.shape[0], p["b_in"].shape[1])),
        )
        return np.tanh(pre) @ p["w_out"][j] + p["bias"][j]
    total = np.full(x.shape[0], p["bias"][j])
    for i in parents:
        for m in range(p["frequency"].shape[2]):
            total += p["amplitude"][i, j, m] * np.cos(
                p["frequency"][i, j, m] * x[:, i] + p["phase"][i, j, m]
            )
    return total


def _np_noise_std(scm, x, j):
    p = _np_fields(scm)
    parents = np.flatnonzero(p["adjacency"][:, j])
    z = sum((p["noise_weights"][i, j] * x[:, i] for i in parents), np.zeros(len(x)))
    return p["noise_scale"][j] * np.exp(0.5 * np.tanh(z))


def _np_order(adjacency):
    a = np.asarray(adjacency)
    order, left = [], set(range(len(a)))
    while left:
        ready = [j for j in sorted(left) if not any(a[i, j] for i in left)]
        order += ready
        left -= set(ready)
    return order


def _np_simulate_noiseless(scm, node, value):
    d = scm.n_vars
    x = np.zeros((len(node), d))
    for j in _np_order(scm.adjacency):
        x[:, j] = np.where(node == j, value, _np_mean(scm, x, j))
    return x


@pytest.fixture(scope="module")
def graph():
    # A 6-node graph with a collider of 3 parents and a chain below it.
    a = np.zeros((6, 6), bool)
    a[0, 3] = a[1, 3] = a[2, 3] = a[3, 4] = a[4, 5] = a[0, 5] = True
    return jnp.asarray(a)


MECHANISMS = ["mlp", "rff"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_samples_follow_the_mechanisms(graph, mechanism, x64):
    scm = sample_nonlinear_scm(
        jr.key(0), graph, mechanism=mechanism, noise="heteroscedastic", n_hidden=5
    )
    assert scm.bias.dtype == jnp.float64
    noiseless = eqx.tree_at(lambda m: m.noise_scale, scm, jnp.zeros(6))
    node = np.array([-1] * 6 + [3] * 4 + [4] * 4 + [0] * 4)
    value = np.linspace(-2.0, 2.0, node.size)
    x = simulate(jr.key(1), noiseless, jnp.asarray(node), jnp.asarray(value))
    expected = _np_simulate_noiseless(noiseless, node, value)
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-10, atol=1e-10)
    # With noise: the standardised residuals of every non-intervened cell are
    # N(0, 1), whatever the parents (heteroscedastic scale included).
    n = 4000
    x = np.asarray(simulate(jr.key(2), scm, -jnp.ones(n, int), jnp.zeros(n)))
    for j in range(1, 6):
        r = (x[:, j] - _np_mean(scm, x, j)) / _np_noise_std(scm, x, j)
        assert abs(r.mean()) < 4 / np.sqrt(n)
        assert abs(r.var() - 1) < 0.1
        # Independent of the parents' values (also of their magnitudes).
        for i in np.flatnonzero(np.asarray(graph)[:, j]):
            assert abs(np.corrcoef(r, x[:, i])[0, 1]) < 0.06
            assert abs(np.corrcoef(r**2, np.abs(x[:, i]))[0, 1]) < 0.06
    # Standardised on a pilot sample: mean ~0, variance ~1.
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.15)
    np.testing.assert_allclose(x.std(0), 1.0, atol=0.15)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_interventions_cut_incoming_edges(graph, mechanism):
    scm = sample_nonlinear_scm(jr.key(3), graph, mechanism=mechanism)
    n = 50
    key = jr.key(4)
    observational = np.asarray(simulate(key, scm, -jnp.ones(n, int), jnp.zeros(n)))
    done = np.asarray(simulate(key, scm, jnp.full(n, 3), jnp.full(n, 2.5)))
    # X_3 no longer listens to its parents; its non-descendants (0, 1, 2) are
    # untouched (same noise), its descendants (4, 5) respond to the new value.
    np.testing.assert_array_equal(done[:, 3], 2.5)
    np.testing.assert_array_equal(done[:, :3], observational[:, :3])
    assert np.all(np.abs(done[:, 4:] - observational[:, 4:]).max(0) > 1e-3)
    # And the intervened variable's value does not depend on its parents: the
    # parents' values vary, X_3 does not.
    assert np.ptp(done[:, 0]) > 0.5


def test_jit_vmap_and_determinism(graph):
    sample = jax.jit(
        jax.vmap(lambda k: sample_nonlinear_scm(k, graph, mechanism="rff"))
    )
    scms = sample(jr.split(jr.key(0), 3))
    assert scms.amplitude.shape[0] == 3
    one = sample_nonlinear_scm(jr.split(jr.key(0), 3)[1], graph, mechanism="rff")
    np.testing.assert_allclose(scms.amplitude[1], one.amplitude, rtol=1e-5)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(key, scm, node, value):
        return simulate(key, scm, node, value)

    node, value = jnp.array([-1, 2, 3]), jnp.array([0.0, 1.0, -1.0])
    for seed in range(2):
        np.testing.assert_allclose(
            run(jr.key(seed), one, node, value),
            simulate(jr.key(seed), one, node, value),
            rtol=1e-5,
            atol=1e-6,
        )


def test_bad_inputs(graph):
    cycle = jnp.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
    with pytest.raises(ValueError, match="adjacency"):
        sample_nonlinear_scm(jr.key(0), cycle)
    with pytest.raises(ValueError, match="mechanism"):
        sample_nonlinear_scm(jr.key(0), graph, mechanism="linear")
    with pytest.raises(ValueError, match="noise"):
        sample_nonlinear_scm(jr.key(0), graph, noise="poisson")
    with pytest.raises((ValueError, TypeError), match="w_out"):
        MLPSCM(
            graph,
            jnp.zeros((6, 6, 2)),
            jnp.zeros((6, 2)),
            jnp.zeros((6, 3)),
            jnp.zeros(6),
            jnp.ones(6),
            jnp.zeros((6, 6)),
        )
    with pytest.raises(TypeError, match="phase"):
        AdditiveFourierSCM(
            graph,
            jnp.zeros((6, 6, 2)),
            None,
            jnp.zeros((6, 6, 2)),
            jnp.zeros(6),
            jnp.ones(6),
            jnp.zeros((6, 6)),
        )
    with pytest.raises(ValueError, match="noise"):
        TaskConfig(n_vars=3, n_samples=10, noise="heteroscedastic")
    with pytest.raises(ValueError, match="mechanism"):
        TaskConfig(n_vars=3, n_samples=10, mechanism="gp")
    with pytest.raises(ValueError, match="label_smoothing"):
        TaskConfig(n_vars=3, n_samples=10, label_smoothing=1.0)


def test_linear_tasks_unchanged_by_the_new_options():
    default = sample_task(jr.key(5), TaskConfig(n_vars=4, n_samples=20))
    explicit = sample_task(
        jr.key(5), TaskConfig(n_vars=4, n_samples=20, mechanism="linear")
    )
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_nonlinear_tasks_and_truth_labels():
    mlp = TaskConfig(n_vars=4, n_samples=16, mechanism="mlp", n_hidden=4)
    task = sample_task(jr.key(6), mlp)
    assert task.data.shape == (16, 4, 3)
    assert isinstance(task.scm, MLPSCM)
    marks = np.asarray(task.data[..., Channel.TARGET])
    assert (marks.argmax(1) == int(task.target)).all()
    # Truth labels, smoothed: (1 - ε) on the true set plus ε spread uniformly.
    config = TaskConfig(
        n_vars=4,
        n_samples=16,
        mechanism="rff",
        max_parents=2,
        n_hidden=4,
        label_smoothing=0.2,
    )
    batch = sample_training_batch(jr.key(7), config, 4, 2)
    assert bool(batch.valid.all())
    probs = np.exp(np.asarray(batch.expert_log_probs, np.float64))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs.max(1), 0.8 + 0.2 / 7, rtol=1e-5)
    tasks = jax.vmap(lambda k: sample_task(k, config))(jr.split(jr.key(7), 4))
    np.testing.assert_array_equal(tasks.data, batch.data)
    for b in range(4):
        members = np.asarray(candidate_variables(tasks.target[b], 4, 2))
        chosen = set(members[probs[b].argmax()].tolist()) - {-1}
        truth = set(np.flatnonzero(np.asarray(tasks.true_parents[b])).tolist())
        assert chosen == truth
    # A true set larger than K is no candidate: the task is skipped, not mislabelled.
    small_k = sample_training_batch(jr.key(7), config, 4, 0)
    sizes = np.asarray(tasks.true_parents).sum(1)
    np.testing.assert_array_equal(small_k.valid, sizes == 0)


def test_task_stream_mixes_mechanisms():
    from eqx_models.causal import Curriculum, TaskStream

    linear = TaskConfig(n_vars=3, n_samples=10, max_parents=1)
    mlp = TaskConfig(n_vars=3, n_samples=10, max_parents=1, mechanism="mlp")
    # All weight on the MLP bucket: every batch is labelled by the truth.
    stream = TaskStream(
        [(linear, 2), (mlp, 2)], 1, 4, Curriculum((0.0, 1.0), (0.0, 1.0)), jr.key(0)
    )
    for step in range(2):
        assert stream.bucket_and_families(step)[0] == 1
        probs = np.exp(np.asarray(stream(step).expert_log_probs))
        np.testing.assert_array_equal(probs.max(1), 1.0)
