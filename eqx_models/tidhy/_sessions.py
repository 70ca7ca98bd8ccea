"""Real recordings: several sessions of unequal length, with missing entries.

A `Sessions` holds one `(T_i, D)` array per session on the host (NumPy), with an
observation mask and optional metadata; it cuts windows that never cross a session
boundary, splits every session into training and validation parts, and z-scores.
`load_sessions` reads the common layouts (`.npy`, `.npz`, HDF5 through the optional
`h5py`). Everything here runs eagerly in NumPy: recordings are data, not traced.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from transforms.validation import (
    check_choice,
    check_in_range,
    check_size,
    describe,
    fail,
    typechecked,
)

from ._windows import window_starts


ZSCORE_SCOPES = ("session", "global")


class SessionWindows(NamedTuple):
    """Windows cut from a [`eqx_models.tidhy.Sessions`][], session by session.

    - `x`: the windows, shape `(N, length, D)`, 0 at missing entries.
    - `mask`: True where observed, shape `(N, length, D)`.
    - `session`: the session of every window, shape `(N,)`.
    - `start`: the first step of every window within its session, shape `(N,)`.
    """

    x: Float[Array, "N length D"]
    mask: Bool[Array, "N length D"]
    session: Int[Array, " N"]
    start: Int[Array, " N"]


def _as_recording(fn: str, arg: str, value: Any) -> np.ndarray:
    expected = "a 2-D floating array (frames, features)"
    try:
        array = np.asarray(value)
    except Exception:  # a ragged list, say: report it as what it is
        raise fail(fn, arg, expected, describe(value), TypeError) from None
    if not np.issubdtype(array.dtype, np.floating):
        raise fail(fn, arg, expected, describe(value), TypeError)
    if array.ndim != 2:
        raise fail(fn, arg, expected, f"shape {array.shape}")
    return array


class Sessions:
    """Several recordings (sessions) of the same features, of unequal lengths.

    Each session is a `(T_i, D)` array of frames × features kept on the host.
    Missing entries are marked by the mask (False) or by NaN in the data (NaN
    entries are masked automatically and stored as 0). The windows of
    [`eqx_models.tidhy.Sessions.windows`][] never cross a session boundary, and
    their masks go straight to [`eqx_models.tidhy.train`][] and
    [`eqx_models.tidhy.evaluate_record`][].

    **Arguments:**

    - `recordings`: a sequence of floating arrays of shape `(T_i, D)`, one per
        session (same `D`).
    - `masks`: optional sequence of bool arrays of shape `(T_i, D)` (or `(T_i,)`
        for whole frames), True where observed.
    - `names`: optional distinct names (default `"session0"`, `"session1"`, ...).
    - `metadata`: optional sequence of mappings, one per session (subject, date,
        condition, ...), carried along by `split` and `zscore`.

    **Raises:**

    `ValueError` if there is no session, the feature counts differ, a mask's shape
    differs from its recording's, a recording holds `±inf`, a session has no
    observed entry at all (all NaN or masked), or `names` / `metadata` have
    another length than `recordings` or repeat a name; `TypeError` for a
    recording that is not a 2-D floating array or a mask that is not bool.

    !!! example

        ```python
        sessions = Sessions([x_a, x_b, x_c])  # (T_i, D) arrays, NaN = missing
        train, val = sessions.zscore("session").split(0.2)
        w = train.windows(length=200, stride=20)
        result = tidhy.train(model, w.x, mask=w.mask, n_epochs=100)
        ```
    """

    data: tuple[np.ndarray, ...]
    mask: tuple[np.ndarray, ...]
    names: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...]

    def __init__(
        self,
        recordings: Sequence[Any],
        *,
        masks: Sequence[Any] | None = None,
        names: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ):
        fn = "Sessions"
        if isinstance(recordings, np.ndarray) or not isinstance(recordings, Sequence):
            raise fail(
                fn,
                "recordings",
                "a sequence of (T_i, D) arrays",
                describe(recordings),
                TypeError,
            )
        if len(recordings) == 0:
            raise fail(fn, "recordings", "at least one session", "none")
        arrays = [
            _as_recording(fn, f"recordings[{i}]", x) for i, x in enumerate(recordings)
        ]
        n_features = arrays[0].shape[1]
        for i, x in enumerate(arrays):
            if x.shape[1] != n_features:
                raise fail(
                    fn,
                    f"recordings[{i}]",
                    f"{n_features} features (those of recordings[0])",
                    f"shape {x.shape}",
                )
        n = len(arrays)
        for arg, value in (("masks", masks), ("names", names), ("metadata", metadata)):
            if value is not None and len(value) != n:
                raise fail(fn, arg, f"{n} entries (one per session)", str(len(value)))
        data, full_masks = [], []
        for i, x in enumerate(arrays):
            observed = ~np.isnan(x)
            if masks is not None:
                m = np.asarray(masks[i])
                if m.dtype != np.bool_:
                    raise fail(
                        fn, f"masks[{i}]", "a bool array", describe(masks[i]), TypeError
                    )
                if m.shape == x.shape[:1]:
                    m = np.broadcast_to(m[:, None], x.shape)
                elif m.shape != x.shape:
                    raise fail(
                        fn,
                        f"masks[{i}]",
                        f"a bool array of shape {x.shape} or {x.shape[:1]}",
                        f"shape {m.shape}",
                    )
                observed = observed & m
            if np.any(np.isinf(x) & observed):
                raise fail(
                    fn, f"recordings[{i}]", "finite (NaN marks a missing entry)", "inf"
                )
            if not np.any(observed):
                raise fail(
                    fn,
                    f"recordings[{i}]",
                    "a session with at least one observed entry",
                    f"all {x.size} entries missing (NaN or masked)",
                )
            data.append(np.where(observed, x, 0).astype(x.dtype))
            full_masks.append(observed)
        names = tuple(f"session{i}" for i in range(n)) if names is None else names
        names = tuple(str(name) for name in names)
        if len(set(names)) != n:
            raise fail(fn, "names", "distinct names", repr(names))
        self.data = tuple(data)
        self.mask = tuple(full_masks)
        self.names = names
        self.metadata = tuple(dict(m) for m in metadata) if metadata else ({},) * n

    def __repr__(self) -> str:
        return (
            f"Sessions({len(self)} sessions, lengths {list(self.lengths)}, "
            f"{self.n_features} features)"
        )

    def __len__(self) -> int:
        return len(self.data)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The number of frames of every session."""
        return tuple(x.shape[0] for x in self.data)

    @property
    def n_features(self) -> int:
        """The number of features `D`."""
        return self.data[0].shape[1]

    def _replace(self, data, mask) -> "Sessions":
        return Sessions(
            list(data), masks=list(mask), names=self.names, metadata=self.metadata
        )

    def subset(self, indices: Sequence[int]) -> "Sessions":
        """The sessions at `indices`, in that order, with their masks, names and
        metadata: to hold out whole sessions (across-session generalisation), as
        opposed to `split`, which holds out part of every session.

        **Arguments:**

        - `indices`: session indices in `[0, S)`, at least one, no repeats.

        **Returns:**

        A [`eqx_models.tidhy.Sessions`][].

        **Raises:**

        `ValueError` for no index, an index out of range or a repeated one;
        `TypeError` for an index that is not an integer.
        """
        fn = "Sessions.subset"
        if len(indices) == 0:
            raise fail(fn, "indices", "at least one session index", "none")
        chosen = [
            check_size(fn, "indices", i, minimum=0, maximum=len(self) - 1)
            for i in indices
        ]
        if len(set(chosen)) != len(chosen):
            raise fail(fn, "indices", "distinct indices", repr(list(indices)))
        return Sessions(
            [self.data[i] for i in chosen],
            masks=[self.mask[i] for i in chosen],
            names=[self.names[i] for i in chosen],
            metadata=[self.metadata[i] for i in chosen],
        )

    def windows(self, length: int, stride: int) -> SessionWindows:
        """Cut every session into windows, as
        [`eqx_models.tidhy.stack_windows`][] does for one record.

        Windows start at `0, stride, 2 stride, ...` within each session, so no
        window crosses a session boundary; a session yields
        `(T_i - length) // stride + 1` windows, session by session in order. The
        last frames of a session that no window reaches are left out (as in
        `stack_windows`); [`eqx_models.tidhy.evaluate_recording`][] covers them.

        **Arguments:**

        - `length`: steps per window, at least 2 and at most the shortest
            session's length.
        - `stride`: steps between window starts, at least 1.

        **Returns:**

        A [`eqx_models.tidhy.SessionWindows`][].

        **Raises:**

        `ValueError` if `length < 2`, `stride < 1`, or `length` exceeds a
        session's length (naming the session); `TypeError` if either is not an
        integer.
        """
        fn = "Sessions.windows"
        length = check_size(fn, "length", length, minimum=2)
        stride = check_size(fn, "stride", stride)
        xs, masks, session, start = [], [], [], []
        for i, (x, m) in enumerate(zip(self.data, self.mask)):
            if x.shape[0] < length:
                raise fail(
                    fn,
                    "length",
                    f"at most the length of every session ({x.shape[0]} frames in "
                    f"session {self.names[i]!r})",
                    str(length),
                )
            starts = window_starts(x.shape[0], length, stride)
            index = starts[:, None] + np.arange(length)[None, :]
            xs.append(x[index])
            masks.append(m[index])
            session.append(np.full(len(starts), i))
            start.append(starts)
        return SessionWindows(
            x=jnp.asarray(np.concatenate(xs)),
            mask=jnp.asarray(np.concatenate(masks)),
            session=jnp.asarray(np.concatenate(session)),
            start=jnp.asarray(np.concatenate(start)),
        )

    def split(self, val_fraction: float) -> tuple["Sessions", "Sessions"]:
        """Split every session into a training part and a validation part.

        Stratified by session: each session gives its first
        `T_i - round(val_fraction T_i)` frames to training and the rest to
        validation (at least one frame each), so every session is represented in
        both in the same proportion. The parts are contiguous, so windows cut from
        them afterwards never share a frame between training and validation (a
        random split of overlapping windows would). Names and metadata are kept.

        **Arguments:**

        - `val_fraction`: the fraction of every session held out, in `(0, 1)`.

        **Returns:**

        `(train, val)`, two [`eqx_models.tidhy.Sessions`][].

        **Raises:**

        `ValueError` for a fraction outside `(0, 1)`, a session shorter than 2
        frames, or a part with no observed entry.
        """
        fn = "Sessions.split"
        check_in_range(
            fn, "val_fraction", val_fraction, low=0, high=1, inclusive=(False, False)
        )
        cuts = []
        for name, n in zip(self.names, self.lengths):
            if n < 2:
                raise fail(
                    fn, "sessions", "sessions of at least 2 frames", f"{n} in {name!r}"
                )
            cuts.append(min(max(n - round(val_fraction * n), 1), n - 1))
        train = self._replace(
            [x[:c] for x, c in zip(self.data, cuts)],
            [m[:c] for m, c in zip(self.mask, cuts)],
        )
        val = self._replace(
            [x[c:] for x, c in zip(self.data, cuts)],
            [m[c:] for m, c in zip(self.mask, cuts)],
        )
        return train, val

    def zscore_stats(self, scope: str = "session") -> tuple[np.ndarray, np.ndarray]:
        """The means and standard deviations `zscore` uses, over observed entries.

        **Arguments:**

        - `scope`: `"session"` (statistics of every session on its own) or
            `"global"` (pooled over all sessions, the same for every session).

        **Returns:**

        `(mean, std)`, float64 arrays of shape `(S, D)`. A feature with no spread
        (or no observed entry) gets std 1, so it is only centred.

        **Raises:**

        `ValueError` for another `scope`.
        """
        check_choice("Sessions.zscore_stats", "scope", scope, ZSCORE_SCOPES)
        sums = np.stack([np.sum(x, 0, dtype=np.float64) for x in self.data])
        counts = np.stack([np.sum(m, 0) for m in self.mask]).astype(np.float64)
        if scope == "global":
            sums, counts = sums.sum(0, keepdims=True), counts.sum(0, keepdims=True)
        mean = sums / np.maximum(counts, 1)
        means = mean if scope == "session" else np.repeat(mean, len(self), 0)
        squares = np.stack(
            [
                np.sum(np.where(m, (x - mu) ** 2, 0), 0, dtype=np.float64)
                for x, m, mu in zip(self.data, self.mask, means)
            ]
        )
        if scope == "global":
            squares = squares.sum(0, keepdims=True)
        std = np.sqrt(squares / np.maximum(counts, 1))
        std = np.where(std > 0, std, 1.0)
        if scope == "global":
            std = np.repeat(std, len(self), 0)
        return means, std

    def zscore(
        self,
        scope: str = "session",
        *,
        stats: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> "Sessions":
        """Standardise every feature to mean 0 and standard deviation 1.

        `"session"` z-scores each session with its own statistics (removes
        per-session offsets and gains, e.g. camera placement or animal size);
        `"global"` uses statistics pooled over all sessions (keeps the differences
        between sessions). Only observed entries enter the statistics; missing
        entries stay missing. To apply training statistics to validation data,
        pass `stats=train.zscore_stats(scope)` (same sessions, as after `split`).

        **Arguments:**

        - `scope`: `"session"` or `"global"`.
        - `stats`: optional `(mean, std)` of shape `(S, D)` to use instead of this
            data's own.

        **Returns:**

        A new [`eqx_models.tidhy.Sessions`][] with the same names, masks and
        metadata.

        **Raises:**

        `ValueError` for another `scope`, or `stats` of the wrong shape or with a
        non-positive or non-finite std.
        """
        fn = "Sessions.zscore"
        check_choice(fn, "scope", scope, ZSCORE_SCOPES)
        if stats is None:
            mean, std = self.zscore_stats(scope)
        else:
            mean, std = (np.asarray(s, np.float64) for s in stats)
            expected = (len(self), self.n_features)
            if mean.shape != expected or std.shape != expected:
                raise fail(
                    fn,
                    "stats",
                    f"(mean, std) of shape {expected}",
                    f"shapes {mean.shape}, {std.shape}",
                )
            check_in_range(fn, "stats", mean)
            check_in_range(fn, "stats", std, low=0, inclusive=(False, True))
        data = [
            np.where(m, (x - mu) / sd, 0).astype(x.dtype)
            for x, m, mu, sd in zip(self.data, self.mask, mean, std)
        ]
        return self._replace(data, self.mask)


def _flatten_frames(fn: str, arg: str, array: np.ndarray) -> np.ndarray:
    """(T, ...) -> (T, D): keypoints × coordinates become features."""
    array = np.asarray(array)
    if array.ndim < 2:
        raise fail(
            fn,
            arg,
            "an array of frames × features (2-D or more)",
            f"shape {array.shape}",
        )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array.reshape(array.shape[0], -1)


def _read_hdf5(fn: str, path: Path, key: str | None) -> list[tuple[str, np.ndarray]]:
    try:
        import h5py  # pyright: ignore[reportMissingImports]  (an optional extra)
    except ImportError:
        raise ImportError(
            f"{fn}: reading {path.name} needs h5py: pip install 'eqx-models[h5py]'"
        ) from None
    with h5py.File(path, "r") as f:
        found: list[str] = []
        f.visititems(
            lambda name, obj: (
                found.append(name) if isinstance(obj, h5py.Dataset) else None
            )
        )
        if key is not None and key not in found:
            raise fail(fn, "key", f"one of the datasets {sorted(found)}", repr(key))

        def read(name: str) -> np.ndarray:
            dataset = f[name]
            assert isinstance(dataset, h5py.Dataset)  # `found` lists datasets only
            return np.asarray(dataset[()])

        names = [key] if key is not None else sorted(found)
        return [(f"{path.stem}/{name}", read(name)) for name in names]


@typechecked
def load_sessions(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    key: str | None = None,
    zscore: str | None = None,
    metadata: Sequence[Mapping[str, Any]] | None = None,
    dtype: Any = np.float32,
) -> Sessions:
    """Load recordings of frames × features, one session per array.

    The layout: every array has frames on its first axis; further axes (keypoints
    × coordinates, say `(T, K, 2)`) are flattened into `D` features. NaN marks a
    missing entry (an undetected keypoint).

    - `.npy`: one session per file.
    - `.npz`: every array in the file is a session (named `file/array`, in file
        order), or only the array `key`.
    - `.h5` / `.hdf5` (needs the optional `h5py`: `pip install
        'eqx-models[h5py]'`): every dataset in the file (named `file/path`, in
        sorted order), or only the dataset at `key`.

    Sessions keep the order of `paths`, then the order within each file.

    **Arguments:**

    - `paths`: a file or a sequence of files.
    - `key`: the array (npz) or dataset path (HDF5) to read from each file.
    - `zscore`: `None` (default: as stored), `"session"` or `"global"`; see
        [`eqx_models.tidhy.Sessions.zscore`].
    - `metadata`: optional mappings, one per session loaded.
    - `dtype`: the floating dtype of the loaded data (float32).

    **Returns:**

    A [`eqx_models.tidhy.Sessions`][].

    **Raises:**

    `ValueError` for an unknown file extension, a `key` that is not in a file
    (the message lists the keys found), an array with fewer than 2 axes, an
    unknown `zscore`, or the errors of [`eqx_models.tidhy.Sessions`][] (features
    that differ, an all-NaN session); `ImportError` for an HDF5 file without
    h5py; `FileNotFoundError` for a missing file.
    """
    fn = "load_sessions"
    if zscore is not None:
        check_choice(fn, "zscore", zscore, ZSCORE_SCOPES)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    loaded: list[tuple[str, np.ndarray]] = []
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            loaded.append((path.stem, np.load(path, allow_pickle=False)))
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if key is not None:
                    if key not in names:
                        raise fail(fn, "key", f"one of the arrays {names}", repr(key))
                    names = [key]
                loaded.extend((f"{path.stem}/{n}", archive[n]) for n in names)
        elif suffix in (".h5", ".hdf5"):
            loaded.extend(_read_hdf5(fn, path, key))
        else:
            raise fail(
                fn, "paths", "files ending in .npy, .npz, .h5 or .hdf5", repr(str(path))
            )
    recordings = [
        _flatten_frames(fn, f"paths ({name})", array).astype(dtype)
        for name, array in loaded
    ]
    sessions = Sessions(
        recordings, names=[name for name, _ in loaded], metadata=metadata
    )
    return sessions if zscore is None else sessions.zscore(zscore)
