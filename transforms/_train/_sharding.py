"""Data-parallel placement: `shard_batch` splits a batch, `replicate` copies the rest.

A batch is split along its leading axis over one axis of a mesh; the model, the
optimiser state and keys are copied to every device. The training and attribution
steps place their inputs this way, and users call the same two functions.
"""

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._validation import check_type


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
        return jax.device_put(leaf, sharding)

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
    return eqx.filter_shard(tree, NamedSharding(mesh, PartitionSpec()))
