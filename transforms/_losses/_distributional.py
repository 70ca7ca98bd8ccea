"""Regression as classification: target distributions over bins, and their loss.

`two_hot` and `hl_gauss` turn a scalar target into a distribution over bin centres
or histogram bins, and `soft_cross_entropy` scores `softmax(logits)` against it: the
alternatives to an expected-value regression loss for binned scalars.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .._validation import (
    check_in_range,
    check_probabilities,
    check_sorted,
    fail,
    is_traced,
    typechecked,
)
from ._masked import masked_mean


@typechecked
def two_hot(
    x: Float[Array, "*batch"], centres: Float[Array, " n"]
) -> Float[Array, "*batch n"]:
    """The two-hot distribution of a value over sorted bin centres.

    A value between centres `c_j <= x <= c_{j+1}` puts weight
    `(c_{j+1} - x) / (c_{j+1} - c_j)` on bin `j` and the rest on bin `j + 1`, so the
    distribution's mean over the centres is `x` itself; values outside the range
    are clipped to the end bins (one-hot there).

    **Arguments:**

    - `x`: the values, any shape `*batch`; `±inf` is clipped, NaN is rejected.
    - `centres`: the bin centres, shape `(n,)`, finite and non-decreasing, `n >= 2`.

    **Returns:**

    Probabilities of shape `(*batch, n)`.

    **Raises:**

    `ValueError` if there are fewer than two centres, if they are unsorted or not
    finite, or if `x` holds NaN (at once for concrete arrays, by `eqx.error_if`
    under `jit`).
    """
    n = centres.shape[0]
    if n < 2:
        raise fail("two_hot", "centres", "at least 2 bins", f"{n}")
    centres = check_sorted("two_hot", "centres", centres)
    x = check_in_range("two_hot", "x", x, finite=False)
    dtype = jnp.result_type(x.dtype, centres.dtype)
    x = jnp.clip(x.astype(dtype), centres[0], centres[-1])
    upper = jnp.clip(jnp.searchsorted(centres, x, side="right"), 1, n - 1)
    lower = upper - 1
    width = centres[upper] - centres[lower]
    # Repeated centres (a degenerate quantile bin) would divide by zero.
    safe = jnp.where(width > 0, width, 1)
    weight_upper = jnp.where(width > 0, (x - centres[lower]) / safe, 0)
    bins = jnp.arange(n)
    return (bins == lower[..., None]) * (1 - weight_upper)[..., None] + (
        bins == upper[..., None]
    ) * weight_upper[..., None]


@typechecked
def hl_gauss(
    x: Float[Array, "*batch"],
    edges: Float[Array, " n_edges"],
    sigma: float | Float[Array, "..."],
) -> Float[Array, "*batch n"]:
    """The HL-Gauss distribution of a value over histogram bins.

    The probability of bin `i` is the mass of a normal `N(x, sigma^2)` between the
    bin's edges `edges[i]` and `edges[i + 1]`, renormalised by the mass inside
    `[edges[0], edges[-1]]` (Imani & White 2018; Farebrother et al. 2024 recommend
    `sigma` of about 0.75 bin widths). Values outside the edges are clipped to
    them first.

    **Arguments:**

    - `x`: the values, any shape `*batch`; `±inf` is clipped, NaN is rejected.
    - `edges`: the bin edges, shape `(n + 1,)`, finite and non-decreasing, with
        `edges[-1] > edges[0]`.
    - `sigma`: the smoothing scale, a positive finite float or an array shaped like
        `x`.

    **Returns:**

    Probabilities of shape `(*batch, n)`.

    **Raises:**

    `ValueError` if there are fewer than two edges, if they are unsorted, not
    finite or span nothing, if `sigma` is not positive and finite, or if `x` holds
    NaN (at once for concrete arrays, by `eqx.error_if` under `jit`).
    """
    name = "hl_gauss"
    if edges.shape[0] < 2:
        raise fail(name, "edges", "at least 2 entries (1 bin)", f"{edges.shape[0]}")
    # Repeated edges (a degenerate quantile bin) are allowed: that bin gets no mass.
    edges = check_sorted(name, "edges", edges)
    if not is_traced(edges):
        span = edges[-1] - edges[0]
        check_in_range(
            name, "edges[-1] - edges[0]", span, low=0, inclusive=(False, True)
        )
    x = check_in_range(name, "x", x, finite=False)
    sigma = check_in_range(name, "sigma", sigma, low=0, inclusive=(False, True))
    dtype = jnp.result_type(x.dtype, edges.dtype, jnp.float32)
    edges = edges.astype(dtype)
    # Far outside the support all bins would get ~0 mass and the renormalisation
    # would be 0/0: clip to the support as the two-hot target does.
    x = jnp.clip(x.astype(dtype), edges[0], edges[-1])
    sigma = jnp.asarray(sigma, dtype)
    z = (edges - x[..., None]) / (jnp.sqrt(2.0).astype(dtype) * sigma[..., None])
    cdf = 0.5 * jax.scipy.special.erf(z)
    mass = cdf[..., 1:] - cdf[..., :-1]
    return mass / (cdf[..., -1:] - cdf[..., :1])


@typechecked
def soft_cross_entropy(
    logits: Float[Array, "n k"],
    target_probs: Float[Array, "n k"],
    *,
    where: Bool[Array, " n"] | None = None,
) -> Float[Array, ""]:
    """Cross-entropy between target distributions and `softmax(logits)`, averaged.

    The loss of a position is `-sum_j target_probs[j] * log_softmax(logits)[j]`,
    computed in at least float32; the result is its mean over the positions selected
    by `where` (exactly `0.0` with a zero gradient when none is). With
    [`transforms.two_hot`][] or [`transforms.hl_gauss`][] targets this is the
    distributional alternative to an expected-value regression loss.

    **Arguments:**

    - `logits`: shape `(n, k)`.
    - `target_probs`: target distributions, shape `(n, k)`: non-negative rows that
        sum to 1 (within the square root of the dtype's epsilon) at the selected
        positions.
    - `where`: boolean mask of shape `(n,)`, or `None` for all positions.

    **Returns:**

    A scalar.

    **Raises:**

    `ValueError` if a selected row of `target_probs` is not a distribution (at once
    for concrete arrays, by `eqx.error_if` under `jit`).
    """
    target_probs = check_probabilities(
        "soft_cross_entropy", "target_probs", target_probs, where=where
    )
    dtype = jnp.result_type(logits.dtype, target_probs.dtype, jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    per_position = -jnp.sum(target_probs.astype(dtype) * log_probs, axis=-1)
    return masked_mean(per_position, where)
