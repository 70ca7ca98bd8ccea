import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp


_MAGIC = b"EQXCKPT1"
_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, or does not match its template."""


class Checkpoint(NamedTuple):
    """What [`transforms.load_checkpoint`][] returns."""

    model: Any
    opt_state: Any
    step: int
    key: Any
    metadata: dict


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("eqx-models")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        return "unknown"


def _describe(tree) -> list[dict]:
    """Path, shape and dtype of every array leaf: what a template must agree with."""
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return [
        {
            "path": jax.tree_util.keystr(path),
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
        }
        for path, leaf in leaves
    ]


def _key_payload(key) -> tuple[Any, str | None]:
    if key is None:
        return None, None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    return key, None


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    opt_state=None,
    step: int = 0,
    key=None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a training checkpoint atomically.

    The file holds a JSON header (format, step, user metadata, library version, the
    path/shape/dtype of every array, the key's PRNG implementation and a SHA-256 of
    the payload) followed by the arrays written with `eqx.tree_serialise_leaves`. It
    is written to a temporary file in the same directory and moved into place with
    `os.replace`, so a reader sees either the old or the new checkpoint, never half.

    **Arguments:**

    - `path`: the file to write.
    - `model`: the model (any pytree).
    - `opt_state`: the optimiser state, or `None`.
    - `step`: the number of steps taken so far (where a resumed run starts).
    - `key`: the run's PRNG key (typed or raw `uint32`), or `None`.
    - `metadata`: a JSON-serialisable mapping (configuration, data position, ...).

    **Raises:**

    `TypeError` if `metadata` is not JSON-serialisable.
    """
    key_data, key_impl = _key_payload(key)
    tree = (model, opt_state, key_data)
    payload = io.BytesIO()
    eqx.tree_serialise_leaves(payload, tree)
    payload_bytes = payload.getvalue()
    header = {
        "format": _FORMAT,
        "step": int(step),
        "metadata": dict(metadata or {}),
        "library_version": _library_version(),
        "key_impl": key_impl,
        "leaves": _describe(tree),
        "payload_bytes": len(payload_bytes),
        "payload_sha256": hashlib.sha256(payload_bytes).hexdigest(),
    }
    try:
        header_bytes = json.dumps(header).encode()
    except TypeError as error:
        raise TypeError(
            f"save_checkpoint: `metadata` must be JSON-serialisable ({error})."
        ) from None
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC)
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            f.write(payload_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path) -> tuple[dict, bytes]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path!r}.")
    with open(path, "rb") as f:
        data = f.read()
    prefix = len(_MAGIC) + 8
    if len(data) < prefix or data[: len(_MAGIC)] != _MAGIC:
        raise CheckpointError(
            f"load_checkpoint: {path!r} is not an eqx-models checkpoint (bad header)."
        )
    (header_len,) = struct.unpack("<Q", data[len(_MAGIC) : prefix])
    if len(data) < prefix + header_len:
        raise CheckpointError(
            f"load_checkpoint: {path!r} is truncated inside its header."
        )
    try:
        header = json.loads(data[prefix : prefix + header_len])
    except ValueError as error:
        raise CheckpointError(
            f"load_checkpoint: the header of {path!r} is not valid JSON ({error})."
        ) from None
    payload = data[prefix + header_len :]
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"load_checkpoint: {path!r} is truncated or padded: expected "
            f"{header['payload_bytes']} bytes of arrays, found {len(payload)}."
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(
            f"load_checkpoint: {path!r} is corrupted (SHA-256 of the arrays differs "
            f"from the one recorded when it was written)."
        )
    return header, payload


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The header of a checkpoint, without loading its arrays into a model.

    **Arguments:**

    - `path`: the checkpoint file.

    **Returns:**

    A dict with `step`, `metadata`, `library_version`, `key_impl` and `leaves` (path,
    shape and dtype of every stored array).

    **Raises:**

    `FileNotFoundError` if there is no file; [`transforms.CheckpointError`][] if it is
    not a checkpoint, truncated or corrupted.
    """
    header, _ = _read(path)
    return {
        k: header[k] for k in ("step", "metadata", "library_version", "key_impl")
    } | {"leaves": header["leaves"]}


def _compare(stored: list[dict], expected: list[dict]) -> list[str]:
    stored_by_path = {leaf["path"]: leaf for leaf in stored}
    expected_by_path = {leaf["path"]: leaf for leaf in expected}
    problems = []
    for p in expected_by_path.keys() - stored_by_path.keys():
        problems.append(f"missing from the file: {p}")
    for p in stored_by_path.keys() - expected_by_path.keys():
        problems.append(f"not in the template: {p}")
    for p in expected_by_path.keys() & stored_by_path.keys():
        want, got = expected_by_path[p], stored_by_path[p]
        if want["shape"] != got["shape"] or want["dtype"] != got["dtype"]:
            problems.append(
                f"{p}: template {want['dtype']}{want['shape']}, file "
                f"{got['dtype']}{got['shape']}"
            )
    return sorted(problems)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    opt_state=None,
    key=None,
    expected_metadata: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read a checkpoint written by [`transforms.save_checkpoint`][].

    **Arguments:**

    - `path`: the checkpoint file.
    - `model`: a template of the model: same structure, shapes and dtypes (for
        example a freshly initialised model); its non-array parts are kept.
    - `opt_state`: a template of the optimiser state (`optimizer.init(...)`), or
        `None` if none was saved.
    - `key`: a template key of the same kind as the saved one (typed or raw), or
        `None` if none was saved.
    - `expected_metadata`: entries the stored metadata must equal, e.g. the model
        configuration; a mismatch raises and lists every differing field.

    **Returns:**

    A [`transforms.Checkpoint`][] `(model, opt_state, step, key, metadata)`.

    **Raises:**

    `FileNotFoundError` if there is no file; [`transforms.CheckpointError`][] (a
    `ValueError`) if the file is not a checkpoint, is truncated or corrupted, or
    disagrees with the templates or `expected_metadata` (the message lists the
    differences).
    """
    header, payload = _read(path)
    key_template, _ = _key_payload(key)
    template = (model, opt_state, key_template)
    problems = _compare(header["leaves"], _describe(template))
    if problems:
        raise CheckpointError(
            f"load_checkpoint: {os.fspath(path)!r} does not match the template:\n  "
            + "\n  ".join(problems)
        )
    if expected_metadata is not None:
        stored = header["metadata"]
        # Compare as JSON would store them (tuples become lists, keys strings).
        expected = json.loads(json.dumps(dict(expected_metadata)))
        differing = [
            f"{name}: expected {value!r}, checkpoint has "
            f"{stored.get(name, '<absent>')!r}"
            for name, value in expected.items()
            if stored.get(name, object()) != value
        ]
        if differing:
            raise CheckpointError(
                f"load_checkpoint: {os.fspath(path)!r} was written for another "
                "configuration:\n  " + "\n  ".join(differing)
            )
    try:
        model, opt_state, key_data = eqx.tree_deserialise_leaves(
            io.BytesIO(payload), template
        )
    except Exception as error:
        raise CheckpointError(
            f"load_checkpoint: could not read the arrays of {os.fspath(path)!r} "
            f"({type(error).__name__}: {error})."
        ) from error
    if header["key_impl"] is not None:
        key_data = jax.random.wrap_key_data(
            jnp.asarray(key_data), impl=header["key_impl"]
        )
    return Checkpoint(
        model=model,
        opt_state=opt_state,
        step=header["step"],
        key=key_data,
        metadata=header["metadata"],
    )
