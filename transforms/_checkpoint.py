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


def _read_header(f, path: str, caller: str) -> dict:
    """The JSON header of an open checkpoint file, leaving `f` at the arrays."""
    prefix = f.read(len(_MAGIC) + 8)
    if len(prefix) < len(_MAGIC) + 8 or prefix[: len(_MAGIC)] != _MAGIC:
        raise CheckpointError(
            f"{caller}: {path!r} is not an eqx-models checkpoint (bad header)."
        )
    (header_len,) = struct.unpack("<Q", prefix[len(_MAGIC) :])
    header_bytes = f.read(header_len)
    if len(header_bytes) < header_len:
        raise CheckpointError(f"{caller}: {path!r} is truncated inside its header.")
    try:
        return json.loads(header_bytes)
    except ValueError as error:
        raise CheckpointError(
            f"{caller}: the header of {path!r} is not valid JSON ({error})."
        ) from None


def _existing(path, caller: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{caller}: no checkpoint at {path!r}.")
    return path


def _read(path, caller: str) -> tuple[dict, bytes]:
    path = _existing(path, caller)
    with open(path, "rb") as f:
        header = _read_header(f, path, caller)
        payload = f.read()
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(
            f"{caller}: {path!r} is truncated or padded: expected "
            f"{header['payload_bytes']} bytes of arrays, found {len(payload)}."
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(
            f"{caller}: {path!r} is corrupted (SHA-256 of the arrays differs "
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
    header, _ = _read(path, "read_checkpoint_metadata")
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


def _check_metadata(path, stored: dict, expected_metadata, caller: str) -> None:
    """The one metadata comparison behind `expected_metadata` everywhere."""
    try:
        # Compare as JSON would store them (tuples become lists, keys strings).
        expected = json.loads(json.dumps(dict(expected_metadata)))
    except TypeError as error:
        raise TypeError(
            f"{caller}: `expected_metadata` must be JSON-serialisable ({error})."
        ) from None
    differing = [
        f"{name}: expected {value!r}, checkpoint has {stored.get(name, '<absent>')!r}"
        for name, value in expected.items()
        if stored.get(name, object()) != value
    ]
    if differing:
        raise CheckpointError(
            f"{caller}: {os.fspath(path)!r} was written for another configuration:"
            "\n  " + "\n  ".join(differing)
        )


def check_checkpoint_metadata(
    path: str | os.PathLike,
    expected_metadata: Mapping[str, Any],
    *,
    caller: str = "check_checkpoint_metadata",
) -> None:
    """Check that a checkpoint was written for the expected configuration.

    Reads only the file's header, not its arrays, so a trainer can refuse an
    incompatible checkpoint before building or compiling anything. Each entry of
    `expected_metadata` must equal the stored metadata entry of the same name, as
    JSON stores it (tuples compare equal to lists); stored entries not named are
    ignored. [`transforms.load_checkpoint`][] and [`transforms.fit`][] make the same
    check through their `expected_metadata` argument.

    **Arguments:**

    - `path`: the checkpoint file.
    - `expected_metadata`: the values the stored metadata must hold, e.g. the model
        configuration.
    - `caller`: the function name the error messages begin with (the function the
        user called).

    **Returns:**

    `None`.

    **Raises:**

    `FileNotFoundError` if there is no file; [`transforms.CheckpointError`][] if its
    header is unreadable, or if the metadata differs (the message lists every
    differing field with the expected and the stored value, `'<absent>'` for a
    missing one); `TypeError` if `expected_metadata` is not JSON-serialisable.

    !!! example

        ```python
        check_checkpoint_metadata("run.ckpt", {"width": 64, "layers": 4})
        ```
    """
    path = _existing(path, caller)
    with open(path, "rb") as f:
        header = _read_header(f, path, caller)
    _check_metadata(path, header["metadata"], expected_metadata, caller)


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
    header, payload = _read(path, "load_checkpoint")
    if expected_metadata is not None:
        _check_metadata(path, header["metadata"], expected_metadata, "load_checkpoint")
    key_template, _ = _key_payload(key)
    template = (model, opt_state, key_template)
    problems = _compare(header["leaves"], _describe(template))
    if problems:
        raise CheckpointError(
            f"load_checkpoint: {os.fspath(path)!r} does not match the template:\n  "
            + "\n  ".join(problems)
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
