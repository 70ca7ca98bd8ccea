"""Uniform sampling of positions without replacement, with a fixed output shape.

`sample_positions` returns at most `k` of the selected positions in an array whose
size does not depend on how many are selected (unused slots are flagged), so that a
loss can subsample positions under `jit` without recompiling.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from .._validation import check_size, typechecked


@typechecked
def sample_positions(
    key: PRNGKeyArray, where: Bool[Array, " n"], k: int
) -> tuple[Int[Array, " m"], Bool[Array, " m"]]:
    """Sample at most `k` of the selected positions, uniformly without replacement.

    The output has a fixed shape, so this works under `jit`: `m = min(k, n)` slots,
    of which exactly `min(k, count(where))` are filled with distinct selected
    positions (every subset of that size equally likely) and the rest are flagged
    invalid. When fewer than `k` positions are selected, all of them are returned.

    It draws one uniform number per position, gives unselected positions a score
    below every selected one, and keeps the `m` largest (`lax.top_k`): a uniformly
    random ordering of the selected positions, truncated.

    **Arguments:**

    - `key`: a PRNG key.
    - `where`: boolean mask of shape `(n,)`, the positions that may be sampled.
    - `k`: the largest number of positions to return, a positive Python int.

    **Returns:**

    `(indices, valid)`, both of shape `(min(k, n),)`: positions into `where` and
    whether each slot holds a sampled position. An invalid slot's index is an
    arbitrary position; mask it with `valid`.

    **Raises:**

    `ValueError` if `k < 1`; `TypeError` if `k` is not an integer (a bool
    included).

    !!! example

        ```python
        indices, valid = sample_positions(key, tokens != PAD, 256)
        rows = hidden[indices]  # (256, d); use `valid` as the loss mask
        ```
    """
    k = check_size("sample_positions", "k", k)
    (n,) = where.shape
    m = min(k, n)
    scores = jnp.where(where, jax.random.uniform(key, (n,)), -1.0)
    top, indices = jax.lax.top_k(scores, m)
    return indices.astype(jnp.int32), top >= 0
