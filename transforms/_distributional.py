import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._masked import masked_mean
from ._validation import typechecked


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

    - `x`: the values, any shape `*batch`.
    - `centres`: the bin centres, shape `(n,)`, non-decreasing, `n >= 2`.

    **Returns:**

    Probabilities of shape `(*batch, n)`.

    **Raises:**

    `ValueError` if there are fewer than two centres.
    """
    n = centres.shape[0]
    if n < 2:
        raise ValueError(f"two_hot: `centres` needs at least 2 bins, got {n}.")
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

    - `x`: the values, any shape `*batch`.
    - `edges`: the bin edges, shape `(n + 1,)`, strictly increasing.
    - `sigma`: the smoothing scale, a positive float or an array shaped like `x`.

    **Returns:**

    Probabilities of shape `(*batch, n)`.

    **Raises:**

    `ValueError` if there are fewer than two edges.
    """
    if edges.shape[0] < 2:
        raise ValueError(
            f"hl_gauss: `edges` needs at least 2 entries (1 bin), got {edges.shape[0]}."
        )
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
    - `target_probs`: target distributions, shape `(n, k)`.
    - `where`: boolean mask of shape `(n,)`, or `None` for all positions.

    **Returns:**

    A scalar.
    """
    dtype = jnp.result_type(logits.dtype, target_probs.dtype, jnp.float32)
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    per_position = -jnp.sum(target_probs.astype(dtype) * log_probs, axis=-1)
    return masked_mean(per_position, where)
