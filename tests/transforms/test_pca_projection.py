"""PCA-initialised projections (`calibrate_projection`) against float64 references:
the second moments of a tiny network's inputs and output gradients written by hand
in numpy, projected `vmap(grad)` gradients, and exact gradient dot products."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from transforms import (
    build_gradient_store,
    calibrate_projection,
    open_gradient_store,
    projected_grads,
    tracin_scores,
)

from ._ghost_models import make_case
from ._reference import per_example_grads, projected_reference


class _Net(eqx.Module):
    """Two linear layers applied at every position of a `[T, 4]` sequence."""

    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.l1 = eqx.nn.Linear(4, 5, key=k1, dtype=jnp.float64)
        self.l2 = eqx.nn.Linear(5, 3, key=k2, dtype=jnp.float64)

    def __call__(self, x):
        return jax.vmap(self.l2)(jnp.tanh(jax.vmap(self.l1)(x)))


def _net_loss(model, x, y):
    return 0.5 * jnp.sum((model(x) - y) ** 2)


def _net_moments(model, x, y) -> dict[str, np.ndarray]:
    """The second moments the calibration must sum, from the network's maths: inputs
    `a` and output gradients `g` of each layer at every position of every example,
    and the biases' per-example gradients `Σ_t g_t`."""
    w1, b1, w2, b2 = (
        np.asarray(p, np.float64)
        for p in (model.l1.weight, model.l1.bias, model.l2.weight, model.l2.bias)
    )
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.tanh(x @ w1.T + b1)  # [N, T, 5]
    g2 = h @ w2.T + b2 - y  # dloss/dout, [N, T, 3]
    g1 = (g2 @ w2) * (1 - h * h)  # [N, T, 5]
    second = lambda v: v.reshape(-1, v.shape[-1]).T @ v.reshape(-1, v.shape[-1])
    return {
        "a1": second(x),
        "g1": second(g1),
        "a2": second(h),
        "g2": second(g2),
        "b1": second(g1.sum(axis=1)),
        "b2": second(g2.sum(axis=1)),
    }


def _top(moment, k) -> np.ndarray:
    w, v = np.linalg.eigh(moment)
    return v[:, np.argsort(w)[::-1][:k]].T


def _assert_equal_up_to_sign(p, ref):
    p = np.asarray(p, np.float64)
    signs = np.sign(np.sum(p * ref, axis=1))
    np.testing.assert_allclose(p, ref * signs[:, None], rtol=1e-8, atol=1e-10)
    # The sign convention: each row's entry of largest magnitude is positive.
    assert np.all(p[np.arange(len(p)), np.argmax(np.abs(p), axis=1)] > 0)


def test_matrices_are_eigenvectors_of_hand_computed_moments(x64):
    model = _Net(jr.key(0))
    x = jr.normal(jr.key(1), (7, 6, 4), jnp.float64)
    y = jr.normal(jr.key(2), (7, 6, 3), jnp.float64)
    # batch_size 3: two full batches and a ragged one, all summed.
    project = calibrate_projection(
        _net_loss, model, (x, y), k_out=2, k_in=3, k_vector=2, batch_size=3
    )
    ref = _net_moments(model, x, y)
    (p1_out, p1_in), (pb1,), (p2_out, p2_in), (pb2,) = project.pca
    _assert_equal_up_to_sign(p1_out, _top(ref["g1"], 2))
    _assert_equal_up_to_sign(p1_in, _top(ref["a1"], 3))
    _assert_equal_up_to_sign(p2_out, _top(ref["g2"], 2))
    _assert_equal_up_to_sign(p2_in, _top(ref["a2"], 3))
    _assert_equal_up_to_sign(pb1, _top(ref["b1"], 2))
    _assert_equal_up_to_sign(pb2, _top(ref["b2"], 2))
    assert project.kind == "pca" and project.config["kind"] == "pca"


def test_a_fallback_matrix_uses_its_gradients_moments(x64):
    model, loss, train, _ = make_case("elementwise", n_train=5)
    project = calibrate_projection(loss, model, train, k_out=2, k_in=2)
    assert project.plan(model, train).fallback == (".scale",)
    G = per_example_grads(model, loss, train)[0]  # `.scale`: [5, 2, 3]
    p_out, p_in = project.pca[0]
    _assert_equal_up_to_sign(p_out, _top(np.einsum("bij,bkj->ik", G, G), 2))
    _assert_equal_up_to_sign(p_in, _top(np.einsum("bij,bik->jk", G, G), 2))


@pytest.mark.parametrize(
    "name",
    [
        "mlp",
        pytest.param("conv", marks=pytest.mark.slow),
        pytest.param("embedding_layernorm", marks=pytest.mark.slow),
        pytest.param("gpt_scan", marks=pytest.mark.slow),
        pytest.param("gpt_tied", marks=pytest.mark.slow),
    ],
)
def test_pca_rows_equal_projected_vmap_grad(x64, name):
    model, loss, train, val = make_case(name, n_train=4, n_val=3)
    project = calibrate_projection(loss, model, train, k_out=2, k_in=3, batch_size=2)
    layout = project.layout(model, val)
    rows = eqx.filter_jit(project)(model, val, project.matrices(model, val))
    ref = projected_reference(model, loss, val, project.pca, layout)
    np.testing.assert_allclose(np.asarray(rows), ref, rtol=1e-10, atol=1e-12)
    # Rows of orthonormal vectors: a projection never lengthens a gradient.
    for mats in project.pca:
        for p in mats:
            np.testing.assert_allclose(p @ p.T, np.eye(len(p)), atol=1e-12)


@pytest.mark.slow
def test_full_rank_pca_gives_exact_tracin(x64, tmp_path):
    model, loss, train, val = make_case("gpt_tied", n_train=5, n_val=2)
    project = calibrate_projection(
        loss, model, train, k_out=64, k_in=64, k_vector=64, fit=True
    )
    store = build_gradient_store(
        tmp_path / "s", project, model, train, batch_size=5, chunk_size=5
    )
    n, q = 5, 2
    g = np.concatenate(
        [x.reshape(n, -1) for x in per_example_grads(model, loss, train)], 1
    )
    gq = np.concatenate(
        [x.reshape(q, -1) for x in per_example_grads(model, loss, val)], 1
    )
    scores = tracin_scores(store, project, model, val)
    np.testing.assert_allclose(scores, gq @ g.T, rtol=1e-9, atol=1e-12)


def test_store_round_trip_and_refusals(x64, tmp_path):
    model, loss, train, val = make_case("mlp", n_train=6, n_val=3)
    project = calibrate_projection(
        loss, model, train, k_out=2, k_in=2, unroll_layers=False
    )
    assert project.unroll_layers is False
    kw = dict(batch_size=2, chunk_size=4, progress=False)
    build_gradient_store(tmp_path / "pca", project, model, train, **kw)
    store = open_gradient_store(tmp_path / "pca")
    assert sorted(os.listdir(tmp_path / "pca"))[-1] == "projection.npz"
    reopened = store.projector(loss)
    assert reopened.config == project.config
    # How the passes run a layer scan does not change the rows: not configuration.
    unrolled = store.projector(loss, unroll_layers=True)
    assert unrolled.unroll_layers is True and unrolled.config == project.config
    scores = tracin_scores(store, reopened, model, val)
    rows, queries = project(model, train), project(model, val)
    ref = np.asarray(queries, np.float64) @ np.asarray(rows, np.float64).T
    np.testing.assert_allclose(scores, ref, rtol=1e-10, atol=1e-12)

    gaussian = projected_grads(loss, k_out=2, k_in=2)
    with pytest.raises(ValueError, match="`projector`.*kind: store 'pca'"):
        tracin_scores(store, gaussian, model, val)
    build_gradient_store(tmp_path / "gauss", gaussian, model, train, **kw)
    with pytest.raises(ValueError, match="kind: store 'gaussian', projector 'pca'"):
        tracin_scores(open_gradient_store(tmp_path / "gauss"), project, model, val)
    other = calibrate_projection(loss, model, val, k_out=2, k_in=2)
    with pytest.raises(ValueError, match="matrices_sha256: store"):
        tracin_scores(store, other, model, val)
    with pytest.raises(ValueError, match="built differently.*matrices_sha256"):
        build_gradient_store(tmp_path / "pca", other, model, train, **kw)

    # Matrices replaced on disk are noticed when the store is opened.
    with np.load(tmp_path / "pca" / "projection.npz") as f:
        arrays = {k: 2 * f[k] for k in f}
    np.savez(tmp_path / "pca" / "projection.npz", **arrays)
    with pytest.raises(ValueError, match="not those its metadata names"):
        open_gradient_store(tmp_path / "pca")
    with open(tmp_path / "pca" / "metadata.json") as f:
        assert json.load(f)["projection"]["matrices_sha256"] == project.pca_sha256


def test_bad_input_is_refused(x64):
    model, loss, train, _ = make_case("mlp", n_train=3)
    with pytest.raises(ValueError, match="`k_in` must be at most"):
        calibrate_projection(loss, model, train, k_out=2, k_in=7)
    with pytest.raises(ValueError, match="`data`.*non-empty batch"):
        calibrate_projection(loss, model, tuple(x[:0] for x in train))
    bad = (train[0].at[1, 0].set(jnp.nan), *train[1:])
    with pytest.raises(ValueError, match=r"`data`.*non-finite.*\.layers\[0\]"):
        calibrate_projection(loss, model, bad, k_out=2, k_in=2)
    other, *_ = make_case("conv")
    project = calibrate_projection(loss, model, train, k_out=2, k_in=2)
    with pytest.raises(ValueError, match="calibrated for another model"):
        project.matrices(other, make_case("conv")[2])


@pytest.mark.slow
def test_pca_keeps_more_of_the_exact_scores_than_gaussian(x64):
    # What PCA is for: at the same k, TracIn scores closer to the exact ones.
    model, loss, train, val = make_case("gpt_tied", n_train=32, n_val=8)
    flat = lambda b, n: np.concatenate(
        [g.reshape(n, -1) for g in per_example_grads(model, loss, b)], 1
    )
    exact = (flat(val, 8) @ flat(train, 32).T).ravel()

    # Validation and training examples in one call: one compilation per projection.
    both = jax.tree.map(lambda v, t: jnp.concatenate([v, t]), val, train)

    def agreement(project):
        rows = np.asarray(eqx.filter_jit(project)(model, both))
        scores = rows[:8] @ rows[8:].T
        return np.corrcoef(scores.ravel(), exact)[0, 1]

    sizes = dict(k_out=2, k_in=2, k_vector=2, fit=True)
    pca = agreement(calibrate_projection(loss, model, train, **sizes))
    gaussian = [agreement(projected_grads(loss, seed=s, **sizes)) for s in range(3)]
    assert pca > max(gaussian), (pca, gaussian)


class _Bag(eqx.Module):
    """An embedding averaged over positions, then a linear head."""

    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.embed = eqx.nn.Embedding(6, 3, key=k1, dtype=jnp.float64)
        self.head = eqx.nn.Linear(3, 2, key=k2, dtype=jnp.float64)

    def __call__(self, tokens):
        return self.head(jnp.mean(jax.vmap(self.embed)(tokens), axis=0))


def test_an_embedding_uses_token_counts_and_output_gradients(x64):
    model = _Bag(jr.key(0))
    # Token counts 8, 5, 4, 2, 1, 0: distinct, so the top eigenvectors are unique.
    counts = [8, 5, 4, 2, 1, 0]
    tokens = np.repeat(np.arange(6), counts).reshape(4, 5)
    y = np.asarray(jr.normal(jr.key(1), (4, 2), jnp.float64))
    project = calibrate_projection(
        _net_loss, model, (jnp.asarray(tokens), jnp.asarray(y)), k_out=2, k_in=2
    )
    E, W, b = (model.embed.weight, model.head.weight, model.head.bias)
    E, W, b = np.asarray(E), np.asarray(W), np.asarray(b)
    h = E[tokens].mean(axis=1)  # [4, 3]
    g_out = h @ W.T + b - y  # [4, 2]
    g_rows = (g_out @ W) / tokens.shape[1]  # dloss/d(each looked-up row), [4, 3]
    (p_vocab, p_dim), (p_head_out, p_head_in), exact_bias = project.pca
    assert exact_bias == ()  # 2 entries, within k_vector
    _assert_equal_up_to_sign(p_vocab, _top(np.diag(counts).astype(float), 2))
    _assert_equal_up_to_sign(p_dim, _top(tokens.shape[1] * g_rows.T @ g_rows, 2))
    _assert_equal_up_to_sign(p_head_out, _top(g_out.T @ g_out, 2))
    _assert_equal_up_to_sign(p_head_in, _top(h.T @ h, 2))


def test_calibration_and_build_compile_once_per_batch_shape(tmp_path):
    # The loss is traced by the checks, the plan and once per compiled batch shape:
    # more batches of the same shape must not add traces, in the calibration pass
    # or in a build with its (array-holding) projector.
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32, n_train=8)

    def traces(n) -> tuple[int, int]:
        count = []

        def counted(model, *example):
            count.append(1)
            return loss(model, *example)

        data = tuple(x[:n] for x in train)
        project = calibrate_projection(
            counted, model, data, k_out=2, k_in=2, batch_size=2
        )
        calibrating = len(count)
        build_gradient_store(
            tmp_path / str(n), project, model, data, batch_size=2, chunk_size=2
        )
        return calibrating, len(count) - calibrating

    assert traces(2) == traces(8)


def test_a_side_beyond_max_side_keeps_the_gaussian_matrix(x64):
    # A vocabulary-sized side is not calibrated (d² memory, d³ eigendecomposition):
    # the embedding's 6-token side keeps the matrix projected_grads draws.
    model = _Bag(jr.key(0))
    tokens = jr.randint(jr.key(1), (4, 5), 0, 6)
    data = (tokens, jr.normal(jr.key(2), (4, 2), jnp.float64))
    sizes = dict(k_out=2, k_in=2)
    project = calibrate_projection(_net_loss, model, data, max_side=5, seed=3, **sizes)
    drawn = projected_grads(_net_loss, seed=3, **sizes).matrices(model, data)
    full = calibrate_projection(_net_loss, model, data, **sizes)
    (p_vocab, p_dim), head, _ = project.pca
    np.testing.assert_array_equal(p_vocab, drawn[0][0])
    np.testing.assert_array_equal(p_dim, full.pca[0][1])
    for p, q in zip(head, full.pca[1]):
        np.testing.assert_array_equal(p, q)
    # Every side but the head's 2 outputs left out, the embedding's K side included.
    small = calibrate_projection(_net_loss, model, data, max_side=2, seed=3, **sizes)
    np.testing.assert_array_equal(small.pca[0][1], drawn[0][1])
    np.testing.assert_array_equal(small.pca[1][0], full.pca[1][0])
    np.testing.assert_array_equal(small.pca[1][1], drawn[1][1])


def test_calibration_memory_does_not_grow_with_the_batch():
    # The moments of a batch are summed one example after another: XLA's
    # temporaries for 16 examples stay near those for 2, where holding each
    # example's 64 × 64 moments (two sides, 32 KB per example) would add 448 KB.
    from transforms._grad._calibration import _batch_moments, _NAME
    from transforms._grad._per_sample import setup
    from transforms._grad._projection import _blocks

    class Wide(eqx.Module):
        layer: eqx.nn.Linear

        def __call__(self, x):
            return jax.vmap(self.layer)(x)

    model = Wide(eqx.nn.Linear(64, 64, use_bias=False, key=jr.key(0)))

    def loss(model, x):
        return jnp.sum(model(x) ** 2)

    def temporaries(batch_size):
        batch = (jnp.ones((batch_size, 4, 64)),)
        s = setup(_NAME, loss, model, batch)
        analysis = s.analyse("project")
        blocks = _blocks(_NAME, s, analysis, 8, 8, 8, "pca", False)
        moments = _batch_moments(analysis, blocks, s.acc, 4096)
        compiled = moments.lower(s.leaves, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_example = 2 * 64 * 64 * 4
    assert temporaries(16) - temporaries(2) < 14 * per_example / 4
