"""Single-file training checkpoints.

File layout (format version 2; integers little-endian):

| offset   | bytes | content                                                        |
| -------- | ----- | -------------------------------------------------------------- |
| 0        | 7     | magic `b"EQXCKPT"`                                             |
| 7        | 1     | format version, one ASCII digit: `b"2"`                        |
| 8        | 8     | `N`, the header length, uint64                                 |
| 16       | 32    | SHA-256 of bytes 0-15 followed by the `N` header bytes         |
| 48       | `N`   | header: a UTF-8 JSON object (fields below)                     |
| 48 + `N` | `M`   | payload: `eqx.tree_serialise_leaves((model, opt_state, key))`  |

Header fields, all required and no others: `step` (integer >= 0), `metadata` (object),
`library_version` (string), `key_impl` (string, or null for a raw key or none),
`leaves` (a list of `{"path", "shape", "dtype"}`, one per stored array),
`payload_bytes` (`M`) and `payload_sha256` (64 lowercase hex digits, the payload's
SHA-256).

Integrity is a chain: the digest at offset 16 covers the prefix and the header, and
the header holds the payload's length and digest, so editing any byte of the file
(a step, a learning rate in the metadata, an array value, the recorded payload hash)
is detected. The chain, rather than one digest over everything, lets
`check_checkpoint_metadata` verify the header without reading the arrays, so a trainer
can refuse a checkpoint before building anything. The digest sits outside the JSON so
that the bytes on disk are hashed as they are, with no canonical re-encoding. Format 1
(magic `b"EQXCKPT1"`, hash of the arrays only) is refused with a message saying so.

Temporary files. A save writes `.<name>.eqxckpt-<random>.tmp` in the directory of
`<name>`, holds an exclusive `flock` on it from creation until it has been moved onto
`<name>` with `os.replace`, and removes it on any exception. A process killed mid-save
leaves its temporary file behind, unlocked (the kernel drops a dead process's locks).
The next `save_checkpoint` or `load_checkpoint` of the same path removes the files of
exactly that pattern whose lock it can take: their writer is gone. A file whose lock is
held belongs to a save in progress (another process, or another thread) and is left
alone. Where locks are unavailable (Windows, a filesystem without `flock`), only files
untouched for an hour (`_ABANDONED_AFTER_S`) are removed. Nothing else is ever removed:
not other checkpoints' temporary files, not symlinks or directories, not user files.
"""

import contextlib
import hashlib
import io
import json
import operator
import os
import re
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._version import __version__


if sys.platform == "win32":
    fcntl = None
else:
    import fcntl


_MAGIC = b"EQXCKPT"
_VERSION = b"2"
_LENGTH = struct.Struct("<Q")
_DIGEST_BYTES = 32
_PREFIX_BYTES = len(_MAGIC) + len(_VERSION) + _LENGTH.size  # what the digest covers
_HEADER_START = _PREFIX_BYTES + _DIGEST_BYTES
# Without locks, how long a temporary file must sit untouched before it counts as
# abandoned: far longer than any write of one file.
_ABANDONED_AFTER_S = 3600.0


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, corrupted, of an unsupported format
    version, or does not match its template or the expected metadata."""


class Checkpoint(NamedTuple):
    """What [`transforms.load_checkpoint`][] returns."""

    model: Any
    opt_state: Any
    step: int
    key: Any
    metadata: dict


def _as_path(path, caller: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{caller}: `path` must be a str or an os.PathLike, got "
            f"{type(path).__name__}."
        )
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{caller}: `path` must be a text path, got bytes {path!r}.")
    if not path:
        raise ValueError(f"{caller}: `path` is empty.")
    return path


def _as_step(step, caller: str) -> int:
    message = f"{caller}: `step` must be an integer >= 0, got {step!r}"
    if isinstance(step, (bool, np.bool_)):
        raise TypeError(f"{message} (a bool).")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"{message} (a {type(step).__name__}).") from None
    if value < 0:
        raise ValueError(f"{message}.")
    return value


def _to_json(value, where: str, name: str, caller: str) -> Any:
    """`value` as JSON will store it (mappings become dicts, tuples lists), or a
    `TypeError` naming the first entry JSON cannot hold."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                # json.dumps would silently turn it into a string.
                raise TypeError(
                    f"{caller}: `{name}` must be JSON-serialisable: {where} has the "
                    f"key {k!r} ({type(k).__name__}); JSON keys are strings."
                )
            out[k] = _to_json(v, f"{where}[{k!r}]", name, caller)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]", name, caller) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise TypeError(
        f"{caller}: `{name}` must be JSON-serialisable: {where} is of type "
        f"{type(value).__name__} (JSON holds dicts with string keys, lists, tuples, "
        "str, int, float, bool and None)."
    )


def _json_mapping(value, name: str, caller: str) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{caller}: `{name}` must be a mapping, got {type(value).__name__}."
        )
    return _to_json(value, name, name, caller)


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


def _key_payload(key, caller: str) -> tuple[Any, str | None]:
    if key is None:
        return None, None
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    if dtype == np.uint32:
        return key, None
    raise TypeError(
        f"{caller}: `key` must be a PRNG key (`jax.random.key`, or a raw uint32 key "
        f"from `jax.random.PRNGKey`) or None, got {type(key).__name__}"
        + (f" of dtype {dtype}." if dtype is not None else ".")
    )


def _temp_prefix(name: str) -> str:
    return f".{name}.eqxckpt-"


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _writer_alive(fd: int) -> bool:
    """Whether the temporary file open at `fd` belongs to a save still running."""
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem without locks: judge by age
        return time.time() - os.fstat(fd).st_mtime < _ABANDONED_AFTER_S
    return False


def _remove_abandoned_temps(path: str) -> None:
    """Remove the temporary files that killed saves of `path` left behind (see the
    module docstring for the rule). Best effort: a failure here never fails a save or
    a load."""
    directory, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(_temp_prefix(name)) + r"[a-z0-9_]+\.tmp")
    try:
        with os.scandir(directory) as entries:
            candidates = [
                entry.path
                for entry in entries
                if pattern.fullmatch(entry.name)
                and entry.is_file(follow_symlinks=False)
            ]
    except OSError:
        return
    for tmp in candidates:
        with contextlib.suppress(OSError):
            if fcntl is None:
                if time.time() - os.lstat(tmp).st_mtime >= _ABANDONED_AFTER_S:
                    os.remove(tmp)
                continue
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                # The identity check skips a file that its save has meanwhile moved
                # into place: the name then points nowhere (or to a newer save's file).
                if not _writer_alive(fd) and _same_file(fd, tmp):
                    os.remove(tmp)
            finally:
                os.close(fd)


def _create_temp(path: str) -> tuple[int, str]:
    """A new temporary file next to `path`, open at the returned descriptor and
    locked for as long as it stays open."""
    directory, name = os.path.split(os.path.abspath(path))
    while True:
        fd, tmp = tempfile.mkstemp(
            prefix=_temp_prefix(name), suffix=".tmp", dir=directory
        )
        if fcntl is None:
            return fd, tmp
        with contextlib.suppress(OSError):  # no locks here: cleaners judge by age
            fcntl.flock(fd, fcntl.LOCK_EX)
        # A cleaner may have taken the file for abandoned in the instant between
        # its creation and the lock, and removed it: then start over.
        if _same_file(fd, tmp):
            return fd, tmp
        os.close(fd)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself survive a power loss; some filesystems refuse.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: str, chunks: list[bytes]) -> None:
    fd, tmp = _create_temp(path)
    replaced = False
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                # Renamed while still locked, so that no cleaner takes the finished
                # file for abandoned before it is in place.
                os.replace(tmp, path)
                replaced = True
        if not replaced:  # Windows cannot rename an open file
            os.replace(tmp, path)
            replaced = True
    finally:
        if not replaced:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    opt_state=None,
    step: int | np.integer = 0,
    key=None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a training checkpoint atomically.

    The file holds a JSON header (step, user metadata, library version, the
    path/shape/dtype of every array, the key's PRNG implementation) followed by the
    arrays written with `eqx.tree_serialise_leaves`; SHA-256 digests cover both, so a
    later load detects any edited or damaged byte. The file is written to a temporary
    file `.<name>.eqxckpt-<random>.tmp` in the same directory and moved into place
    with `os.replace`, so a reader sees either the old or the new checkpoint, never
    half. The temporary file is removed if the save fails; one left by a process
    killed mid-save is removed by the next save or load of the same path (never one
    of a save still running).

    **Arguments:**

    - `path`: the file to write (a `str` or `os.PathLike`); missing parent
        directories are created.
    - `model`: the model (any pytree).
    - `opt_state`: the optimiser state, or `None`.
    - `step`: the number of steps taken so far (where a resumed run starts), an
        integer >= 0 (a Python or NumPy integer, not a bool).
    - `key`: the run's PRNG key (typed, or raw `uint32`), or `None`.
    - `metadata`: a JSON-serialisable mapping (configuration, data position, ...);
        tuples are stored as lists.

    **Returns:**

    `None`.

    **Raises:**

    `TypeError` if `path` is not a `str`/`os.PathLike`, `step` is not an integer (a
    float or a bool), `key` is not a PRNG key, or `metadata` is not a mapping that
    JSON can hold exactly (the message names the offending entry; non-string keys
    are refused rather than converted). `ValueError` if `step` is negative or `path`
    is empty. `IsADirectoryError` if `path` is a directory. `OSError` if the file
    cannot be written; the previous checkpoint at `path` is then left untouched.
    """
    caller = "save_checkpoint"
    path = _as_path(path, caller)
    step = _as_step(step, caller)
    metadata = _json_mapping({} if metadata is None else metadata, "metadata", caller)
    key_data, key_impl = _key_payload(key, caller)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{caller}: {path!r} is a directory, not a file.")
    tree = (model, opt_state, key_data)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "step": step,
            "metadata": metadata,
            "library_version": __version__,
            "key_impl": key_impl,
            "leaves": _describe(tree),
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
    ).encode()
    prefix = _MAGIC + _VERSION + _LENGTH.pack(len(header))
    digest = hashlib.sha256(prefix + header).digest()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # First, so that space held by killed saves is free for this one.
    _remove_abandoned_temps(path)
    _write_atomically(path, [prefix, digest, header, payload])


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_leaf(x) -> bool:
    return (
        isinstance(x, dict)
        and x.keys() == {"path", "shape", "dtype"}
        and isinstance(x["path"], str)
        and isinstance(x["dtype"], str)
        and isinstance(x["shape"], list)
        and all(map(_is_count, x["shape"]))
    )


_HEADER_FIELDS = {
    "step": ("an integer >= 0", _is_count),
    "metadata": ("a JSON object", lambda x: isinstance(x, dict)),
    "library_version": ("a string", lambda x: isinstance(x, str)),
    "key_impl": ("a string or null", lambda x: x is None or isinstance(x, str)),
    "leaves": (
        'a list of {"path": str, "shape": [int, ...], "dtype": str}',
        lambda x: isinstance(x, list) and all(map(_is_leaf, x)),
    ),
    "payload_bytes": ("an integer >= 0", _is_count),
    "payload_sha256": (
        "64 lowercase hex digits",
        lambda x: isinstance(x, str) and re.fullmatch("[0-9a-f]{64}", x) is not None,
    ),
}


def _check_header(header, path: str, caller: str) -> dict:
    def malformed(problem):
        return CheckpointError(
            f"{caller}: the header of {path!r} is malformed: {problem}."
        )

    if not isinstance(header, dict):
        raise malformed(f"a JSON object was expected, got a {type(header).__name__}")
    missing = [name for name in _HEADER_FIELDS if name not in header]
    if missing:
        raise malformed(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(header.keys() - _HEADER_FIELDS.keys())
    if unknown:
        raise malformed(f"unknown field(s) {', '.join(unknown)}")
    for name, (expected, valid) in _HEADER_FIELDS.items():
        if not valid(header[name]):
            raise malformed(f"`{name}` must be {expected}, got {header[name]!r:.200}")
    return header


def _read_header(f, path: str, caller: str) -> dict:
    """The checked header of an open checkpoint file, leaving `f` at the payload."""
    size = os.fstat(f.fileno()).st_size
    start = f.read(_HEADER_START)
    if not start:
        raise CheckpointError(f"{caller}: {path!r} is empty, not a checkpoint.")
    if start[: len(_MAGIC)] != _MAGIC[: len(start)]:
        raise CheckpointError(
            f"{caller}: {path!r} is not an eqx-models checkpoint (it does not begin "
            f"with {_MAGIC!r})."
        )
    version = start[len(_MAGIC) : len(_MAGIC) + len(_VERSION)]
    if not version:
        raise CheckpointError(f"{caller}: {path!r} is truncated inside its header.")
    if version != _VERSION:
        raise CheckpointError(
            f"{caller}: {path!r} has checkpoint format version "
            f"{version.decode('ascii', 'backslashreplace')}; this eqx-models reads "
            f"version {_VERSION.decode()} only (version 1 files, whose hash covered "
            "the arrays only, are no longer read)."
        )
    if len(start) < _HEADER_START:
        raise CheckpointError(f"{caller}: {path!r} is truncated inside its header.")
    (length,) = _LENGTH.unpack(start[len(_MAGIC) + len(_VERSION) : _PREFIX_BYTES])
    if length > size - _HEADER_START:
        raise CheckpointError(
            f"{caller}: {path!r} is truncated inside its header (the header should "
            f"be {length} bytes, the file has {size - _HEADER_START} after its prefix)."
        )
    header_bytes = f.read(length)
    if (
        hashlib.sha256(start[:_PREFIX_BYTES] + header_bytes).digest()
        != start[_PREFIX_BYTES:_HEADER_START]
    ):
        raise CheckpointError(
            f"{caller}: the header of {path!r} is corrupted: its SHA-256 differs from "
            "the one recorded when it was written (the file was edited or damaged)."
        )
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # includes UnicodeDecodeError
        raise CheckpointError(
            f"{caller}: the header of {path!r} is not valid UTF-8 JSON ({error})."
        ) from None
    return _check_header(header, path, caller)


def _existing(path, caller: str) -> str:
    path = _as_path(path, caller)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{caller}: no checkpoint at {path!r}.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{caller}: {path!r} is a directory, not a file.")
    return path


def _read(path: str, caller: str) -> tuple[dict, bytes]:
    """The checked header and payload of the checkpoint at `path`."""
    with open(path, "rb") as f:
        header = _read_header(f, path, caller)
        found = os.fstat(f.fileno()).st_size - f.tell()
        if found != header["payload_bytes"]:
            raise CheckpointError(
                f"{caller}: {path!r} is truncated or padded: expected "
                f"{header['payload_bytes']} bytes of arrays, found {found}."
            )
        payload = f.read()
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(
            f"{caller}: the arrays of {path!r} are corrupted: their SHA-256 differs "
            "from the one recorded when the file was written."
        )
    return header, payload


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The header of a checkpoint, without loading its arrays into a model.

    The whole file is verified (header and arrays). Unlike
    [`transforms.load_checkpoint`][], this never removes anything.

    **Arguments:**

    - `path`: the checkpoint file.

    **Returns:**

    A dict with `step`, `metadata`, `library_version`, `key_impl` and `leaves` (path,
    shape and dtype of every stored array).

    **Raises:**

    `FileNotFoundError` if there is no file; `IsADirectoryError` if `path` is a
    directory; `TypeError` if `path` is not a `str`/`os.PathLike`;
    [`transforms.CheckpointError`][] if the file is empty, not a checkpoint, of an
    unsupported format version, truncated or padded, has a malformed header (not
    JSON, a missing, unknown or mistyped field, e.g. a negative or fractional step),
    or if its header or arrays differ from what was written (SHA-256 mismatch).
    """
    caller = "read_checkpoint_metadata"
    header, _ = _read(_existing(path, caller), caller)
    return {
        k: header[k]
        for k in ("step", "metadata", "library_version", "key_impl", "leaves")
    }


def _check_template(path: str, stored: list[dict], template, caller: str) -> None:
    """The leaves a checkpoint stored (`_describe`'s records) against the template
    it is read into: a `CheckpointError` listing every difference."""
    problems = _compare(stored, _describe(template))
    if problems:
        raise CheckpointError(
            f"{caller}: {os.fspath(path)!r} does not match the template:\n  "
            + "\n  ".join(problems)
        )


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


def _differences(name: str, stored: Any, expected: Any) -> list[str]:
    """Where `stored` differs from `expected`, one line per field. Mappings (and
    lists of mappings of the same length) are compared entry by entry, so that a
    difference deep in a nested configuration names that one field."""
    if isinstance(expected, dict) and isinstance(stored, dict):
        return [
            line
            for key, value in expected.items()
            for line in _differences(f"{name}.{key}", stored.get(key, _ABSENT), value)
        ]
    if (
        isinstance(expected, list)
        and isinstance(stored, list)
        and len(expected) == len(stored)
        and any(isinstance(e, dict) for e in expected)
    ):
        return [
            line
            for i, (s, e) in enumerate(zip(stored, expected))
            for line in _differences(f"{name}[{i}]", s, e)
        ]
    if stored is _ABSENT:
        return [f"{name}: expected {expected!r}, checkpoint has '<absent>'"]
    if stored != expected:
        return [f"{name}: expected {expected!r}, checkpoint has {stored!r}"]
    return []


_ABSENT = object()


def _check_metadata(path: str, stored: dict, expected: dict, caller: str) -> None:
    """The one metadata comparison behind `expected_metadata` everywhere; `expected`
    comes from `_json_mapping`, so that tuples compare equal to the stored lists."""
    differing = [
        line
        for name, value in expected.items()
        for line in _differences(name, stored.get(name, _ABSENT), value)
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
    incompatible checkpoint before building or compiling anything; the header's own
    SHA-256 is verified, the arrays' is left to [`transforms.load_checkpoint`][].
    Each entry of `expected_metadata` must equal the stored metadata entry of the
    same name, as JSON stores it (tuples compare equal to lists); stored entries not
    named are ignored. [`transforms.load_checkpoint`][] and [`transforms.fit`][] make
    the same check through their `expected_metadata` argument.

    **Arguments:**

    - `path`: the checkpoint file.
    - `expected_metadata`: the values the stored metadata must hold, e.g. the model
        configuration.
    - `caller`: the function name the error messages begin with (the function the
        user called).

    **Returns:**

    `None`.

    **Raises:**

    `FileNotFoundError` if there is no file; `IsADirectoryError` if `path` is a
    directory; [`transforms.CheckpointError`][] if the header is unreadable (empty
    file, not a checkpoint, unsupported format version, truncated, malformed or
    edited, as for [`transforms.read_checkpoint_metadata`][]), or if the metadata
    differs (the message lists every differing field with the expected and the
    stored value, `'<absent>'` for a missing one; a field inside nested mappings is
    named by its path, e.g. `train.learning_rate` or `buckets[0].batch_size`);
    `TypeError` if `path` is not a `str`/`os.PathLike`, or `expected_metadata` is
    not a JSON-serialisable mapping.

    !!! example

        ```python
        check_checkpoint_metadata("run.ckpt", {"width": 64, "layers": 4})
        ```
    """
    path = _existing(path, caller)
    expected = _json_mapping(expected_metadata, "expected_metadata", caller)
    with open(path, "rb") as f:
        header = _read_header(f, path, caller)
    _check_metadata(path, header["metadata"], expected, caller)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model,
    opt_state=None,
    key=None,
    expected_metadata: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read a checkpoint written by [`transforms.save_checkpoint`][].

    Before reading, temporary files that killed saves of this same `path` left
    behind are removed (never those of a save still running).

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

    `FileNotFoundError` if there is no file; `IsADirectoryError` if `path` is a
    directory; [`transforms.CheckpointError`][] (a `ValueError`) if the file is empty,
    not a checkpoint, of an unsupported format version, truncated or padded, has a
    malformed header, differs from what was written (the SHA-256 of its header or of
    its arrays: an edited step or metadata, a flipped byte), or disagrees with the
    templates or `expected_metadata` (the message lists the differences); `TypeError`
    if `path` is not a `str`/`os.PathLike`, `key` is not a PRNG key, or
    `expected_metadata` is not a JSON-serialisable mapping.
    """
    caller = "load_checkpoint"
    path = _as_path(path, caller)
    key_template, _ = _key_payload(key, caller)
    if expected_metadata is not None:
        expected_metadata = _json_mapping(
            expected_metadata, "expected_metadata", caller
        )
    _remove_abandoned_temps(path)
    header, payload = _read(_existing(path, caller), caller)
    if expected_metadata is not None:
        _check_metadata(path, header["metadata"], expected_metadata, caller)
    template = (model, opt_state, key_template)
    _check_template(path, header["leaves"], template, caller)
    try:
        model, opt_state, key_data = eqx.tree_deserialise_leaves(
            io.BytesIO(payload), template
        )
    except Exception as error:
        raise CheckpointError(
            f"{caller}: could not read the arrays of {path!r} "
            f"({type(error).__name__}: {error})."
        ) from error
    if header["key_impl"] is not None:
        try:
            key_data = jax.random.wrap_key_data(
                jnp.asarray(key_data), impl=header["key_impl"]
            )
        except Exception as error:
            raise CheckpointError(
                f"{caller}: {path!r} stores a key of PRNG implementation "
                f"{header['key_impl']!r}, which cannot be rebuilt here "
                f"({type(error).__name__}: {error})."
            ) from error
    return Checkpoint(
        model=model,
        opt_state=opt_state,
        step=header["step"],
        key=key_data,
        metadata=header["metadata"],
    )


def check_resumed_config(
    caller: str,
    checkpoint_path: str | os.PathLike | None,
    config: Mapping[str, Any],
    *,
    resume: bool,
    allow_config_change: bool,
) -> None:
    """A trainer's resume check, before anything is built or compiled.

    When the trainer will resume (`resume` and a checkpoint exists at
    `checkpoint_path`: a file, or a directory of
    [`transforms.ShardedCheckpoints`][]), refuse a checkpoint written for another
    configuration, naming every differing field with both values, unless
    `allow_config_change`.
    The comparison is [`transforms.check_checkpoint_metadata`][]'s; [`transforms.fit`][]
    makes it again when it loads, this only fails sooner.

    **Arguments:**

    - `caller`: the trainer's name, for the message.
    - `checkpoint_path`: the trainer's checkpoint path, or `None`.
    - `config`: the configuration the trainer records with its checkpoints.
    - `resume`, `allow_config_change`: the trainer's arguments of those names.

    **Raises:**

    [`transforms.CheckpointError`][] for a checkpoint written for another
    configuration (or one whose header cannot be read); `TypeError` for a
    `checkpoint_path` that is not a path or a `config` that is not a mapping.
    """
    if checkpoint_path is not None and not isinstance(
        checkpoint_path, (str, os.PathLike)
    ):
        raise TypeError(
            f"{caller}: `checkpoint_path` must be a path or None, got "
            f"{type(checkpoint_path).__name__}."
        )
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{caller}: the configuration must be a mapping, got "
            f"{type(config).__name__}."
        )
    if (
        resume
        and not allow_config_change
        and checkpoint_path is not None
        and os.path.exists(checkpoint_path)
    ):
        if os.path.isdir(checkpoint_path):
            # A directory of sharded checkpoints (imported here: that module
            # builds on this one).
            from ._sharded_checkpoint import ShardedCheckpoints

            sharded = ShardedCheckpoints(checkpoint_path)
            try:
                if sharded.exists():
                    sharded.check_metadata(config, caller=caller)
            finally:
                sharded.close()
        else:
            check_checkpoint_metadata(checkpoint_path, config, caller=caller)
