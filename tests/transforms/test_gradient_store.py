"""Projected per-example gradients, the on-disk gradient store and its queries,
against float64 references written from `vmap(grad)` and dense numpy algebra."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transforms import (
    build_gradient_store,
    fisher_inverse,
    GhostFallbackWarning,
    influence_scores,
    open_gradient_store,
    projected_grads,
    self_influence,
    top_k_scores,
    tracin_scores,
)
from transforms._attribution import _store as store_module

from ._ghost_models import CASES, make_case
from ._reference import per_example_grads, projected_reference


def _flat(grads, n) -> np.ndarray:
    return np.concatenate([g.reshape(n, -1) for g in grads], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES + ["gpt_tied_scan"])
def test_projected_grads_equal_projected_vmap_grad(x64, name):
    # Linear, Conv, Embedding, LayerNorm, stacked (scanned) layers, a tied head.
    model, loss, train, _ = make_case(name, n_train=3)
    project = projected_grads(loss, k_out=2, k_in=3)
    layout = project.layout(model, train)
    matrices = project.matrices(model, train)
    rows = eqx.filter_jit(project)(model, train, matrices)
    assert project.plan(model, train).fallback == ()
    ref = projected_reference(model, loss, train, matrices, layout)
    assert rows.shape == ref.shape == (3, sum(b.size for b in layout))
    np.testing.assert_allclose(np.asarray(rows), ref, rtol=1e-10, atol=1e-12)


def test_stacked_layers_are_projected_slice_by_slice(x64):
    model, loss, train, _ = make_case("gpt_scan")
    layout = projected_grads(loss, k_out=2, k_in=3).layout(model, train)
    qkv = next(b for b in layout if "qkv.weight" in b.path)
    assert (qkv.stacked, qkv.kind, qkv.k, qkv.size) == (1, "matrix", (2, 3), 2 * 6)


@pytest.mark.slow
def test_fallback_is_projected_vmap_grad_and_reported(x64):
    model, loss, train, _ = make_case("elementwise")
    project = projected_grads(loss, k_out=2, k_in=2, method="ghost")
    assert project.plan(model, train).fallback == (".scale",)
    with pytest.warns(GhostFallbackWarning, match=r"\.scale"):
        rows = project(model, train)
    matrices = project.matrices(model, train)
    ref = projected_reference(
        model, loss, train, matrices, project.layout(model, train)
    )
    np.testing.assert_allclose(np.asarray(rows), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="fallback=False"):
        projected_grads(loss, k_out=2, k_in=2, fallback=False)(model, train)


@pytest.mark.slow
def test_projection_is_unbiased_in_scale(x64):
    # E‖P_out G P_inᵀ‖² = ‖G‖² for Gaussian matrices of variance 1/k: averaged over
    # seeds, projected squared norms approach the exact ones.
    model, loss, train, _ = make_case("mlp", n_train=2)
    exact = np.sum(_flat(per_example_grads(model, loss, train), 2) ** 2, axis=1)
    project = eqx.filter_jit(projected_grads(loss, k_out=2, k_in=2))
    draws = [
        projected_grads(loss, k_out=2, k_in=2, seed=s).matrices(model, train)
        for s in range(200)
    ]
    est = np.mean(
        [np.sum(np.asarray(project(model, train, m)) ** 2, axis=1) for m in draws],
        axis=0,
    )
    np.testing.assert_allclose(est, exact, rtol=0.15)


def _store(tmp_path, name, project, model, data, **kw):
    kw = {"batch_size": 2, "chunk_size": 4, "progress": False, **kw}
    return build_gradient_store(tmp_path / name, project, model, data, **kw)


@pytest.mark.slow
def test_identity_tracin_equals_exact_gradient_dots(x64, tmp_path):
    model, loss, train, val = make_case("embedding_layernorm", n_train=7, n_val=3)
    project = projected_grads(loss, kind="identity")
    store = _store(tmp_path, "s", project, model, train)
    g = _flat(per_example_grads(model, loss, train), 7)
    gq = _flat(per_example_grads(model, loss, val), 3)
    np.testing.assert_allclose(store.rows(), g, rtol=1e-10, atol=1e-12)
    scores = tracin_scores(store, project, model, val)
    np.testing.assert_allclose(scores, gq @ g.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(self_influence(store), np.sum(g * g, 1), rtol=1e-10)
    # Several checkpoints: the weighted sum of each one's products.
    model2 = jax.tree.map(lambda x: x * 1.1 if eqx.is_inexact_array(x) else x, model)
    store2 = _store(tmp_path, "s2", project, model2, train)
    g2 = _flat(per_example_grads(model2, loss, train), 7)
    gq2 = _flat(per_example_grads(model2, loss, val), 3)
    both = tracin_scores(
        [store, store2], project, [model, model2], val, weights=[0.5, 0.25]
    )
    np.testing.assert_allclose(
        both, 0.5 * gq @ g.T + 0.25 * gq2 @ g2.T, rtol=1e-10, atol=1e-12
    )


@pytest.mark.slow
@pytest.mark.parametrize("blocks", ["full", "layer"])
def test_influence_equals_dense_float64_inverse(x64, tmp_path, blocks):
    model, loss, train, val = make_case("embedding_layernorm", n_train=9, n_val=3)
    project = projected_grads(loss, kind="identity")
    store = _store(tmp_path, "s", project, model, train)
    g = _flat(per_example_grads(model, loss, train), 9)
    gq = _flat(per_example_grads(model, loss, val), 3)
    # The empirical Fisher (1/N) Σ g gᵀ, block-diagonal per parameter leaf or full,
    # each block damped by 0.1 · its mean diagonal entry.
    fisher = g.T @ g / 9
    H = np.zeros_like(fisher)
    if blocks == "full":
        bounds = [(0, fisher.shape[0])]
    else:
        bounds = [(b.offset, b.offset + b.size) for b in store.layout]
    for lo, hi in bounds:
        F = fisher[lo:hi, lo:hi]
        lam = 0.1 * np.trace(F) / (hi - lo)
        H[lo:hi, lo:hi] = F + (lam if lam > 0 else 0.1) * np.eye(hi - lo)
    ref = gq @ np.linalg.solve(H, g.T)
    inverse = fisher_inverse(store, damping=0.1, blocks=blocks)
    scores = influence_scores(store, project, model, val, fisher=inverse)
    np.testing.assert_allclose(scores, ref, rtol=1e-8, atol=1e-10)
    self_ref = np.einsum("nd,nd->n", g, np.linalg.solve(H, g.T).T)
    np.testing.assert_allclose(
        self_influence(store, fisher=inverse), self_ref, rtol=1e-8
    )
    values, indices = top_k_scores(store, project, model, val, 4, fisher=inverse)
    np.testing.assert_array_equal(indices, np.argsort(-ref, axis=1)[:, :4])
    np.testing.assert_allclose(values, np.take_along_axis(ref, indices, 1), rtol=1e-8)
    low, low_idx = top_k_scores(
        store, project, model, val, 2, fisher=inverse, largest=False
    )
    np.testing.assert_array_equal(low_idx, np.argsort(ref, axis=1)[:, :2])


@pytest.mark.slow
def test_influence_with_projection_matchesprojected_reference(
    tmp_path, highest_precision
):
    # float32 (full float32 products, not TF32 on a GPU), Gaussian projections: the
    # same algebra on P·vmap(grad) rows.
    model, loss, train, val = make_case("mlp", dtype=jnp.float32, n_train=6)
    project = projected_grads(loss, k_out=2, k_in=2, seed=3)
    store = _store(tmp_path, "s", project, model, train)
    mats = project.matrices(model, train)
    g = projected_reference(model, loss, train, mats, store.layout)
    gq = projected_reference(model, loss, val, mats, store.layout)
    np.testing.assert_allclose(store.rows(), g, rtol=1e-4, atol=1e-5)
    F = g.T @ g / 6
    lam = 0.1 * np.trace(F) / F.shape[0]
    ref = gq @ np.linalg.solve(F + lam * np.eye(F.shape[0]), g.T)
    inverse = fisher_inverse(store, blocks="full")
    scores = influence_scores(store, project, model, val, fisher=inverse)
    np.testing.assert_allclose(scores, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_store(tmp_path, monkeypatch):
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32, n_train=11)
    project = projected_grads(loss, k_out=2, k_in=2)
    clean = _store(tmp_path, "clean", project, model, train)
    real = store_module._write_chunk
    written = []

    def dies_after_two(path, rows):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real(path, rows)
        written.append(path)

    monkeypatch.setattr(store_module, "_write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _store(tmp_path, "resumed", project, model, train)
    partial = open_gradient_store(tmp_path / "resumed")
    assert partial.complete_chunks() == {0, 1} and not partial.complete
    with pytest.raises(ValueError, match="incomplete"):
        self_influence(partial)
    monkeypatch.setattr(store_module, "_write_chunk", real)
    resumed = _store(tmp_path, "resumed", project, model, train)
    assert resumed.complete
    for c in range(clean.n_chunks):
        name = f"chunk-{c:06d}.npy"
        clean_bytes = (tmp_path / "clean" / name).read_bytes()
        assert (tmp_path / "resumed" / name).read_bytes() == clean_bytes
    # No temporary file outlives the writes.
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(
        os.listdir(tmp_path / "clean")
    )
    meta = json.loads((tmp_path / "resumed" / "metadata.json").read_text())
    assert meta["projection"] == project.config


def test_bad_input_is_refused(tmp_path):
    model, loss, train, val = make_case("mlp", dtype=jnp.float32, n_train=4)
    project = projected_grads(loss, k_out=2, k_in=2)
    store = _store(tmp_path, "s", project, model, train)
    other = jax.tree.map(lambda x: x + 1 if eqx.is_inexact_array(x) else x, model)
    with pytest.raises(ValueError, match="`models` must be the model"):
        tracin_scores(store, project, other, val)
    with pytest.raises(ValueError, match="`projector` must be configured"):
        tracin_scores(store, projected_grads(loss, k_out=2, k_in=2, seed=1), model, val)
    with pytest.raises(ValueError, match="`k_out` must be at most"):
        projected_grads(loss, k_out=7, k_in=2)(model, train)
    with pytest.raises(ValueError, match="`k_in` must be at most"):
        _store(tmp_path, "k", projected_grads(loss, k_out=2, k_in=4), model, train)
    assert projected_grads(loss, k_out=7, k_in=9, fit=True).layout(model, train)
    with pytest.raises(ValueError, match="`data` must be a non-empty batch"):
        _store(tmp_path, "e", project, model, tuple(x[:0] for x in train))
    with pytest.raises(ValueError, match="built differently.*model_sha256"):
        _store(tmp_path, "s", project, other, train)
    with pytest.raises(ValueError, match="`chunk_size` must be a multiple"):
        _store(tmp_path, "c", project, model, train, chunk_size=3)
    with pytest.raises(ValueError, match="`k` must be"):
        top_k_scores(store, project, model, val, 5)
    with pytest.raises(ValueError, match="`weights` must be"):
        tracin_scores(store, project, model, val, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="`damping` must be"):
        fisher_inverse(store, damping=0.0)
    with pytest.raises(ValueError, match="`models` must be one model per store"):
        tracin_scores([store, store], project, model, val)
    with pytest.raises(FileNotFoundError):
        open_gradient_store(tmp_path / "nothing")


def test_store_build_compiles_once(tmp_path):
    # The loss is traced by the shape checks and the plan of each call of the
    # projector, and once inside the compiled batch function; how many batches the
    # data has (and whether the last one is padded) must not change the count.
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32, n_train=7)

    def traces_of_a_build(name, data) -> int:
        traces = []

        def counted(model, *example):
            traces.append(1)
            return loss(model, *example)

        _store(tmp_path, name, projected_grads(counted, k_out=2, k_in=2), model, data)
        return len(traces)

    one_batch = traces_of_a_build("one", tuple(x[:2] for x in train))
    four_batches = traces_of_a_build("four", train)  # 2 + 2 + 2 + 1 padded
    assert one_batch == four_batches


def test_memory_mapped_data_gives_the_same_store(tmp_path):
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32, n_train=5)
    mapped = []
    for n, x in enumerate(train):
        path = tmp_path / f"x{n}.npy"
        np.save(path, np.asarray(x))
        mapped.append(np.load(path, mmap_mode="r"))
    project = projected_grads(loss, k_out=2, k_in=2)
    from_disk = _store(tmp_path, "disk", project, model, tuple(mapped))
    in_memory = _store(tmp_path, "memory", project, model, train)
    np.testing.assert_array_equal(from_disk.rows(), in_memory.rows())


def test_float16_rows_halve_the_bytes(tmp_path):
    model, loss, train, val = make_case("mlp", dtype=jnp.float32, n_train=6)
    project = projected_grads(loss, k_out=2, k_in=2)
    full = _store(tmp_path, "full", project, model, train)
    half = _store(tmp_path, "half", project, model, train, dtype="float16")
    assert full.metadata["dtype"] == "float32" and half.chunk(0).dtype == np.float16
    assert half.chunk(0).nbytes * 2 == full.chunk(0).nbytes
    np.testing.assert_allclose(half.rows(), full.rows(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(
        tracin_scores(half, project, model, val),
        tracin_scores(full, project, model, val),
        rtol=1e-2,
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        _store(tmp_path, "bad", project, model, train, dtype="int8")
