"""Checks of integer inputs that refuse concrete arrays at once and guard traced ones.

The token, type and segment checks of the LM share one way of reporting: with
concrete arrays a plain `ValueError` naming the argument and the first offending
index; inside `jit` or `vmap` one `eqx.branched_error_if` with a message per check.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from transforms.validation import fail


def refuse_or_guard(
    where: str,
    tokens,
    checks: Sequence[tuple[str, str, Any, Any]],
    *,
    concrete: bool,
):
    """Apply `checks`, each `(argument, what it must be, mask of bad entries, the
    argument's values)`, and return `tokens` (guarded when traced)."""
    if concrete:
        for arg, text, mask, values in checks:
            if np.any(mask):
                index = tuple(int(i) for i in np.argwhere(mask)[0])
                value = np.asarray(values)[index].item()
                raise fail(where, arg, text, f"{value!r} at index {index}")
        return tokens
    preds = jnp.stack([jnp.any(mask) for _, _, mask, _ in checks])
    messages = tuple(
        f"{where}: `{arg}` must be {text}, got some that are not (checked at run time)."
        for arg, text, _, _ in checks
    )
    # The check rides on a scalar added to `tokens`, not on `tokens` itself: an
    # array passed through the check's conditional loses its sharding (XLA
    # replicates it), which would gather a data-parallel batch on every step.
    zero = jnp.zeros((), tokens.dtype)
    zero = eqx.branched_error_if(zero, jnp.any(preds), jnp.argmax(preds), messages)
    return tokens + zero
