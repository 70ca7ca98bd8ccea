"""The optimiser side of the trainer contract: where the learning rate lives, and
optimisers that compare by value.

Why a module of its own: these are the two rules every training step and every
family trainer of the library follows, stated once.

1. **The optimiser is the single source of the learning rate.** A rate that changes
   (a schedule, or a value edited between calls) is injected with
   `optax.inject_hyperparams`, which records the rate each update used in its state
   (`state.hyperparams["learning_rate"]`). A training step reports that value as its
   `learning_rate` metric; it is never given the schedule a second time.
2. **Compiled steps are reused because their static parts are values.** A step is
   compiled once per distinct static part (Python values, functions, the tree
   structure); arrays are traced. optax's transformations are closures, which compare
   by identity: two optimisers built by two calls of the same code are different
   static parts and compile twice. `hashable_optimizer` builds the optax optimiser
   from a factory and its hyperparameters when it is used, and compares by those, so
   equal configurations share one compiled step without any cache.
"""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._validation import check_callable, check_in_range, describe, fail, is_traced


_INJECTED_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def injected_learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate an optimiser state records, by the library's one rule.

    The rate is the `learning_rate` hyperparameter of the first
    `optax.inject_hyperparams` state met in `opt_state` (in pytree flattening order,
    outer states before the states nested in them): the rate its last update used,
    or, before any update, the one the first update will use. This is the value
    [`transforms.make_train_step`][] reports as the `learning_rate` metric. An
    optimiser with several injected rates (one per parameter group, say) is reported
    by its first; put the rate to report first, or read the others from the state.

    **Arguments:**

    - `opt_state`: an optax optimiser state.

    **Returns:**

    The rate as a float32 scalar array, or `None` if no injected `learning_rate`
    is in the state.

    !!! example

        ```python
        optimizer = optax.inject_hyperparams(optax.adam)(
            learning_rate=optax.cosine_decay_schedule(1e-3, 1000)
        )
        opt_state = optimizer.init(params)
        injected_learning_rate(opt_state)  # 1e-3
        ```
    """
    injected = lambda node: isinstance(node, _INJECTED_STATES)
    for node in jax.tree.leaves(opt_state, is_leaf=injected):
        if injected(node) and "learning_rate" in node.hyperparams:
            return jnp.asarray(node.hyperparams["learning_rate"], jnp.float32)
    return None


def inject_learning_rate(
    factory: Callable[..., optax.GradientTransformation],
    learning_rate: Any,
    /,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """`factory(learning_rate=..., **kwargs)` with only its learning rate injected.

    A thin layer over `optax.inject_hyperparams` that injects the learning rate and
    nothing else: every other argument of `factory` (given in `kwargs` or left at
    its default) is passed as it is, a Python number staying a Python number, so the
    transformation computes exactly what `factory` called directly computes.
    (`optax.inject_hyperparams` alone turns every numeric argument into an array,
    which changes the last bits of, e.g., `1 - b1`.)

    **Arguments:**

    - `factory`: a function returning an optax optimiser, with a `learning_rate`
        parameter (e.g. `optax.adamw`).
    - `learning_rate`: a number, an array, an optax schedule (a function of the
        step count) or a stateful schedule (`optax.schedules.StatefulSchedule`).
    - `kwargs`: the other arguments of `factory`.

    **Returns:**

    An `optax.GradientTransformationExtraArgs` whose state records the rate of its
    last update, where [`transforms.injected_learning_rate`][] finds it.

    **Raises:**

    `TypeError` if `factory` is not callable; `ValueError` if it has no
    `learning_rate` parameter, or for a negative, NaN or infinite constant
    `learning_rate` (a negative rate climbs the loss).

    !!! example

        ```python
        schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 10_000)
        optimizer = inject_learning_rate(optax.adamw, schedule, weight_decay=0.1)
        ```
    """
    name = "inject_learning_rate"
    check_callable(name, "factory", factory)
    parameters = inspect.signature(factory).parameters
    if "learning_rate" not in parameters:
        raise fail(
            name,
            "factory",
            "a function with a `learning_rate` parameter",
            f"{getattr(factory, '__qualname__', describe(factory))} with parameters "
            f"{list(parameters)}",
        )
    if not callable(learning_rate) and not is_traced(learning_rate):
        # A schedule is a function of the step: its values are the user's to choose.
        check_in_range(name, "learning_rate", learning_rate, low=0)
    static = tuple(p for p in parameters if p != "learning_rate")
    return optax.inject_hyperparams(factory, static_args=static)(
        learning_rate=learning_rate, **kwargs
    )


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _OptimizerValue(eqx.Module):
    """An optax optimiser given by a factory and its hyperparameters; built where it
    is used. Its `init` and `update` are what `hashable_optimizer` returns."""

    factory: Callable[..., optax.GradientTransformation] = eqx.field(static=True)
    static: tuple[tuple[str, Any], ...] = eqx.field(static=True)
    arrays: dict[str, jax.Array]

    def build(self) -> optax.GradientTransformationExtraArgs:
        transformation = self.factory(**dict(self.static), **self.arrays)
        return optax.with_extra_args_support(transformation)

    def init(self, params):
        return self.build().init(params)

    def update(self, updates, state, params=None, **extra_args):
        return self.build().update(updates, state, params, **extra_args)

    def hyperparameters(self) -> dict[str, Any]:
        return {**dict(self.static), **self.arrays}

    # Hashable like optax's closures, so that `jax.jit(optimizer.update)` works; the
    # arrays enter by name only (equality still compares their values).
    def __hash__(self):
        return hash((self.factory, self.static, tuple(self.arrays)))


def hashable_optimizer(
    factory: Callable[..., optax.GradientTransformation], /, **hyperparameters: Any
) -> optax.GradientTransformationExtraArgs:
    """An optax optimiser that compares by value, so compiled steps are reused.

    The result is an ordinary `optax.GradientTransformationExtraArgs`: its `init` and
    `update` call `factory(**hyperparameters)` and forward to the optimiser it
    returns. But where the optimisers optax builds are closures, compared by
    identity, this one is compared by `factory` and `hyperparameters`: two calls with
    equal arguments give equal optimisers, so a step from
    [`transforms.make_train_step`][] compiled for one is reused by the other, and
    array hyperparameters are traced, so changing their values does not recompile
    either. Building the optimiser inside the compiled step costs nothing at run
    time.

    **Arguments:**

    - `factory`: a function returning an optax optimiser, defined once (at module
        level, say): it is compared by identity, so a lambda or closure made anew on
        every call defeats the purpose.
    - `hyperparameters`: the keyword arguments of `factory`. Arrays (JAX or NumPy)
        are leaves, traced in a compiled step; every other value is static and must
        be hashable and compare by value (numbers, strings, tuples, frozen
        dataclasses, module-level functions).

    **Returns:**

    An `optax.GradientTransformationExtraArgs`.

    **Raises:**

    `TypeError` if `factory` is not callable or a non-array hyperparameter is not
    hashable.

    !!! example

        ```python
        def adamw(learning_rate, weight_decay):
            return inject_learning_rate(
                optax.adamw, learning_rate, weight_decay=weight_decay
            )

        optimizer = hashable_optimizer(
            adamw, learning_rate=jnp.asarray(1e-3), weight_decay=0.1
        )
        ```
    """
    name = "hashable_optimizer"
    check_callable(name, "factory", factory)
    static, arrays = [], {}
    for key, value in sorted(hyperparameters.items()):
        if _is_array(value):
            arrays[key] = jnp.asarray(value)
            continue
        try:
            hash(value)
        except TypeError:
            raise fail(
                name,
                key,
                "an array or a hashable value (it is part of the compiled step's "
                "static key)",
                describe(value),
                TypeError,
            ) from None
        static.append((key, value))
    value = _OptimizerValue(factory, tuple(static), arrays)
    return optax.GradientTransformationExtraArgs(value.init, value.update)


def optimizer_value(optimizer: Any) -> _OptimizerValue | None:
    """The factory and hyperparameters behind a `hashable_optimizer`, else `None`."""
    update = getattr(optimizer, "update", None)
    owner = getattr(update, "__self__", None)
    return owner if isinstance(owner, _OptimizerValue) else None
