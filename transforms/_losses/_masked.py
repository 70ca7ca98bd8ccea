"""Reductions for losses: `masked_mean`, and `pairwise_sum` for accurate long sums.

A masked mean with nothing selected is exactly 0 with a zero gradient, so an absent
modality adds nothing to a loss; sums are pairwise so that long float32 reductions
keep their accuracy. The losses here and in `eqx_models` share both.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float

from .._validation import typechecked


def _gathered(x: Array) -> Array:
    """`x` replicated if its axis is split over an explicit mesh axis.

    The pairwise tree slices the axis, and JAX's explicit sharding refuses slices
    of a sharded axis that the mesh does not divide; gathering a vector of
    per-example values first costs one all-gather of that vector.
    """
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", None)
    if spec and spec[0] is not None:
        # The array's own (possibly abstract) mesh: no mesh context is needed.
        return jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
    return x


@typechecked
def pairwise_sum(x: Float[Array, " n"]) -> Float[Array, ""]:
    """Sum a vector by pairwise (tree) reduction.

    A running float32 sum over `n` terms accumulates an error that grows like `n`
    ulps; the pairwise tree keeps it near `log2(n)`, which matters for
    log-likelihoods and losses summed over tens of thousands of steps. (XLA's own
    reductions are not guaranteed to be pairwise on every backend.)

    **Arguments:**

    - `x`: a 1-D floating array.

    **Returns:**

    The sum, a scalar of `x`'s dtype.

    **Raises:**

    `TypeError` (from the shape annotation) if `x` is not a 1-D floating array.
    """
    x = _gathered(x)
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
        x = x[0::2] + x[1::2]
    return jnp.sum(x)


@typechecked
def masked_mean(
    x: Float[Array, "*shape"], where: Bool[Array, "*shape"] | None = None
) -> Float[Array, ""]:
    """Mean of the entries of `x` selected by `where`; exactly 0 when none is selected.

    Unselected entries never reach the result or its gradient (they are replaced
    by zeros with `jnp.where` before the sum), so a non-finite value there is
    harmless, and when nothing is selected the result is `0.0` with a zero
    gradient everywhere: an absent modality adds nothing to a loss. The sum is
    pairwise, so long float32 sums keep their accuracy.

    **Arguments:**

    - `x`: values, any shape.
    - `where`: a boolean mask of the same shape, or `None` for all entries.

    **Returns:**

    A scalar of `x`'s dtype: `sum(x[where]) / max(count(where), 1)`.

    **Raises:**

    `TypeError` (from the annotations) if `where` is not a boolean array of the
    shape of `x`.
    """
    if where is None:
        where = jnp.ones(x.shape, bool)
    total = pairwise_sum(jnp.where(where, x, jnp.zeros((), x.dtype)).reshape(-1))
    count = jnp.sum(where, dtype=jnp.int32)
    return total / jnp.maximum(count, 1).astype(x.dtype)
