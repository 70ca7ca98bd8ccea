"""Evaluation of arbitrarily long recordings in chunks of windows, stitched into one
continuous trajectory.

`evaluate_record` holds every window of its input on the device at once; a
recording of 10⁶ frames cut into overlapping windows does not fit. Here the windows
are cut on the host a chunk at a time, each chunk runs through the same compiled
evaluation (one compilation: the last chunk is padded), and only the frames each
window contributes to the stitched trajectory are copied back. Windows are
independent in the per-window mode, so the result does not depend on the chunk
size.
"""

from typing import Any, NamedTuple

import numpy as np
from jaxtyping import Bool, Float, Int

from transforms.validation import (
    check_choice,
    check_size,
    check_type,
    fail,
    typechecked,
)

from ._evaluate import _evaluate
from ._inference import InferenceConfig
from ._model import TiDHy
from ._sessions import Sessions
from ._windows import window_starts


STITCH_RULES = ("history", "mean")
_FLOAT_FIELDS = (
    "x_hat",
    "x_bar",
    "r",
    "r_bar",
    "r2",
    "w",
    "spatial_loss_hat",
    "spatial_loss_bar",
    "temporal_loss",
)


class Trajectory(NamedTuple):
    """One recording's stitched evaluation (host NumPy arrays, one row per frame).

    - `x_hat`, `x_bar`, `r`, `r_bar`, `r2`, `w`, `spatial_loss_hat`,
        `spatial_loss_bar`, `temporal_loss`: as in [`eqx_models.tidhy.Record`][],
        with the window axis stitched away: shape `(T, ...)`.
    - `n_iter`, `converged`: the inference diagnostics of every frame, shape
        `(T,)`, from the window that gave the frame under the `"history"` rule.
    - `window`: that window's index in `starts`, shape `(T,)`.
    - `starts`: the first frame of every window evaluated, shape `(N,)`.
    """

    x_hat: Float[np.ndarray, "T D"]
    x_bar: Float[np.ndarray, "T D"]
    r: Float[np.ndarray, "T r"]
    r_bar: Float[np.ndarray, "T r"]
    r2: Float[np.ndarray, "T r2"]
    w: Float[np.ndarray, "T mix"]
    spatial_loss_hat: Float[np.ndarray, "T D"]
    spatial_loss_bar: Float[np.ndarray, "T D"]
    temporal_loss: Float[np.ndarray, "T r"]
    n_iter: Int[np.ndarray, " T"]
    converged: Bool[np.ndarray, " T"]
    window: Int[np.ndarray, " T"]
    starts: Int[np.ndarray, " N"]


def _new_frames(starts: np.ndarray, length: int) -> np.ndarray:
    """For every window, the first of its positions that no earlier window covers
    (so window k gives frames `starts[k] + first[k]` to `starts[k] + length - 1`)."""
    previous_end = np.concatenate([[0], starts[:-1] + length])
    return np.maximum(previous_end - starts, 0)


@typechecked
def evaluate_recording(
    model: TiDHy,
    x: Any,
    *,
    length: int,
    stride: int | None = None,
    config: InferenceConfig = InferenceConfig(),
    mask: Any = None,
    chunk_size: int | None = None,
    stitch: str = "history",
) -> Trajectory:
    """Evaluate a model over a whole recording of any length, in chunks of windows,
    and stitch the windows into one trajectory.

    The recording is cut into windows of `length` frames starting `stride` apart
    (the rule of [`eqx_models.tidhy.stack_windows`][]), plus one window ending at
    the last frame when the last frames would otherwise be left out. Each window is
    evaluated as by [`eqx_models.tidhy.evaluate_record`][] (first-step inference,
    then one-step-ahead predictions and inference at every step), `chunk_size`
    windows per compiled call, so that device memory is bounded by the chunk, not
    by the recording. The windows are cut on the host from `x` (a NumPy array
    stays on the host) and only the stitched trajectory, one row per frame, is
    kept.

    Stitching: every frame lies in one or more windows. `"history"` (default)
    takes each frame from the window that started earliest among those containing
    it: the inference is causal (a step uses only the steps before it), so that
    window has seen the most of the frame's past, and its slow latent `r2`, which
    starts from 0 in every window, is the most warmed up. Frame `t` then comes from
    window `k` for `starts[k-1] + length <= t < starts[k] + length`; the trajectory
    switches windows there, so with overlapping windows every frame past the
    first window has at least `length - stride` frames of history. `"mean"`
    averages each floating field over all windows containing the frame (the
    diagnostics still follow `"history"`).

    In the per-window mode (the default) windows are independent, so the result
    does not depend on `chunk_size`: the same iteration counts, and the same values
    up to rounding (XLA may pick other kernels for another batch size, which
    changes the last bit of a product; float64 runs agree to ~1e-16, float32 ones
    to the inner loop's sensitivity to that last bit). The reference mode, whose
    batch-mean energy couples the windows of a call, needs `chunk_size=None`.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `x`: the recording, shape `(T, D)` (NumPy or JAX), `T >= length`.
    - `length`: frames per window, at least 2.
    - `stride`: frames between window starts, in `[1, length]` (default
        `length`: no overlap).
    - `config`: an [`eqx_models.tidhy.InferenceConfig`][].
    - `mask`: optional bool array of shape `(T, D)` or `(T,)`, True where
        observed (see [`eqx_models.tidhy.evaluate_record`][]).
    - `chunk_size`: windows per compiled call, or `None` for all at once.
    - `stitch`: `"history"` or `"mean"`.

    **Returns:**

    A [`eqx_models.tidhy.Trajectory`][].

    **Raises:**

    `ValueError` if `x` is not a `(T, D)` array matching the model, `T < length`,
    `stride` is outside `[1, length]`, `mask` has the wrong shape, `chunk_size`
    is given in the reference mode, or `stitch` is unknown; the errors of
    [`eqx_models.tidhy.evaluate_record`][] for non-finite observed entries;
    `TypeError` for sizes that are not integers or a `mask` that is not bool.
    """
    fn = "evaluate_recording"
    check_type(fn, "model", model, TiDHy, "a TiDHy model")
    check_type(fn, "config", config, InferenceConfig, "an InferenceConfig")
    length = check_size(fn, "length", length, minimum=2)
    stride = (
        length if stride is None else check_size(fn, "stride", stride, maximum=length)
    )
    check_choice(fn, "stitch", stitch, STITCH_RULES)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != model.input_dim:
        raise fail(
            fn, "x", f"an array of shape (T, {model.input_dim})", f"shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise fail(fn, "x", "a floating array", f"dtype {x.dtype}", TypeError)
    n_frames = x.shape[0]
    if n_frames < length:
        raise fail(
            fn, "length", f"at most the recording's {n_frames} frames", str(length)
        )
    if mask is not None:
        mask = np.asarray(mask)
        expected = f"a bool array of shape {x.shape} or {x.shape[:1]}"
        if mask.dtype != np.bool_:
            raise fail(fn, "mask", expected, f"dtype {mask.dtype}", TypeError)
        if mask.shape == x.shape[:1]:
            mask = np.broadcast_to(mask[:, None], x.shape)
        elif mask.shape != x.shape:
            raise fail(fn, "mask", expected, f"shape {mask.shape}")
        x = np.where(mask, x, 0).astype(x.dtype)
    if not np.all(np.isfinite(x)):
        raise fail(fn, "x", "all finite where observed", "NaN or inf")
    starts = window_starts(n_frames, length, stride, cover_end=True)
    n_windows = len(starts)
    if chunk_size is None:
        chunk_size = n_windows
    else:
        chunk_size = check_size(fn, "chunk_size", chunk_size)
        if config.batch_mode != "per_window" and chunk_size < n_windows:
            raise fail(
                fn,
                "config",
                "batch_mode='per_window' for a chunked evaluation (the reference "
                "mode's batch-mean energy couples the windows of a call), or "
                "chunk_size=None",
                repr(config.batch_mode),
            )
    first = _new_frames(starts, length)
    offsets = np.arange(length)
    out: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts = np.zeros(n_frames, np.int64) if stitch == "mean" else None
    window_of = np.zeros(n_frames, np.int64)
    for begin in range(0, n_windows, chunk_size):
        chunk = np.arange(begin, min(begin + chunk_size, n_windows))
        # The last chunk repeats its last window up to `chunk_size`, so every call
        # has one shape (one compilation); the repeats are discarded.
        padded = np.concatenate(
            [chunk, np.full(chunk_size - len(chunk), chunk[-1], chunk.dtype)]
        )
        index = starts[padded][:, None] + offsets[None, :]
        windows = x[index]
        window_mask = None if mask is None else mask[index]
        record = _evaluate(model, windows, config, window_mask)
        fields = {name: np.asarray(getattr(record, name)) for name in _FLOAT_FIELDS}
        fields["n_iter"] = np.asarray(record.n_iter)
        fields["converged"] = np.asarray(record.converged)
        for j, k in enumerate(chunk):
            frames = slice(starts[k] + first[k], starts[k] + length)
            for name, value in fields.items():
                if name not in out:
                    out[name] = np.zeros((n_frames, *value.shape[2:]), value.dtype)
                out[name][frames] = value[j, first[k] :]
            window_of[frames] = k
            if counts is not None:
                span = slice(starts[k], starts[k] + length)
                for name in _FLOAT_FIELDS:
                    if name not in sums:
                        shape = (n_frames, *fields[name].shape[2:])
                        sums[name] = np.zeros(shape, np.float64)
                    sums[name][span] += fields[name][j]
                counts[span] += 1
    if counts is not None:
        for name in _FLOAT_FIELDS:
            scale = counts.reshape(-1, *([1] * (sums[name].ndim - 1)))
            out[name] = (sums[name] / scale).astype(out[name].dtype)
    return Trajectory(
        **{name: out[name] for name in _FLOAT_FIELDS},
        n_iter=out["n_iter"],
        converged=out["converged"],
        window=window_of,
        starts=starts,
    )


@typechecked
def evaluate_sessions(
    model: TiDHy,
    sessions: Sessions,
    *,
    length: int,
    stride: int | None = None,
    config: InferenceConfig = InferenceConfig(),
    chunk_size: int | None = None,
    stitch: str = "history",
) -> list[Trajectory]:
    """[`eqx_models.tidhy.evaluate_recording`][] on every session, with its mask.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `sessions`: a [`eqx_models.tidhy.Sessions`][].
    - `length`, `stride`, `config`, `chunk_size`, `stitch`: as in
        `evaluate_recording`.

    **Returns:**

    One [`eqx_models.tidhy.Trajectory`][] per session, in order.

    **Raises:**

    `TypeError` if `sessions` is not a `Sessions`; the errors of
    `evaluate_recording` (a `length` longer than a session, say).
    """
    check_type("evaluate_sessions", "sessions", sessions, Sessions, "a tidhy.Sessions")
    return [
        evaluate_recording(
            model,
            x,
            length=length,
            stride=stride,
            config=config,
            mask=m,
            chunk_size=chunk_size,
            stitch=stitch,
        )
        for x, m in zip(sessions.data, sessions.mask)
    ]
