"""Activations kept split over the batch inside a sharded step.

A step with a mesh traces its loss inside [`transforms.batch_sharding`][]; a model
calls [`transforms.constrain_batch`][] on its activations, which then tells XLA
that their batch dimension stays split over the step's data axis. Outside such a
trace the call does nothing, so a model written this way runs unchanged on one
device.

Why it is needed: XLA propagates shardings from every input of an operation. With
the parameters split over the data axis (FSDP), an embedding table or a weight
split along its feature dimension offers XLA a second layout for the activations
it produces, split by features over the whole batch, and XLA then gathers whole
batches around the matrix products instead of gathering the (much smaller)
parameters. Pinning the activations' batch dimension leaves XLA one choice: gather
each parameter where it is used.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._validation import check_size, check_type, fail
from ._parameter_sharding import auto_axes


# The mesh and axis of the trace in progress. Read only while tracing: a function
# enters `batch_sharding` inside the function it compiles, so the constraints are
# part of that function's trace and never outlive it.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar(
    "transforms_batch_sharding", default=None
)


@contextlib.contextmanager
def batch_sharding(mesh: Mesh | None, axis: str = "data") -> Iterator[None]:
    """Trace the body with the batch dimension of activations split over `axis`
    of `mesh`: inside it, [`transforms.constrain_batch`][] constrains the arrays
    it is given.

    [`transforms.make_train_step`][] with a `mesh` traces its loss (forward and
    backward) inside this context, and
    [`eqx_models.multimodal.evaluate`][] its evaluation; enter it yourself in a
    compiled function of your own that runs a model on a batch split over a mesh.
    Enter it inside the function being compiled (as below), so that its
    constraints belong to that function's trace.

    **Arguments:**

    - `mesh`: the `jax.sharding.Mesh` the batch is split over (its axes are used
        as `Auto` axes, as the steps use them), or `None` (no constraints:
        `constrain_batch` returns its input).
    - `axis`: the mesh axis the batch is split over.

    **Raises:**

    `TypeError` if `mesh` is neither a `Mesh` nor `None`; `ValueError` if `axis`
    is not one of its axes.

    !!! example

        ```python
        @eqx.filter_jit
        def predict(model, batch, mesh):
            with batch_sharding(mesh, "data"):
                return model.features_batch(batch.tokens)
        ```
    """
    name = "batch_sharding"
    if mesh is not None:
        check_type(name, "mesh", mesh, Mesh, "a jax.sharding.Mesh or None")
        if not isinstance(axis, str) or axis not in mesh.axis_names:
            expected = f"an axis of the mesh {tuple(mesh.axis_names)}"
            raise fail(name, "axis", expected, repr(axis))
        mesh = auto_axes(mesh)
    token = _ACTIVE.set(None if mesh is None else (mesh, axis))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def batch_shards() -> int:
    """How many ways the batch of the trace in progress is split (1 outside
    [`transforms.batch_sharding`][])."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, axis = active
    return mesh.shape[axis]


def constrain_batch(tree, dim: int = 0):
    """Keep dimension `dim` of each array of `tree` split over the batch axis of
    the sharded step being traced.

    Inside [`transforms.batch_sharding`][] (the loss of a step built by
    [`transforms.make_train_step`][] with a `mesh` is traced there), each array
    whose dimension `dim` the batch axis divides is constrained
    (`jax.lax.with_sharding_constraint`) to be split along that dimension over the
    axis, its other dimensions left to XLA (so that a tensor-parallel split of the
    features survives). Anywhere else, and for an array whose dimension the axis
    does not divide, the array is returned as it is. Values never change, only
    where XLA keeps them.

    Call it on a model's activations, arrays whose dimension `dim` is the batch:
    under fully sharded data parallelism ([`transforms.ParameterSharding`][]) it
    keeps XLA from laying activations out like the split parameters, which
    gathers whole batches onto every device; XLA gathers each parameter where it is
    used instead. Inside `jax.vmap` over examples an array's leading dimension is
    not the batch: constrain only dimensions that are (a single example's
    dimension of size 1 is left alone, since the axis does not divide it).

    **Arguments:**

    - `tree`: an array or a pytree of arrays (other leaves are returned unchanged).
    - `dim`: the batch dimension of every array, a non-negative integer (an array
        with no dimension `dim` is returned unchanged).

    **Returns:**

    `tree`, its arrays constrained inside a sharded trace.

    **Raises:**

    `TypeError` if `dim` is not an integer, `ValueError` if it is negative.

    !!! example

        ```python
        def features(params, tokens):  # tokens: (batch, length)
            x = params.embedding[tokens]  # (batch, length, d)
            return constrain_batch(x)
        ```
    """
    dim = check_size("constrain_batch", "dim", dim, minimum=0)
    active = _ACTIVE.get()
    if active is None:
        return tree
    mesh, axis = active
    n = mesh.shape[axis]

    def constrain(x):
        if not eqx.is_array(x) or x.ndim <= dim or x.shape[dim] % n:
            return x
        spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
        spec[dim] = axis
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(*spec))
        )

    return jax.tree.map(constrain, tree)
