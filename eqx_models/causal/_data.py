"""The AVICI data layout `[N, d, 3]`: its channels and the checks of data and masks.

The task sampler writes this layout; the expert, the model and the training code
read it. Naming the channels and checking shapes (at trace time) and values (with
`eqx.error_if`, so under `jit` too) in one module keeps them in agreement.
"""

import enum

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


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
    """Value checks with `eqx.error_if` (they run inside `jit`); returns the data
    (threaded through the checks) and the target index."""
    cell = sample_mask[:, None] & variable_mask[None, :]
    values = data[..., Channel.VALUE]
    indicators = data[..., Channel.INTERVENED :]
    data = eqx.error_if(
        data,
        jnp.any(cell & ~jnp.isfinite(values)),
        f"{name}: `data` has non-finite values (NaN or inf) in the value channel.",
    )
    data = eqx.error_if(
        data,
        jnp.any(cell[..., None] & (indicators != 0) & (indicators != 1)),
        f"{name}: the intervened and target channels of `data` must be 0 or 1.",
    )
    marks = jnp.where(cell, data[..., Channel.TARGET] == 1, False)
    per_row = jnp.sum(marks, axis=1)
    target = jnp.argmax(jnp.sum(marks, axis=0))
    data = eqx.error_if(
        data,
        jnp.any(sample_mask & (per_row != 1)),
        f"{name}: the target channel of `data` must mark exactly one variable in "
        f"every row; some row marks none or several.",
    )
    data = eqx.error_if(
        data,
        jnp.any(sample_mask & ~marks[:, target]),
        f"{name}: the target channel of `data` must mark the same variable in every "
        f"row.",
    )
    return data, target
