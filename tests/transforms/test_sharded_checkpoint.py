"""Sharded checkpoints (orbax): round trips, restoring onto another device count,
resuming `fit` bit-identically, and a save killed midway."""

import os
import pathlib
import signal
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from ..helpers import import_optional, run_script


import_optional("orbax.checkpoint", extra="orbax")

from transforms import (  # noqa: E402
    CheckpointError,
    fit,
    make_train_step,
    ShardedCheckpoints,
)


ROOT = pathlib.Path(__file__).resolve().parents[2]

# One training setup for every device count: an MLP with Adam, FSDP over "data".
_SETUP = """
import equinox as eqx, jax.numpy as jnp, jax.random as jr, numpy as np, optax
from transforms import (
    fit, make_train_step, ParameterSharding, ShardedCheckpoints
)

def loss(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

model = eqx.nn.MLP(8, 4, 64, 2, key=jr.key(0))
x = jr.normal(jr.key(1), (32, 8)); y = jnp.tanh(x[:, :4])
optimizer = optax.adam(1e-2)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
mesh = jax.make_mesh((jax.device_count(),), ("data",))
step = make_train_step(
    loss, optimizer, mesh=mesh,
    parameter_sharding=ParameterSharding(fsdp_axis="data", min_size=64),
)

def run(path, n_steps, resume=False):
    return fit(step, model, opt_state, lambda i: (x * (1 + 0.1 * i), y),
               n_steps=n_steps, key=jr.key(2), checkpoint_path=path,
               checkpoint_every=2, resume=resume, progress=False)

def arrays(tree):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]
"""

_ON_EIGHT = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
{setup}
import sys
out = sys.argv[1]
whole = run(out + "/whole", 4)
half = run(out + "/run", 2)
assert ShardedCheckpoints(out + "/run").latest_step() == 2
np.savez(out + "/step2.npz", *arrays((half.model, half.opt_state)))
resumed = run(out + "/run", 4, resume=True)
assert resumed.step == 4 and len(resumed.history) == 2
# The same devices, the same arithmetic: bit-identical to the uninterrupted run.
for a, b in zip(arrays((whole.model, whole.opt_state)),
                arrays((resumed.model, resumed.opt_state))):
    assert np.array_equal(a, b)
w = whole.model.layers[1].weight
assert w.sharding.shard_shape(w.shape) == (64, 8), w.sharding
np.savez(out + "/step4.npz", *arrays((whole.model, whole.opt_state)))
print("OK")
"""

_ON_FEWER = """
import jax
import sys
jax.config.update("jax_num_cpu_devices", int(sys.argv[2]))
{setup}
out = sys.argv[1]
n = jax.device_count()
# Restored straight into this machine's layout: the arrays of step 2, exactly.
placed = step.place(model, opt_state)
restored = ShardedCheckpoints(out + "/run").restore(
    model=placed[0], opt_state=placed[1], key=jr.key(2), step=2
)
saved = np.load(out + "/step2.npz")
for i, a in enumerate(arrays((restored.model, restored.opt_state))):
    assert np.array_equal(a, saved[f"arr_{{i}}"]), i
w = restored.model.layers[1].weight
assert w.sharding.shard_shape(w.shape) == (64, 64 // n), w.sharding
# fit continues from step 2 to 4 (its checkpoint directory is a copy: a run
# never writes into another's steps).
import shutil
shutil.copytree(out + "/run", out + f"/on{{n}}", ignore=shutil.ignore_patterns("4"))
assert ShardedCheckpoints(out + f"/on{{n}}").latest_step() == 2
continued = run(out + f"/on{{n}}", 4, resume=True)
final = np.load(out + "/step4.npz")
for i, a in enumerate(arrays((continued.model, continued.opt_state))):
    # Another device count sums the split reductions in another order.
    np.testing.assert_allclose(a, final[f"arr_{{i}}"], rtol=1e-5, atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_saved_on_eight_devices_restores_on_four_and_on_one(tmp_path):
    run_script(_ON_EIGHT.format(setup=_SETUP), str(tmp_path))
    for n in ("4", "1"):
        run_script(_ON_FEWER.format(setup=_SETUP), str(tmp_path), n)


_KILLED = """
import os, signal, sys, time
import jax.numpy as jnp, numpy as np
from transforms import ShardedCheckpoints
checkpoints = ShardedCheckpoints(sys.argv[1])
checkpoints.save(1, model={"w": jnp.full((4,), 1.0)})
checkpoints.wait()
# Large enough that writing it takes a while; killed while its files are being
# written in the background, once its temporary directory exists: orbax creates
# that in the background too (`create_directories_asynchronously`), so on a loaded
# machine a kill right after `save` returned could come before it (seen in CI).
checkpoints.save(2, model={"w": jnp.full((64 * 2**20,), 2.0)})
deadline = time.monotonic() + 120
while True:
    names = os.listdir(sys.argv[1])
    if any(n.startswith("2") and n != "2" for n in names):
        os.kill(os.getpid(), signal.SIGKILL)
    if "2" in names or time.monotonic() > deadline:
        sys.exit(f"step 2 was not seen being written: {names}")
    time.sleep(0.001)
"""


def test_a_save_killed_midway_leaves_the_previous_step(tmp_path):
    directory = tmp_path / "run"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(directory)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu"),
        timeout=600,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    # The unfinished step was being written beside the finished one...
    assert any(p.name.startswith("2") and p.name != "2" for p in directory.iterdir())
    checkpoints = ShardedCheckpoints(directory)
    assert checkpoints.latest_step() == 1
    restored = checkpoints.restore(model={"w": jnp.zeros(4)})
    assert restored.step == 1
    np.testing.assert_array_equal(restored.model["w"], np.ones(4))
    # ...and the next save of that step succeeds.
    checkpoints.save(2, model={"w": jnp.zeros(4)})
    checkpoints.close()
    assert ShardedCheckpoints(directory).latest_step() == 2


def test_round_trip_of_a_module_an_optimiser_state_and_a_key(tmp_path):
    model = eqx.nn.MLP(3, 2, 8, 1, key=jr.key(0))
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    checkpoints = ShardedCheckpoints(tmp_path / "run", max_to_keep=1)
    for step in (3, 5):
        checkpoints.save(
            step, model=model, opt_state=opt_state, key=jr.key(7), metadata={"s": step}
        )
    checkpoints.wait()
    assert checkpoints.latest_step() == 5
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["5"]
    restored = checkpoints.restore(model=model, opt_state=opt_state, key=jr.key(0))
    assert restored.step == 5 and restored.metadata == {"s": 5}
    assert jnp.array_equal(jr.key_data(restored.key), jr.key_data(jr.key(7)))
    for a, b in zip(
        jax.tree.leaves(eqx.filter((model, opt_state), eqx.is_array)),
        jax.tree.leaves(eqx.filter((restored.model, restored.opt_state), eqx.is_array)),
    ):
        assert np.array_equal(a, b)
    with pytest.raises(CheckpointError, match=r"s: expected 4, checkpoint has 5"):
        checkpoints.check_metadata({"s": 4})
    wider = eqx.nn.MLP(3, 2, 9, 1, key=jr.key(0))
    with pytest.raises(CheckpointError, match="does not match the template"):
        checkpoints.restore(model=wider, opt_state=opt_state, key=jr.key(0))
    with pytest.raises(FileNotFoundError, match=r"saved steps: \[5\]"):
        checkpoints.restore(model=model, opt_state=opt_state, key=jr.key(0), step=3)
    with pytest.raises(ValueError, match="`step` must be newer than the latest"):
        checkpoints.save(5, model=model)
    checkpoints.close()


def test_bad_arguments_are_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        ShardedCheckpoints(tmp_path / "file")
    with pytest.raises(ValueError, match="`max_to_keep` must be a positive integer"):
        ShardedCheckpoints(tmp_path / "run", max_to_keep=0)
    with pytest.raises(ValueError, match="`checkpoint_format` must be one of"):
        fit(
            lambda m, s, b, k: (m, s, {}),
            None,
            None,
            lambda i: None,
            n_steps=1,
            checkpoint_format="orbax",
        )


def test_fit_refuses_to_start_over_an_earlier_sharded_run(tmp_path):
    checkpoints = ShardedCheckpoints(tmp_path / "run")
    checkpoints.save(1, model={"w": jnp.zeros(2)})
    checkpoints.close()
    step = make_train_step(
        lambda m, b, k: jnp.sum(m["w"] ** 2), optax.sgd(0.1), donate=False
    )
    model = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="holds sharded checkpoints of an earlier run"):
        fit(
            step,
            model,
            optax.sgd(0.1).init(model),
            lambda i: None,
            n_steps=2,
            checkpoint_path=tmp_path / "run",
            checkpoint_format="sharded",
        )


def test_numpy_leaves_come_back_as_numpy_arrays(tmp_path):
    # A NumPy template has no sharding to read into: it gets a NumPy array back,
    # in its own dtype.
    checkpoints = ShardedCheckpoints(tmp_path / "run")
    stored = np.arange(3.0)
    checkpoints.save(1, model={"w": stored, "v": jnp.ones(2)})
    checkpoints.wait()
    restored = checkpoints.restore(model={"w": np.zeros(3), "v": jnp.zeros(2)})
    checkpoints.close()
    assert isinstance(restored.model["w"], np.ndarray)
    assert restored.model["w"].dtype == np.float64
    np.testing.assert_array_equal(restored.model["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(restored.model["v"], [1.0, 1.0])
