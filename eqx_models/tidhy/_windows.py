"""Cutting long records into fixed-length, possibly overlapping windows.

Training and evaluation work on batches of equal-length windows `(N, length, D)`;
this is the one step from raw records to that form, and it needs no model.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from transforms.validation import check_size, typechecked


def window_starts(
    n_steps: int, length: int, stride: int, *, cover_end: bool = False
) -> np.ndarray:
    """The start of every window of `length` steps that fits in `n_steps`, `stride`
    apart from 0 (the rule of `stack_windows`). With `cover_end`, one more window
    starts at `n_steps - length` when the last steps would otherwise be left out,
    so that every step is in a window (the evaluation of a whole recording)."""
    starts = np.arange(0, n_steps - length + 1, stride)
    if cover_end and starts[-1] + length < n_steps:
        starts = np.append(starts, n_steps - length)
    return starts


@typechecked
def stack_windows(
    x: Float[Array, "T D"] | Float[Array, "S T D"], length: int, stride: int
) -> Float[Array, "N length D"]:
    """Cut a record into windows of `length` steps whose starts are `stride` apart.

    Windows start at `0, stride, 2 stride, ...` and every window that fits entirely
    is kept, the last exactly-fitting one included (the original's 2-D branch
    dropped it). A stride below `length` makes windows overlap (the paper used
    `stride = length // 10` for the synthetic data).

    **Arguments:**

    - `x`: one record of shape `(T, D)`, or several of shape `(S, T, D)` (windows of
        each record, record by record).
    - `length`: steps per window, at least 2.
    - `stride`: steps between window starts, at least 1.

    **Returns:**

    An array of shape `(N, length, D)` with `N = S (T - length) // stride + S`.

    **Raises:**

    `ValueError` if `length < 2`, `stride < 1` or `T < length`; `TypeError` if
    `length` or `stride` is not an integer.

    !!! example

        ```python
        windows = stack_windows(x, length=200, stride=20)  # x: (T, D)
        ```
    """
    length = check_size("stack_windows", "length", length, minimum=2)
    stride = check_size("stack_windows", "stride", stride)
    records = x[None] if x.ndim == 2 else x
    n_steps = records.shape[1]
    if n_steps < length:
        raise ValueError(
            f"stack_windows: the record has {n_steps} steps, fewer than `length`="
            f"{length}."
        )
    starts = jnp.asarray(window_starts(n_steps, length, stride))
    index = starts[:, None] + jnp.arange(length)[None, :]
    windows = records[:, index]
    return windows.reshape(-1, length, records.shape[-1])
