"""Where a model's parameters and optimiser state live on a mesh: replicated (data
parallelism), split over the data axis (fully sharded data parallelism, FSDP), split
by a tensor-parallel rule, or both.

Everything here is a named sharding handed to XLA; the collectives (all-gathers of
split parameters before use, reduce-scatters of their gradients) are XLA's. One
[`transforms.ParameterSharding`][] describes the layout; the step places the model
and optimiser state with it before the update and constrains the updated ones to it
inside the compiled step, so the layout survives every step.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from .._validation import (
    check_callable,
    check_size,
    check_type,
    describe,
    fail,
)
from ._sharding import place


# A tensor-parallel rule: `rule(path, leaf) -> PartitionSpec | None` for each array
# of the model (`path` as `jax.tree_util.tree_flatten_with_path` gives it); `None`
# or a shorter spec leaves the remaining dimensions unsplit.
ShardingRule = Callable[[tuple, Any], PartitionSpec | None]


def auto_axes(mesh: Mesh) -> Mesh:
    """The same mesh with every axis of type `Auto`.

    `jax.make_mesh` makes `Explicit` axes, under which every operation on a split
    array (a gather, a matrix product over a split dimension) needs its output
    sharding spelled out; with `Auto` axes XLA propagates the shardings of the
    inputs and inserts the collectives itself, which is what the steps rely on.
    """
    auto = (AxisType.Auto,) * len(mesh.axis_names)
    if tuple(mesh.axis_types) == auto:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


@dataclasses.dataclass(frozen=True)
class ParameterSharding:
    """How the parameters and the optimiser state of a training step are laid out
    over its mesh. Give it to [`transforms.make_train_step`][] (or
    [`transforms.fit`][], [`eqx_models.multimodal.train`][]) as
    `parameter_sharding`; `None` there replicates them on every device (data
    parallelism).

    - **Fully sharded data parallelism** (`fsdp_axis="data"`): every array of at
      least `min_size` entries is split along one dimension over the mesh axis
      `fsdp_axis` (the largest dimension that divides evenly and that no
      tensor-parallel rule uses; the last of equal ones), and so is its optimiser
      state (Adam's two moments). Each device stores `1/n` of them; XLA gathers a
      parameter where it is used and reduce-scatters its gradient. Arrays smaller
      than `min_size`, or with no divisible dimension, stay replicated: splitting a
      bias of 768 entries saves little and costs a collective.
    - **Tensor parallelism** (`tensor_parallel=rule`): `rule(path, leaf)` gives a
      `PartitionSpec` for each array (e.g.
      [`eqx_models.multimodal.TensorParallelRule`][] splits the attention and MLP
      weights Megatron-style over a `"model"` axis). With both, the rule's
      dimensions are split first and FSDP takes the largest dimension left.

    The arithmetic is the single-device step's: results agree with it to
    floating-point reassociation (the reductions XLA splits over devices sum in
    another order; see the tests on eight fake CPU devices).

    **Arguments:**

    - `fsdp_axis`: the mesh axis to split parameters over (usually the data axis),
        or `None` for no FSDP.
    - `tensor_parallel`: a rule `(path, leaf) -> PartitionSpec | None`, or `None`.
        Compared by identity in the step's compilation cache, so build it once.
    - `min_size`: arrays with fewer entries stay replicated under FSDP.

    **Raises:**

    `TypeError` for an `fsdp_axis` that is not a str, a `tensor_parallel` that is
    not callable or a `min_size` that is not an integer; `ValueError` for a
    `min_size` below 1 or when neither `fsdp_axis` nor `tensor_parallel` is given.
    When the step lays out a model: `ValueError` if the rule's spec has more
    entries than an array has dimensions or splits a dimension by mesh axes whose
    size does not divide it (naming the array's path).

    !!! example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        step = make_train_step(
            loss_fn, optimizer, mesh=mesh,
            parameter_sharding=ParameterSharding(fsdp_axis="data"),
        )
        ```
    """

    fsdp_axis: str | None = None
    tensor_parallel: ShardingRule | None = None
    min_size: int = 1024

    def __post_init__(self):
        name = "ParameterSharding"
        if self.fsdp_axis is not None:
            check_type(name, "fsdp_axis", self.fsdp_axis, str, "a mesh axis name")
        if self.tensor_parallel is not None:
            check_callable(name, "tensor_parallel", self.tensor_parallel)
        check_size(name, "min_size", self.min_size, minimum=1)
        if self.fsdp_axis is None and self.tensor_parallel is None:
            raise fail(
                name,
                "fsdp_axis",
                "a mesh axis name when `tensor_parallel` is None (for replicated "
                "parameters pass `parameter_sharding=None` to the step)",
                "None",
            )

    def check_mesh(self, caller: str, mesh: Mesh) -> None:
        """Refuse a mesh without the FSDP axis."""
        if self.fsdp_axis is not None and self.fsdp_axis not in mesh.axis_names:
            raise fail(
                caller,
                "parameter_sharding",
                f"an `fsdp_axis` among the mesh axes {tuple(mesh.axis_names)}",
                repr(self.fsdp_axis),
            )

    def spec(self, mesh: Mesh | AbstractMesh, path: tuple, leaf: Any) -> PartitionSpec:
        """The `PartitionSpec` of one array of the model (only the mesh's axis sizes
        are read, so an abstract mesh will do)."""
        dims: list = [None] * leaf.ndim
        if self.tensor_parallel is not None:
            given = self.tensor_parallel(path, leaf)
            if given is not None:
                if len(given) > leaf.ndim:
                    raise fail(
                        "ParameterSharding",
                        "tensor_parallel",
                        f"a PartitionSpec of at most {leaf.ndim} entries for the "
                        f"array at {jax.tree_util.keystr(path)} of shape {leaf.shape}",
                        repr(given),
                    )
                dims[: len(given)] = list(given)
            for dim, axis in enumerate(dims):
                size = _axis_size(mesh, axis)
                if leaf.shape[dim] % size:
                    raise fail(
                        "ParameterSharding",
                        "tensor_parallel",
                        f"a split of dimension {dim} of the array at "
                        f"{jax.tree_util.keystr(path)} (shape {leaf.shape}) over "
                        f"mesh axes whose size ({size}) divides it",
                        repr(PartitionSpec(*dims)),
                    )
        if self.fsdp_axis is not None and leaf.size >= self.min_size:
            n = mesh.shape[self.fsdp_axis]
            free = [d for d, axis in enumerate(dims) if axis is None]
            free = [d for d in free if leaf.shape[d] % n == 0]
            if free and self.fsdp_axis not in _axes_used(dims):
                largest = max(free, key=lambda d: (leaf.shape[d], d))
                dims[largest] = self.fsdp_axis
        return PartitionSpec(*dims)

    def shardings(self, mesh: Mesh, tree: Any) -> Any:
        """A `NamedSharding` for every array leaf of `tree` (a model), `None` for
        every other leaf."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: (
                NamedSharding(mesh, self.spec(mesh, path, leaf))
                if eqx.is_array(leaf)
                else None
            ),
            tree,
        )


def _axis_size(mesh: Mesh | AbstractMesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def _axes_used(dims: list) -> set:
    used = set()
    for axis in dims:
        if axis is not None:
            used.update(axis if isinstance(axis, tuple) else (axis,))
    return used


def state_shardings(
    mesh: Mesh,
    layout: ParameterSharding | None,
    optimizer: optax.GradientTransformation,
    model: Any,
    opt_state: Any,
) -> tuple[Any, Any]:
    """The shardings of `(model, opt_state)` under `layout` (`None`: replicated).

    The optimiser state's copies of the parameters (momenta, second moments) follow
    their parameters' shardings, found with `optax.tree_map_params`; its other
    leaves (step counts, injected hyperparameters) are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    if layout is None:
        return replicated, replicated
    # Built over the filtered trees, whose `None`s line up with the model's
    # non-array leaves (the structure `eqx.filter_shard` and optax expect).
    model_shardings = layout.shardings(mesh, eqx.filter(model, eqx.is_array))
    param_shardings = layout.shardings(mesh, eqx.filter(model, eqx.is_inexact_array))
    try:
        state = optax.tree_map_params(
            optimizer,
            lambda _, sharding: sharding,
            opt_state,
            param_shardings,
            transform_non_params=lambda leaf: (
                replicated if eqx.is_array(leaf) else None
            ),
            is_leaf=lambda x: x is None,
        )
    except (ValueError, TypeError) as error:
        raise fail(
            "ParameterSharding",
            "optimizer",
            "an optimiser whose state optax.tree_map_params can map over (one "
            "built from optax transformations)",
            f"{describe(optimizer)} ({error})",
        ) from error
    return model_shardings, state


def place_state(mesh, layout, optimizer, model, opt_state):
    """`(model, opt_state)` placed by `layout` on `mesh`: a transfer outside `jit`,
    a sharding constraint inside it."""
    shardings = state_shardings(mesh, layout, optimizer, model, opt_state)
    return place((model, opt_state), shardings)
