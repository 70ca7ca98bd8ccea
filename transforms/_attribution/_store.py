"""An on-disk store of projected per-example gradients for a whole dataset.

Layout of a store directory:

| file                | content                                                    |
| ------------------- | ---------------------------------------------------------- |
| `metadata.json`     | format, library version, model fingerprint, projection     |
|                     | (kind, seed, sizes), row layout, rows, row size, chunking  |
| `projection.npz`    | a `"pca"` projector's matrices (`leaf{n}_{j}`), whose      |
|                     | SHA-256 the metadata's projection records                  |
| `index.json`        | `{"complete": [chunk ids]}`: the chunks fully written      |
| `chunk-NNNNNN.npy`  | rows `[c·chunk_size, (c+1)·chunk_size)` as an `[n, dim]`   |
|                     | array, read back memory-mapped                             |

Every file is written to a temporary file and moved into place (`os.replace`, the
checkpoints' writer), the chunk before the index that names it: a process killed at
any point leaves complete chunks and an index that names only complete ones (and
the matrices before the metadata that names them), and a
resumed build computes the missing chunks only. Rows are computed batch by batch
with one compiled function (the last batch padded), so a resumed build gives the
same bytes as an uninterrupted one.
"""

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .._grad._ghost_rules import acc_dtype
from .._grad._per_sample import as_batch
from .._grad._projection import (
    matrices_sha256,
    projected_grads,
    ProjectedGrads,
    ProjectionBlock,
    with_matrices,
)
from .._train._checkpoint import _describe, _write_atomically
from .._validation import (
    check_choice,
    check_size,
    check_type,
    describe,
    fail,
    typechecked,
)
from .._version import __version__


_FORMAT = 1
_DTYPES = (None, "float16", "float32", "float64")
_METADATA = "metadata.json"
_INDEX = "index.json"
_MATRICES = "projection.npz"


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.npy"


@typechecked
def model_fingerprint(model: Any) -> str:
    """The SHA-256 of a model's arrays (values, shapes, dtypes and paths).

    A gradient store records the fingerprint of the model it was built from, and a
    query with another model (other weights, e.g. a later checkpoint) is refused.

    **Arguments:**

    - `model`: any pytree.

    **Returns:**

    64 lowercase hex digits.

    **Raises:**

    `ValueError` if `model` holds no arrays.
    """
    arrays = eqx.filter(model, eqx.is_array)
    if not jax.tree.leaves(arrays):
        raise fail(
            "model_fingerprint", "model", "a pytree with arrays", describe(model)
        )
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, arrays)
    digest = hashlib.sha256(json.dumps(_describe(model)).encode())
    digest.update(buffer.getvalue())
    return digest.hexdigest()


class GradientStore:
    """A store of projected per-example gradients on disk; build it with
    [`transforms.build_gradient_store`][] or open one with
    [`transforms.open_gradient_store`][].

    Attributes: `path`; `metadata` (the parsed `metadata.json`: `model_sha256`,
    `projection`, `layout`, `n_rows`, `dim`, `chunk_size`, `batch_size`, `user`);
    `n_rows`, `dim`, `chunk_size`; `layout`, the [`transforms.ProjectionBlock`][]s
    of a row; `matrices`, a `"pca"` projection's matrices (else `None`).
    """

    def __init__(self, path: str | os.PathLike):
        """Open the store at `path` (see [`transforms.open_gradient_store`][]).

        **Raises:**

        `FileNotFoundError` if `path` holds no store; `ValueError` if its metadata
        is of another format, or its `"pca"` matrices are missing or altered.
        """
        self.path = os.fspath(path)
        meta_path = os.path.join(self.path, _METADATA)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"GradientStore: no gradient store at {self.path!r} (no {_METADATA})."
            )
        with open(meta_path) as f:
            self.metadata: dict[str, Any] = json.load(f)
        if self.metadata.get("format") != _FORMAT:
            raise ValueError(
                f"GradientStore: {self.path!r} has format "
                f"{self.metadata.get('format')!r}; this library reads {_FORMAT}."
            )
        self.n_rows: int = self.metadata["n_rows"]
        self.dim: int = self.metadata["dim"]
        self.chunk_size: int = self.metadata["chunk_size"]
        self.layout = tuple(
            ProjectionBlock(**{**b, "shape": tuple(b["shape"]), "k": tuple(b["k"])})
            for b in self.metadata["layout"]
        )
        self.matrices: list[tuple] | None = None
        if self.metadata["projection"]["kind"] == "pca":
            self.matrices = _read_matrices(self.path, len(self.layout))
            want = self.metadata["projection"]["matrices_sha256"]
            if matrices_sha256(self.matrices) != want:
                raise ValueError(
                    f"GradientStore: the projection matrices in {self.path!r} "
                    f"({_MATRICES}) are not those its metadata names (SHA-256 "
                    f"{want[:12]}…): the file was altered or replaced."
                )

    def __repr__(self) -> str:
        done = len(self.complete_chunks())
        return (
            f"GradientStore({self.path!r}, rows={self.n_rows}, dim={self.dim}, "
            f"chunks {done}/{self.n_chunks} complete)"
        )

    @property
    def n_chunks(self) -> int:
        """The number of chunks of a complete store."""
        return -(-self.n_rows // self.chunk_size)

    def complete_chunks(self) -> set[int]:
        """The ids of the chunks written completely (from `index.json`)."""
        index = os.path.join(self.path, _INDEX)
        if not os.path.isfile(index):
            return set()
        with open(index) as f:
            return set(json.load(f)["complete"])

    @property
    def complete(self) -> bool:
        """Whether every chunk has been written."""
        return len(self.complete_chunks()) == self.n_chunks

    def chunk(self, c: int) -> np.ndarray:
        """Chunk `c`'s rows, `[n, dim]`, memory-mapped (read-only).

        **Raises:**

        `ValueError` if chunk `c` is not complete.
        """
        if c not in self.complete_chunks():
            raise ValueError(
                f"GradientStore.chunk: `c` must name a complete chunk of "
                f"{self.path!r} (0..{self.n_chunks - 1}, complete: "
                f"{len(self.complete_chunks())}), got {c!r}."
            )
        return np.load(os.path.join(self.path, _chunk_name(c)), mmap_mode="r")

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """`(first row, rows)` for every chunk, in order; memory-mapped.

        **Raises:**

        `ValueError` if the store is incomplete (an interrupted build: run
        [`transforms.build_gradient_store`][] again to finish it).
        """
        self.check_complete("GradientStore.chunks")
        for c in range(self.n_chunks):
            yield c * self.chunk_size, self.chunk(c)

    def rows(self) -> np.ndarray:
        """All rows, `[n_rows, dim]`, read into memory (small stores only).

        **Raises:**

        `ValueError` if the store is incomplete.
        """
        return np.concatenate([rows for _, rows in self.chunks()])

    def check_complete(self, caller: str) -> None:
        """Raise `ValueError` naming `caller` if some chunk is missing."""
        if not self.complete:
            raise ValueError(
                f"{caller}: the gradient store {self.path!r} is incomplete "
                f"({len(self.complete_chunks())} of {self.n_chunks} chunks); run "
                "`build_gradient_store` again with the same arguments to finish it."
            )

    def projector(
        self,
        loss_fn: Callable,
        *,
        method: str = "auto",
        fallback: bool = True,
        unroll_layers: bool | str = "auto",
    ) -> ProjectedGrads:
        """The projector the store was built with, for queries in a new process:
        from its seed, or with the `"pca"` matrices read from the store.

        **Arguments:**

        - `loss_fn`: the loss of one example, as given to the store's projector.
        - `method`, `fallback`, `unroll_layers`: as for
            [`transforms.projected_grads`][].

        **Returns:**

        A [`transforms.ProjectedGrads`][] whose configuration is the store's.

        **Raises:**

        As [`transforms.projected_grads`][].
        """
        config = self.metadata["projection"]
        options = {key: config[key] for key in ("k_out", "k_in", "k_vector", "fit")}
        options.update(method=method, fallback=fallback, unroll_layers=unroll_layers)
        if config["kind"] != "pca":
            return projected_grads(
                loss_fn, kind=config["kind"], seed=config["seed"], **options
            )
        base = projected_grads(loss_fn, **options)
        assert self.matrices is not None  # read in `__init__` for a "pca" store
        return with_matrices(base, self.matrices)

    def check_model(
        self, caller: str, projector: ProjectedGrads, model: Any, arg: str = "model"
    ) -> None:
        """Refuse a model or projection other than the store's.

        **Raises:**

        `ValueError` naming `arg` if `model`'s fingerprint differs from the store's,
        or `projector` if its configuration does (naming the fields that differ).
        """
        stored, got = self.metadata["projection"], projector.config
        if got != stored:
            fields = sorted(k for k in {*stored, *got} if stored.get(k) != got.get(k))
            differ = "; ".join(
                f"{k}: store {stored.get(k)!r}, projector {got.get(k)!r}"
                for k in fields
            )
            raise ValueError(
                f"{caller}: `projector` must be configured as the store's projection "
                f"{stored}, got {got} ({differ})."
            )
        got = model_fingerprint(model)
        if got != self.metadata["model_sha256"]:
            raise ValueError(
                f"{caller}: `{arg}` must be the model the gradient store "
                f"{self.path!r} was built from (fingerprint "
                f"{self.metadata['model_sha256'][:12]}…), got a model with "
                f"fingerprint {got[:12]}…: other weights or structure."
            )


@typechecked
def open_gradient_store(path: str | os.PathLike) -> GradientStore:
    """Open a gradient store written by [`transforms.build_gradient_store`][].

    **Arguments:**

    - `path`: the store's directory.

    **Returns:**

    A [`transforms.GradientStore`][] (complete or not: see its `complete`).

    **Raises:**

    `TypeError` if `path` is not a `str`/`os.PathLike`; `FileNotFoundError` if it
    holds no store; `ValueError` for a store of another format.
    """
    check_type("open_gradient_store", "path", path, (str, os.PathLike), "a path")
    return GradientStore(path)


def _row_dtype(model: Any) -> Any:
    """The projector's row dtype: float32, or wider for wider parameters."""
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return acc_dtype(*[x.dtype for x in leaves])


def _write_json(path: str, value: dict) -> None:
    _write_atomically(path, [json.dumps(value, indent=1).encode()])


def _write_matrices(directory: str, matrices: list) -> None:
    arrays = {
        f"leaf{n}_{j}": np.asarray(m)
        for n, mats in enumerate(matrices)
        for j, m in enumerate(mats)
    }
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    _write_atomically(os.path.join(directory, _MATRICES), [buffer.getvalue()])


def _read_matrices(directory: str, n_leaves: int) -> list[tuple]:
    path = os.path.join(directory, _MATRICES)
    if not os.path.isfile(path):
        raise ValueError(
            f"GradientStore: {directory!r} was built with a 'pca' projection but "
            f"holds no {_MATRICES}."
        )
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    return [
        tuple(
            jnp.asarray(arrays[f"leaf{n}_{j}"])
            for j in range(sum(k.startswith(f"leaf{n}_") for k in arrays))
        )
        for n in range(n_leaves)
    ]


def _write_chunk(path: str, rows: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    _write_atomically(path, [buffer.getvalue()])


# At module level, so that builds with equal projectors (and loss functions) and
# shapes reuse one compiled function.
@eqx.filter_jit
def _rows(projector, model, mats, batch):
    return projector(model, batch, mats)


def _differences(stored: dict, expected: dict) -> list[str]:
    return [
        f"{key}: stored {stored.get(key)!r}, now {expected[key]!r}"
        for key in expected
        if key != "library_version" and stored.get(key) != expected[key]
    ]


@typechecked
def build_gradient_store(
    path: str | os.PathLike,
    projector: ProjectedGrads,
    model: Any,
    data: Any,
    *,
    batch_size: int | np.integer = 32,
    chunk_size: int | np.integer = 1024,
    dtype: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> GradientStore:
    """Project the per-example gradients of a whole dataset and write them to disk.

    The model streams over `data` in batches of `batch_size`; every `chunk_size`
    rows are written as one `.npy` chunk (atomically, then recorded in the store's
    index). If `path` already holds a store built with the same model, projection,
    data shapes and chunking, the chunks it has are kept and only the missing ones
    are computed: a build killed part-way resumes where it stopped and gives the
    same store.

    **Arguments:**

    - `path`: the store's directory (created if missing).
    - `projector`: a [`transforms.ProjectedGrads`][] (its loss, sizes and seed);
        the matrices of a `"pca"` one ([`transforms.calibrate_projection`][]) are
        saved with the store (`projection.npz`).
    - `model`: the model (one checkpoint); its fingerprint is stored.
    - `data`: a tuple of arrays sharing a leading axis of `N` examples (NumPy arrays,
        memory-mapped ones included, or JAX arrays); example `i` is
        `tuple(x[i] for x in data)`. NumPy arrays stay where they are and are read
        one batch at a time.
    - `batch_size`: examples per compiled call; `chunk_size` must be a multiple.
    - `chunk_size`: rows per chunk file.
    - `dtype`: the rows' dtype on disk: `None` (default) keeps the projector's
        (float32, or float64 under float64 parameters); `"float16"` halves the bytes
        and the query traffic (about 3 significant digits; a row that overflows
        float16 is an error); `"float32"`, `"float64"`. Queries compute in float32
        or wider.
    - `metadata`: a JSON-serialisable mapping stored as `metadata["user"]`.
    - `progress`: a tqdm bar over chunks (`None`: when writing to a terminal).

    **Returns:**

    The complete [`transforms.GradientStore`][].

    **Raises:**

    `TypeError`/`ValueError` for a `path` that is not a path, a `projector` that is
    not a `ProjectedGrads`, empty or ragged `data`, sizes that are not positive
    integers or a `chunk_size` that is not a multiple of `batch_size`;
    `ValueError` if `path` holds a store built differently (naming what differs),
    for an unknown `dtype` or a float16 row that overflows, and as the projector for
    the model and data.

    !!! example

        ```python
        project = projected_grads(loss_fn, k_out=4, k_in=4)
        store = build_gradient_store(
            directory, project, model, (xs, ys), batch_size=4, chunk_size=8
        )
        store.n_rows, store.dim
        ```
    """
    name = "build_gradient_store"
    check_type(name, "path", path, (str, os.PathLike), "a path")
    check_type(name, "projector", projector, ProjectedGrads, "a ProjectedGrads")
    batch_size = check_size(name, "batch_size", batch_size)
    check_choice(name, "dtype", dtype, _DTYPES)
    chunk_size = check_size(name, "chunk_size", chunk_size)
    if chunk_size % batch_size:
        raise fail(
            name,
            "chunk_size",
            f"a multiple of `batch_size` ({batch_size})",
            str(chunk_size),
        )
    data = as_batch(name, "data", data, to_device=False)
    user = json.loads(json.dumps(dict(metadata or {})))
    n = data[0].shape[0]
    first = tuple(jnp.asarray(x[:batch_size]) for x in data)
    layout = projector.layout(model, first)
    mats = projector.matrices(model, first)
    dim = sum(b.size for b in layout)
    expected = {
        "format": _FORMAT,
        "library_version": __version__,
        "model_sha256": model_fingerprint(model),
        "model_leaves": _describe(model),
        "projection": projector.config,
        "layout": [dataclasses.asdict(b) for b in layout],
        "n_rows": n,
        "dim": dim,
        "dtype": dtype or str(np.dtype(_row_dtype(model))),
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "data": [[list(x.shape[1:]), str(x.dtype)] for x in data],
        "user": user,
    }
    expected = json.loads(json.dumps(expected))
    path = os.fspath(path)
    meta_path = os.path.join(path, _METADATA)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            stored = json.load(f)
        problems = _differences(stored, expected)
        if problems:
            raise ValueError(
                f"{name}: `path` {path!r} holds a gradient store built differently "
                f"({'; '.join(problems)}); use a new directory."
            )
    else:
        os.makedirs(path, exist_ok=True)
        if projector.kind == "pca":
            _write_matrices(path, mats)
        _write_json(meta_path, expected)
    store = GradientStore(path)
    done = store.complete_chunks()
    todo = [c for c in range(store.n_chunks) if c not in done]

    bar = tqdm(
        total=store.n_chunks,
        initial=len(done),
        disable=None if progress is None else not progress,
        desc=name,
    )
    for c in todo:
        start, stop = c * chunk_size, min((c + 1) * chunk_size, n)
        parts = []
        for b0 in range(start, stop, batch_size):
            b1 = min(b0 + batch_size, stop)
            # The last batch is padded with its last example: one compiled shape.
            idx = np.minimum(np.arange(b0, b0 + batch_size), b1 - 1)
            batch = tuple(jnp.asarray(x[idx]) for x in data)
            rows = _rows(projector, model, mats, batch)
            parts.append(np.asarray(rows)[: b1 - b0])
        rows = np.concatenate(parts)
        stored = rows.astype(dtype or rows.dtype)
        if not np.all(np.isfinite(stored)):
            raise ValueError(
                f"{name}: rows {start}..{stop - 1} are not finite in `dtype` "
                f"{dtype!r} (largest magnitude {np.max(np.abs(rows)):.3g}; "
                "non-finite gradients, or beyond float16's range): use "
                "dtype='float32' or check the loss."
            )
        _write_chunk(os.path.join(path, _chunk_name(c)), stored)
        done = done | {c}
        _write_json(os.path.join(path, _INDEX), {"complete": sorted(done)})
        bar.update(1)
    bar.close()
    return store
