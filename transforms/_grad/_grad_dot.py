"""Dot products of per-example training gradients with the validation gradient.

`grad_dot_products` computes them by forward mode along the validation gradient
(jvp), by the layer rules of the ghost path, or by `vmap(grad)` as the reference;
only the last forms per-example gradients. The jvp and ghost kernels also drive
`make_attribution_step`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._validation import check_callable, check_choice, typechecked
from ._ghost_eval import ghost_pass, leaf_contributions
from ._ghost_plan import Analysis, GhostPlan
from ._per_sample import (
    per_example_dot,
    report_fallback,
    Setup,
    setup,
    UNROLL_LAYERS,
)


_NAME = "grad_dot_products"
_METHODS = ("auto", "jvp", "ghost", "vmap")
_REDUCTIONS = ("mean", "sum")


def jvp_dots(s: Setup, leaves: list, batch: tuple, tangents: dict) -> jax.Array:
    """`<∇l_i, v>` for every example by one forward-mode pass along `v`.

    Only the leaves in `tangents` get a tangent; the others are closed over, so the
    tangent propagates from their uses onwards only.
    """
    idx = sorted(tangents)

    def losses(sub):
        vals = list(leaves)
        for i, x in zip(idx, sub):
            vals[i] = x
        return s.losses(vals, batch)

    primals = [leaves[i] for i in idx]
    _, out = jax.jvp(losses, (primals,), ([tangents[i] for i in idx],))
    return out.astype(s.acc)


def _jvp_parts(s: Setup, leaves, batch, g: list, idx: list[int], per_leaf: bool):
    """Per-leaf (or one joint) jvp dot products for the leaves `idx`."""
    if not idx:
        return {}
    if per_leaf:
        return {i: jvp_dots(s, leaves, batch, {i: g[i]}) for i in idx}
    return {idx[0]: jvp_dots(s, leaves, batch, {i: g[i] for i in idx})}


def ghost_dots(
    s: Setup,
    analysis: Analysis,
    leaves: list,
    batch: tuple,
    g: list,
    *,
    method: str,
    fallback: bool,
    per_leaf: bool,
    param_grads: bool = False,
) -> tuple[dict, dict]:
    """Dot products with one validation gradient `g` by the layer rules, for
    `analysis = s.analyse("dots")` (the caller takes `g` from the same analysis, see
    `Setup.with_stack_unrolled`).

    Returns `(parts, out)`: `parts` maps leaf index -> `[B]` contribution (fallback
    leaves folded into one entry unless `per_leaf`); `out` is `ghost_pass`'s output.
    """
    report_fallback(s.name, analysis.plan, method, fallback)
    out = ghost_pass(
        analysis,
        leaves,
        batch,
        mode="dots",
        acc=s.acc,
        views=g,
        param_grads=param_grads,
    )
    parts = dict(
        enumerate(
            leaf_contributions(
                analysis, out["sites"], lambda: jnp.zeros(len(batch[0]), s.acc)
            )
        )
    )
    for i, pe in out["per_example"].items():
        parts[i] = parts[i] + per_example_dot(pe, g[i], s.acc)
    fb = [i for i, t in enumerate(analysis.treatment) if t == "fallback"]
    for i, value in _jvp_parts(s, leaves, batch, g, fb, per_leaf).items():
        parts[i] = parts[i] + value
    return parts, out


def _matrix(s: Setup, method: str, val: tuple, per_leaf: bool, fallback: bool) -> list:
    """Per-leaf `[B, n_val]` matrices `<∇l_i, ∇l_v>`."""
    leaves, train, acc = s.leaves, s.batch, s.acc
    n_val = val[0].shape[0]
    if method == "vmap":
        gt = s.per_example_grads(leaves, train)
        gv = s.per_example_grads(leaves, val)
        return [_pair_dots(a, b, acc) for a, b in zip(gt, gv)]
    if method == "jvp":
        grad = jax.grad(s.per_example)

        def column(example):
            gv = grad(leaves, *example)
            parts = _jvp_parts(s, leaves, train, gv, list(range(len(leaves))), per_leaf)
            return [parts.get(i, jnp.zeros(s.size, acc)) for i in range(len(leaves))]

        columns = jax.lax.map(column, val)
        return [jnp.transpose(c) for c in columns]
    analysis = s.analyse("dots")
    report_fallback(s.name, analysis.plan, method, fallback)
    gv = s.with_stack_unrolled(analysis).per_example_grads(leaves, val)
    out = ghost_pass(
        analysis, leaves, train, mode="matrix", acc=acc, views=gv, n_val=n_val
    )
    parts = leaf_contributions(
        analysis, out["sites"], lambda: jnp.zeros((s.size, n_val), acc)
    )
    for i, pe in out["per_example"].items():
        parts[i] = parts[i] + _pair_dots(pe, gv[i], acc)
    return parts


def _pair_dots(a: jax.Array, b: jax.Array, acc) -> jax.Array:
    a = a.reshape(a.shape[0], -1).astype(acc)
    b = b.reshape(b.shape[0], -1).astype(acc)
    return a @ b.T


class GradDotProducts(eqx.Module):
    """Train×validation gradient dot products; build it with
    [`transforms.grad_dot_products`][]."""

    loss_fn: Callable
    method: str = eqx.field(static=True)
    val_reduction: str = eqx.field(static=True)
    per_leaf: bool = eqx.field(static=True)
    full_matrix: bool = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")

    @typechecked
    def __call__(
        self, model: Any, train_batch: Any, val_batch: Any
    ) -> Float[Array, "batch ..."] | tuple[Float[Array, "batch ..."], PyTree]:
        """Dot products of per-example training gradients with validation gradients.

        **Arguments:**

        - `model`: any pytree; its inexact arrays are the parameters θ.
        - `train_batch`: a tuple of arrays with a leading axis of size `B`.
        - `val_batch`: a tuple of arrays with a leading axis of size `V`, with the same
            per-example structure as `train_batch`.

        **Returns:**

        `dot` of shape `[B]` with `dot[i] = <∇θ l_i, ḡ>`, `ḡ` the gradient of the mean
        (or, with `val_reduction="sum"`, summed) validation loss; with
        `full_matrix=True` the `[B, V]` matrix `<∇θ l_i, ∇θ l_v>`. With `per_leaf=True`
        the pair `(dot, per_leaf)`, `per_leaf` having the structure of
        `eqx.filter(model, eqx.is_inexact_array)` with each leaf's share (they sum to
        `dot`). float32 (float64 under float64 parameters).

        **Raises:**

        `ValueError`/`TypeError` for bad inputs, or if `fallback=False` and a
        parameter is outside the layer rules.
        """
        s = setup(
            _NAME,
            self.loss_fn,
            model,
            train_batch,
            arg="train_batch",
            unroll_layers=self.unroll_layers,
        )
        val = s.check_val("val_batch", val_batch)
        method = self.method
        if method == "auto":
            method = "ghost" if (self.per_leaf or self.full_matrix) else "jvp"
        if self.full_matrix:
            parts = _matrix(s, method, val, self.per_leaf, self.fallback)
        else:
            parts = self._aggregate(s, method, val)
        total = sum(parts[1:], parts[0])
        if self.per_leaf:
            return total, s.unflatten(parts)
        return total

    def _aggregate(self, s: Setup, method: str, val: tuple) -> list:
        leaves, train, acc = s.leaves, s.batch, s.acc
        n = len(leaves)
        if method == "ghost":
            analysis = s.analyse("dots")
            g = s.with_stack_unrolled(analysis).reduced_grad(
                leaves, val, self.val_reduction
            )
            parts, _ = ghost_dots(
                s,
                analysis,
                leaves,
                train,
                g,
                method=method,
                fallback=self.fallback,
                per_leaf=self.per_leaf,
            )
            return [parts.get(i, jnp.zeros(s.size, acc)) for i in range(n)]
        g = s.reduced_grad(leaves, val, self.val_reduction)
        if method == "vmap":
            gt = s.per_example_grads(leaves, train)
            return [per_example_dot(a, b, acc) for a, b in zip(gt, g)]
        parts = _jvp_parts(s, leaves, train, g, list(range(n)), self.per_leaf)
        return [parts.get(i, jnp.zeros(s.size, acc)) for i in range(n)]

    def plan(self, model: Any, train_batch: Any) -> GhostPlan:
        """How the ghost path would treat each parameter for this model and batch.

        **Returns:**

        A [`transforms.GhostPlan`][]; only the shapes of `train_batch` matter.
        """
        s = setup(_NAME, self.loss_fn, model, train_batch, arg="train_batch")
        return s.analyse("dots").plan


@typechecked
def grad_dot_products(
    loss_fn: Callable,
    *,
    method: str = "auto",
    val_reduction: str = "mean",
    per_leaf: bool = False,
    full_matrix: bool = False,
    fallback: bool = True,
    unroll_layers: bool | str = "auto",
) -> GradDotProducts:
    """Dot products `<∇θ l_i, ḡ_val>` of per-example training gradients with the
    validation gradient, without materialising per-example gradients.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `method`:
        - `"jvp"`: one backward pass for `ḡ_val`, then one forward-mode pass of the
          per-example training losses along `ḡ_val`: exact for any architecture.
        - `"ghost"`: one backward pass over the training batch; each matrix product,
          embedding lookup and convolution that uses a parameter adds
          `Σ_t b_tᵀ G a_t` (activations `a`, output gradients `b`, the parameter's
          validation gradient `G`), formed inside the backward pass. Vector-like
          parameters get per-example gradients directly; any other parameter is
          computed by the jvp path, with a [`transforms.GhostFallbackWarning`][].
        - `"vmap"`: `vmap(grad)`, materialising every per-example gradient.
        - `"auto"` (default): `"jvp"` for the aggregated products (the forward-mode
          pass stores no activations), `"ghost"` for `per_leaf` or `full_matrix`
          (one pass for all leaves).
    - `val_reduction`: `"mean"` (default) or `"sum"` of the validation losses.
    - `per_leaf`: also return each parameter leaf's share of the dot products.
    - `full_matrix`: return the `[B, V]` matrix of products with every validation
        example's gradient (`val_reduction` then does not apply). The validation
        examples' gradients are formed (V copies of the parameters); the training
        examples' are not, except by `"vmap"`.
    - `fallback`: with `False`, raise instead of falling back.
    - `unroll_layers`: how the ghost passes (and the validation gradients beside
        them) run a `lax.scan` of the loss over stacked layers: `True` unrolls it
        fully, `False` keeps the loss's own `unroll`, `"auto"` (default) unrolls it
        on a GPU or TPU only. The results are the same; unrolled runs faster in less
        memory on a GPU and compiles slower (the ghost engines' guide, "A scanned
        stack of layers").

    **Returns:**

    A [`transforms.GradDotProducts`][], called as `fn(model, train_batch,
    val_batch)`. Products are accumulated in float32 (float64 under float64
    parameters). Call it under `eqx.filter_jit`: un-jitted, every call traces the
    loss, plans the ghost path again and runs op by op (milliseconds of overhead a
    call).

    **Raises:**

    `TypeError` if `loss_fn` is not callable or `unroll_layers` not a bool or
    string; `ValueError` for an unknown `method`, `val_reduction` or
    `unroll_layers`. The returned function raises as
    [`transforms.per_sample_grads`][]'s, and if the validation examples do not
    have the structure of the training examples.

    !!! example

        ```python
        def loss_fn(model, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

        dots_fn = eqx.filter_jit(grad_dot_products(loss_fn))
        dots = dots_fn(model, (xs, ys), (xs_val, ys_val))
        ```
    """
    check_callable(_NAME, "loss_fn", loss_fn)
    check_choice(_NAME, "method", method, _METHODS)
    check_choice(_NAME, "val_reduction", val_reduction, _REDUCTIONS)
    check_choice(_NAME, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    return GradDotProducts(
        loss_fn=loss_fn,
        method=method,
        val_reduction=val_reduction,
        per_leaf=per_leaf,
        full_matrix=full_matrix,
        fallback=fallback,
        unroll_layers=unroll_layers,
    )
