"""Evaluation of a traced per-example loss with ghost taps at the supported uses.

The loss is traced once to a jaxpr (see `_ghost_plan.analyse`), then re-evaluated
equation by equation. Each supported use of a ghost leaf is evaluated as usual and its
output passed through a *tap*: an identity in the forward pass whose backward pass
receives the output gradient and, from it and the forward factor saved for it, writes
the use's contribution (squared norm, or dot product with the validation gradient) into
the cotangent of a zero "slot" input. Nothing per-example and parameter-sized is kept:
contributions are formed inside the backward pass, layer by layer.

The `"clip"` mode serves differentially private training: the slot of each use gets
its squared-norm contribution, as in `"norms"`, plus a *probe* whose value is zero
but whose derivative with respect to the shadow `g` (a leaf-shaped direction carried
to the use like a validation gradient) is the one-sided product `<g_i, g>`. The
derivative of `Σ_i w_i <g_i, g>` with respect to `g` is `Σ_i w_i g_i`: a weighted
sum of per-example gradients, formed from the same factors as the norms once the
weights are known (see `transforms._privacy._clipping`).

For the squared norm of a leaf with several uses, the cross terms `2<g_i, g_j>` are
formed by message passing: the earlier use i outputs a zero array `z_i` that the later
use j takes as an input; j's backward pass returns, as the cotangent of `z_i`, its own
gradient applied to i's forward factor, and i's backward pass (which runs after j's)
contracts it with its output gradient.

The `"moments"` mode serves the calibration of PCA projections: the slot of each use
is a pair receiving the use's second moments `Σ_t K_tᵀK_t` (output gradients) and
`Σ_t F_tᵀF_t` (inputs), from the factors every other mode contracts.

The `"plain"` mode has no taps: it evaluates the loss as traced, with its scans over
stacked layers set as in the other modes (`plain_loss`), for the plain gradients a
step takes beside its ghost pass.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex

from ._ghost_plan import (
    Analysis,
    inner_jaxpr,
    scan_operands,
)
from ._ghost_rules import (
    AbstractRule,
    clip_direction,
    cross_message,
    cross_value,
    moments,
    one_sided,
    projected,
    rule_for,
    self_norm,
)
from ._jaxpr_tables import INLINE_CALLS, REMAT, VALUE_KEEPING


@dataclasses.dataclass(frozen=True)
class _TapStatic:
    rule: AbstractRule
    mode: str
    partner_rules: tuple[AbstractRule, ...]
    has_later: bool
    acc: Any
    # moments mode: which of the (K, F) sides get their second moment
    sides: tuple[bool, bool] = (True, True)


def _z_shape(static: _TapStatic) -> tuple[int, ...]:
    return (static.rule.layout.T, static.rule.layout.Pk) if static.has_later else (0,)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _probe(rule: AbstractRule, acc, K, fwd, g):
    """Zero, with derivative `one_sided(rule, K, F, ġ)` along the direction `ġ` of
    `g` (as `clip_direction`): the product is never formed unless it is
    differentiated."""
    del rule, K, fwd, g
    return jnp.zeros((), acc)


@_probe.defjvp
def _probe_jvp(rule, acc, primals, tangents):
    K, fwd, g = primals
    g_dot = tangents[2]
    del g
    value = clip_direction(rule, K, rule.F(fwd), g_dot, acc)
    return jnp.zeros((), acc), value


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap(static, y, fwd, g, slot, partners):
    del fwd, g, partners
    # Adding the (zero) slot makes the outputs batched like the slot: an output that
    # did not depend on the example (a position embedding) would otherwise get the
    # cotangent summed over the batch.
    # (A sum of at most one entry: a moments slot may be empty, `[0, 0]`.)
    zero = jnp.sum(jnp.reshape(jax.tree.leaves(slot)[0], (-1,))[:1])
    return y + zero.astype(y.dtype), jnp.zeros(_z_shape(static), static.acc) + zero


def _tap_fwd(static, y, fwd, g, slot, partners):
    out = _tap(static, y, fwd, g, slot, partners)
    return out, (fwd, g, tuple(p[1] for p in partners))


def _tap_bwd(static, residuals, cotangents):
    fwd, g, partner_fwds = residuals
    ct_y, ct_z = cotangents
    rule = static.rule
    K = rule.K(ct_y)
    F = rule.F(fwd)
    partner_cts = ()
    if static.mode in ("norms", "clip"):
        value = self_norm(rule.layout, K, F)
        if static.has_later:
            value = value + 2 * cross_value(K, ct_z)
        partner_cts = tuple(
            (
                cross_message(r.layout, r.F(f), rule.layout, K, F).astype(static.acc),
                None,
            )
            for r, f in zip(static.partner_rules, partner_fwds)
        )
        if static.mode == "clip":
            value = value + _probe(rule, static.acc, K, fwd, g)
    elif static.mode == "dots":
        value = one_sided(rule, K, F, g)
    elif static.mode == "project":
        value = projected(K, F, *g)
    elif static.mode == "moments":
        value = moments(rule.layout, K, F, static.sides)
    else:
        value = jax.vmap(lambda gv: one_sided(rule, K, F, gv))(g)
    value = jax.tree.map(lambda v: v.astype(static.acc), value)
    return ct_y, None, None, value, partner_cts


_tap.defvjp(_tap_fwd, _tap_bwd)


def bind(eqn, invals: Sequence[Any]) -> list:
    """Apply one jaxpr equation to concrete (or traced) inputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: Sequence[Any] = ()
    if isinstance(params, tuple):
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        with ctx:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


@dataclasses.dataclass
class _Run:
    analysis: Analysis
    mode: str
    slots: dict[int, Any]
    acc: Any
    lead: int
    rules: dict[int, AbstractRule]
    # project mode: uid -> the (K side, F side) projection matrices of the use
    projections: dict[int, tuple] = dataclasses.field(default_factory=dict)
    # moments mode: uid -> which of the (K, F) sides get their second moment
    sides: dict[int, tuple[bool, bool]] = dataclasses.field(default_factory=dict)


class _Scope:
    """Messages between uses of one leaf within one traced body."""

    def __init__(self):
        self.z: dict[int, tuple[Any, Any]] = {}


# The modes that carry a shadow (a validation gradient's view) alongside each leaf.
_SHADOWED = ("dots", "matrix", "clip")


def _is_var(v) -> bool:
    return isinstance(v, jex.Var) and not isinstance(v, jex.DropVar)


def _relabel(eqn, s, lead: int):
    if eqn.primitive.name in VALUE_KEEPING:
        return s
    if lead:
        return jax.vmap(lambda x: bind(eqn, [x])[0])(s)
    return bind(eqn, [s])[0]


def _evaluate(run: _Run, jaxpr, consts, args, shadows, scope: _Scope) -> list:
    env: dict[Any, Any] = {}
    shadow: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, s in zip(jaxpr.invars, args, shadows):
        env[v] = x
        if s is not None:
            shadow[v] = s
    sites = run.analysis.sites
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        key = id(eqn)
        site = sites.get(key)
        if site is not None and run.mode != "plain":
            g = None
            if run.mode == "project":
                g = run.projections[site.uid]
            elif run.mode not in ("norms", "moments"):
                g = shadow[eqn.invars[site.operand]]
            outs = [_apply_site(run, site, eqn, invals, g, scope)]
        elif key in run.analysis.live_containers:
            in_shadows = [shadow.get(v) if _is_var(v) else None for v in eqn.invars]
            outs = _container(run, eqn, invals, in_shadows, scope)
        else:
            outs = bind(eqn, invals)
            if run.mode in _SHADOWED and key in run.analysis.relabel_eqns:
                s = shadow.get(eqn.invars[0]) if _is_var(eqn.invars[0]) else None
                if s is not None:
                    shadow[eqn.outvars[0]] = _relabel(eqn, s, run.lead)
        for v, x in zip(eqn.outvars, outs):
            if _is_var(v):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _apply_site(run: _Run, site, eqn, invals, g, scope: _Scope):
    (y,) = bind(eqn, invals)
    rule = run.rules[site.uid]
    fwd = rule.fwd_inputs(invals)
    partners = ()
    partner_rules = ()
    norms = run.mode in ("norms", "clip")
    if norms:
        partners = tuple(scope.z[p.uid] for p in site.partners)
        partner_rules = tuple(run.rules[p.uid] for p in site.partners)
    static = _TapStatic(
        rule=rule,
        mode=run.mode,
        partner_rules=partner_rules,
        has_later=norms and site.has_later,
        acc=run.acc,
        sides=run.sides.get(site.uid, (True, True)),
    )
    y, z = _tap(static, y, fwd, g, run.slots[site.uid], partners)  # pyright: ignore
    if static.has_later:
        scope.z[site.uid] = (z, fwd)
    return y


def _container(run: _Run, eqn, invals, in_shadows, scope: _Scope) -> list:
    name = eqn.primitive.name
    if name in INLINE_CALLS:
        inner, consts = inner_jaxpr(eqn)
        return _evaluate(run, inner, consts, invals, in_shadows, scope)
    if name in REMAT:
        inner, consts = inner_jaxpr(eqn)

        def body(*args):
            return _evaluate(run, inner, consts, args, in_shadows, _Scope())

        p = eqn.params
        return list(
            jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])(
                *invals
            )
        )
    return _scan(run, eqn, invals, in_shadows)


def _scan(run: _Run, eqn, invals, in_shadows) -> list:
    p = eqn.params
    body, body_consts, n_consts, n_carry = scan_operands(eqn)
    consts = invals[:n_consts]
    init = invals[n_consts : n_consts + n_carry]
    xs = invals[n_consts + n_carry :]
    const_shadows = in_shadows[:n_consts]
    xs_shadows = in_shadows[n_consts + n_carry :]
    # A validation-gradient view with a leading per-validation-example axis is scanned
    # over its second axis, like the parameter it shadows.
    scanned = [jnp.moveaxis(s, run.lead, 0) for s in xs_shadows if s is not None]
    # A projection slot of a use on a leaf this scan steps through (a stacked layer)
    # has the leaf's stacked axis: each iteration writes its own slice.
    stepped = {
        site.uid: run.slots[site.uid]
        for site in run.analysis.sites.values()
        if site.slicers
        and site.slicers[0] == id(eqn)
        and run.mode in ("project", "moments")
    }

    def step(carry, x):
        x_vals, x_shadows, x_slots = x
        body_run = run
        if x_slots:
            body_run = dataclasses.replace(
                run, slots={**run.slots, **x_slots}, analysis=_peeled(run, x_slots)
            )
        it = iter(x_shadows)
        shadows = (
            list(const_shadows)
            + [None] * n_carry
            + [next(it) if s is not None else None for s in xs_shadows]
        )
        outs = _evaluate(
            body_run, body, body_consts, [*consts, *carry, *x_vals], shadows, _Scope()
        )
        return outs[:n_carry], outs[n_carry:]

    carry, ys = lax.scan(
        step,
        list(init),
        (list(xs), scanned, stepped),
        length=p["length"],
        reverse=p["reverse"],
        unroll=_unroll(run, eqn),
    )
    return [*carry, *ys]


def _unroll(run: _Run, eqn) -> int | bool:
    """How many iterations of the loss's `lax.scan` `eqn` the pass unrolls.

    A scan that steps through a leaf with ghost uses is a stack of layers; with the
    transform's `unroll_layers` (by default on a GPU or TPU) the pass unrolls it
    fully. XLA then keeps each layer's saved values as buffers of their own, where a
    rolled scan stacks them into arrays that it first fills with zeros, and
    schedules across layers. Other scans (over time steps, possibly long) keep the
    loss's own setting.
    """
    if unrolls_a_stack(run.analysis) and any(
        id(eqn) in site.slicers for site in run.analysis.sites.values()
    ):
        return True
    return eqn.params["unroll"]


def unrolls_a_stack(analysis: Analysis) -> bool:
    """Whether the passes unroll a scan of the loss: `unroll_layers` is on and the
    loss scans over a leaf with ghost uses (see `_unroll`)."""
    return analysis.unroll_layers and any(
        site.slicers for site in analysis.sites.values()
    )


def _peeled(run: _Run, x_slots: dict) -> Analysis:
    """The analysis seen inside a scan body: the uses whose slots the scan slices
    have one enclosing slicer fewer (a nested scan may slice them further)."""
    sites = {}
    for key, site in run.analysis.sites.items():
        if site.uid in x_slots:
            site = dataclasses.replace(site, slicers=site.slicers[1:])
        sites[key] = site
    return dataclasses.replace(run.analysis, sites=sites)


@dataclasses.dataclass
class _Pass:
    """The vmapped per-example loss of a ghost pass, as a function of the leaves
    shared by all examples, the per-example copies of the directly materialised
    leaves and the zero slots whose cotangents receive the contributions."""

    losses: Callable
    shared: list[int]
    direct: list[int]
    shared_vals: list
    direct_vals: list
    slots: dict


def _prepare(
    analysis, leaves, batch, *, mode, acc, views, n_val, projections=None, sides=None
) -> _Pass:
    n = analysis.n_leaves
    B = jnp.shape(batch[0])[0]
    treatment = analysis.treatment
    direct = [
        i
        for i in range(n)
        if treatment[i] == "materialised"
        or (
            treatment[i] == "fallback"
            and mode in ("norms", "clip", "matrix", "project", "moments")
        )
    ]
    shared = [i for i in range(n) if i not in direct]
    slot_shape = (B, n_val) if mode == "matrix" else (B,)
    sites = sorted(analysis.sites.values(), key=lambda s: s.uid)
    if mode == "project":
        assert projections is not None
        slots = {
            s.uid: jnp.zeros(
                (B,)
                + tuple(jnp.shape(leaves[s.leaf])[: len(s.slicers)])
                + (projections[s.uid][0].shape[0], projections[s.uid][1].shape[0]),
                acc,
            )
            for s in sites
        }
    elif mode == "moments":
        slots = {}
        for s in sites:
            lead = (B,) + tuple(jnp.shape(leaves[s.leaf])[: len(s.slicers)])
            layout = rule_for(s).layout
            keep = (sides or {}).get(s.uid, (True, True))
            slots[s.uid] = tuple(
                jnp.zeros(lead + (n, n) if kept else lead + (0, 0), acc)
                for n, kept in zip((layout.Pk, layout.Pf), keep)
            )
    else:
        slots = {s.uid: jnp.zeros(slot_shape, acc) for s in sites}
    rules = {s.uid: rule_for(s) for s in sites}
    shadows = [None] * n
    if mode in _SHADOWED:
        assert views is not None
        for i in range(n):
            if treatment[i] == "ghost":
                shadows[i] = views[i]
    closed = analysis.closed

    def per_example(shared_vals, direct_vals, slot_vals, example):
        vals: list[Any] = [None] * n
        for i, x in zip(shared, shared_vals):
            vals[i] = x
        for i, x in zip(direct, direct_vals):
            vals[i] = x
        run = _Run(
            analysis=analysis,
            mode=mode,
            slots=slot_vals,
            acc=acc,
            lead=1 if mode == "matrix" else 0,
            rules=rules,
            projections=projections or {},
            sides=sides or {},
        )
        (loss,) = _evaluate(
            run,
            closed.jaxpr,
            closed.consts,
            [*vals, *example],
            shadows + [None] * len(example),
            _Scope(),
        )
        return loss

    def losses(shared_vals, direct_vals, slot_vals):
        return jax.vmap(per_example, in_axes=(None, 0, 0, 0))(
            shared_vals, direct_vals, slot_vals, tuple(batch)
        )

    return _Pass(
        losses=losses,
        shared=shared,
        direct=direct,
        shared_vals=[leaves[i] for i in shared],
        direct_vals=[
            jnp.broadcast_to(leaves[i], (B,) + jnp.shape(leaves[i])) for i in direct
        ],
        slots=slots,
    )


def ghost_pass(
    analysis: Analysis,
    leaves: Sequence[Any],
    batch: Sequence[Any],
    *,
    mode: str,
    acc: Any,
    views: Sequence[Any] | None = None,
    n_val: int = 0,
    param_grads: bool = False,
    projections: dict[int, tuple] | None = None,
    sides: dict[int, tuple[bool, bool]] | None = None,
) -> dict[str, Any]:
    """One forward and backward pass over the batch with taps at the ghost uses.

    **Arguments:**

    - `analysis`: from `_ghost_plan.analyse` on one example of `batch`.
    - `leaves`: the model's inexact leaves.
    - `batch`: tuple of arrays with a leading batch axis.
    - `mode`: `"norms"` (squared norms), `"dots"` (dot products with `views`, one
      validation gradient per leaf), `"matrix"` (dot products with `n_val`
      gradients per leaf, stacked on a leading axis of `views`) or `"clip"` (squared
      norms plus a zero probe whose derivative along `views` is the dot product; see
      the module's docstring), or `"project"` (each use's projected per-example
      gradient `Σ_t (P_K K_t)(P_F F_t)ᵀ`, for the matrices `projections[uid]`;
      needs an analysis in the project mode), or `"moments"` (each use's pair of
      second moments `(Σ_t K_tᵀK_t, Σ_t F_tᵀF_t)`, with a project-mode analysis;
      `sides[uid]` may leave either out, a `[0, 0]` array in its place).
      `"norms"` and `"clip"` need an analysis in the norms mode.
    - `acc`: dtype of the contributions.
    - `param_grads`: also return the gradient of the summed loss for every leaf.

    **Returns:**

    A dict with `losses` `[B]`; `sites` (uid -> `[B]` or `[B, n_val]` contribution);
    `per_example` (leaf index -> `[B, ...]` per-example gradient) for the leaves whose
    per-example gradients are formed directly; and `grads` (leaf index -> summed
    gradient) if `param_grads`.
    """
    p = _prepare(
        analysis,
        leaves,
        batch,
        mode=mode,
        acc=acc,
        views=views,
        n_val=n_val,
        projections=projections,
        sides=sides,
    )

    def total(shared_vals, direct_vals, slot_vals):
        losses = p.losses(shared_vals, direct_vals, slot_vals)
        return jnp.sum(losses), losses

    argnums = (0, 1, 2) if param_grads else (1, 2)
    grads, losses = jax.grad(total, argnums=argnums, has_aux=True)(
        p.shared_vals, p.direct_vals, p.slots
    )
    if param_grads:
        g_shared, g_direct, g_slots = grads
    else:
        g_direct, g_slots = grads
        g_shared = None
    out: dict[str, Any] = {
        "losses": losses,
        "sites": g_slots,
        "per_example": dict(zip(p.direct, g_direct)),
    }
    if param_grads:
        assert g_shared is not None
        summed = dict(zip(p.shared, g_shared))
        for i, g in zip(p.direct, g_direct):
            summed[i] = jnp.sum(g, axis=0)
        out["grads"] = summed
    return out


def ghost_vjp(
    analysis: Analysis, leaves: Sequence[Any], batch: Sequence[Any], *, acc: Any
) -> tuple[jax.Array, Callable]:
    """The forward pass of a norms-mode ghost pass, and its backward pass as a
    function that may be called more than once with different per-example seeds.

    **Returns:**

    `(losses, backward)`: the `[B]` losses, and `backward(seeds)` for `[B]` weights
    `seeds`, the backward pass of `Σ_i seeds_i l_i`, returning a dict with `grads`
    (leaf index -> `Σ_i seeds_i ∇l_i` for the leaves shared by the examples),
    `per_example` (leaf index -> the `[B, ...]` gradients `seeds_i ∇l_i` of the
    directly materialised leaves) and `sites` (uid -> the `[B]` squared-norm
    contributions, times `seeds_i²`). Every call reuses the one forward pass; what a
    call leaves unused is removed by the compiler.
    """
    p = _prepare(analysis, leaves, batch, mode="norms", acc=acc, views=None, n_val=0)
    losses, pullback = jax.vjp(p.losses, p.shared_vals, p.direct_vals, p.slots)

    def backward(seeds):
        g_shared, g_direct, g_slots = pullback(seeds.astype(losses.dtype))
        return {
            "grads": dict(zip(p.shared, g_shared)),
            "per_example": dict(zip(p.direct, g_direct)),
            "sites": g_slots,
        }

    return losses, backward


def plain_loss(analysis: Analysis, acc: Any) -> Callable:
    """The loss `per_example(leaves, *example)` traced in `analysis`, evaluated again
    equation by equation without taps, its scans over stacked layers set as the
    ghost passes set them (`_unroll`).

    A step's plain passes (the attribution step's validation gradient) take it so
    that on a GPU they unroll the stack as its ghost pass does; their values are the
    loss's own.
    """
    closed = analysis.closed

    def per_example(leaves, *example):
        run = _Run(analysis=analysis, mode="plain", slots={}, acc=acc, lead=0, rules={})
        args = [*leaves, *example]
        (loss,) = _evaluate(
            run, closed.jaxpr, closed.consts, args, [None] * len(args), _Scope()
        )
        return loss

    return per_example


def leaf_contributions(
    analysis: Analysis, site_values: dict[int, Any], zero: Callable[[], Any]
) -> list[Any]:
    """Sum the per-use contributions of each leaf (`zero()` for leaves without uses)."""
    per_leaf: list[Any] = [None] * analysis.n_leaves
    for site in analysis.sites.values():
        value = site_values[site.uid]
        per_leaf[site.leaf] = (
            value if per_leaf[site.leaf] is None else per_leaf[site.leaf] + value
        )
    return [zero() if v is None else v for v in per_leaf]
