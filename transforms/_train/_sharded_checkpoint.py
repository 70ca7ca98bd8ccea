"""Sharded, asynchronous training checkpoints on orbax-checkpoint.

A single-file checkpoint (`_checkpoint.py`) gathers every array on one host and
writes it in one piece: right for a run on one device, wasteful (and, across hosts,
impossible) for parameters split over a mesh. Orbax writes each device's shards
itself, in the background while training continues, and reads them back into any
sharding, so a run saved on eight devices restores on one or on four.

Layout: a directory with one subdirectory per saved step (orbax's
`CheckpointManager`), each holding two items: `arrays`, the array leaves of
`(model, opt_state, key data)` as a flat mapping `{"0": ..., "1": ...}` in tree
order (the tree's structure comes from the templates on restore, as for the
single-file format, so any Equinox module or optax state round-trips), and
`header`, a JSON object with the step, the user's metadata, the library version,
the key's PRNG implementation and the path, shape and dtype of every stored array.
Orbax writes a step into a temporary directory and renames it when complete: a
process killed mid-save leaves the previous step readable, and the unfinished
directory is never listed.

Several processes (one JAX runtime over `jax.distributed`): orbax synchronises
them at every save, restore and close, so each process makes the same calls;
each writes its own devices' shards, process 0 the header and the commit.
Process 0 also lists the steps for everyone (orbax's
`single_host_load_and_broadcast`), so the processes agree on the latest step. A
process-local array (the key) is written as one replicated over all devices,
since orbax refuses arrays that each process holds separately.
"""

import importlib
import os
from collections.abc import Mapping
from typing import Any, TypeGuard

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .._version import __version__
from ._checkpoint import (
    _as_path,
    _as_step,
    _check_metadata,
    _check_template,
    _describe,
    _json_mapping,
    _key_payload,
    Checkpoint,
)


def _orbax():
    """`orbax.checkpoint`, imported now; an `ImportError` naming the extra if absent."""
    try:
        return importlib.import_module("orbax.checkpoint")
    except ImportError as error:
        raise ImportError(
            "Sharded checkpoints need orbax-checkpoint: "
            "`pip install eqx-models[orbax]`."
        ) from error


def _arrays(tree) -> dict[str, jax.Array | np.ndarray]:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return {str(i): leaf for i, leaf in enumerate(leaves)}


def _host_local(leaf) -> TypeGuard[jax.Array]:
    """Whether `leaf` lives on this process's devices only while the run spans
    several processes (the key, or an array never placed on the mesh): orbax
    refuses to write such an array, since each process holds its own copy."""
    return (
        isinstance(leaf, jax.Array)
        and jax.process_count() > 1
        and leaf.is_fully_addressable
    )


def _replicated() -> NamedSharding:
    """Every device of every process holding the whole array."""
    return NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), P())


def _global(leaf):
    """`leaf` in a form orbax writes from several processes: a host-local array
    becomes one replicated over every device, built from this process's copy
    (every process holds the same value, as for the key `fit` folds; orbax
    writes the copy of the first replica, which is process 0's)."""
    if not _host_local(leaf):
        return leaf
    return jax.make_array_from_process_local_data(_replicated(), np.asarray(leaf))


def _target(leaf):
    """What orbax reads a stored array as, for the template array `leaf`: a
    NumPy array for a NumPy template (it has no sharding), else a JAX array in
    the template's sharding (replicated first, for a host-local one)."""
    if not isinstance(leaf, jax.Array):
        return leaf
    sharding = _replicated() if _host_local(leaf) else leaf.sharding
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class ShardedCheckpoints:
    """A directory of sharded training checkpoints, written asynchronously with
    orbax-checkpoint (`pip install eqx-models[orbax]`).

    [`transforms.fit`][] uses it for a step with a mesh; use it directly in a loop
    of your own. `save` returns once the arrays are copied off the devices and
    writes them in the background (call `wait`, or `close`, before reading them
    or exiting); each device's shards are written by their own process, so the
    arrays are never gathered. `restore` reads a step into the shardings of the
    templates it is given: the run may continue on another number of devices or
    another layout. A save is complete or absent: a process killed while saving
    leaves the previous steps readable.

    In a run of several processes (`jax.distributed`), every process constructs
    it on the same directory and makes the same calls in the same order (orbax
    synchronises the processes at each); each process writes its own devices'
    shards, process 0 the header, and all agree on `latest_step` (process 0
    lists the steps for the others). Arrays that each process holds whole
    rather than as shards of the mesh, such as the key, must have the same
    value in every process: process 0's copy is written.

    **Arguments:**

    - `directory`: where the steps are written (created if missing).
    - `max_to_keep`: how many of the newest steps to keep (older ones are deleted
        once a newer save completes); at least 1.

    **Raises:**

    `ImportError` without orbax-checkpoint; `TypeError`/`ValueError` for a
    `directory` that is not a non-empty path or a `max_to_keep` below 1;
    `NotADirectoryError` if `directory` is an existing file.

    !!! example

        ```python
        checkpoints = ShardedCheckpoints(tmp / "run")
        checkpoints.save(10, model=model, opt_state=opt_state, key=key)
        checkpoints.wait()
        restored = checkpoints.restore(model=model, opt_state=opt_state, key=key)
        restored.step  # 10
        ```
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        from .._validation import check_size

        caller = "ShardedCheckpoints"
        self.directory = os.path.abspath(_as_path(directory, caller))
        self.max_to_keep = check_size(caller, "max_to_keep", max_to_keep, minimum=1)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"{caller}: `directory` {self.directory!r} is a file (a single-file "
                "checkpoint?), not a directory of sharded checkpoints."
            )
        ocp = _orbax()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                enable_async_checkpointing=True,
                create=True,
                # Process 0 lists the steps and tells the others, so that every
                # process agrees on `latest_step` (and on whether a run may
                # start here) even where a shared filesystem shows the
                # directory to each host at a different moment.
                single_host_load_and_broadcast=True,
            ),
            item_names=("arrays", "header"),
        )

    def latest_step(self) -> int | None:
        """The newest completely written step, or `None` if there is none."""
        steps = self._steps()
        return max(steps) if steps else None

    def _steps(self) -> list[int]:
        # Python integers: the steps process 0 broadcasts come back as numpy's.
        return sorted(int(step) for step in self._manager.all_steps())

    def exists(self) -> bool:
        """Whether a step has been completely written."""
        return self.latest_step() is not None

    def check_metadata(
        self,
        expected_metadata: Mapping[str, Any],
        *,
        caller: str = "ShardedCheckpoints",
    ) -> None:
        """Refuse the latest step if its metadata differs from `expected_metadata`
        (reading its header only).

        **Raises:**

        [`transforms.CheckpointError`][] listing every differing field;
        `FileNotFoundError` if no step is saved.
        """
        expected = _json_mapping(expected_metadata, "expected_metadata", caller)
        header = self.read_header()
        where = os.path.join(self.directory, str(header["step"]))
        _check_metadata(where, header["metadata"], expected, caller)

    def save(
        self,
        step: int,
        *,
        model,
        opt_state=None,
        key=None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Start writing a checkpoint of step `step` (see
        [`transforms.save_checkpoint`][] for the arguments) and return; a save
        still running is waited for first.

        **Raises:**

        `TypeError`/`ValueError` as `save_checkpoint` for a bad `step`, `key` or
        `metadata`; `ValueError` if `step` is not newer than the latest saved one.
        """
        caller = "ShardedCheckpoints.save"
        step = _as_step(step, caller)
        metadata = _json_mapping(
            {} if metadata is None else metadata, "metadata", caller
        )
        key_data, key_impl = _key_payload(key, caller)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"{caller}: `step` must be newer than the latest saved step "
                f"{latest}, got {step}."
            )
        tree = (model, opt_state, key_data)
        header = {
            "step": step,
            "metadata": metadata,
            "library_version": __version__,
            "key_impl": key_impl,
            "leaves": _describe(tree),
        }
        ocp = _orbax()
        self._manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(
                    {name: _global(leaf) for name, leaf in _arrays(tree).items()}
                ),
                header=ocp.args.JsonSave(header),
            ),
        )

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish the saves in flight and release the directory."""
        self._manager.close()

    def read_header(self, step: int | None = None) -> dict:
        """The header of step `step` (default: the latest): `step`, `metadata`,
        `library_version`, `key_impl` and `leaves`, without reading the arrays.

        **Raises:**

        `FileNotFoundError` if no step is saved (or not that one).
        """
        step = self._step(step, "ShardedCheckpoints.read_header")
        ocp = _orbax()
        restored = self._manager.restore(
            step, args=ocp.args.Composite(header=ocp.args.JsonRestore())
        )
        return dict(restored["header"])

    def _step(self, step: int | None, caller: str) -> int:
        saved = self._steps()
        if step is None:
            step = self.latest_step()
        elif _as_step(step, caller) not in saved:
            step = None
        if step is None:
            raise FileNotFoundError(
                f"{caller}: no checkpoint of the requested step in {self.directory!r} "
                f"(saved steps: {saved})."
            )
        return step

    def restore(
        self,
        *,
        model,
        opt_state=None,
        key=None,
        step: int | None = None,
        expected_metadata: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Read step `step` (default: the latest) into the templates' shardings.

        **Arguments:**

        - `model`, `opt_state`, `key`: templates as for
            [`transforms.load_checkpoint`][]; each array is read into the template
            array's sharding (place the templates on the new mesh first, e.g. with
            the step's layout, to restore straight into it).
        - `step`: the step to read, or `None` for the latest.
        - `expected_metadata`: entries the stored metadata must equal.

        **Returns:**

        A [`transforms.Checkpoint`][].

        **Raises:**

        `FileNotFoundError` if no step is saved (or not that one);
        [`transforms.CheckpointError`][] if the stored arrays disagree with the
        templates or the metadata with `expected_metadata` (listing the
        differences); `TypeError` for a `key` that is not a PRNG key.
        """
        caller = "ShardedCheckpoints.restore"
        key_template, _ = _key_payload(key, caller)
        if expected_metadata is not None:
            expected_metadata = _json_mapping(
                expected_metadata, "expected_metadata", caller
            )
        header = self.read_header(self._step(step, caller))
        where = os.path.join(self.directory, str(header["step"]))
        if expected_metadata is not None:
            _check_metadata(where, header["metadata"], expected_metadata, caller)
        template = (model, opt_state, key_template)
        _check_template(where, header["leaves"], template, caller)
        ocp = _orbax()
        templates = _arrays(template)
        targets = {name: _target(leaf) for name, leaf in templates.items()}
        arrays = self._manager.restore(
            header["step"],
            args=ocp.args.Composite(arrays=ocp.args.StandardRestore(targets)),
        )["arrays"]
        dynamic, static = eqx.partition(template, eqx.is_array)
        structure = jax.tree.structure(dynamic)
        dynamic = jax.tree.unflatten(
            structure,
            [
                # A host-local template gets its array back on its own device.
                jax.device_put(arrays[name].addressable_data(0), leaf.sharding)
                if _host_local(leaf)
                else arrays[name]
                for name, leaf in templates.items()
            ],
        )
        model, opt_state, key_data = eqx.combine(dynamic, static)
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
