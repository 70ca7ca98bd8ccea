"""Streaming (chunked) and online EM against batch EM."""

import jax.random as jr
import numpy as np
import pytest

from eqx_models.chmm import (
    CHMM,
    em,
    expected_counts,
    online_em,
    sample,
    seen_transitions,
    SparseCHMM,
    streaming_em,
    streaming_expected_counts,
)

from .test_inference import close, METHODS, UNEVEN


def _data(layout, steps=23, seed=0):
    model = CHMM.random(layout, 2, key=jr.key(seed))
    a = jr.randint(jr.key(seed + 1), (steps,), 0, 2)
    x, _ = sample(model, a, key=jr.key(seed + 2))
    return model, np.asarray(x), np.asarray(a)


@pytest.mark.parametrize("layout", [(2, 3, 1), UNEVEN])
@pytest.mark.parametrize("method", METHODS)
def test_chunked_counts_are_exact(x64, layout, method):
    dense, x, a = _data(layout)
    for model in (dense, SparseCHMM.from_dense(dense, seen_transitions(x, a))):
        want, want_lnl = expected_counts(model, x, a, method=method)
        # One chunk, several (with a ragged last one), one step per chunk.
        for chunk_size in (22, 5, 1):
            counts, lnl = streaming_expected_counts(
                model, x, a, chunk_size=chunk_size, method=method
            )
            close(counts, want)
            close(lnl, want_lnl)


def test_one_chunk_is_batch_em(x64):
    # Bit for bit with the scan (what the streaming docstring promises); the
    # parallel strategy, `"auto"`'s choice on a GPU, agrees up to rounding
    # (`test_chunked_counts_are_exact`).
    model, x, a = _data((2, 3, 1))
    counts, _ = streaming_expected_counts(model, x, a, chunk_size=22, method="scan")
    np.testing.assert_array_equal(
        counts, expected_counts(model, x, a, method="scan")[0]
    )
    want, want_curve = em(model, x, a, n_iter=3, pseudocount=0.1)
    got, curve = streaming_em(model, x, a, n_iter=3, chunk_size=22, pseudocount=0.1)
    close(got.T, want.T)
    close(curve, want_curve)
    got, curve = streaming_em(model, x, a, n_iter=3, chunk_size=4, pseudocount=0.1)
    close(got.T, want.T)
    close(curve, want_curve)


def test_sequences_of_unequal_length(x64):
    model, x, a = _data((2, 3, 1), steps=30)
    xs, as_ = [x, x[:11], x[:3]], [a, a[:11], a[:3]]
    want, want_lnl = expected_counts(model, xs, as_)
    counts, lnl = streaming_expected_counts(model, xs, as_, chunk_size=4)
    close(counts, want)
    close(lnl, want_lnl)
    trained, curve = streaming_em(model, xs, as_, n_iter=2, chunk_size=4)
    want_model, want_curve = em(model, xs, as_, n_iter=2)
    close(trained.T, want_model.T)
    close(curve, want_curve)


def test_online_em_improves_and_reduces_to_em(x64):
    model, x, a = _data((2, 3, 1), steps=40)
    # A step size of one on a single chunk holding the sequence is one EM step.
    one, _ = online_em(model, x, a, chunk_size=39, step_size=lambda k: 1.0)
    step, _ = em(model, x, a, n_iter=1)
    close(one.T, step.T)
    trained, lnls = online_em(model, x, a, chunk_size=8, n_epochs=3)
    assert lnls.shape == (15,)  # 5 chunks per epoch
    assert np.all(np.isfinite(lnls))
    before = expected_counts(model, x, a)[1]
    after = expected_counts(trained, x, a)[1]
    assert after > before
    sums = np.asarray(trained.T).sum(-1)
    close(sums[sums > 0], np.ones(np.sum(sums > 0)), tol=1e-10)


def test_bad_chunk_sizes():
    model, x, a = _data((2, 1))
    for fn in (streaming_expected_counts, online_em):
        for bad in (0, -3):
            with pytest.raises(ValueError, match="`chunk_size`"):
                fn(model, x, a, chunk_size=bad)
        # (Under the suite the jaxtyping hook reports the type in its own words.)
        with pytest.raises(TypeError, match="chunk_size"):
            fn(model, x, a, chunk_size=2.5)
    with pytest.raises(ValueError, match="`chunk_size`"):
        streaming_em(model, x, a, n_iter=1, chunk_size=0)
    with pytest.raises(ValueError, match="`x`"):
        streaming_expected_counts(model, x + 5, a, chunk_size=3)
    with pytest.raises(ValueError, match="`n_epochs`"):
        online_em(model, x, a, chunk_size=3, n_epochs=0)


@pytest.mark.parametrize("method", METHODS)
def test_groups_of_chunks_read_from_the_host_give_the_same_counts(x64, method):
    # Reference: the counts of batch EM. Groups of 1 and 3 chunks of 4 steps over
    # 30 steps (8 chunks: the last group ragged), and a group larger than the
    # sequence; a sparse model and a list of unequal sequences too.
    dense, x, a = _data(UNEVEN, steps=31)
    xs, as_ = [x, x[:11], x[:2]], [a, a[:11], a[:2]]
    for model in (dense, SparseCHMM.from_dense(dense, seen_transitions(x, a))):
        want, want_lnl = expected_counts(model, xs, as_, method=method)
        for per_call in (1, 3, 20):
            counts, lnl = streaming_expected_counts(
                model, xs, as_, chunk_size=4, method=method, chunks_per_call=per_call
            )
            close(counts, want)
            close(lnl, want_lnl)


def test_groups_read_from_a_memory_mapped_file(x64, tmp_path):
    # The sequence never has to be in memory: int64 ids in .npy files, opened
    # memory-mapped; EM and online EM give what they give on the arrays in memory.
    model, x, a = _data((2, 3, 1), steps=40)
    np.save(tmp_path / "x.npy", x.astype(np.int64))
    np.save(tmp_path / "a.npy", a.astype(np.int64))
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    am = np.load(tmp_path / "a.npy", mmap_mode="r")
    want, want_curve = em(model, x, a, n_iter=2, pseudocount=0.1)
    got, curve = streaming_em(
        model, xm, am, n_iter=2, chunk_size=5, pseudocount=0.1, chunks_per_call=3
    )
    close(got.T, want.T)
    close(curve, want_curve)
    # Online EM makes the same updates whether a call holds 3 chunks or all 8.
    kwargs = dict(chunk_size=5, n_epochs=2, pseudocount=0.1)
    want_model, want_lnls = online_em(model, x, a, **kwargs)
    got_model, lnls = online_em(model, xm, am, chunks_per_call=3, **kwargs)
    close(got_model.T, want_model.T)
    close(lnls, want_lnls)


def test_groups_compile_once_for_every_length(x64):
    from eqx_models.chmm import _streaming

    model, x, a = _data((2, 3, 1), steps=60)
    before = {f: f._cached._cache_size() for f in _GROUPED(_streaming)}
    for steps in (59, 41, 23):
        streaming_expected_counts(
            model, x[: steps + 1], a[: steps + 1], chunk_size=4, chunks_per_call=2
        )
    after = {f: f._cached._cache_size() for f in _GROUPED(_streaming)}
    assert all(after[f] - before[f] <= 1 for f in after), (before, after)


def _GROUPED(module):
    return (module._forward_group, module._backward_group, module._first_alpha_of)


def test_bad_groups():
    model, x, a = _data((2, 1), steps=30)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="`chunks_per_call`"):
            streaming_expected_counts(model, x, a, chunk_size=3, chunks_per_call=bad)
    with pytest.raises(TypeError, match="chunks_per_call"):
        online_em(model, x, a, chunk_size=3, chunks_per_call=1.5)
    # Ids are checked a group at a time; the message names the slice.
    bad_x = x.copy()
    bad_x[25] = 7
    message = r"in x\[24:30\]; its index 0 is x\[24\]\): `x` must be .* index \(1,\)"
    with pytest.raises(ValueError, match=message):
        streaming_em(model, bad_x, a, n_iter=1, chunk_size=3, chunks_per_call=2)
