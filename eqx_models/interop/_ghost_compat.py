"""A GhostEngines-style stateful wrapper over the functional attribution API."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import torch

from transforms import (
    grad_dot_products,
    in_run_shapley,
    make_attribution_step,
    NonFiniteLossError,
    shapley_values,
)
from transforms._train._train_step import nonfinite_parts, reported_learning_rate
from transforms.interop.torch import to_jax


_FN = "DotProductEngine"


def _as_batch(where: str, arrays: tuple) -> tuple:
    if not arrays:
        raise ValueError(f"{_FN}.{where}: give at least one array.")
    converted = []
    for array in arrays:
        if isinstance(array, torch.Tensor):
            converted.append(to_jax(array))
        elif eqx.is_array_like(array):
            converted.append(jnp.asarray(array))
        else:
            raise TypeError(
                f"{_FN}.{where}: batch entries must be arrays or torch tensors, got "
                f"{type(array).__name__}."
            )
    sizes = {a.shape[0] if a.ndim else None for a in converted}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            f"{_FN}.{where}: every array needs the same leading (batch) axis, got "
            f"shapes {[tuple(a.shape) for a in converted]}."
        )
    return tuple(converted)


class DotProductEngine:
    """Training with per-example gradient dot products, in the style of GhostEngines.

    A stateful convenience for users migrating from the original PyTorch
    `GradDotProdEngine`: attach a model and a validation batch, feed training
    batches, read the dot products. Underneath it is the functional API:
    [`transforms.make_attribution_step`][] for `step` and
    [`transforms.grad_dot_products`][] for `dot_products`, so the numbers are theirs:
    `dots[i] = <∇θ l_i, ḡ_val>` with `l_i` the loss of training example `i` alone and
    `ḡ_val` the gradient of the mean (or summed) validation loss, at the parameters
    before the update; the update uses the mean training gradient only. Use
    [`transforms.to_original_scaling`][] for the original's numbers. Batches may be
    JAX/NumPy arrays or torch tensors (converted through DLPack).

    Unlike the original there is no hook, no concatenated train+validation batch and
    no `.grad` juggling: `step()` replaces the forward, backward,
    `aggregate_and_log`, `prepare_gradients`, `optimizer.step` and
    `clear_gradients` sequence.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `optimizer`: an optax `GradientTransformation`.
    - `method`, `val_reduction`: as in [`transforms.make_attribution_step`][].
    - `learning_rate`: the optimiser's learning rate (float or schedule); needed
        to accumulate In-Run Data Shapley values.
    - `n_train`: the size of the training set, to accumulate first-order In-Run
        Data Shapley values over the steps (give `indices` to
        `attach_train_batch`).

    **Raises:**

    `ValueError` for `n_train` without `learning_rate`, or bad options.

    !!! example

        ```python
        engine = DotProductEngine(loss_fn, optax.sgd(0.1), learning_rate=0.1)
        engine.attach(model, (x_val, y_val))
        for x, y in loader:
            engine.attach_train_batch(x, y)
            dots = engine.step()
        model = engine.model
        ```
    """

    def __init__(
        self,
        loss_fn: Callable,
        optimizer: optax.GradientTransformation,
        *,
        method: str = "auto",
        val_reduction: str = "mean",
        learning_rate: float | Callable | None = None,
        n_train: int | None = None,
    ):
        if n_train is not None and learning_rate is None:
            raise ValueError(
                f"{_FN}: accumulating Shapley values (`n_train`={n_train}) needs the "
                "optimiser's `learning_rate`."
            )
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self._step = make_attribution_step(
            loss_fn, optimizer, method=method, val_reduction=val_reduction, donate=False
        )
        # Compiled: un-jitted, each call would trace the loss and plan again.
        self._dots = eqx.filter_jit(
            grad_dot_products(
                loss_fn,
                method="jvp" if method == "auto" else method,
                val_reduction=val_reduction,
            )
        )
        self._shapley = None if n_train is None else in_run_shapley(n_train)
        self._shapley_state = None if self._shapley is None else self._shapley.init()
        self.model: Any = None
        self.opt_state: Any = None
        self.val_batch: tuple | None = None
        self.train_batch: tuple | None = None
        self.indices: jax.Array | None = None
        self.iteration = 0
        self.dots: Any = None
        self.metrics: dict[str, jax.Array] = {}
        self.dot_product_log: list[dict[str, Any]] = []

    def attach(self, model: Any, val_batch: tuple, *, opt_state: Any = None) -> None:
        """Attach the model (and its optimiser state) and the validation batch.

        **Arguments:**

        - `model`: an Equinox model (any pytree; its inexact arrays are trained).
        - `val_batch`: a tuple of arrays with a leading batch axis.
        - `opt_state`: the optimiser state; default `optimizer.init` of the model's
            inexact arrays.
        """
        self.model = model
        self.opt_state = (
            self.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
            if opt_state is None
            else opt_state
        )
        self.attach_val_batch(*val_batch)

    def attach_val_batch(self, *arrays) -> None:
        """Replace the validation batch (arrays with a leading batch axis)."""
        self.val_batch = _as_batch("attach_val_batch", arrays)

    def attach_train_batch(
        self, *arrays, indices=None, iter_num: int | None = None
    ) -> None:
        """Set the training batch of the next `step` (or `dot_products`).

        **Arguments:**

        - `*arrays`: the batch's arrays (e.g. `x, y`), leading batch axis `B`.
        - `indices`: the examples' indices in the training set, shape `(B,)`
            (for the Shapley accumulation and the log).
        - `iter_num`: the iteration number recorded in the log (default: a count).
        """
        self.train_batch = _as_batch("attach_train_batch", arrays)
        size = self.train_batch[0].shape[0]
        if indices is not None:
            indices = to_jax(indices) if isinstance(indices, torch.Tensor) else indices
            indices = jnp.asarray(indices)
            if indices.shape != (size,):
                raise ValueError(
                    f"{_FN}.attach_train_batch: `indices` must have shape ({size},), "
                    f"got {indices.shape}."
                )
        self.indices = indices
        if iter_num is not None:
            self.iteration = iter_num

    def _require(self, where: str) -> tuple[tuple, tuple]:
        if self.model is None or self.val_batch is None:
            raise ValueError(f"{_FN}.{where}: call `attach(model, val_batch)` first.")
        if self.train_batch is None:
            raise ValueError(f"{_FN}.{where}: call `attach_train_batch(...)` first.")
        return self.train_batch, self.val_batch

    def dot_products(self) -> jax.Array:
        """The dot products for the attached training batch at the current
        parameters, without training.

        **Returns:**

        `dots` of shape `(B,)` (by [`transforms.grad_dot_products`][]).
        """
        train, val = self._require("dot_products")
        dots: Any = self._dots(self.model, train, val)
        return dots

    def step(self) -> jax.Array:
        """One optimiser step on the attached training batch, logging the dot products.

        **Returns:**

        `dots` of shape `(B,)` at the parameters before the update; also stored in
        `self.dots`, with the step's metrics in `self.metrics` and a record
        `{"iter", "dot_product", "indices", "loss", "val_loss"}` appended to
        `self.dot_product_log`. `self.model` and `self.opt_state` are updated.

        **Raises:**

        `ValueError` if no model/validation batch or training batch is attached, or
        if Shapley values are accumulated and the batch has no `indices`;
        [`transforms.NonFiniteLossError`][] if the step's loss, gradient, updated
        parameters or optimiser state is not finite (its `nonfinite` metric): then
        nothing of the step is adopted (model, optimiser state, Shapley values,
        log and iteration count stay as they were; the training batch stays
        attached), and the error holds the engine's model and optimiser state.
        """
        train, val = self._require("step")
        if self._shapley is not None and self.indices is None:
            raise ValueError(
                f"{_FN}.step: accumulating Shapley values needs the batch's "
                "`indices` (attach_train_batch(..., indices=...))."
            )
        dots: Any
        model, opt_state, metrics, dots = self._step(
            self.model, self.opt_state, train, val
        )
        mask = int(metrics["nonfinite"])
        if mask:
            # The step handed back its inputs; adopt nothing of it (its dot products
            # would poison the Shapley values and the log), as `transforms.fit` does.
            parts = nonfinite_parts(mask)
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values = ", ".join(
                f"{k}={record[k]}" for k in ("loss", "grad_norm") if k in record
            )
            raise NonFiniteLossError(
                f"{_FN}.step: non-finite {', '.join(parts)} at iteration "
                f"{self.iteration} ({values}); the update was not applied and the "
                "engine keeps its model, optimiser state and Shapley values.",
                step=self.iteration,
                metrics=record,
                checkpoint_step=None,
                nonfinite=parts,
                model=self.model,
                opt_state=self.opt_state,
            )
        if self._shapley is not None:
            # The original's API takes the rate beside the optimiser; one the
            # optimiser state records (injected) takes precedence.
            rate = reported_learning_rate(self.learning_rate, self.opt_state, opt_state)
            self._shapley_state = self._shapley.update(
                self._shapley_state, self.indices, dots, rate
            )
        self.model, self.opt_state = model, opt_state
        self.dots, self.metrics = dots, metrics
        self.dot_product_log.append(
            {
                "iter": self.iteration,
                "dot_product": dots,
                "indices": self.indices,
                "loss": metrics["loss"],
                "val_loss": metrics["val_loss"],
            }
        )
        self.iteration += 1
        self.train_batch = None
        return dots

    def shapley_values(self) -> jax.Array:
        """The accumulated first-order In-Run Data Shapley values, shape
        `(n_train,)` (see [`transforms.in_run_shapley`][]).

        **Raises:**

        `ValueError` if the engine was built without `n_train`.
        """
        if self._shapley_state is None:
            raise ValueError(
                f"{_FN}.shapley_values: build the engine with `n_train` (and "
                "`learning_rate`) to accumulate values."
            )
        values: Any = shapley_values(self._shapley_state)
        return values

    def detach(self) -> Any:
        """Release the engine's references and return the trained model."""
        model = self.model
        self.model = self.opt_state = self.val_batch = self.train_batch = None
        return model
