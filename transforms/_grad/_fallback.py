"""Steps that cannot be compiled run eagerly instead: `with_fallback`.

Tracing fails when a loss needs concrete values (a Python `if` on an array, boolean
indexing). The wrapper catches exactly those concretisation errors, warns once, and
runs the same step under `jax.disable_jit()` from then on; any other error
propagates.
"""

import warnings
from collections.abc import Callable

import jax

from .._validation import check_callable


# Errors raised while tracing code that needs concrete values (a Python `if` on an
# array, `int(x)`, `np.asarray(x)`, boolean indexing): running eagerly avoids them.
_CONCRETISATION_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
    jax.errors.NonConcreteBooleanIndexError,
)


class FallbackStep:
    """A step that compiles when it can and runs eagerly when it cannot.

    Built by [`transforms.with_fallback`][]. The attribute `eager` tells whether the
    fallback has been taken; `error` holds the error that caused it.
    """

    def __init__(self, step: Callable):
        self.step = step
        self.eager = False
        self.error: Exception | None = None

    def __call__(self, *args, **kwargs):
        if not self.eager:
            try:
                return self.step(*args, **kwargs)
            except _CONCRETISATION_ERRORS as error:
                self.eager = True
                self.error = error
                first_line = str(error).strip().splitlines()[0]
                warnings.warn(
                    f"with_fallback: the step could not be compiled "
                    f"({type(error).__name__}: {first_line}); running it eagerly "
                    f"from now on, which is much slower. Rewrite the loss with "
                    f"`jnp.where`/`lax.cond` to compile it.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        with jax.disable_jit():
            return self.step(*args, **kwargs)


def with_fallback(step: Callable) -> FallbackStep:
    """Run a compiled step eagerly if it cannot be compiled.

    The first call tries the step as it is. If tracing fails with a concretisation
    error (a Python `if` on a traced value, `int()` of an array, boolean indexing with
    a traced mask), a single `RuntimeWarning` names the error and this and every later
    call run the same computation with `jax.disable_jit()`: same arguments, same
    results, much slower. Any other error propagates unchanged.

    **Arguments:**

    - `step`: a callable, typically from [`transforms.make_train_step`][]. Tracing
        must not have side effects on the arguments, which is true of a step that
        fails to compile (nothing was executed or donated).

    **Returns:**

    A [`transforms.FallbackStep`][] with the same call signature as `step`.

    **Raises:**

    `TypeError` if `step` is not callable.

    !!! example

        ```python
        def loss_fn(model, batch, key):
            loss = jnp.mean((jax.vmap(model)(batch[0]) - batch[1]) ** 2)
            if loss > 1.0:  # a Python branch on a traced value: not jittable
                loss = jnp.sqrt(loss)
            return loss

        step = with_fallback(make_train_step(loss_fn, optax.sgd(1e-2)))
        model, opt_state, metrics = step(model, opt_state, batch, key)  # warns once
        ```
    """
    check_callable("with_fallback", "step", step)
    return FallbackStep(step)
