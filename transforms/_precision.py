"""Casting a model's floating-point arrays, for mixed-precision compute.

Why a module of its own: every family's model computes in the dtype of its weights,
so the one cast a user needs (a bfloat16 copy of float32 master weights, inside or
outside a loss) belongs to no family.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from .validation import describe, fail


def cast_floating(tree, dtype):
    """Cast every floating-point array of a pytree to `dtype` (for mixed precision).

    **Arguments:**

    - `tree`: any pytree, e.g. a model.
    - `dtype`: the target floating dtype.

    **Returns:**

    The same pytree; gradients taken through the cast flow back to the original
    (e.g. float32 master) arrays.

    **Raises:**

    `TypeError` if `dtype` is not a dtype (`None` included, which NumPy would read
    as float64); `ValueError` for a dtype that is not floating point (the
    parameters would be rounded to integers).
    """
    expected = "a floating-point dtype"
    try:
        target = None if dtype is None else jnp.dtype(dtype)
    except (TypeError, ValueError):
        target = None
    if target is None:
        raise fail("cast_floating", "dtype", expected, describe(dtype), TypeError)
    if not jnp.issubdtype(target, jnp.floating):
        raise fail("cast_floating", "dtype", expected, str(target))
    return jax.tree.map(
        lambda x: (
            x.astype(target)
            if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)
            else x
        ),
        tree,
    )
