"""Session data sets, the loader, and the chunked, stitched evaluation of long
recordings (against brute force: per-frame searches over the windows)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy

from ..helpers import import_optional
from .helpers import small_model


def _labelled(lengths, D=4):
    """Sessions whose entries say where they come from: feature 0 is the session,
    feature 1 the frame within it."""
    recordings = []
    for s, n in enumerate(lengths):
        x = np.zeros((n, D), np.float32)
        x[:, 0] = s
        x[:, 1] = np.arange(n)
        x[:, 2:] = np.random.default_rng(s).normal(size=(n, D - 2))
        recordings.append(x)
    return recordings


def test_windows_never_cross_a_session_boundary():
    lengths = (23, 9, 15)
    sessions = tidhy.Sessions(
        _labelled(lengths), metadata=[{"id": i} for i in range(3)]
    )
    w = sessions.windows(length=6, stride=4)
    x = np.asarray(w.x)
    # Every window is a run of consecutive frames of one session.
    np.testing.assert_array_equal(
        x[:, :, 0], np.asarray(w.session)[:, None] + 0 * x[:, :, 0]
    )
    np.testing.assert_array_equal(
        x[:, :, 1], np.asarray(w.start)[:, None] + np.arange(6)[None, :]
    )
    counts = np.bincount(np.asarray(w.session))
    np.testing.assert_array_equal(counts, [(n - 6) // 4 + 1 for n in lengths])
    assert bool(jnp.all(w.mask))
    # The same windows as stack_windows on each session alone.
    for s in range(3):
        alone = tidhy.stack_windows(jnp.asarray(sessions.data[s]), 6, 4)
        np.testing.assert_array_equal(x[np.asarray(w.session) == s], alone)


def test_nan_marks_missing_entries_and_masks_combine():
    a, b = _labelled((8, 6))
    a[2, 3] = np.nan
    mask_b = np.ones(6, bool)
    mask_b[4] = False
    sessions = tidhy.Sessions([a, b], masks=[np.ones(a.shape, bool), mask_b])
    assert not sessions.mask[0][2, 3] and sessions.data[0][2, 3] == 0
    assert sessions.mask[0].sum() == a.size - 1
    assert not sessions.mask[1][4].any() and sessions.mask[1].sum() == b.size - 4


def test_split_is_stratified_contiguous_and_keeps_metadata():
    lengths = (40, 20, 30)
    meta = [{"subject": s} for s in "abc"]
    sessions = tidhy.Sessions(_labelled(lengths), metadata=meta, names=["A", "B", "C"])
    train, val = sessions.split(0.25)
    assert train.names == val.names == ("A", "B", "C")
    assert train.metadata == val.metadata == tuple(meta)
    assert val.lengths == (10, 5, 8) and train.lengths == (30, 15, 22)
    for s in range(3):
        frames = np.concatenate([train.data[s][:, 1], val.data[s][:, 1]])
        np.testing.assert_array_equal(frames, np.arange(lengths[s]))
    held_out = sessions.subset([2, 0])
    assert held_out.names == ("C", "A") and held_out.lengths == (30, 40)
    assert held_out.metadata == (meta[2], meta[0])
    np.testing.assert_array_equal(held_out.data[0], sessions.data[2])
    with pytest.raises(ValueError, match="Sessions.subset: `indices` must be"):
        sessions.subset([0, 3])
    with pytest.raises(ValueError, match="`indices` must be distinct"):
        sessions.subset([1, 1])


@pytest.mark.parametrize("scope", ["session", "global"])
def test_zscore_matches_numpy_over_observed_entries(scope):
    rng = np.random.default_rng(0)
    recordings = [
        rng.normal(3.0 * s, 1.0 + s, size=(n, 3)) for s, n in enumerate((50, 30))
    ]
    recordings[0][5, 1] = np.nan
    sessions = tidhy.Sessions(recordings)
    z = sessions.zscore(scope)
    pooled = np.concatenate(recordings)
    for s, x in enumerate(recordings):
        ref = x if scope == "session" else pooled
        expected = (x - np.nanmean(ref, 0)) / np.nanstd(ref, 0)
        observed = ~np.isnan(x)
        np.testing.assert_allclose(z.data[s][observed], expected[observed], rtol=1e-10)
        assert z.data[s][5, 1] == 0 if s == 0 else True
    if scope == "session":
        for x, m in zip(z.data, z.mask):
            np.testing.assert_allclose(x.sum(0) / m.sum(0), 0, atol=1e-12)
    train, val = sessions.split(0.3)
    applied = val.zscore(scope, stats=train.zscore_stats(scope))
    mean, std = train.zscore_stats(scope)
    np.testing.assert_allclose(applied.data[1], (val.data[1] - mean[1]) / std[1])


def test_bad_session_inputs_name_the_argument():
    a, b = _labelled((10, 8))
    with pytest.raises(
        ValueError,
        match=r"Sessions: `recordings\[1\]` must be a session with at least one "
        r"observed entry, got all",
    ):
        tidhy.Sessions([a, np.full((5, 4), np.nan, np.float32)])
    with pytest.raises(
        ValueError,
        match=r"Sessions: `masks\[0\]` must be a bool array of shape \(10, 4\) or "
        r"\(10,\), got shape \(10, 3\)",
    ):
        tidhy.Sessions([a, b], masks=[np.ones((10, 3), bool), np.ones((8, 4), bool)])
    with pytest.raises(TypeError, match=r"`masks\[0\]` must be a bool array"):
        tidhy.Sessions([a], masks=[np.ones((10, 4))])
    with pytest.raises(ValueError, match=r"`recordings\[1\]` must be 4 features"):
        tidhy.Sessions([a, b[:, :3]])
    with pytest.raises(
        ValueError,
        match=r"Sessions.windows: `length` must be at most the length of every "
        r"session \(8 frames in session 'session1'\), got 9",
    ):
        tidhy.Sessions([a, b]).windows(length=9, stride=1)
    with pytest.raises(ValueError, match="`val_fraction`"):
        tidhy.Sessions([a, b]).split(1.0)
    with pytest.raises(ValueError, match="`scope` must be one of"):
        tidhy.Sessions([a, b]).zscore("frame")


def test_load_sessions_npy_npz_and_layouts(tmp_path):
    rng = np.random.default_rng(0)
    keypoints = rng.normal(size=(12, 5, 2)).astype(np.float32)  # frames, keypoints, xy
    np.save(tmp_path / "mouse1.npy", keypoints)
    np.savez(
        tmp_path / "day2.npz", a=rng.normal(size=(9, 10)), b=rng.normal(size=(7, 10))
    )
    sessions = tidhy.load_sessions([tmp_path / "mouse1.npy", tmp_path / "day2.npz"])
    assert sessions.names == ("mouse1", "day2/a", "day2/b")
    assert sessions.lengths == (12, 9, 7) and sessions.n_features == 10
    np.testing.assert_array_equal(sessions.data[0], keypoints.reshape(12, 10))
    assert sessions.data[1].dtype == np.float32
    only_b = tidhy.load_sessions(tmp_path / "day2.npz", key="b", zscore="session")
    assert only_b.lengths == (7,)
    np.testing.assert_allclose(only_b.data[0].mean(0), 0, atol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"load_sessions: `key` must be one of the arrays \['a', 'b'\], got 'c'",
    ):
        tidhy.load_sessions(tmp_path / "day2.npz", key="c")
    with pytest.raises(ValueError, match="`paths` must be files ending in"):
        tidhy.load_sessions(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="`zscore` must be one of"):
        tidhy.load_sessions(tmp_path / "mouse1.npy", zscore="yes")


def test_load_sessions_hdf5(tmp_path):
    h5py = import_optional("h5py")
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "rec.h5", "w") as f:
        f["s2"] = rng.normal(size=(6, 3))
        f.create_group("g")["s1"] = rng.normal(size=(8, 3))
    sessions = tidhy.load_sessions(tmp_path / "rec.h5")
    assert sessions.names == ("rec/g/s1", "rec/s2") and sessions.lengths == (8, 6)
    one = tidhy.load_sessions(tmp_path / "rec.h5", key="g/s1", zscore="global")
    assert one.lengths == (8,)
    with pytest.raises(ValueError, match="`key` must be one of the datasets"):
        tidhy.load_sessions(tmp_path / "rec.h5", key="nope")


def _x64_model(key):
    model = small_model(key)
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, model
    )


def test_chunked_evaluation_equals_one_shot(x64, getkey):
    model = _x64_model(getkey())
    x = np.asarray(jr.normal(getkey(), (41, 4)))
    mask = np.asarray(jr.bernoulli(getkey(), 0.9, x.shape))
    cfg = tidhy.InferenceConfig(max_iter=40)
    kwargs = dict(length=8, stride=3, config=cfg, mask=mask)
    one_shot = tidhy.evaluate_recording(model, x, **kwargs)
    for chunk_size in (1, 4, 5):
        chunked = tidhy.evaluate_recording(model, x, chunk_size=chunk_size, **kwargs)
        for name in ("n_iter", "converged", "window", "starts"):
            np.testing.assert_array_equal(
                getattr(chunked, name), getattr(one_shot, name)
            )
        # Rounding only: another batch size may use other kernels (see the docs).
        for name in ("r", "r2", "x_hat", "spatial_loss_bar", "temporal_loss"):
            np.testing.assert_allclose(
                getattr(chunked, name), getattr(one_shot, name), rtol=1e-12, atol=1e-13
            )


@pytest.mark.parametrize("stitch", ["history", "mean"])
def test_stitching_equals_brute_force_over_windows(getkey, stitch):
    model = small_model(getkey())
    T, L, s = 29, 8, 3
    x = jr.normal(getkey(), (T, 4))
    cfg = tidhy.InferenceConfig(max_iter=30)
    traj = tidhy.evaluate_recording(
        model, x, length=L, stride=s, config=cfg, stitch=stitch
    )
    starts = list(range(0, T - L + 1, s))
    if starts[-1] + L < T:
        starts.append(T - L)  # the window that covers the end
    np.testing.assert_array_equal(traj.starts, starts)
    windows = jnp.stack([x[a : a + L] for a in starts])
    record = tidhy.evaluate_record(model, windows, cfg)
    for t in range(T):
        holders = [k for k, a in enumerate(starts) if a <= t < a + L]
        if stitch == "history":
            k = min(holders, key=lambda k: starts[k])
            expected = record.r[k, t - starts[k]]
            assert traj.window[t] == k
        else:
            expected = np.mean([record.r[k, t - starts[k]] for k in holders], axis=0)
        np.testing.assert_allclose(traj.r[t], expected, rtol=1e-5, atol=1e-6)


def test_evaluate_recording_bad_inputs(getkey):
    model = small_model(getkey())
    x = np.zeros((20, 4), np.float32)
    with pytest.raises(
        ValueError,
        match=r"evaluate_recording: `length` must be at most the recording's 20 "
        r"frames, got 21",
    ):
        tidhy.evaluate_recording(model, x, length=21)
    with pytest.raises(
        ValueError,
        match=r"`mask` must be a bool array of shape \(20, 4\) or \(20,\), got "
        r"shape \(20, 3\)",
    ):
        tidhy.evaluate_recording(model, x, length=5, mask=np.ones((20, 3), bool))
    with pytest.raises(ValueError, match="`stride` must be an integer in"):
        tidhy.evaluate_recording(model, x, length=5, stride=6)
    with pytest.raises(ValueError, match="`config` must be batch_mode='per_window'"):
        tidhy.evaluate_recording(
            model,
            x,
            length=5,
            chunk_size=2,
            config=tidhy.InferenceConfig(batch_mode="reference", max_iter=10),
        )
    with pytest.raises(ValueError, match="`x` must be all finite where observed"):
        tidhy.evaluate_recording(model, x + np.nan, length=5)


def test_training_on_masked_session_windows(getkey):
    recordings = [np.array(jr.normal(getkey(), (n, 4))) for n in (14, 10)]
    recordings[0][3] = np.nan  # a missing frame
    sessions = tidhy.Sessions(recordings)
    w = sessions.windows(length=5, stride=5)
    model = small_model(getkey())
    result = tidhy.train(
        model,
        jnp.where(w.mask, w.x, jnp.nan),
        mask=w.mask,
        n_epochs=2,
        batch_size=2,  # minibatches of (windows, mask) pairs
        inference=tidhy.InferenceConfig(max_iter=20),
        train=tidhy.TiDHyTrainConfig(grad_norm=True),
        progress=False,
    )
    assert all(np.isfinite(float(row["loss"])) for row in result.history)
    trajectories = tidhy.evaluate_sessions(
        result.model,
        sessions,
        length=5,
        stride=2,
        config=tidhy.InferenceConfig(max_iter=20),
    )
    assert [t.r.shape[0] for t in trajectories] == [14, 10]


def test_chunked_evaluation_compiles_once_and_sees_only_a_chunk(getkey, monkeypatch):
    from eqx_models.tidhy import _evaluate, _stream

    shapes = []

    def spy(model, X, config, mask):
        shapes.append(X.shape)
        return _evaluate.evaluate_impl(model, X, config, mask)

    counted = eqx.filter_jit(eqx.debug.assert_max_traces(spy, max_traces=1))
    monkeypatch.setattr(_stream, "_evaluate", counted)
    model = small_model(getkey())
    x = np.asarray(jr.normal(getkey(), (41, 4)))
    cfg = tidhy.InferenceConfig(max_iter=20)
    # 12 windows (11 by the stride, one more to cover the end) in chunks of 5: the
    # last chunk is padded, so every call has the shape of one chunk.
    trajectory = tidhy.evaluate_recording(
        model, x, length=8, stride=3, config=cfg, chunk_size=5
    )
    assert trajectory.starts.size == 12
    assert shapes == [(5, 8, 4)]  # traced once: every call had this shape
