import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqx_models.causal import (
    Channel,
    GRAPH_FAMILIES,
    LinearGaussianSCM,
    sample_dag,
    sample_linear_gaussian_scm,
    sample_task,
    simulate,
    TaskConfig,
)


def _is_dag(adjacency):
    a = np.asarray(adjacency, float)
    power = np.eye(len(a))
    for _ in range(len(a)):
        power = power @ a
    return not power.any()


@pytest.fixture(scope="module")
def graphs():
    """30 graphs of 9 nodes per family, from one compiled sampler (traced codes)."""
    codes = jnp.repeat(jnp.arange(len(GRAPH_FAMILIES)), 30)
    keys = jr.split(jr.key(0), codes.shape[0])
    sample = jax.jit(jax.vmap(lambda k, c: sample_dag(k, 9, c, max_parents=3)))
    out = np.asarray(sample(keys, codes)).reshape(len(GRAPH_FAMILIES), 30, 9, 9)
    return dict(zip(GRAPH_FAMILIES, out)), keys


@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_families(graphs, family):
    d, k = 9, 3
    by_family, keys = graphs
    for a in by_family[family]:
        assert _is_dag(a)
        indegree, outdegree = a.sum(0), a.sum(1)
        assert indegree.max() <= k
        if family == "chain":
            assert a.sum() == d - 1 and indegree.max() == 1 and outdegree.max() == 1
        elif family == "fork":
            assert sorted(outdegree) == [0] * (d - 1) + [d - 1]
        elif family == "collider":
            # Two layers: floor(d/2) colliders with 2..K parents, no node with
            # both parents and children.
            assert (indegree > 0).sum() == d // 2
            assert not ((indegree > 0) & (outdegree > 0)).any()
            assert set(indegree[indegree > 0]) <= {2, 3}
        elif family == "scale_free":
            # Every node but the first has 1 or 2 parents; all share the same m.
            assert sorted(set(indegree)) in ([0, 1], [0, 1, 2])
    # Random labels: edges do not all point from lower to higher indices.
    assert np.mean([np.tril(a, -1).any() for a in by_family[family]]) > 0.8
    # Deterministic given the key.
    index = GRAPH_FAMILIES.index(family)
    again = sample_dag(keys[30 * index + 4], d, family, max_parents=k)
    np.testing.assert_array_equal(again, by_family[family][4])


def test_erdos_renyi_density_and_scale_free_hubs():
    d = 12
    keys = jr.split(jr.key(1), 200)
    er = np.asarray(
        jax.vmap(lambda k: sample_dag(k, d, "erdos_renyi", max_parents=d))(keys)
    )
    # Uncapped, the expected number of edges is edges_per_node * d.
    assert abs(er.sum(axis=(1, 2)).mean() - 1.5 * d) < 1.0
    sf = np.asarray(jax.vmap(lambda k: sample_dag(k, d, "scale_free"))(keys))
    # Preferential attachment makes hubs: the largest out-degree is well above the
    # mean out-degree.
    out_degree = sf.sum(2)
    assert out_degree.max(1).mean() > 2.5 * out_degree.mean()


def test_dag_errors():
    with pytest.raises(ValueError, match="sample_dag: `family` must be one of"):
        sample_dag(jr.key(0), 4, "tree")
    with pytest.raises(
        ValueError, match=r"sample_dag: `family` must be integer ids in \[0, 5\)"
    ):
        sample_dag(jr.key(0), 4, 7)
    with pytest.raises(
        ValueError, match="sample_dag: `n_vars` must be a positive integer"
    ):
        sample_dag(jr.key(0), 0, "chain")
    with pytest.raises(
        ValueError, match="sample_dag: `max_parents` must be a positive integer"
    ):
        sample_dag(jr.key(0), 4, "chain", max_parents=0)


def _covariance(scm):
    w = np.asarray(scm.weights, np.float64)
    m = np.linalg.inv(np.eye(len(w)) - w)
    return m.T @ np.diag(np.asarray(scm.noise_scale, np.float64) ** 2) @ m


def test_scm_parameterisations(x64):
    adjacency = sample_dag(jr.key(2), 7, "erdos_renyi")
    a = np.asarray(adjacency)
    explained = sample_linear_gaussian_scm(jr.key(3), adjacency, standardise=False)
    cov = _covariance(explained)
    np.testing.assert_allclose(np.diag(cov), 1.0, rtol=1e-10)
    w = np.asarray(explained.weights)
    for j in range(7):
        if a[:, j].any():
            r2 = w[:, j] @ cov @ w[:, j]  # variance explained by the parents
            assert 0.3 - 1e-9 <= r2 <= 0.9 + 1e-9
            np.testing.assert_allclose(r2 + explained.noise_scale[j] ** 2, 1.0)
    raw = sample_linear_gaussian_scm(
        jr.key(3), adjacency, explained_variance=None, standardise=False
    )
    assert np.all(np.asarray(raw.noise_scale) >= 0.5)
    magnitudes = np.abs(np.asarray(raw.weights))[a]
    assert magnitudes.min() >= 0.5 and magnitudes.max() <= 2.0
    assert not np.asarray(raw.weights)[~a].any()
    standard = sample_linear_gaussian_scm(jr.key(3), adjacency, explained_variance=None)
    np.testing.assert_allclose(np.diag(_covariance(standard)), 1.0, rtol=1e-10)
    np.testing.assert_array_equal(standard.bias, 0.0)
    # The same model in other units: correlations are unchanged.
    corr = lambda c: c / np.sqrt(np.outer(np.diag(c), np.diag(c)))
    np.testing.assert_allclose(
        corr(_covariance(standard)), corr(_covariance(raw)), atol=1e-10
    )


def test_simulate_matches_the_mechanisms(x64):
    adjacency = sample_dag(jr.key(4), 5, "scale_free")
    scm = sample_linear_gaussian_scm(jr.key(5), adjacency, explained_variance=None)
    n = 20_000
    node = jnp.where(jnp.arange(n) < n // 2, -1, jnp.arange(n) % 5)
    value = jnp.linspace(-3.0, 3.0, n)
    x = np.asarray(jax.jit(simulate)(jr.key(6), scm, node, value))
    node, value = np.asarray(node), np.asarray(value)
    w, b, s = (np.asarray(v) for v in (scm.weights, scm.bias, scm.noise_scale))
    for j in range(5):
        set_here = node == j
        np.testing.assert_array_equal(x[set_here, j], value[set_here])
        residual = (x[~set_here, j] - x[~set_here] @ w[:, j] - b[j]) / s[j]
        # Standard normal noise, independent of the other variables' values.
        assert abs(residual.mean()) < 0.03 and abs(residual.std() - 1) < 0.03
        parents = np.flatnonzero(adjacency[:, j])
        for p in parents:
            assert abs(np.corrcoef(residual, x[~set_here, p])[0, 1]) < 0.03
    observational = x[node < 0]
    np.testing.assert_allclose(np.cov(observational.T), _covariance(scm), atol=0.06)


def test_scm_errors():
    adjacency = jnp.zeros((3, 3), bool)
    with pytest.raises(
        ValueError, match=r"`weight_range\[0\]` must be a finite real number > 0"
    ):
        sample_linear_gaussian_scm(jr.key(0), adjacency, weight_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="`explained_variance"):
        sample_linear_gaussian_scm(jr.key(0), adjacency, explained_variance=(0.5, 1.0))
    # Field shapes are checked by the jaxtyping annotations (dimension d).
    with pytest.raises(TypeCheckError, match="bias"):
        LinearGaussianSCM(adjacency, jnp.zeros((3, 3)), jnp.zeros(2), jnp.ones(3))
    scm = LinearGaussianSCM(adjacency, jnp.zeros((3, 3)), jnp.zeros(3), jnp.ones(3))
    # A length mismatch: the annotations' shared dimension `n` catches it first.
    with pytest.raises(TypeCheckError, match="intervention_value"):
        simulate(jr.key(0), scm, jnp.zeros(4, int), jnp.zeros(3))
    message = r"simulate: `intervened_node` must be -1 \(no intervention\) or a node"
    with pytest.raises(ValueError, match=message + ".*got 3 at index 1"):
        simulate(jr.key(0), scm, jnp.array([0, 3]), jnp.zeros(2))
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(
            eqx.filter_jit(lambda n: simulate(jr.key(0), scm, n, jnp.zeros(2)))(
                jnp.array([0, 3])
            )
        )


@pytest.fixture(scope="module")
def tasks():
    config = TaskConfig(n_vars=6, n_samples=40)
    return jax.vmap(lambda k: sample_task(k, config))(jr.split(jr.key(7), 64))


def test_task_format(tasks):
    data = np.asarray(tasks.data)
    target = np.asarray(tasks.target)
    assert data.shape == (64, 40, 6, 3)
    for t in range(64):
        # The target channel marks the target in every row, nothing else.
        expected = np.zeros((40, 6))
        expected[:, target[t]] = 1
        np.testing.assert_array_equal(data[t, :, :, Channel.TARGET], expected)
        intervened = data[t, :, :, Channel.INTERVENED]
        per_row = intervened.sum(1)
        assert set(per_row) <= {0.0, 1.0}
        assert 4 <= per_row.sum() <= 16  # round(ρN), ρ in [0.1, 0.4]
    # Sink targets: no children.
    children = np.asarray(tasks.adjacency).sum(2)
    assert np.all(children[np.arange(64), target] == 0)
    assert len(set(np.asarray(tasks.family))) == 5


def test_task_targets_and_families():
    any_config = TaskConfig(n_vars=6, n_samples=20, target="any")
    keys = jr.split(jr.key(8), 64)
    general = jax.vmap(lambda k: sample_task(k, any_config))(keys)
    children = np.asarray(general.adjacency).sum(2)[
        np.arange(64), np.asarray(general.target)
    ]
    assert (children > 0).any()  # not only sinks
    only_chains = jax.vmap(
        lambda k: sample_task(k, any_config, jnp.array([1.0, 0, 0, 0, 0]))
    )(keys)
    assert np.all(np.asarray(only_chains.family) == 0)
    np.testing.assert_array_equal(
        sample_task(keys[3], any_config).data, general.data[3]
    )  # deterministic
    assert np.asarray(general.true_parents).shape == (64, 6)


def test_task_errors():
    with pytest.raises(
        ValueError, match="TaskConfig: `n_vars` must be an integer >= 2"
    ):
        TaskConfig(n_vars=1, n_samples=10)
    with pytest.raises(ValueError, match="TaskConfig: `target` must be"):
        TaskConfig(n_vars=3, n_samples=10, target="root")
    with pytest.raises(ValueError, match="TaskConfig: `interventional_fraction`"):
        TaskConfig(n_vars=3, n_samples=10, interventional_fraction=(0.5, 0.2))
    with pytest.raises(
        ValueError, match=r"sample_task: `family_weights` must have shape \(5,\)"
    ):
        sample_task(jr.key(0), TaskConfig(n_vars=3, n_samples=10), jnp.ones(3))
