"""Expected values under a softmax, and the regression loss built on them.

A model that predicts a token of a codebook also predicts a value: the codebook
weighted by `softmax(logits)`. `expected_value` computes it in at least float32 at
the highest matmul precision; `expected_value_loss` compares it with the targets
over the selected positions.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._validation import check_ids, typechecked
from ._masked import masked_mean


def _float_dtype(*arrays) -> jnp.dtype:
    # At least float32 (bf16 logits are upcast), float64 under x64 with f64 inputs.
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


@typechecked
def expected_value(
    logits: Float[Array, "*batch n"], values: Float[Array, " n *dims"]
) -> Float[Array, "..."]:
    """The expected value of `values` under `softmax(logits)`.

    The softmax and the weighted sum are computed in at least float32 (bfloat16
    logits are upcast first), and the contraction uses the highest matmul
    precision, so the result does not depend on TF32 settings.

    **Arguments:**

    - `logits`: unnormalised log-probabilities over `n` outcomes, shape
        `(*batch, n)`: for a vocabulary slice, the logits of that slice only.
    - `values`: the value of each outcome, shape `(n, *dims)`: a codebook
        `(n, D)`, bin centres `(n,)`, ...

    **Returns:**

    `sum_i softmax(logits)_i * values[i]`, shape `(*batch, *dims)`.

    **Raises:**

    `TypeError` (from the shape annotations) if the last axis of `logits` and the
    first of `values` differ.

    !!! example

        ```python
        codebook = jnp.array([[0.0, 0.0], [1.0, 2.0]])
        expected_value(jnp.array([0.0, 0.0]), codebook)  # [0.5, 1.0]
        ```
    """
    dtype = _float_dtype(logits, values)
    probs = jax.nn.softmax(logits.astype(dtype), axis=-1)
    return jnp.tensordot(
        probs, values.astype(dtype), axes=1, precision=jax.lax.Precision.HIGHEST
    )


def _squared_error(prediction, target):
    return jnp.mean((prediction - target) ** 2)


@typechecked
def expected_value_loss(
    logits: Float[Array, "n v"],
    values: Float[Array, " v *dims"],
    targets: Int[Array, " n"] | Float[Array, " n *dims"],
    *,
    where: Bool[Array, " n"] | None = None,
    loss_fn: Callable[[Array, Array], Array] | None = None,
    check_targets: bool = True,
) -> Float[Array, ""]:
    """A regression loss between expected values and targets, averaged over positions.

    For each position `i`, the prediction is `expected_value(logits[i], values)`;
    the per-position loss is `loss_fn(prediction, target)` (default: the squared
    error averaged over the value dimensions, so the result is the MSE over
    positions x dimensions); the result is the mean over the positions selected by
    `where`, exactly `0.0` with a zero gradient when none is selected.

    **Arguments:**

    - `logits`: the logits of `n` positions over the `v` outcomes, shape `(n, v)`.
    - `values`: the value of each outcome, shape `(v, *dims)`.
    - `targets`: either integer indices into `values`, shape `(n,)` (the target is
        `values[targets[i]]`, e.g. the codebook vector of the target token), or
        target values of shape `(n, *dims)`.
    - `where`: boolean mask of shape `(n,)` selecting the positions that count;
        `None` selects all. Target indices at unselected positions are ignored.
    - `loss_fn`: `loss_fn(prediction, target) -> scalar` for one position, both of
        shape `dims`; default mean squared error.
    - `check_targets`: check that the selected target indices lie in `[0, v)`
        (a run-time check under `jit`); turn off only where the caller guarantees
        it, as the multimodal loss does for targets it selected by range.

    **Returns:**

    A scalar in at least float32.

    **Raises:**

    `TypeError` (from the shape annotations) for inconsistent shapes, or if
    `loss_fn` is not callable; `ValueError` if `loss_fn` does not return a scalar,
    or, with `check_targets`, if a selected target index lies outside `[0, v)` (at
    once for concrete indices, by `eqx.error_if` under `jit`).
    """
    name = "expected_value_loss"
    n, v = logits.shape
    if where is None:
        where = jnp.ones((n,), bool)
    dtype = _float_dtype(logits, values)
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if check_targets:
            targets = check_ids(name, "targets", targets, v, where=where)
        target_values = values.astype(dtype)[jnp.clip(targets, 0, v - 1)]
    else:
        target_values = targets.astype(dtype)
    predictions = expected_value(logits, values)
    per_position = jax.vmap(loss_fn or _squared_error)(predictions, target_values)
    if per_position.shape != (n,):
        raise ValueError(
            "expected_value_loss: `loss_fn` must return a scalar per position, got "
            f"shape {per_position.shape[1:]}."
        )
    return masked_mean(per_position.astype(dtype), where)
