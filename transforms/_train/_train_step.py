"""The compiled training step: `make_train_step` and the `TrainStep` it returns.

One function from `(model, opt_state, batch, key)` to the updated pair and its
metrics, with the NaN guard applied on device (a non-finite update is not
applied), data-parallel placement over a mesh, buffer donation and the
deterministic variants. The loop around it is `_fit.py`; the optimiser conventions
it reads (the injected learning rate) are `_optimizer.py`.
"""

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from .._validation import (
    check_bool,
    check_callable,
    check_in_range,
    check_optimizer,
    check_type,
    describe,
    fail,
)
from ._batch_sharding import batch_sharding
from ._determinism import compile_variants
from ._optimizer import injected_learning_rate
from ._parameter_sharding import auto_axes, ParameterSharding, place_state
from ._sharding import replicate, shard_batch


_RESERVED_METRICS = ("loss", "grad_norm", "learning_rate", "nonfinite")

# What bit `i` of the `nonfinite` metric stands for.
NONFINITE_PARTS = ("loss", "gradient", "parameters", "optimiser state")


def _all_finite(tree) -> jax.Array:
    """Whether every inexact array leaf of `tree` is finite (a scalar bool)."""
    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def nonfinite_mask(loss, grad_norm, model, opt_state) -> jax.Array:
    """The `nonfinite` metric: an int32 with bit `i` set where
    `NONFINITE_PARTS[i]` is not finite (0 for a finite step).

    The gradient is judged by its global norm, which is finite exactly when every
    entry is (short of a norm that overflows, which no update survives either).
    """
    finite = (
        jnp.all(jnp.isfinite(loss)),
        jnp.isfinite(grad_norm),
        _all_finite(model),
        _all_finite(opt_state),
    )
    bits = [jnp.where(ok, 0, 1 << bit) for bit, ok in enumerate(finite)]
    return jnp.sum(jnp.stack(bits).astype(jnp.int32))


def nonfinite_parts(mask: int) -> tuple[str, ...]:
    """The names of the parts a `nonfinite` mask flags."""
    return tuple(name for bit, name in enumerate(NONFINITE_PARTS) if mask >> bit & 1)


def keep_if_finite(mask, new, old):
    """`new` where `mask` is 0, else `old`: a non-finite update is not applied.

    Selected inside the compiled step, so that the previous state survives even
    when its buffers were donated.
    """
    finite = mask == 0
    return jax.tree.map(
        lambda n, o: jnp.where(finite, n, o) if eqx.is_array(n) else n, new, old
    )


def reported_learning_rate(
    legacy: float | Callable | None, opt_state_before: Any, opt_state_after: Any
) -> jax.Array | None:
    """The `learning_rate` metric of a step: the rate the optimiser state records
    ([`transforms.injected_learning_rate`][]), else, for the deprecated
    `learning_rate=` argument of the step builders, that float or schedule at the
    optimiser's step count."""
    recorded = injected_learning_rate(opt_state_after)
    if recorded is not None or legacy is None:
        return recorded
    if not callable(legacy):
        return jnp.asarray(legacy, jnp.float32)
    counts = optax.tree_utils.tree_get_all_with_path(opt_state_before, "count")
    if not counts:
        raise ValueError(
            "make_train_step: a `learning_rate` schedule was given but the "
            "optimiser state holds no step `count` to evaluate it at; pass the "
            "optimiser through `optax.inject_hyperparams` instead."
        )
    return jnp.asarray(legacy(counts[0][1]), jnp.float32)


def warn_learning_rate_argument(caller: str) -> None:
    """The deprecation of the steps' `learning_rate=` argument."""
    warnings.warn(
        f"{caller}: `learning_rate=` is deprecated and will be removed in the next "
        "release: the optimiser is the single source of the learning rate. Inject "
        "it into the optimiser instead (`optax.inject_hyperparams`, or "
        "`transforms.inject_learning_rate(optax.adam, schedule)`); the step reports "
        "the rate the optimiser state records.",
        DeprecationWarning,
        stacklevel=3,
    )


def copy_for_donation(tree: Any) -> Any:
    """A copy of every array of `tree` (other leaves kept), for a step that donates
    its inputs.

    A step from [`transforms.make_train_step`][] reuses the buffers of the model and
    optimiser state it is given (donation), which deletes them. A trainer that
    must leave its caller's model usable trains on this copy instead.

    **Arguments:**

    - `tree`: any pytree, e.g. `(model, opt_state)`.

    **Returns:**

    The same pytree with each array replaced by a copy (same values, dtype and
    sharding).
    """
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


def check_step_arguments(
    name: str,
    *,
    loss_fn: Any,
    optimizer: Any,
    learning_rate: Any,
    mesh: Any,
    data_axis: Any,
    flags: dict[str, Any],
) -> None:
    """The argument checks every step builder shares (training and attribution):
    the loss function, the optimiser, the deprecated rate, the mesh and its data
    axis, and the boolean options in `flags`."""
    check_callable(name, "loss_fn", loss_fn)
    check_optimizer(name, "optimizer", optimizer)
    if learning_rate is not None and not callable(learning_rate):
        check_in_range(
            name, "learning_rate", learning_rate, low=0, inclusive=(False, True)
        )
    if mesh is not None:
        check_type(name, "mesh", mesh, Mesh, "a jax.sharding.Mesh or None")
    check_type(name, "data_axis", data_axis, str, "a mesh axis name (a str)")
    for arg, flag in flags.items():
        check_bool(name, arg, flag)
    if mesh is not None and data_axis not in mesh.axis_names:
        raise ValueError(
            f"{name}: `data_axis` {data_axis!r} is not an axis of the mesh "
            f"{tuple(mesh.axis_names)}."
        )


def check_parameter_sharding(name: str, layout: Any, mesh: Mesh | None) -> None:
    """`layout` is a `ParameterSharding` (or `None`) that fits `mesh`."""
    if layout is None:
        return
    check_type(
        name,
        "parameter_sharding",
        layout,
        ParameterSharding,
        "a transforms.ParameterSharding or None",
    )
    if mesh is None:
        raise fail(name, "parameter_sharding", "None when `mesh` is None", "a layout")
    layout.check_mesh(name, mesh)


def finish_update(step, metrics, mask, old, new, layout=None):
    """The end of every update step (training and attribution alike): report the
    learning rate the update used in `metrics`, keep the update only if `mask`
    (the NaN guard) is 0, and lay the result out over the step's mesh by `layout`
    (a [`transforms.ParameterSharding`][]; `None` replicates it).

    Returns the `(model, opt_state)` the step hands back.
    """
    (_, opt_state), (_, new_opt_state) = old, new
    lr = reported_learning_rate(step.learning_rate, opt_state, new_opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    model, opt_state = keep_if_finite(mask, new, old)
    if step.mesh is not None:
        model, opt_state = place_state(
            step.mesh, layout, step.optimizer, model, opt_state
        )
    return model, opt_state


def _step(static, model, opt_state):
    step, batch, key = static
    params, rest = eqx.partition(model, eqx.is_inexact_array)

    def loss_of_params(params):
        return step.loss_fn(eqx.combine(params, rest), batch, key)

    # Traced with the activations' batch dimensions pinned to the data axis (for
    # the models that call `constrain_batch`), the backward pass included.
    with batch_sharding(step.mesh, step.data_axis):
        grad_fn = jax.value_and_grad(loss_of_params, has_aux=step.has_aux)
        out, grads = grad_fn(params)
    loss, aux = out if step.has_aux else (out, {})
    if not isinstance(aux, dict):
        raise TypeError(
            "make_train_step: with `has_aux=True` the loss function must return "
            f"`(loss, aux)` with `aux` a dict of scalars, got aux of type {type(aux)}."
        )
    clash = sorted(set(aux) & set(_RESERVED_METRICS))
    if clash:
        raise ValueError(
            f"make_train_step: the aux dict may not use the reserved metric names "
            f"{clash}."
        )
    updates, new_opt_state = step.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    grad_norm = optax.tree.norm(grads)
    mask = nonfinite_mask(loss, grad_norm, new_model, new_opt_state)
    metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "nonfinite": mask}
    model, new_opt_state = finish_update(
        step,
        metrics,
        mask,
        (model, opt_state),
        (new_model, new_opt_state),
        layout=step.parameter_sharding,
    )
    return model, new_opt_state, metrics


# Donating the model and the optimiser state lets XLA update the parameters in place.
_compiled = compile_variants(_step)


class TrainStep(eqx.Module):
    """A compiled optimisation step; build it with [`transforms.make_train_step`][].

    Call it as `step(model, opt_state, batch, key)`; it returns
    `(model, opt_state, metrics)`, and skips an update that is not finite (see the
    `nonfinite` metric).
    """

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    has_aux: bool = eqx.field(static=True)
    learning_rate: float | Callable | None
    mesh: Mesh | None = eqx.field(static=True)
    data_axis: str = eqx.field(static=True)
    donate: bool = eqx.field(static=True)
    deterministic: bool = eqx.field(static=True, default=False)
    parameter_sharding: ParameterSharding | None = eqx.field(static=True, default=None)

    def place(self, model, opt_state):
        """`(model, opt_state)` laid out as the step keeps them: replicated over its
        mesh, or split by its `parameter_sharding`; unchanged without a mesh. The
        step places its inputs itself; place them first to restore a checkpoint
        straight into the layout, or to see what each device holds.

        **Raises:**

        `ValueError` if a tensor-parallel rule does not fit an array.
        """
        if self.mesh is None:
            return model, opt_state
        return place_state(
            self.mesh, self.parameter_sharding, self.optimizer, model, opt_state
        )

    def __call__(self, model, opt_state, batch, key=None):
        """One optimisation step.

        **Arguments:**

        - `model`: the model (any pytree; its inexact arrays are trained). With
            donation on, its buffers are reused for the result: do not use it again.
        - `opt_state`: the optimiser state from `optimizer.init(eqx.filter(model,
            eqx.is_inexact_array))`.
        - `batch`: any pytree passed through to the loss function.
        - `key`: a PRNG key passed through to the loss function (or `None`).

        **Returns:**

        `(model, opt_state, metrics)` with `metrics` a dict of scalar device arrays:
        `loss`, the aux losses, `grad_norm` (global L2 norm of the gradient),
        `nonfinite` (see [`transforms.make_train_step`][]) and `learning_rate` when
        the optimiser state records one (see
        [`transforms.injected_learning_rate`][]). When `nonfinite` is not 0 the
        returned model and optimiser state are the ones given (the update is not
        applied).

        **Raises:**

        `TypeError` if `key` is neither a PRNG key (an array) nor `None`; the loss
        function's own errors.
        """
        if key is not None and not isinstance(key, (jax.Array, np.ndarray)):
            raise fail(
                "TrainStep", "key", "a PRNG key or None", describe(key), TypeError
            )
        if self.mesh is not None:
            batch = shard_batch(batch, self.mesh, self.data_axis)
            model, opt_state = self.place(model, opt_state)
            key = replicate(key, self.mesh)
        compiled = _compiled[self.donate, self.deterministic]
        return compiled((self, batch, key), model, opt_state)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    learning_rate: float | Callable | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    donate: bool = True,
    deterministic: bool = False,
    parameter_sharding: ParameterSharding | None = None,
) -> TrainStep:
    """Build a compiled training step from a loss and an optax optimiser.

    The step guards against non-finite values. Among its metrics, `nonfinite` is an
    int32 computed inside the compiled step: 0 when the step is finite, else the sum
    of 1 (the loss is not finite), 2 (the gradient's global norm is not), 4 (an
    updated parameter, i.e. an inexact array of the new model, is not) and 8 (a
    floating-point leaf of the new optimiser state is not). A non-finite update is
    not applied: the step returns the model and optimiser state it was given
    (selected on the device, so they survive donation), and [`transforms.fit`][]
    stops with [`transforms.NonFiniteLossError`][] naming the parts. In a loop of
    your own, check `metrics["nonfinite"]`: a skipped update shows only there. The
    check reads the new parameters and optimiser state once more: on a CPU it
    added about a quarter to the step time of a 3-layer MLP of width 512 at batch
    128 (Adam), less with larger batches, whose forward and backward passes cost
    more while the check does not.

    The step follows the library's trainer contract. The optimiser is the single
    source of the learning rate: inject a schedule (or a rate you will change) with
    `optax.inject_hyperparams` or [`transforms.inject_learning_rate`][], and the
    step reports the rate the optimiser state records as the `learning_rate`
    metric ([`transforms.injected_learning_rate`][] says which). The step compiles
    once per distinct static part: the loss function and the optimiser are part of
    it, arrays inside them traced, everything else compared with `==`. Steps built
    from equal parts share one compilation, across calls of `make_train_step` too;
    an optimiser made by optax compares by identity (it is a closure), one from
    [`transforms.hashable_optimizer`][] by value.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, batch, key) -> loss`, a scalar (the loss of the whole
        batch, typically a mean), or `(loss, aux)` with `has_aux=True` where `aux` is
        a dict of scalar arrays reported among the metrics.
    - `optimizer`: an `optax.GradientTransformation`; the optimiser state must come
        from `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`. An optax
        optimiser is a closure whose settings cannot be read back, so a negative
        rate given to, say, `optax.sgd` is not seen here; a rate injected with
        [`transforms.inject_learning_rate`][] is checked where it is given.
    - `has_aux`: whether `loss_fn` returns `(loss, aux)`.
    - `learning_rate`: deprecated (a `DeprecationWarning`; removed in the next
        release): the float or optax schedule given to the optimiser, evaluated at
        the optimiser's step count for the metrics when the state records no rate.
        Inject the rate into the optimiser instead.
    - `mesh`: a `jax.sharding.Mesh` for data parallelism: the batch is split over its
        `data_axis` along the leading dimension, the model and optimiser state are
        replicated (or laid out by `parameter_sharding`); gradients are reduced by
        XLA. Its axes are used as `Auto` axes (XLA propagates shardings). The loss
        is traced inside [`transforms.batch_sharding`][], so a model that calls
        [`transforms.constrain_batch`][] on its activations keeps them split by the
        batch. `None` runs on the default device.
    - `data_axis`: the mesh axis the batch is split over.
    - `donate`: donate the model and optimiser state buffers to the update.
    - `deterministic`: compile for run-to-run determinism on a GPU (XLA's
        `xla_gpu_deterministic_ops`: deterministic scatter-adds, reductions and
        kernels instead of atomics), so that a resumed run gives bit-identical
        parameters there too. It costs speed on a GPU (1.3-1.5x the step time of the
        causal and multimodal steps on an H200; see the "On a GPU" page of the docs)
        and nothing on a CPU, which is deterministic anyway. Off by default;
        [`transforms.fit`][] and the family trainers take `deterministic=True` too.
    - `parameter_sharding`: with a `mesh`, how the parameters and optimiser state
        are split over it (a [`transforms.ParameterSharding`][]: fully sharded data
        parallelism, tensor parallelism or both); `None` replicates them. The step
        places what it is given and returns the updated state in the same layout.

    **Returns:**

    A [`transforms.TrainStep`][], called as `step(model, opt_state, batch, key)`. It
    compiles once per input shape and dtype.

    **Raises:**

    `TypeError` if `loss_fn` is not callable, `optimizer` not an
    `optax.GradientTransformation`, `mesh` not a `Mesh` or a flag not a bool;
    `ValueError` for a `learning_rate` number that is not positive and finite, if
    `data_axis` is not an axis of `mesh`, or if `parameter_sharding` is given
    without a `mesh` or names an axis the mesh lacks. When the step is called:
    `TypeError` if `has_aux=True` and the aux is not a dict, `ValueError` if the
    aux uses a reserved metric name (`loss`, `grad_norm`, `learning_rate`, `nonfinite`).

    !!! example

        ```python
        def loss_fn(model, batch, key):
            x, y = batch
            return jnp.mean((jax.vmap(model)(x) - y) ** 2)

        optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = make_train_step(loss_fn, optimizer)
        model, opt_state, metrics = step(model, opt_state, (x, y), key)
        metrics["learning_rate"]  # 1e-3, from the optimiser state
        ```
    """
    check_step_arguments(
        "make_train_step",
        loss_fn=loss_fn,
        optimizer=optimizer,
        learning_rate=learning_rate,
        mesh=mesh,
        data_axis=data_axis,
        flags={"has_aux": has_aux, "donate": donate, "deterministic": deterministic},
    )
    check_parameter_sharding("make_train_step", parameter_sharding, mesh)
    if learning_rate is not None:
        warn_learning_rate_argument("make_train_step")
    return TrainStep(
        loss_fn=loss_fn,
        optimizer=optimizer,
        has_aux=has_aux,
        learning_rate=learning_rate,
        mesh=None if mesh is None else auto_axes(mesh),
        data_axis=data_axis,
        donate=donate,
        deterministic=deterministic,
        parameter_sharding=parameter_sharding,
    )
