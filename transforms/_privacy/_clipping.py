"""The sum of per-example gradients, each clipped to a norm, without forming them.

Three exact methods share one contract. `"vmap"` forms every per-example gradient
(the reference). `"two_pass"` takes the norms from the ghost engine's backward pass,
then runs a second backward pass from the same forward pass, seeded with each
example's clip factor. `"one_pass"` forms the clipped sum from the factors the norms
were computed from (activations and output gradients, kept from the one backward
pass), through the ghost engine's `"clip"` mode: the sum is the derivative of a zero
probe, so it costs one product per use of a parameter, the size of the weight
gradient of a plain backward pass.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._grad._ghost_eval import ghost_pass, ghost_vjp, leaf_contributions
from .._grad._ghost_plan import GhostPlan
from .._grad._per_sample import (
    report_fallback,
    Setup,
    setup,
    sum_squares,
    UNROLL_LAYERS,
)
from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_in_range,
    describe,
    fail,
    typechecked,
)


_NAME = "clipped_grad_sum"
METHODS = ("auto", "one_pass", "two_pass", "vmap")


class ClippedGrads(NamedTuple):
    """What [`transforms.ClippedGradSum`][] returns.

    **Attributes:**

    - `grads`: `Σ_i w_i ∇θ l_i` over the examples of the batch, with the structure
        of `eqx.filter(model, eqx.is_inexact_array)`; `w_i = min(1, C / ‖∇θ l_i‖)`
        (flat clipping) and 0 for an example the mask leaves out.
    - `norms`: the `[B]` norms `‖∇θ l_i‖` before clipping (0 where masked out).
    - `losses`: the `[B]` losses `l_i` (0 where masked out).
    """

    grads: PyTree
    norms: Float[Array, " batch"]
    losses: Float[Array, " batch"]


def check_settings(
    name: str,
    *,
    clip_norm: Any,
    method: Any,
    per_layer: Any,
    fallback: Any,
    unroll_layers: Any,
) -> None:
    """The checks of the clipping settings that every builder shares."""
    check_in_range(name, "clip_norm", clip_norm, low=0, inclusive=(False, True))
    check_choice(name, "method", method, METHODS)
    check_bool(name, "per_layer", per_layer)
    check_bool(name, "fallback", fallback)
    check_choice(name, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    if per_layer and method == "two_pass":
        raise ValueError(
            f'{name}: `method` "two_pass" clips the whole gradient of an example '
            "(one clip factor per example seeds its backward pass), so it cannot clip "
            'per layer; with `per_layer=True` use "one_pass", "vmap" or "auto".'
        )


def check_mask(name: str, mask: Any, size: int) -> jax.Array:
    """A boolean `[B]` mask (the examples that count)."""
    expected = f"a boolean array of shape ({size},), one entry per example"
    if not isinstance(mask, (jax.Array, jnp.ndarray)) and not hasattr(mask, "dtype"):
        raise fail(name, "mask", expected, describe(mask), TypeError)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise fail(name, "mask", expected, describe(mask), TypeError)
    if mask.shape != (size,):
        raise fail(name, "mask", expected, f"shape {mask.shape}")
    return mask


def resolve_method(method: str, plan: GhostPlan) -> str:
    """What `"auto"` means for a model: one pass where the ghost rules cover a
    parameter, else per-example gradients (nothing would be saved)."""
    if method != "auto":
        return method
    if any(leaf.treatment == "ghost" for leaf in plan.leaves):
        return "one_pass"
    return "vmap"


def _factors(squares: list, clip_norm: float, per_layer: bool, mask, acc):
    """Clip factors `min(1, C / norm)` (0 where masked out): `[B]` for flat
    clipping, one `[B]` per leaf for per-layer clipping (each of the `L` leaves to
    `C / √L`, so that the clipped gradient's norm stays within `C`)."""

    def factor(square, bound):
        norm = jnp.sqrt(jnp.maximum(square, 0))
        # C / max(norm, C) is min(1, C / norm) and stays 1 for a zero gradient.
        w = bound / jnp.maximum(norm, bound)
        return jnp.where(mask, w, 0).astype(acc)

    if per_layer:
        bound = clip_norm / len(squares) ** 0.5
        return [factor(q, bound) for q in squares]
    return factor(sum(squares[1:], squares[0]), clip_norm)


def _weighted(w, g, acc):
    """`Σ_i w_i g_i` for per-example gradients `g` with a leading batch axis."""
    return jnp.tensordot(w.astype(acc), g.astype(acc), axes=1)


def clip_and_sum(
    s: Setup,
    method: str,
    clip_norm: float,
    per_layer: bool,
    mask,
    *,
    fallback: bool = True,
    name: str = _NAME,
) -> tuple[list, jax.Array, jax.Array]:
    """The clipped sum of a checked setup: `(sums, norms, losses)`, `sums` one array
    per leaf in the accumulation dtype, `norms` and `losses` of shape `[B]`."""
    acc, leaves, batch = s.acc, s.leaves, s.batch
    zeros = lambda: jnp.zeros(s.size, acc)
    if method != "vmap":
        analysis = s.analyse("norms")
        report_fallback(name, analysis.plan, method, fallback)
        method = resolve_method(method, analysis.plan)
    if method == "vmap":
        value_and_grad = jax.value_and_grad(s.per_example)
        in_axes = (None,) + (0,) * len(batch)
        losses, grads = jax.vmap(value_and_grad, in_axes=in_axes)(leaves, *batch)
        squares = [sum_squares(g, acc) for g in grads]
        w = _factors(squares, clip_norm, per_layer, mask, acc)
        sums = [
            _weighted(w[i] if per_layer else w, g, acc) for i, g in enumerate(grads)
        ]
    elif method == "two_pass":
        losses, backward = ghost_vjp(analysis, leaves, batch, acc=acc)
        first = backward(jnp.ones(s.size, acc))
        squares = leaf_contributions(analysis, first["sites"], zeros)
        for i, g in first["per_example"].items():
            squares[i] = squares[i] + sum_squares(g, acc)
        w = _factors(squares, clip_norm, False, mask, acc)
        second = backward(w)
        sums = [None] * len(leaves)
        for i, g in second["grads"].items():
            sums[i] = g.astype(acc)
        for i, g in first["per_example"].items():
            sums[i] = _weighted(w, g, acc)
    else:
        ghost = [i for i, t in enumerate(analysis.treatment) if t == "ghost"]

        def clip_pass(directions):
            views: list[Any] = [None] * len(leaves)
            for i, v in zip(ghost, directions):
                views[i] = v
            out = ghost_pass(analysis, leaves, batch, mode="clip", acc=acc, views=views)
            return out["sites"], (out["losses"], out["per_example"])

        # The directions are zero: the pass computes the norms, and its derivative
        # along them, taken below with the clip factors, is the clipped sum.
        start = [jnp.zeros_like(leaves[i]) for i in ghost]
        sites, pullback, (losses, per_example) = jax.vjp(clip_pass, start, has_aux=True)
        squares = leaf_contributions(analysis, sites, zeros)
        for i, g in per_example.items():
            squares[i] = squares[i] + sum_squares(g, acc)
        w = _factors(squares, clip_norm, per_layer, mask, acc)
        leaf_of = {site.uid: site.leaf for site in analysis.sites.values()}
        site_w = {uid: w[leaf_of[uid]] if per_layer else w for uid in sites}
        (clipped,) = pullback(site_w)
        sums = [None] * len(leaves)
        for i, g in zip(ghost, clipped):
            sums[i] = g.astype(acc)
        for i, g in per_example.items():
            sums[i] = _weighted(w[i] if per_layer else w, g, acc)
    sums = [
        jnp.zeros(jnp.shape(x), acc) if g is None else g for g, x in zip(sums, leaves)
    ]
    total = sum(squares[1:], squares[0])
    norms = jnp.where(mask, jnp.sqrt(jnp.maximum(total, 0)), 0)
    losses = jnp.where(mask, losses, 0)
    return sums, norms, losses


class ClippedGradSum(eqx.Module):
    """The clipped sum of per-example gradients; build it with
    [`transforms.clipped_grad_sum`][]."""

    loss_fn: Callable
    clip_norm: float
    method: str = eqx.field(static=True)
    per_layer: bool = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")

    @typechecked
    def __call__(self, model: Any, batch: Any, mask: Any = None) -> ClippedGrads:
        """Clip every example's gradient and sum them.

        **Arguments:**

        - `model`: any pytree; its inexact arrays are the parameters.
        - `batch`: a tuple of arrays sharing a leading batch axis of size `B`.
        - `mask`: `None` (every example counts) or a boolean `[B]` array; an
            example where it is `False` contributes nothing (padding).

        **Returns:**

        A [`transforms.ClippedGrads`][] `(grads, norms, losses)`; `grads` in the
        parameters' dtype.

        **Raises:**

        `TypeError`/`ValueError` for a bad batch or loss (as
        [`transforms.per_sample_grads`][]), or a mask that is not a boolean array of
        shape `(B,)`; `ValueError` with `fallback=False` if a parameter is outside
        the ghost rules.
        """
        s = setup(_NAME, self.loss_fn, model, batch, unroll_layers=self.unroll_layers)
        if mask is None:
            mask = jnp.ones(s.size, bool)
        mask = check_mask(_NAME, mask, s.size)
        sums, norms, losses = clip_and_sum(
            s,
            self.method,
            self.clip_norm,
            self.per_layer,
            mask,
            fallback=self.fallback,
        )
        grads = [g.astype(jnp.result_type(x)) for g, x in zip(sums, s.leaves)]
        return ClippedGrads(s.unflatten(grads), norms, losses)

    def plan(self, model: Any, batch: Any) -> GhostPlan:
        """How the ghost engine treats each parameter (see
        [`transforms.GhostPlan`][]); `"auto"` takes `"one_pass"` when at least one
        parameter is `"ghost"` and `"vmap"` otherwise.

        **Raises:**

        As calling it, for `batch`.
        """
        s = setup(_NAME, self.loss_fn, model, batch)
        return s.analyse("norms").plan


@typechecked
def clipped_grad_sum(
    loss_fn: Callable,
    *,
    clip_norm: float,
    method: str = "auto",
    per_layer: bool = False,
    fallback: bool = True,
    unroll_layers: bool | str = "auto",
) -> ClippedGradSum:
    """The sum of per-example gradients, each clipped to norm `clip_norm`: the
    sensitivity-bounded core of DP-SGD, without materialising per-example gradients.

    Example `i`'s gradient `g_i = ∇θ l_i` is scaled by `w_i = min(1, C / ‖g_i‖)`,
    and the result is `Σ_i w_i g_i`. All methods compute this exactly (up to
    floating-point rounding): they differ in cost.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `clip_norm`: the bound `C > 0`.
    - `method`:
        - `"one_pass"`: one forward and one backward pass. The ghost engine's taps
          compute each example's squared norm in the backward pass and keep the
          factors it came from (inputs and output gradients of each use of a
          parameter); once the clip factors are known, each use contributes one
          weighted product the size of its weight gradient. Costs about a plain
          training step plus the norms; holds the output gradients of every
          layer until the end of the backward pass.
        - `"two_pass"`: the norms from a first backward pass, then a second
          backward pass seeded with the clip factors, both from one forward pass
          (Opacus' ghost clipping, without its second forward). Holds no more
          than a plain step plus the norms' work; costs one more backward pass.
          Flat clipping only.
        - `"vmap"`: `vmap(grad)`, every per-example gradient formed: memory grows
          as `B ×` the parameters. The reference.
        - `"auto"` (default): `"one_pass"`, or `"vmap"` where the ghost rules cover
          no parameter of the model (see [`transforms.GhostPlan`][]).

        The ghost methods treat parameters the layer rules do not cover by
        per-example gradients of those parameters alone, exactly, with a
        [`transforms.GhostFallbackWarning`][] when the method is named.
    - `per_layer`: clip each parameter leaf separately to `C / √L` (`L` leaves), so
        that the whole clipped gradient still has norm at most `C` (Opacus'
        per-layer clipping with equal thresholds).
    - `fallback`: with `False`, raise instead of falling back.
    - `unroll_layers`: how the ghost passes run a `lax.scan` of the loss
        over stacked layers: `True` unrolls it fully, `False` keeps the loss's own
        `unroll`, `"auto"` (default) unrolls it on a GPU or TPU only. The results
        are the same; unrolled runs faster in less memory on a GPU and compiles
        slower (the ghost engines' guide, "A scanned stack of layers").

    **Returns:**

    A [`transforms.ClippedGradSum`][], called as `fn(model, batch, mask=None)`. Call
    it under `eqx.filter_jit`.

    **Raises:**

    `TypeError` if `loss_fn` is not callable or a flag not a bool; `ValueError` if
    `clip_norm` is not a positive finite number, `method` or `unroll_layers`
    unknown, or
    `per_layer=True` with `method="two_pass"`.

    !!! example

        ```python
        def loss_fn(model, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

        clip = eqx.filter_jit(clipped_grad_sum(loss_fn, clip_norm=1.0))
        grads, norms, losses = clip(model, (xs, ys))
        ```
    """
    check_callable(_NAME, "loss_fn", loss_fn)
    check_settings(
        _NAME,
        clip_norm=clip_norm,
        method=method,
        per_layer=per_layer,
        fallback=fallback,
        unroll_layers=unroll_layers,
    )
    return ClippedGradSum(
        loss_fn=loss_fn,
        clip_norm=float(clip_norm),
        method=method,
        per_layer=per_layer,
        fallback=fallback,
        unroll_layers=unroll_layers,
    )
