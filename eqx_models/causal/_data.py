"""The AVICI data layout `[N, d, 3]`: its channels and the checks of data and masks.

The task sampler writes this layout; the expert, the model and the training code
read it. Naming the channels and checking shapes (at trace time) and values (with
`eqx.error_if`, so under `jit` too) in one module keeps them in agreement.
"""

import enum
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from transforms.validation import Checks, fail, is_concrete


class Channel(enum.IntEnum):
    """The three channels of AVICI-format data `[N, d, 3]`, defined once.

    `data[r, i, Channel.VALUE]` is the value of variable `i` in row `r`;
    `data[r, i, Channel.INTERVENED]` is 1 if variable `i` was set by a perfect
    intervention in row `r`, else 0; `data[r, i, Channel.TARGET]` is 1 for the target
    variable (the same one in every row) and 0 elsewhere. Members are plain integers,
    so they index arrays directly.
    """

    VALUE = 0
    INTERVENED = 1
    TARGET = 2


def check_shapes(
    name: str,
    data: Array,
    sample_mask: Array | None,
    variable_mask: Array | None,
) -> tuple[Bool[Array, " N"], Bool[Array, " d"]]:
    """Trace-time checks of AVICI data and its masks; returns the masks (all-true
    where not given)."""
    if data.ndim != 3 or data.shape[-1] != len(Channel):
        raise ValueError(
            f"{name}: `data` must have shape [N, d, 3] (channels value, intervened, "
            f"target), got shape {data.shape}."
        )
    if not jnp.issubdtype(data.dtype, jnp.floating):
        raise TypeError(f"{name}: `data` must be floating point, got {data.dtype}.")
    n, d, _ = data.shape
    if n < 1 or d < 1:
        raise ValueError(
            f"{name}: `data` needs at least one row and one variable, got shape "
            f"{data.shape}."
        )
    masks = []
    for arg, mask, size, axis in (
        ("sample_mask", sample_mask, n, "N"),
        ("variable_mask", variable_mask, d, "d"),
    ):
        if mask is None:
            masks.append(jnp.ones((size,), bool))
            continue
        if mask.shape != (size,) or mask.dtype != jnp.bool_:
            raise ValueError(
                f"{name}: `{arg}` must be a boolean array of shape ({axis},) = "
                f"({size},), got {mask.dtype}{list(mask.shape)}."
            )
        masks.append(mask)
    return masks[0], masks[1]


def check_values(
    name: str,
    data: Float[Array, "N d 3"],
    sample_mask: Bool[Array, " N"],
    variable_mask: Bool[Array, " d"],
) -> tuple[Float[Array, "N d 3"], Int[Array, ""]]:
    """Value checks of AVICI data; returns the data and the target index.

    Concrete arrays are checked at once (a `ValueError`); traced ones by one
    `eqx.branched_error_if` that the returned data is threaded through (it runs
    inside `jit` and names the first problem found)."""
    concrete = is_concrete(data, sample_mask, variable_mask)
    xp: Any = np if concrete else jnp
    arrays: Any = data
    rows: Any = sample_mask
    columns: Any = variable_mask
    if concrete:
        arrays, rows, columns = (np.asarray(v) for v in (data, rows, columns))
    cell = rows[:, None] & columns[None, :]
    values = arrays[..., Channel.VALUE]
    indicators = arrays[..., Channel.INTERVENED :]
    marks = xp.where(cell, arrays[..., Channel.TARGET] == 1, False)
    per_row = xp.sum(marks, axis=1)
    target = xp.argmax(xp.sum(marks, axis=0))
    problems = (
        (
            xp.any(cell & ~xp.isfinite(values)),
            "finite in the value channel",
            "non-finite values (NaN or inf)",
        ),
        (
            xp.any(cell[..., None] & (indicators != 0) & (indicators != 1)),
            "0 or 1 in the intervened and target channels",
            "another value",
        ),
        (
            xp.any(rows & (per_row != 1)),
            "a target channel marking exactly one variable in every row",
            "a row marking none or several",
        ),
        (
            xp.any(rows & ~marks[:, target]),
            "a target channel marking the same variable in every row",
            "rows marking different variables",
        ),
    )
    if concrete:
        for bad, expected, got in problems:
            if bad:
                raise fail(name, "data", expected, got)
        return data, jnp.asarray(target)
    # One conditional for the four checks, not one each (`Checks` says why).
    checks = Checks()
    for bad, expected, got in problems:
        checks.add(bad, f"{name}: `data` must be {expected}, got {got}.")
    return checks.guard(data), jnp.asarray(target)
