"""Training with data attribution: the attribution step and In-Run Data Shapley.

`make_attribution_step` is a training step that also returns every training
example's gradient dot product with the validation gradient (the jvp, ghost or vmap
route of `_grad_dot.py`), compiled like `make_train_step`. `in_run_shapley`
accumulates those products, times the learning rate, into per-example values.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int

from .._train._determinism import compile_variants
from .._train._sharding import replicate, shard_batch
from .._train._train_step import (
    check_step_arguments,
    finish_update,
    nonfinite_mask,
    warn_learning_rate_argument,
)
from .._validation import (
    check_choice,
    check_finite,
    check_ids,
    check_size,
    fail,
    typechecked,
)
from ._ghost_plan import GhostPlan
from ._grad_dot import ghost_dots, jvp_dots
from ._per_sample import (
    as_batch,
    per_example_dot,
    setup,
    UNROLL_LAYERS,
)


_NAME = "make_attribution_step"
_METHODS = ("auto", "ghost", "jvp", "vmap")


def _step(static, model, opt_state):
    step, train, val = static
    s = setup(
        _NAME,
        step.loss_fn,
        model,
        train,
        arg="train_batch",
        unroll_layers=step.unroll_layers,
    )
    val = s.check_val("val_batch", val)
    leaves, n = s.leaves, len(s.leaves)
    method = "ghost" if step.method == "auto" else step.method
    analysis = s.analyse("dots") if method == "ghost" else None
    # Beside a ghost pass, the validation gradient unrolls a stack of layers as the
    # pass does (`unroll_layers`).
    s_val = s if analysis is None else s.with_stack_unrolled(analysis)

    def validation(leaves):
        losses = s_val.losses(leaves, val)
        reduced = jnp.mean(losses) if step.val_reduction == "mean" else jnp.sum(losses)
        return reduced, jnp.mean(losses)

    (_, val_loss), g = jax.value_and_grad(validation, has_aux=True)(leaves)
    if analysis is not None:
        parts, out = ghost_dots(
            s,
            analysis,
            leaves,
            s.batch,
            g,
            method=method,
            fallback=step.fallback,
            per_leaf=False,
            param_grads=True,
        )
        dots = sum(parts.values())
        losses = out["losses"]
        grads = [out["grads"][i] / s.size for i in range(n)]
    elif method == "jvp":
        losses, vjp = jax.vjp(lambda p: s.losses(p, s.batch), leaves)
        (grads,) = vjp(jnp.full_like(losses, 1 / s.size))
        dots = jvp_dots(s, leaves, s.batch, dict(enumerate(g)))
    else:
        losses = s.losses(leaves, s.batch)
        per_example = s.per_example_grads(leaves, s.batch)
        grads = [jnp.mean(pe, axis=0) for pe in per_example]
        dots = sum(per_example_dot(pe, gv, s.acc) for pe, gv in zip(per_example, g))
    params = s.unflatten(leaves)
    grads = s.unflatten(list(grads))
    updates, new_opt_state = step.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    loss, grad_norm = jnp.mean(losses), optax.tree.norm(grads)
    mask = nonfinite_mask(loss, grad_norm, new_model, new_opt_state)
    metrics = {
        "loss": loss,
        "val_loss": val_loss,
        "grad_norm": grad_norm,
        "nonfinite": mask,
    }
    model, new_opt_state = finish_update(
        step, metrics, mask, (model, opt_state), (new_model, new_opt_state)
    )
    return model, new_opt_state, metrics, dots


_compiled = compile_variants(_step)


class AttributionStep(eqx.Module):
    """A training step that also returns training×validation gradient dot products.

    Build it with [`transforms.make_attribution_step`][]; call it as
    `step(model, opt_state, train_batch, val_batch)`.
    """

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    method: str = eqx.field(static=True)
    val_reduction: str = eqx.field(static=True)
    learning_rate: float | Callable | None
    mesh: Mesh | None = eqx.field(static=True)
    data_axis: str = eqx.field(static=True)
    donate: bool = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    deterministic: bool = eqx.field(static=True, default=False)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")

    def __call__(self, model: Any, opt_state: Any, train_batch: Any, val_batch: Any):
        """One optimisation step on the training batch, with attribution.

        **Arguments:**

        - `model`: the model; donated (do not reuse it) unless `donate=False`.
        - `opt_state`: from `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`.
        - `train_batch`: tuple of arrays with a leading axis of size `B`.
        - `val_batch`: tuple of arrays with a leading axis of size `V`, with the
            per-example structure of `train_batch`.

        **Returns:**

        `(model, opt_state, metrics, dots)`: the model after the optimiser update with
        the MEAN training gradient (the validation batch does not enter the update);
        `metrics` with `loss` (mean training loss), `val_loss` (mean validation loss),
        `grad_norm`, `nonfinite` and `learning_rate` where the optimiser state
        records one; `dots` of shape
        `[B]`, `dots[i] = <∇θ l_i, ḡ_val>` at the parameters before the update
        (float32). As in [`transforms.make_train_step`][], `nonfinite` flags a
        non-finite loss (1), gradient norm (2), updated parameter (4) or optimiser
        state (8), and a non-finite update is not applied: the model and optimiser
        state given are returned. Check it before using `dots` (they may be
        non-finite too).

        **Raises:**

        `TypeError` if a batch is not a tuple of arrays (a list or a dict
        included), `ValueError` if it is empty or its arrays differ in their leading
        (batch) axis; the message names `train_batch` or `val_batch`.
        """
        train = as_batch(_NAME, "train_batch", train_batch)
        val = as_batch(_NAME, "val_batch", val_batch)
        if self.mesh is not None:
            train = shard_batch(train, self.mesh, self.data_axis)
            val = shard_batch(val, self.mesh, self.data_axis)
            model, opt_state = replicate((model, opt_state), self.mesh)
        compiled = _compiled[self.donate, self.deterministic]
        return compiled((self, train, val), model, opt_state)

    def plan(self, model: Any, train_batch: Any) -> GhostPlan:
        """How the ghost path treats each parameter; see [`transforms.GhostPlan`][].

        **Raises:**

        As for calling the step, for `train_batch`.
        """
        s = setup(_NAME, self.loss_fn, model, train_batch, arg="train_batch")
        return s.analyse("dots").plan


@typechecked
def make_attribution_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    method: str = "auto",
    val_reduction: str = "mean",
    learning_rate: float | Callable | None = None,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    donate: bool = True,
    fallback: bool = True,
    deterministic: bool = False,
    unroll_layers: bool | str = "auto",
) -> AttributionStep:
    """A compiled training step that logs per-example gradient dot products with the
    validation gradient: the engine of first-order In-Run Data Shapley.

    The step evaluates the validation gradient `ḡ_val` (one forward and backward pass
    over the validation batch), then one forward and backward pass over the training
    batch gives both the mean training gradient, which the optimiser applies, and
    `dot[i] = <∇θ l_i, ḡ_val>` at the pre-update parameters, formed inside that
    backward pass by the ghost layer rules (see [`transforms.grad_dot_products`][]).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `optimizer`: an optax `GradientTransformation`.
    - `method`: `"ghost"` (the default for `"auto"`), `"jvp"` (an extra forward-mode
        pass over the training batch) or `"vmap"` (per-example gradients).
    - `val_reduction`: `"mean"` (default) or `"sum"` of the validation losses.
    - `learning_rate`: deprecated, as in [`transforms.make_train_step`][]: inject the
        rate into the optimiser instead, and the metrics report the rate its state
        records.
    - `mesh`: a `jax.sharding.Mesh` for data parallelism: both batches are split over
        `data_axis` (their sizes must divide by its size); model and optimiser state
        are replicated. The dot products come back split like the training batch.
    - `data_axis`: the mesh axis the batches are split over.
    - `donate`: donate the model and optimiser state buffers to the update.
    - `fallback`: with `False`, raise if a parameter is outside the ghost layer rules
        (instead of computing its share by the jvp path).
    - `deterministic`: compile for run-to-run determinism on a GPU, as in
        [`transforms.make_train_step`][].
    - `unroll_layers`: as for [`transforms.grad_dot_products`][]: how the ghost pass
        and the validation gradient run a `lax.scan` of the loss over stacked layers.

    **Returns:**

    An [`transforms.AttributionStep`][], called as
    `step(model, opt_state, train_batch, val_batch)` and returning
    `(model, opt_state, metrics, dots)`. It compiles once per input shape.

    **Raises:**

    `TypeError` if `loss_fn` is not callable, `optimizer` not an optax optimiser,
    `mesh` not a `Mesh` or a flag not a bool; `ValueError` for an unknown `method`,
    `val_reduction` or `unroll_layers`, a non-positive constant `learning_rate`,
    or a `data_axis` that is not an axis of `mesh`. The step raises as
    [`transforms.grad_dot_products`][] for bad batches or a `loss_fn` that fails
    on, or does not return a scalar for, one example.

    !!! example

        ```python
        optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        step = make_attribution_step(loss_fn, optimizer)
        shapley = in_run_shapley(n_train)
        state = shapley.init()
        for idx in batches:
            model, opt_state, metrics, dots = step(
                model, opt_state, (x[idx], y[idx]), (x_val, y_val)
            )
            state = shapley.update(state, idx, dots, metrics["learning_rate"])
        ```
    """
    check_step_arguments(
        _NAME,
        loss_fn=loss_fn,
        optimizer=optimizer,
        learning_rate=learning_rate,
        mesh=mesh,
        data_axis=data_axis,
        flags={"donate": donate, "fallback": fallback, "deterministic": deterministic},
    )
    check_choice(_NAME, "method", method, _METHODS)
    check_choice(_NAME, "val_reduction", val_reduction, ("mean", "sum"))
    check_choice(_NAME, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    if learning_rate is not None:
        warn_learning_rate_argument(_NAME)
    return AttributionStep(
        loss_fn=loss_fn,
        optimizer=optimizer,
        method=method,
        val_reduction=val_reduction,
        learning_rate=learning_rate,
        mesh=mesh,
        data_axis=data_axis,
        donate=donate,
        fallback=fallback,
        deterministic=deterministic,
        unroll_layers=unroll_layers,
    )


class ShapleyState(NamedTuple):
    """Running first-order In-Run Data Shapley values (compensated sums)."""

    values: Float[Array, " n"]
    compensation: Float[Array, " n"]
    counts: Int[Array, " n"]


class InRunShapley(NamedTuple):
    """An `(init, update)` pair in the style of optax; see
    [`transforms.in_run_shapley`][].

    **Raises:**

    From `update(state, indices, dots, learning_rate)`: `ValueError` if `indices`
    and `dots` differ in shape, if an index is outside `[0, n_train)`, or if `dots`
    or `learning_rate` is not finite (at once for concrete arrays, by
    `eqx.error_if` under `jit`).
    """

    init: Callable[[], ShapleyState]
    update: Callable[..., ShapleyState]


@typechecked
def in_run_shapley(n_train: int, dtype: Any = jnp.float32) -> InRunShapley:
    """Accumulate first-order In-Run Data Shapley values over a training run.

    Example `i`'s value is `Σ_t η_t · dot_t[i]` over the steps `t` whose training
    batch contained it, with `η_t` the learning rate and `dot_t[i] = <∇θ l_i, ḡ_val>`
    from an [`transforms.AttributionStep`][]. To first order, the step
    `-η_t/B Σ_i ∇θ l_i` lowers the validation loss by `η_t/B Σ_i dot_t[i]`: the value
    is example `i`'s share of that decrease (times the batch size `B`, the same for
    every example when `B` is fixed). Helpful examples get positive values; examples
    whose gradients pull against the validation loss (mislabelled ones) get negative
    values. The change of the validation loss itself is `-value / B`.

    **Arguments:**

    - `n_train`: the number of training examples (their indices are `0..n_train-1`).
    - `dtype`: dtype of the values; the running sums are compensated (Kahan–Neumaier)
        so that float32 does not drift over long runs.

    **Returns:**

    An [`transforms.InRunShapley`][] `(init, update)`: `init()` returns a
    [`transforms.ShapleyState`][]; `update(state, indices, dots, learning_rate)`
    adds `learning_rate * dots[j]` to example `indices[j]` (an index appearing twice
    in one batch gets both contributions) and counts the visits.

    **Raises:**

    `TypeError` if `n_train` is not a positive integer (a bool included). From
    `update`: `ValueError` if `indices` and `dots` differ in shape, if an index is
    outside `[0, n_train)`, or if `dots` or `learning_rate` is not finite (at once
    for concrete arrays, by `eqx.error_if` under `jit`).
    """
    n_train = check_size("in_run_shapley", "n_train", n_train)

    def init() -> ShapleyState:
        zeros = jnp.zeros(n_train, dtype)
        return ShapleyState(zeros, zeros, jnp.zeros(n_train, jnp.int32))

    def update(
        state: ShapleyState,
        indices: ArrayLike,
        dots: ArrayLike,
        learning_rate: ArrayLike,
    ) -> ShapleyState:
        name = "in_run_shapley.update"
        indices = jnp.asarray(indices)
        dots = jnp.asarray(dots)
        if indices.shape != dots.shape:
            raise fail(
                name,
                "dots",
                f"of the shape of `indices` {indices.shape}",
                f"shape {dots.shape}",
            )
        indices = check_ids(name, "indices", indices, n_train)
        dots = check_finite(name, "dots", dots)
        learning_rate = check_finite(name, "learning_rate", learning_rate)
        step = (
            jnp.zeros(n_train, dtype)
            .at[indices]
            .add((jnp.asarray(learning_rate) * dots).astype(dtype))
        )
        # Neumaier's compensated sum, elementwise over the examples.
        total = state.values + step
        big = jnp.abs(state.values) >= jnp.abs(step)
        lost = jnp.where(
            big, (state.values - total) + step, (step - total) + state.values
        )
        counts = state.counts.at[indices].add(1)
        return ShapleyState(total, state.compensation + lost, counts)

    return InRunShapley(init, update)


@typechecked
def shapley_values(state: ShapleyState) -> Float[Array, " n"]:
    """The accumulated values of a [`transforms.ShapleyState`][] (with the
    compensation added back)."""
    return state.values + state.compensation


@typechecked
def to_original_scaling(
    dots: Float[ArrayLike, "*shape"],
    *,
    n_train: int,
    n_val: int,
    val_reduction: str = "mean",
) -> Float[Array, "*shape"]:
    """Convert dot products to the scaling the original GhostEngines logged.

    The original concatenated the training and validation batches into one batch of
    `N = n_train + n_val` examples with a mean loss, and logged
    `<∇θ(l_i/N), Σ_v ∇θ(l_v/N)>`. This library reports `<∇θ l_i, ḡ_val>` with
    `ḡ_val` the mean (default) or sum of the validation gradients, so the original's
    number is `dots · n_val / N²` (mean) or `dots / N²` (sum).

    **Arguments:**

    - `dots`: dot products from [`transforms.grad_dot_products`][] or an
        [`transforms.AttributionStep`][].
    - `n_train`, `n_val`: the training and validation batch sizes of the step.
    - `val_reduction`: the reduction `dots` were computed with.

    **Returns:**

    The dot products in the original's scaling, same shape.

    **Raises:**

    `TypeError`/`ValueError` if `n_train` or `n_val` is not a positive integer or
    `val_reduction` is unknown.
    """
    name = "to_original_scaling"
    check_choice(name, "val_reduction", val_reduction, ("mean", "sum"))
    n_train = check_size(name, "n_train", n_train)
    n_val = check_size(name, "n_val", n_val)
    total = n_train + n_val
    factor = (n_val if val_reduction == "mean" else 1) / total**2
    return jnp.asarray(dots) * factor
