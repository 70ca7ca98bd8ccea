"""Data-parallel placement: `shard_batch` splits a batch, `replicate` copies the rest.

A batch is split along its leading axis over one axis of a mesh; the model, the
optimiser state and keys are copied to every device. The training and attribution
steps place their inputs this way, and users call the same two functions.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from .._validation import check_type, is_concrete


def put(x, sharding: Sharding):
    """`x` laid out by `sharding`, on this process's devices and every other's.

    Within one process this is `jax.device_put`. When the sharding spans the
    devices of several processes (after `jax.distributed.initialize`), every
    process holds the same global value (the same model, key and batch) and builds
    the shards of its own devices from it: `jax.device_put` would first compare
    the copies across processes, a collective on every call that also refuses any
    array holding a NaN (which never equals itself; the LM's batches mark missing
    values with NaN). An array that already spans the processes is resharded.
    """
    if sharding.is_fully_addressable or (
        isinstance(x, jax.Array) and not x.is_fully_addressable
    ):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def place(tree, shardings):
    """The arrays of `tree` laid out by `shardings` (one `Sharding`, or a tree of
    them shaped like `eqx.filter(tree, eqx.is_array)`): moved outside `jit`,
    constrained inside it; other leaves unchanged."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    if not is_concrete(dynamic):
        return eqx.combine(jax.lax.with_sharding_constraint(dynamic, shardings), static)

    # `device_put`, not an eager constraint: arrays committed to other devices
    # (read from a checkpoint, placed for another mesh) are moved, not refused.
    # Never an alias of the caller's array, which a donating step would delete:
    # `device_put` reuses the source buffer for the shard on the same device (even
    # with `may_alias=False` in JAX 0.10), so it moves a copy. An array already laid
    # out is kept, not copied at every step.
    def move(x, sharding):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return put(jnp.copy(x), sharding)

    # `shardings` is a prefix of `dynamic`: each sharding lays out its subtree.
    def put_subtree(sharding: Sharding, subtree):
        return jax.tree.map(lambda x: move(x, sharding), subtree)

    return eqx.combine(jax.tree.map(put_subtree, shardings, dynamic), static)


def _check_axis(mesh: Mesh, axis: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(
            f"data-parallel sharding: `axis` must name an axis of the mesh "
            f"{tuple(mesh.axis_names)}, got {axis!r}."
        )


def shard_batch(batch, mesh: Mesh, axis: str = "data"):
    """Split a batch over the `axis` of a mesh along its leading dimension.

    **Arguments:**

    - `batch`: a pytree of arrays sharing a leading batch dimension.
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis`: the mesh axis the batch dimension is split over.

    **Returns:**

    The same pytree, each array placed with `NamedSharding(mesh, P(axis))`; non-array
    leaves are returned unchanged.

    **Raises:**

    `ValueError` if `axis` is not a mesh axis, or if a leading dimension is not
    divisible by the size of that axis; `TypeError` if `mesh` is not a
    `jax.sharding.Mesh`.

    !!! example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        batch = shard_batch((x, y), mesh)
        ```
    """
    check_type("shard_batch", "mesh", mesh, Mesh, "a jax.sharding.Mesh")
    _check_axis(mesh, axis)
    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def place(path, leaf):
        if not eqx.is_array(leaf):
            return leaf
        if leaf.ndim == 0 or leaf.shape[0] % n != 0:
            raise ValueError(
                f"shard_batch: every array in `batch` needs a leading dimension "
                f"divisible by the {n} devices of mesh axis {axis!r}; the leaf at "
                f"{jax.tree_util.keystr(path)} has shape {leaf.shape}."
            )
        return put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, batch)


def replicate(tree, mesh: Mesh):
    """Place a copy of every array of `tree` on each device of `mesh`.

    **Arguments:**

    - `tree`: any pytree (a model, an optimiser state, a key).
    - `mesh`: a `jax.sharding.Mesh`.

    **Returns:**

    The same pytree with its arrays replicated (`NamedSharding(mesh, P())`);
    non-array leaves are unchanged.

    **Raises:**

    `TypeError` if `mesh` is not a `jax.sharding.Mesh`.
    """
    check_type("replicate", "mesh", mesh, Mesh, "a jax.sharding.Mesh")
    return place(tree, NamedSharding(mesh, PartitionSpec()))
