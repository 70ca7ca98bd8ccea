"""Sharded checkpoints written and read by two processes that form one JAX runtime
(`jax.distributed`, two CPU devices each, collectives over gloo), started as the
multi-host example starts its workers: a run stopped at step 2 and resumed by a
second launch ends bit-identical to an uninterrupted one, a fresh run refuses
the directory on every process (as does a single-file checkpoint of split
parameters), and one process restores the two processes' checkpoint exactly."""

import os

import numpy as np
import pytest

from ..helpers import EXAMPLES, import_optional, load_example, ROOT, run_script


import_optional("orbax.checkpoint", extra="orbax")

# One FSDP training setup for every process count: an MLP with Adam whose two
# weight matrices are split over all the runtime's devices.
_SETUP = """
import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np, optax
from transforms import fit, make_train_step, ParameterSharding, ShardedCheckpoints

def loss(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

model = eqx.nn.MLP(8, 4, 16, 1, key=jr.key(0))
x = jr.normal(jr.key(1), (8, 8)); y = jnp.tanh(x[:, :4])
optimizer = optax.adam(1e-2)
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
mesh = jax.make_mesh((jax.device_count(),), ("data",))
step = make_train_step(
    loss, optimizer, mesh=mesh,
    parameter_sharding=ParameterSharding(fsdp_axis="data", min_size=64),
)

def run(path, n_steps, resume=False, checkpoint_format="sharded"):
    return fit(step, model, opt_state, lambda i: (x * (1 + 0.1 * i), y),
               n_steps=n_steps, key=jr.key(2), checkpoint_path=path,
               checkpoint_every=2, checkpoint_format=checkpoint_format,
               resume=resume, progress=False)

def refusal(*args, **kwargs):  # the message of the ValueError `run` raises
    try:
        run(*args, **kwargs)
    except ValueError as error:
        return str(error)

def split_over_all_devices(a):
    shard = a.sharding.shard_shape(a.shape)
    return int(np.prod(shard)) * jax.device_count() == a.size
"""

# A worker of the two-process runtime. The first launch trains 4 steps
# uninterrupted, then 2 steps into another directory; the second refuses a fresh
# run over that directory and resumes it to step 4. Process 0 saves each final
# state, gathered from every process, with numpy.
_WORKER = """
import argparse
from _processes import add_flags, join, report
parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("launch", choices=("first", "second"))
add_flags(parser)
args = parser.parse_args()
join(args)
{setup}
from jax.experimental import multihost_utils

def save(name, result):
    leaves = jax.tree.leaves(eqx.filter((result.model, result.opt_state), eqx.is_array))
    # Each process holds only its shards: the whole arrays, in every process.
    arrays = [multihost_utils.process_allgather(a, tiled=True) for a in leaves]
    arrays.append(np.asarray(jr.key_data(result.key)))
    if jax.process_index() == 0:
        np.savez(f"{{args.out}}/{{name}}.npz", *arrays)

out = args.out
if args.launch == "first":
    save("whole", run(out + "/whole", 4))
    save("step2", run(out + "/run", 2))
    checkpoints = ShardedCheckpoints(out + "/run")
    report({{"latest": checkpoints.latest_step()}})
    checkpoints.close()
else:
    refused = refusal(out + "/run", 4)
    no_file = refusal(out + "/file", 4, checkpoint_format="file")
    resumed = run(out + "/run", 4, resume=True)
    w = resumed.model.layers[0].weight
    save("resumed", resumed)
    report({{
        "refused": refused,
        "no_file": no_file,
        "steps_run": [r["step"] for r in resumed.history],
        "split": split_over_all_devices(w),
        "local_shards": len(w.addressable_shards),
    }})
"""

# One process (four devices) reads the two processes' step 2 into its own FSDP
# layout and onto one device.
_ONE_PROCESS = """
import sys
{setup}
out = sys.argv[1]
saved = np.load(out + "/step2.npz")
checkpoints = ShardedCheckpoints(out + "/run")
assert checkpoints.latest_step() == 2
for on_four in (True, False):
    # Unplaced templates live on the default device.
    templates = step.place(model, opt_state) if on_four else (model, opt_state)
    restored = checkpoints.restore(
        model=templates[0], opt_state=templates[1], key=jr.key(0), step=2
    )
    leaves = jax.tree.leaves(
        eqx.filter((restored.model, restored.opt_state), eqx.is_array)
    )
    leaves.append(jr.key_data(restored.key))
    assert len(leaves) == len(saved.files)
    for i, a in enumerate(leaves):
        assert np.array_equal(np.asarray(a), saved[f"arr_{{i}}"]), (on_four, i)
    w = restored.model.layers[0].weight
    assert split_over_all_devices(w) == on_four, w.sharding
checkpoints.close()
print("OK")
"""


def _launch(processes_module, out, launch: str) -> list[dict]:
    command = ["-c", _WORKER.format(setup=_SETUP), str(out), launch]
    path = os.pathsep.join([str(EXAMPLES), str(ROOT), os.environ.get("PYTHONPATH", "")])
    workers = processes_module.start(command, 2, 2, env={"PYTHONPATH": path})
    return processes_module.collect(workers, timeout=300)


def _arrays(path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[name] for name in f.files]


@pytest.mark.slow
def test_two_processes_resume_bit_identically_and_one_process_restores(tmp_path):
    processes = load_example("_processes")
    first = _launch(processes, tmp_path, "first")
    # Every process sees the step both wrote.
    assert [report["latest"] for report in first] == [2, 2], first

    run_script(_ONE_PROCESS.format(setup=_SETUP), str(tmp_path), devices=4)

    second = _launch(processes, tmp_path, "second")
    for report in second:
        # A fresh run over the directory is refused on every process alike.
        assert report["refused"] is not None, second
        assert "holds sharded checkpoints of an earlier run" in report["refused"]
        assert "latest step 2" in report["refused"], report
        # A single file cannot hold shards no process holds whole.
        assert "`checkpoint_format` must be 'sharded'" in (report["no_file"] or "")
        # The resumed run continued from the checkpoint, in the FSDP layout.
        assert report["steps_run"] == [2, 3], report
        assert report["split"] and report["local_shards"] == 2, report
    whole = _arrays(tmp_path / "whole.npz")
    resumed = _arrays(tmp_path / "resumed.npz")
    assert len(whole) == len(resumed)
    for i, (a, b) in enumerate(zip(whole, resumed)):
        # The same devices, the same arithmetic: the same bits.
        assert a.dtype == b.dtype and np.array_equal(a, b), i
