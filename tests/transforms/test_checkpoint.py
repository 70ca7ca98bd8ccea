import hashlib
import inspect
import io
import json
import os
import pathlib
import random
import re
import shutil
import struct
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from tests.helpers import assert_tree_allclose


def _state(key):
    model = eqx.nn.MLP(3, 2, 5, 2, key=key)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    # Take a step so the moments are not all zero.
    grads = jax.tree.map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    _, opt_state = optimizer.update(
        grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
    )
    return model, optimizer, opt_state


@pytest.mark.parametrize("typed_key", [True, False])
def test_round_trip_is_exact(tmp_path, getkey, typed_key):
    from transforms import load_checkpoint, read_checkpoint_metadata, save_checkpoint

    model, optimizer, opt_state = _state(getkey())
    key = jr.key(7) if typed_key else jr.PRNGKey(7)
    path = tmp_path / "run.ckpt"
    save_checkpoint(
        path,
        model=model,
        opt_state=opt_state,
        step=12,
        key=key,
        metadata={"config": {"width": 5}, "data_position": 12},
    )
    template_model = eqx.nn.MLP(3, 2, 5, 2, key=getkey())
    template_state = optimizer.init(eqx.filter(template_model, eqx.is_inexact_array))
    template_key = jr.key(0) if typed_key else jr.PRNGKey(0)
    ckpt = load_checkpoint(
        path, model=template_model, opt_state=template_state, key=template_key
    )
    assert ckpt.step == 12
    assert ckpt.metadata == {"config": {"width": 5}, "data_position": 12}
    assert_tree_allclose(ckpt.model, model, rtol=0, atol=0)
    assert_tree_allclose(ckpt.opt_state, opt_state, rtol=0, atol=0)
    if typed_key:
        assert jnp.issubdtype(ckpt.key.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jr.key_data(ckpt.key), jr.key_data(key))
    else:
        np.testing.assert_array_equal(ckpt.key, key)
    header = read_checkpoint_metadata(path)
    assert header["step"] == 12 and header["leaves"]


def test_template_mismatch_lists_the_differences(tmp_path, getkey):
    from transforms import CheckpointError, load_checkpoint, save_checkpoint

    model = eqx.nn.MLP(3, 2, 5, 2, key=getkey())
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model=model)
    wider = eqx.nn.MLP(3, 2, 6, 2, key=getkey())
    with pytest.raises(
        CheckpointError,
        match=r"layers\[0\]\.weight: template float32\[6, 3\], file float32\[5, 3\]",
    ):
        load_checkpoint(path, model=wider)
    deeper = eqx.nn.MLP(3, 2, 5, 3, key=getkey())
    with pytest.raises(CheckpointError, match=r"not in the file|missing from the file"):
        load_checkpoint(path, model=deeper)
    half = jax.tree.map(
        lambda x: x.astype(jnp.float16) if eqx.is_inexact_array(x) else x, model
    )
    with pytest.raises(CheckpointError, match="float16"):
        load_checkpoint(path, model=half)


def test_truncated_and_corrupted_files(tmp_path, getkey):
    from transforms import CheckpointError, load_checkpoint, save_checkpoint

    model = eqx.nn.Linear(4, 4, key=getkey())
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model=model)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model=model)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated inside its header"):
        load_checkpoint(path, model=model)
    corrupted = bytearray(data)
    corrupted[-5] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path, model=model)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not an eqx-models checkpoint"):
        load_checkpoint(path, model=model)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.ckpt", model=model)


def test_expected_metadata_lists_differing_fields(tmp_path, getkey):
    from transforms import CheckpointError, load_checkpoint, save_checkpoint

    model = eqx.nn.Linear(2, 2, key=getkey())
    path = tmp_path / "m.ckpt"
    save_checkpoint(
        path, model=model, metadata={"vocab": 100, "layers": 2, "shape": (1, 2)}
    )
    load_checkpoint(
        path, model=model, expected_metadata={"vocab": 100, "shape": (1, 2)}
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(
            path, model=model, expected_metadata={"vocab": 200, "layers": 2, "heads": 4}
        )
    message = str(info.value)
    assert "vocab: expected 200, checkpoint has 100" in message
    assert "heads: expected 4, checkpoint has '<absent>'" in message
    assert "layers" not in message


def test_nested_metadata_differences_name_the_field(tmp_path, getkey):
    from transforms import check_checkpoint_metadata, CheckpointError, save_checkpoint

    path = tmp_path / "nested.ckpt"
    stored = {
        "train": {"lr": 0.1, "milestones": [2, 4]},
        "buckets": [{"d": 4, "batch": 8}, {"d": 5, "batch": 8}],
        "shape": [6, 5, 4],
    }
    save_checkpoint(path, model=eqx.nn.Linear(2, 2, key=getkey()), metadata=stored)
    check_checkpoint_metadata(path, stored)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_metadata(
            path,
            {
                "train": {"lr": 0.2, "milestones": (2, 4), "gamma": 0.5},
                "buckets": [{"d": 4, "batch": 8}, {"d": 5, "batch": 16}],
                "shape": (8, 5, 4),
            },
        )
    lines = str(info.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "train.lr: expected 0.2, checkpoint has 0.1",
        "train.gamma: expected 0.5, checkpoint has '<absent>'",
        "buckets[1].batch: expected 16, checkpoint has 8",
        # Lists of plain values (shapes) are shown whole, as are lists of another
        # length.
        "shape: expected [8, 5, 4], checkpoint has [6, 5, 4]",
    ]
    with pytest.raises(CheckpointError, match=r"buckets: expected \[\{'d': 4"):
        check_checkpoint_metadata(path, {"buckets": [{"d": 4, "batch": 8}]})


def test_metadata_check_reads_only_the_header(tmp_path, getkey):
    from transforms import (
        check_checkpoint_metadata,
        CheckpointError,
        load_checkpoint,
        save_checkpoint,
    )

    model = eqx.nn.Linear(2, 2, key=getkey())
    path = tmp_path / "m.ckpt"
    metadata = {"vocab": 100, "layers": 2, "groups": ["a", "b"]}
    save_checkpoint(path, model=model, metadata=metadata)
    # Cut into the arrays: the header is intact, the arrays are not.
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model=model)
    check_checkpoint_metadata(path, {"vocab": 100, "groups": ("a", "b")})
    check_checkpoint_metadata(path, {})
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_metadata(
            path, {"vocab": 200, "layers": 2, "groups": ("a",), "heads": 4}
        )
    message = str(info.value)
    assert message.startswith(f"check_checkpoint_metadata: {str(path)!r} was written")
    assert "vocab: expected 200, checkpoint has 100" in message
    assert "groups: expected ['a'], checkpoint has ['a', 'b']" in message
    assert "heads: expected 4, checkpoint has '<absent>'" in message
    assert "layers" not in message
    with pytest.raises(CheckpointError, match=r"(?s)^train: .*vocab: expected 1,"):
        check_checkpoint_metadata(path, {"vocab": 1}, caller="train")
    with pytest.raises(TypeError, match="expected_metadata.*JSON-serialisable"):
        check_checkpoint_metadata(path, {"vocab": object()})
    with pytest.raises(FileNotFoundError, match="^train: no checkpoint"):
        check_checkpoint_metadata(tmp_path / "absent", {}, caller="train")
    path.write_bytes(b"EQXCKP")
    with pytest.raises(CheckpointError, match="truncated"):
        check_checkpoint_metadata(path, {})
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not an eqx-models checkpoint"):
        check_checkpoint_metadata(path, {})


def test_another_configuration_is_named_before_the_shapes(tmp_path, getkey):
    from transforms import CheckpointError, load_checkpoint, save_checkpoint

    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model=eqx.nn.Linear(2, 2, key=getkey()), metadata={"n": 2})
    wider = eqx.nn.Linear(2, 3, key=getkey())
    with pytest.raises(CheckpointError, match="another configuration"):
        load_checkpoint(path, model=wider, expected_metadata={"n": 3})
    with pytest.raises(CheckpointError, match="does not match the template"):
        load_checkpoint(path, model=wider, expected_metadata={"n": 2})


def test_write_is_atomic(tmp_path, getkey, monkeypatch):
    from transforms import load_checkpoint, save_checkpoint

    old = eqx.nn.Linear(2, 2, key=getkey())
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model=old, step=1)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    new = eqx.nn.Linear(2, 2, key=getkey())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=new, step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.ckpt"]
    ckpt = load_checkpoint(path, model=new)
    assert ckpt.step == 1
    assert_tree_allclose(ckpt.model, old, rtol=0, atol=0)


def test_metadata_must_be_json(tmp_path, getkey):
    from transforms import save_checkpoint

    with pytest.raises(TypeError, match="metadata"):
        save_checkpoint(
            tmp_path / "m.ckpt",
            model=eqx.nn.Linear(2, 2, key=getkey()),
            metadata={"f": object()},
        )


# The file layout, written from the format description in
# transforms/_train/_checkpoint.py
# rather than with the library's own code: magic, version digit, header length,
# SHA-256 of those 16 bytes and the header, the JSON header, the arrays.
_MAGIC = b"EQXCKPT"


def _split(data: bytes) -> tuple[bytes, bytes, dict, bytes]:
    """(version, digest, header, payload) of a checkpoint's bytes."""
    assert data[:7] == _MAGIC
    (length,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[48 : 48 + length])
    return data[7:8], data[16:48], header, data[48 + length :]


def _join(header, payload: bytes = b"", *, version=b"2", digest=None) -> bytes:
    """The bytes of a checkpoint; `header` is a dict or raw bytes, `digest` defaults to
    the correct one, so that only what a case changes is wrong."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = _MAGIC + version + struct.pack("<Q", len(header_bytes))
    if digest is None:
        digest = hashlib.sha256(prefix + header_bytes).digest()
    return prefix + digest + header_bytes + payload


def _saved(tmp_path, getkey, **kwargs):
    from transforms import save_checkpoint

    model = eqx.nn.Linear(3, 2, key=getkey())
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model=model, **kwargs)
    return path, model


def test_file_layout_is_as_documented(tmp_path, getkey):
    path, model = _saved(
        tmp_path, getkey, step=7, key=jr.key(3), metadata={"lr": 1e-3, "t": (1, 2)}
    )
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[8:16])
    assert data[:8] == b"EQXCKPT2"
    assert data[16:48] == hashlib.sha256(data[:16] + data[48 : 48 + length]).digest()
    version, _, header, payload = _split(data)
    assert version == b"2"
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, None, jr.key_data(jr.key(3))))
    assert payload == buffer.getvalue()
    assert header["step"] == 7
    assert header["metadata"] == {"lr": 1e-3, "t": [1, 2]}
    assert header["key_impl"] == "threefry2x32"
    assert header["payload_bytes"] == len(payload)
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert [leaf["path"] for leaf in header["leaves"]] == [
        "[0].weight",
        "[0].bias",
        "[2]",
    ]


def _readers():
    from transforms import (
        check_checkpoint_metadata,
        load_checkpoint,
        read_checkpoint_metadata,
    )

    template = eqx.nn.Linear(3, 2, key=jr.key(0))
    return {
        "load": lambda p: load_checkpoint(p, model=template, key=jr.key(0)),
        "read": read_checkpoint_metadata,
        "check": lambda p: check_checkpoint_metadata(p, {}),
    }


@pytest.mark.parametrize("reader", ["load", "read", "check"])
@pytest.mark.parametrize(
    "edit",
    [
        (b'"step": 7', b'"step": 9'),
        (b'"lr": 0.001', b'"lr": 0.002'),
        (b'"key_impl": "threefry2x32"', b'"key_impl": "threefry4x32"'),
    ],
    ids=["step", "learning_rate", "key_impl"],
)
def test_an_edited_header_is_refused(tmp_path, getkey, reader, edit):
    from transforms import CheckpointError

    path, _ = _saved(tmp_path, getkey, step=7, key=jr.key(3), metadata={"lr": 1e-3})
    data = path.read_bytes()
    old, new = edit
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with pytest.raises(
        CheckpointError, match=rf"header of {re.escape(repr(str(path)))} is corrupted"
    ):
        _readers()[reader](path)


def test_an_edited_payload_is_refused(tmp_path, getkey):
    from transforms import CheckpointError

    path, _ = _saved(tmp_path, getkey, key=jr.key(3))
    data = path.read_bytes()
    _, _, header, payload = _split(data)
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0x01
    path.write_bytes(data[: len(data) - len(payload)] + bytes(flipped))
    for name in ("load", "read"):
        with pytest.raises(CheckpointError, match="arrays of .* are corrupted"):
            _readers()[name](path)
    # The header is intact and verified on its own; the arrays are not read.
    _readers()["check"](path)
    # Recording the new payload's hash in the header breaks the header's hash.
    header["payload_sha256"] = hashlib.sha256(bytes(flipped)).hexdigest()
    forged = _join(header, bytes(flipped), digest=_split(data)[1])
    path.write_bytes(forged)
    for reader in _readers().values():
        with pytest.raises(CheckpointError, match="header of .* is corrupted"):
            reader(path)


def _valid_header(tmp_path) -> tuple[dict, bytes]:
    from transforms import save_checkpoint

    path = tmp_path / "valid.ckpt"
    save_checkpoint(path, model=eqx.nn.Linear(3, 2, key=jr.key(1)), key=jr.key(2))
    _, _, header, payload = _split(path.read_bytes())
    return header, payload


def _with(**fields):
    return lambda h, p: _join({**h, **fields}, p)


def _without(name):
    return lambda h, p: _join({k: v for k, v in h.items() if k != name}, p)


def _leaves(leaves):
    return _with(leaves=leaves)


# name -> (bytes of the file from a valid header and payload, message)
_MALFORMED = {
    "empty": (lambda h, p: b"", "is empty"),
    "wrong_magic": (lambda h, p: b"PK\x03\x04" + _join(h, p)[4:], "not an eqx-"),
    "format_1": (lambda h, p: _join(h, p, version=b"1"), "format version 1; "),
    "format_3": (lambda h, p: _join(h, p, version=b"3"), "format version 3; "),
    "truncated_magic": (lambda h, p: b"EQXC", "truncated inside its header"),
    "truncated_prefix": (lambda h, p: _join(h, p)[:30], "truncated inside its header"),
    "truncated_header": (lambda h, p: _join(h, p)[:60], "truncated inside its header"),
    "huge_length": (
        lambda h, p: _MAGIC + b"2" + struct.pack("<Q", 2**62) + _join(h, p)[16:],
        "header should be 4611686018427387904 bytes",
    ),
    "digest": (lambda h, p: _join(h, p, digest=bytes(32)), "header .* is corrupted"),
    "not_utf8": (lambda h, p: _join(b"\xff\xfe{}", p), "not valid UTF-8 JSON"),
    "not_json": (lambda h, p: _join(b'{"step": 1,', p), "not valid UTF-8 JSON"),
    "deep_json": (
        lambda h, p: _join(b"[" * 100_000 + b"]" * 100_000, p),
        "not valid UTF-8 JSON",
    ),
    "json_list": (lambda h, p: _join([h], p), "JSON object was expected, got a list"),
    "json_null": (lambda h, p: _join(b"null", p), "got a NoneType"),
    "missing_payload_sha256": (_without("payload_sha256"), "missing .*payload_sha256"),
    "missing_step": (_without("step"), "missing field.* step"),
    "missing_leaves": (_without("leaves"), "missing field.* leaves"),
    "unknown_field": (_with(format=2), "unknown field.* format"),
    "negative_step": (_with(step=-3), "`step` must be an integer >= 0, got -3"),
    "float_step": (_with(step=2.0), "`step` must be an integer >= 0, got 2.0"),
    "fractional_step": (_with(step=1.5), "`step` must be an integer >= 0, got 1.5"),
    "bool_step": (_with(step=True), "`step` must be an integer >= 0, got True"),
    "string_step": (_with(step="7"), "`step` must be an integer >= 0, got '7'"),
    "null_step": (_with(step=None), "`step` must be an integer >= 0, got None"),
    "metadata_list": (_with(metadata=[]), "`metadata` must be a JSON object"),
    "library_version": (_with(library_version=3), "`library_version` must be a str"),
    "key_impl_number": (_with(key_impl=5), "`key_impl` must be a string or null"),
    "leaves_string": (_leaves("x"), "`leaves` must be a list"),
    "leaf_fields": (_leaves([{"path": "[0]"}]), "`leaves` must be a list"),
    "leaf_negative_shape": (
        _leaves([{"path": "[0]", "shape": [-1], "dtype": "float32"}]),
        "`leaves` must be a list",
    ),
    "leaf_float_shape": (
        _leaves([{"path": "[0]", "shape": [1.5], "dtype": "float32"}]),
        "`leaves` must be a list",
    ),
    "payload_bytes_negative": (
        _with(payload_bytes=-1),
        "`payload_bytes` must be an integer >= 0",
    ),
    "payload_bytes_string": (
        _with(payload_bytes="10"),
        "`payload_bytes` must be an integer >= 0",
    ),
    "payload_sha256_short": (_with(payload_sha256="abc"), "`payload_sha256` must be"),
    "payload_sha256_not_hex": (
        _with(payload_sha256="zz" * 32),
        "`payload_sha256` must be",
    ),
}


@pytest.mark.parametrize("reader", ["load", "read", "check"])
@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_every_malformed_header_is_a_checkpoint_error(tmp_path, reader, case):
    from transforms import CheckpointError

    make, message = _MALFORMED[case]
    path = tmp_path / "m.ckpt"
    path.write_bytes(make(*_valid_header(tmp_path)))
    with pytest.raises(CheckpointError, match=message) as info:
        _readers()[reader](path)
    assert repr(str(path)) in str(info.value)


@pytest.mark.parametrize(
    "make",
    [lambda h, p: _join(h, p[:-1]), lambda h, p: _join(h, p + b"\0")],
    ids=["truncated", "padded"],
)
def test_a_payload_of_the_wrong_length_is_a_checkpoint_error(tmp_path, make):
    from transforms import CheckpointError

    path = tmp_path / "m.ckpt"
    path.write_bytes(make(*_valid_header(tmp_path)))
    for name in ("load", "read"):
        with pytest.raises(CheckpointError, match="truncated or padded"):
            _readers()[name](path)
    _readers()["check"](path)


def test_an_unknown_key_implementation_is_a_checkpoint_error(tmp_path):
    from transforms import CheckpointError

    header, payload = _valid_header(tmp_path)
    path = tmp_path / "m.ckpt"
    path.write_bytes(_join({**header, "key_impl": "no_such_prng"}, payload))
    with pytest.raises(CheckpointError, match="PRNG implementation 'no_such_prng'"):
        _readers()["load"](path)


def _temps(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


_CHILD = """
import os, sys, time
import jax.numpy as jnp
from transforms import save_checkpoint

path = sys.argv[1]
fsync = os.fsync

def slow_fsync(fd):
    # Widens the time between the temporary file's creation and its rename, so that
    # the parent's kill lands mid-save.
    time.sleep(0.2)
    fsync(fd)

os.fsync = slow_fsync
for step in range(1_000_000):
    model = {"w": jnp.full((1024, 1024), step, jnp.float32)}  # 4 MiB
    save_checkpoint(path, model=model, step=step)
    print(step, flush=True)
"""


def test_a_save_killed_midway_keeps_the_last_checkpoint_and_its_temp_is_removed(
    tmp_path,
):
    from transforms import load_checkpoint, save_checkpoint

    root = pathlib.Path(__file__).resolve().parents[2]
    path = tmp_path / "m.ckpt"
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        env={
            **os.environ,
            # Kept: the caller's path may hold dependencies installed outside
            # site-packages (as on the GPU machine).
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(root), os.environ.get("PYTHONPATH")) if p
            ),
            "JAX_PLATFORMS": "cpu",
        },
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == b"0"  # one whole checkpoint
            deadline = time.monotonic() + 30
            while not _temps(tmp_path):  # the next save has begun
                assert time.monotonic() < deadline, "the child began no second save"
                time.sleep(0.001)
            # Anywhere in the write or the slowed fsync.
            time.sleep(random.Random(0).uniform(0, 0.1))
        finally:
            child.kill()
    left = _temps(tmp_path)
    assert len(left) == 1, left
    backup = tmp_path.parent / "left.tmp"
    shutil.copy(tmp_path / left[0], backup)

    template = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    ckpt = load_checkpoint(path, model=template)
    # The file holds one whole save (the arrays of the step it records), never a mix.
    np.testing.assert_array_equal(ckpt.model["w"], np.full((1024, 1024), ckpt.step))
    assert os.listdir(tmp_path) == ["m.ckpt"]

    # The same leftover, seen by a save instead of a load.
    shutil.copy(backup, tmp_path / left[0])
    save_checkpoint(path, model=template, step=ckpt.step + 1)
    assert os.listdir(tmp_path) == ["m.ckpt"]
    assert load_checkpoint(path, model=template).step == ckpt.step + 1


@pytest.mark.parametrize(
    "target, error",
    [
        ("equinox.tree_serialise_leaves", RuntimeError("serialiser failed")),
        ("os.fsync", OSError("disk full")),
        ("os.fsync", KeyboardInterrupt()),
    ],
    ids=["serialiser", "fsync", "interrupt"],
)
def test_a_failed_save_leaves_no_temporary_file(
    tmp_path, getkey, monkeypatch, target, error
):
    from transforms import load_checkpoint, save_checkpoint

    path, model = _saved(tmp_path, getkey, step=1)
    written = []

    def fail(*args, **kwargs):
        written.append(_temps(tmp_path))
        raise error

    monkeypatch.setattr(target, fail)
    with pytest.raises(type(error)):
        save_checkpoint(path, model=eqx.nn.Linear(3, 2, key=getkey()), step=2)
    monkeypatch.undo()
    if target == "os.fsync":
        assert len(written[0]) == 1  # the failure came while the temporary file existed
    assert os.listdir(tmp_path) == ["m.ckpt"]
    ckpt = load_checkpoint(path, model=model)
    assert ckpt.step == 1
    assert_tree_allclose(ckpt.model, model, rtol=0, atol=0)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_cleaning_spares_saves_in_progress_and_other_files(tmp_path, getkey):
    import fcntl

    from transforms import load_checkpoint, save_checkpoint

    path, model = _saved(tmp_path, getkey)
    # Named as the module docstring documents: `.<name>.eqxckpt-<random>.tmp`.
    in_progress = tmp_path / ".m.ckpt.eqxckpt-live0001.tmp"
    abandoned = tmp_path / ".m.ckpt.eqxckpt-dead0001.tmp"
    others = [
        ".m.ckpt.backup.tmp",
        ".other.ckpt.eqxckpt-dead0002.tmp",
        ".m.ckpt.other.eqxckpt-dead0003.tmp",
        ".m.ckpt.eqxckpt-dead0004.tmp.keep",
        "m.ckpt.eqxckpt-dead0005.tmp",
        "notes.txt",
    ]
    for name in others:
        (tmp_path / name).write_bytes(b"user data")
    (tmp_path / "elsewhere.txt").write_bytes(b"user data")
    (tmp_path / ".m.ckpt.eqxckpt-link0001.tmp").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / ".m.ckpt.eqxckpt-dir00001.tmp").mkdir()
    abandoned.write_bytes(b"partial")
    in_progress.write_bytes(b"partial")
    # A save in progress holds its file's lock, as save_checkpoint does (another
    # open file description conflicts even within this process).
    with open(in_progress, "rb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        load_checkpoint(path, model=model)
        assert in_progress.exists() and not abandoned.exists()
        save_checkpoint(path, model=model, step=3)
        assert in_progress.exists()
    save_checkpoint(path, model=model, step=4)
    assert not in_progress.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        others
        + [
            "m.ckpt",
            "elsewhere.txt",
            ".m.ckpt.eqxckpt-link0001.tmp",
            ".m.ckpt.eqxckpt-dir00001.tmp",
        ]
    )


def test_step_is_stored_as_a_python_int(tmp_path, getkey):
    from transforms import load_checkpoint

    path, model = _saved(tmp_path, getkey, step=np.int64(5))
    step = load_checkpoint(path, model=model).step
    assert step == 5 and type(step) is int


# Called unwrapped: the test suite's jaxtyping/beartype hook would otherwise answer
# some of these first, and users without it see the library's own checks.
_BAD_SAVES = {
    "negative_step": ({"step": -3}, ValueError, r"`step` must be an integer >= 0"),
    "float_step": ({"step": 2.0}, TypeError, r"got 2\.0 \(a float\)"),
    "bool_step": ({"step": True}, TypeError, r"got True \(a bool\)"),
    "string_step": ({"step": "3"}, TypeError, r"got '3' \(a str\)"),
    "array_step": ({"step": jnp.ones(2, int)}, TypeError, r"`step` must be"),
    "int_path": ({"path": 3}, TypeError, "`path` must be a str or an os.PathLike"),
    "bytes_path": ({"path": b"m.ckpt"}, TypeError, "os.PathLike, got bytes"),
    "empty_path": ({"path": ""}, ValueError, "`path` is empty"),
    "metadata_object": (
        {"metadata": {"config": {"f": object()}}},
        TypeError,
        r"`metadata` must be JSON-serialisable: metadata\['config'\]\['f'\] is of "
        "type object",
    ),
    "metadata_int_key": (
        {"metadata": {1: "a"}},
        TypeError,
        r"metadata has the key 1 \(int\); JSON keys are strings",
    ),
    "metadata_numpy": (
        {"metadata": {"lr": np.float32(1e-3)}},
        TypeError,
        r"metadata\['lr'\] is of type float32",
    ),
    "metadata_set": ({"metadata": {"s": {1, 2}}}, TypeError, r"is of type set"),
    "metadata_list": (
        {"metadata": [("a", 1)]},
        TypeError,
        "`metadata` must be a mapping, got list",
    ),
    "int_key": ({"key": 3}, TypeError, "`key` must be a PRNG key"),
    "float_key": (
        {"key": jnp.zeros(2)},
        TypeError,
        "`key` must be a PRNG key .* of dtype float32",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_SAVES))
def test_bad_save_arguments_are_refused(tmp_path, getkey, case):
    from transforms import save_checkpoint

    arguments, error, message = _BAD_SAVES[case]
    arguments = {
        "path": tmp_path / "m.ckpt",
        "model": eqx.nn.Linear(2, 2, key=getkey()),
        **arguments,
    }
    with pytest.raises(error, match=f"^save_checkpoint: .*{message}"):
        inspect.unwrap(save_checkpoint)(**arguments)
    assert os.listdir(tmp_path) == []


def test_a_directory_is_not_a_checkpoint(tmp_path, getkey):
    from transforms import load_checkpoint, read_checkpoint_metadata, save_checkpoint

    model = eqx.nn.Linear(2, 2, key=getkey())
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_checkpoint(tmp_path, model=model)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_checkpoint_metadata(tmp_path)


def test_bad_load_arguments_are_refused(tmp_path, getkey):
    from transforms import check_checkpoint_metadata, load_checkpoint

    path, model = _saved(tmp_path, getkey)
    load = inspect.unwrap(load_checkpoint)
    with pytest.raises(TypeError, match="^load_checkpoint: `path` must be a str"):
        load(3, model=model)
    with pytest.raises(TypeError, match="^load_checkpoint: `key` must be a PRNG key"):
        load(path, model=model, key="key")
    with pytest.raises(
        TypeError, match="^load_checkpoint: `expected_metadata` must be a mapping"
    ):
        load(path, model=model, expected_metadata=[("n", 1)])
    with pytest.raises(
        TypeError,
        match="^check_checkpoint_metadata: `expected_metadata` must be JSON-ser",
    ):
        inspect.unwrap(check_checkpoint_metadata)(path, {2: 1})


def test_a_load_during_a_save_spares_the_saves_temporary_file(
    tmp_path, getkey, monkeypatch
):
    from transforms import load_checkpoint, save_checkpoint

    path, old = _saved(tmp_path, getkey, step=1)
    new = eqx.nn.Linear(3, 2, key=getkey())
    fsync = os.fsync
    seen = []

    def load_then_fsync(fd):
        # Another reader of the checkpoint (e.g. an evaluation job) while this save
        # has written its temporary file and not yet moved it into place.
        if not seen:
            seen.append(_temps(tmp_path))
            assert load_checkpoint(path, model=old).step == 1
            seen.append(_temps(tmp_path))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", load_then_fsync)
    save_checkpoint(path, model=new, step=2)
    monkeypatch.undo()
    assert len(seen[0]) == 1 and seen[1] == seen[0]
    assert os.listdir(tmp_path) == ["m.ckpt"]
    ckpt = load_checkpoint(path, model=old)
    assert ckpt.step == 2
    assert_tree_allclose(ckpt.model, new, rtol=0, atol=0)
