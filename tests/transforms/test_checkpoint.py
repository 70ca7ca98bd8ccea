import os

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
    path.write_bytes(b"EQXCKPT1")
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
