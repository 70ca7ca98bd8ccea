"""Per-example gradient norms without per-example gradients.

`per_sample_grad_norms` forms each example's squared norm from activations and
output gradients by the ghost layer rules, or by `vmap(grad)` as the reference.
A leaf the rules cannot handle falls back to per-example gradients of that leaf
only, and `.plan` reports which leaves do.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._validation import check_callable, check_choice, typechecked
from ._ghost_eval import ghost_pass, leaf_contributions
from ._ghost_plan import GhostPlan
from ._per_sample import (
    report_fallback,
    setup,
    sum_squares,
    UNROLL_LAYERS,
)


_NAME = "per_sample_grad_norms"
_METHODS = ("auto", "ghost", "vmap")


class PerSampleGradNorms(eqx.Module):
    """Per-example gradient norms; build with [`transforms.per_sample_grad_norms`][]."""

    loss_fn: Callable
    method: str = eqx.field(static=True)
    per_leaf: bool = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")

    @typechecked
    def __call__(
        self, model: Any, batch: Any
    ) -> Float[Array, " batch"] | tuple[Float[Array, " batch"], PyTree]:
        """L2 norms of the per-example gradients.

        **Arguments:**

        - `model`: any pytree; its inexact arrays are the parameters.
        - `batch`: a tuple of arrays sharing a leading batch axis of size `B`.

        **Returns:**

        The `[B]` norms `‖∇θ l_i‖` (float32, or float64 for float64 parameters); with
        `per_leaf=True` the pair `(norms, per_leaf)` where `per_leaf` has the structure
        of `eqx.filter(model, eqx.is_inexact_array)` and holds each leaf's `[B]` norms
        (`norms² = Σ_leaves per_leaf²`).

        **Raises:**

        `ValueError`/`TypeError` for bad inputs (see [`transforms.per_sample_grads`][]);
        `ValueError` if `fallback=False` and a parameter is outside the layer rules.
        """
        s = setup(_NAME, self.loss_fn, model, batch, unroll_layers=self.unroll_layers)
        acc = s.acc
        if self.method == "vmap":
            grads = s.per_example_grads(s.leaves, s.batch)
            squares = [sum_squares(g, acc) for g in grads]
        else:
            analysis = s.analyse("norms")
            report_fallback(_NAME, analysis.plan, self.method, self.fallback)
            out = ghost_pass(analysis, s.leaves, s.batch, mode="norms", acc=acc)
            squares = leaf_contributions(
                analysis, out["sites"], lambda: jnp.zeros(s.size, acc)
            )
            for i, g in out["per_example"].items():
                squares[i] = squares[i] + sum_squares(g, acc)
            # Cross terms can leave a tiny negative total for a zero gradient.
            squares = [jnp.maximum(q, 0) for q in squares]
        total = jnp.sqrt(sum(squares[1:], squares[0]))
        if self.per_leaf:
            return total, s.unflatten([jnp.sqrt(q) for q in squares])
        return total

    def plan(self, model: Any, batch: Any) -> GhostPlan:
        """How the ghost path would treat each parameter for this model and batch.

        **Returns:**

        A [`transforms.GhostPlan`][]; only the shapes of `batch` matter.
        """
        s = setup(_NAME, self.loss_fn, model, batch)
        return s.analyse("norms").plan


@typechecked
def per_sample_grad_norms(
    loss_fn: Callable,
    *,
    method: str = "auto",
    per_leaf: bool = False,
    fallback: bool = True,
    unroll_layers: bool | str = "auto",
) -> PerSampleGradNorms:
    """Per-example gradient L2 norms without materialising per-example gradients.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `method`:
        - `"ghost"`: one forward and backward pass over the batch; each matrix product,
          embedding lookup and convolution that uses a parameter gets its
          contribution `‖Σ_t b_t a_tᵀ‖²` from its input activations `a` and output
          gradients `b`, as `Σ_{t,s} (a_t·a_s)(b_t·b_s)` when `2T² ≤ p·q` and by
          forming that layer's `p×q` per-example gradient otherwise. Several uses of
          one parameter (a head tied to the embedding) add their cross terms.
          Vector-like parameters (biases, LayerNorm) get their per-example gradients
          directly; any other parameter falls back to per-example gradients of that
          parameter only, with a [`transforms.GhostFallbackWarning`][].
        - `"vmap"`: `vmap(grad)`, materialising every per-example gradient.
        - `"auto"` (default): `"ghost"`, without the warning.
    - `per_leaf`: also return the norm of each parameter leaf.
    - `fallback`: with `False`, raise instead of falling back.
    - `unroll_layers`: how the ghost passes run a `lax.scan` of the loss
        over stacked layers: `True` unrolls it fully, `False` keeps the loss's own
        `unroll`, `"auto"` (default) unrolls it on a GPU or TPU only. The results
        are the same; unrolled runs faster in less memory on a GPU and compiles
        slower (the ghost engines' guide, "A scanned stack of layers").

    **Returns:**

    A [`transforms.PerSampleGradNorms`][], called as `fn(model, batch)`. Squares are
    accumulated in float32 (float64 under float64 parameters) whatever the compute
    dtype. Call it under `eqx.filter_jit`: un-jitted, every call traces the loss,
    plans the ghost path again and runs op by op (milliseconds of overhead a call).

    **Raises:**

    `TypeError` if `loss_fn` is not callable or `unroll_layers` not a bool or
    string; `ValueError` for an unknown `method` or `unroll_layers`.
    The returned function raises as [`transforms.per_sample_grads`][]'s.

    !!! example

        ```python
        def loss_fn(model, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

        norms_fn = eqx.filter_jit(per_sample_grad_norms(loss_fn))
        norms = norms_fn(model, (xs, ys))  # shape (B,)
        ```
    """
    check_callable(_NAME, "loss_fn", loss_fn)
    check_choice(_NAME, "method", method, _METHODS)
    check_choice(_NAME, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    return PerSampleGradNorms(
        loss_fn=loss_fn,
        method=method,
        per_leaf=per_leaf,
        fallback=fallback,
        unroll_layers=unroll_layers,
    )
