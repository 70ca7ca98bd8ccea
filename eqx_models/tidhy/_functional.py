"""Small differentiable pieces shared by inference, training and evaluation."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


# Added to the norm of the old iterate in the inner loop's relative change, as the
# original does (both implementations of the loop).
RELATIVE_CHANGE_EPS = 1e-16


@jax.custom_jvp
def torch_abs(x: Array) -> Array:
    """`|x|` with derivative `sign(x)`, i.e. 0 at 0 (as PyTorch defines it).

    `jnp.abs` has derivative 1 at 0, which changes the first inner-loop step of an
    L1-penalised latent that starts at 0.
    """
    return jnp.abs(x)


@torch_abs.defjvp
def _torch_abs_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


def l1(x: Array) -> Array:
    """The sum of `|x|` over all entries, with PyTorch's subgradient at 0."""
    return jnp.sum(torch_abs(x))


def _safe_norm(x: Array, axis: int) -> Array:
    # The gradient of a plain norm at 0 is NaN; the clamp below makes it irrelevant,
    # so route zero vectors through a harmless value.
    squared = jnp.sum(x**2, axis=axis)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def mean_pairwise_abs_cosine(rows: Float[Array, "n d"], scale: float) -> Array:
    """`scale * sum_{i > j} |cos(rows_i, rows_j)|` with PyTorch's cosine clamp.

    The cosine is `x·y / (max(|x|, 1e-8) max(|y|, 1e-8))` and `|·|` has derivative 0 at
    0, as in PyTorch.
    """
    norms = jnp.maximum(_safe_norm(rows, axis=-1), 1e-8)
    cos = (rows @ rows.T) / (norms[:, None] * norms[None, :])
    lower = jnp.tril(jnp.ones(cos.shape, bool), k=-1)
    return scale * jnp.sum(jnp.where(lower, torch_abs(cos), 0.0))
