"""The analysis of the ghost path: how the traced per-example loss uses each parameter.

The loss is traced once to a jaxpr and walked, through relabellings (casts,
transposes, reshapes), nested calls and scans, to find every use of every parameter
leaf. Each leaf gets a treatment (ghost, materialised, fallback or unused), reported
as a `GhostPlan`; `_ghost_eval.py` carries the decisions out.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from ._ghost_rules import norm_route, rule_for
from ._jaxpr_tables import INLINE_CALLS, RELABEL, REMAT, VALUE_KEEPING


Mode = Literal["norms", "dots", "project"]


def inner_jaxpr(eqn) -> tuple[Any, list]:
    """The jaxpr and constants of a call-like equation (jit, closed_call, remat)."""
    params = eqn.params
    sub = params["jaxpr"] if "jaxpr" in params else params["call_jaxpr"]
    if isinstance(sub, jex.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    return sub, []


def scan_operands(eqn) -> tuple[Any, list, int, int]:
    """A `scan` equation's body jaxpr and constants, and how many of its operands are
    loop constants and carries (the remaining ones are scanned over).

    JAX 0.10 records the counts as `num_consts` and `num_carry`; later versions
    record the three operand groups as a flat tree in `ft_in`.
    """
    body, consts = inner_jaxpr(eqn)
    params = eqn.params
    if "num_consts" in params:
        return body, consts, params["num_consts"], params["num_carry"]
    groups = params.get("ft_in")
    try:
        children = groups.unpack() if hasattr(groups, "unpack") else tuple(groups)
        sizes = [len(child) for child in children]
    except TypeError:
        sizes = []
    if len(sizes) != 3 or sum(sizes) != len(eqn.invars):
        raise NotImplementedError(
            "ghost engines: cannot read the operand layout of `lax.scan` in JAX "
            f"{jax.__version__} (parameters {sorted(params)}); use method='vmap' or "
            "'jvp'."
        )
    return body, consts, sizes[0], sizes[1]


@dataclasses.dataclass(frozen=True)
class _Alias:
    """A variable that is a relabelling of (a slice of) one parameter leaf.

    `dims[i]` is the leaf axis behind axis `i` of the variable, or `dims is None` once a
    reshape or reversal has mixed axes. `context` names the `lax.scan` / remat bodies
    the variable lives in; `repeated` marks a leaf closed over by a scan body (used
    once per iteration, so its uses interact across iterations).
    """

    leaf: int
    dims: tuple[int, ...] | None
    context: tuple[int, ...]
    repeated: bool
    sliced: int = 0
    # the `lax.scan` equations (outermost first) that slice the leaf's leading axes
    slicers: tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class Site:
    """One use of a parameter leaf that the ghost rules handle."""

    uid: int
    leaf: int
    kind: str
    eqn: Any
    operand: int
    dims: tuple[int, ...] | None
    context: tuple[int, ...]
    repeated: bool
    partners: tuple["Site", ...] = ()
    has_later: bool = False
    slicers: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class GhostLeaf:
    """How one parameter leaf is treated; an entry of [`transforms.GhostPlan`][].

    `uses` names the kind of each use of the leaf (`"matmul"`, `"conv"`, `"gather"`,
    `"dynamic_slice"`, `"slice"`). For a `"ghost"` leaf of a norms plan, `routes`
    says how the squared norm of each use is computed, in the same order: `"Gram, T
    = ..."` (two `T × T` Gram matrices of the use's `T` rows), `"formed, p × q"` (the
    use's `p × q` per-example gradient is formed, when `2T² > p·q`) or `"row sums"`
    (an embedding-like use). Empty otherwise.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    treatment: str
    uses: tuple[str, ...]
    reason: str
    routes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GhostPlan:
    """Which parameters the ghost path handles by layer rules and which it does not.

    Returned by the `.plan(...)` method of [`transforms.per_sample_grad_norms`][],
    [`transforms.grad_dot_products`][] and [`transforms.make_attribution_step`][].
    Every inexact leaf of the model appears once in `leaves`, with a `treatment`:

    - `"ghost"`: every use is a matrix product, an embedding lookup (gather, dynamic or
      static slice of rows) or a convolution, handled from activations and output
      gradients without a per-example copy of the whole leaf. For norms, each use
      states its route: `Gram, T = ...` (cost `~T²(p + q)` per example, for the `T`
      rows of the use) or `formed, p × q` (the use's `p × q` gradient is formed per
      example and squared, cost `~T·p·q`, chosen when `2T² > p·q`), or `row sums`
      for a lookup;
    - `"materialised"`: a vector-like leaf (at most one axis longer than 1: biases,
      LayerNorm scales) whose per-example gradients are formed directly; cheap;
    - `"fallback"`: a larger leaf with some other use (named in `reason`); its
      contribution is computed exactly by the jvp path (dot products) or by per-example
      gradients of that leaf only (norms);
    - `"unused"`: the loss does not depend on it; it contributes exactly zero.

    The plan of [`transforms.ProjectedGrads`][] (mode `"project"`) also sends to the
    fallback a leaf whose uses do not all split it into (first axis | the rest),
    since its projection `P_out ∇W P_inᵀ` is summed over uses in that orientation.
    """

    mode: str
    leaves: tuple[GhostLeaf, ...]

    @property
    def fallback(self) -> tuple[str, ...]:
        """Paths of the leaves on the fallback path."""
        return tuple(leaf.path for leaf in self.leaves if leaf.treatment == "fallback")

    def __str__(self) -> str:
        lines = [f"GhostPlan ({self.mode}):"]
        for leaf in self.leaves:
            if leaf.routes:
                uses = "; ".join(f"{u}: {r}" for u, r in zip(leaf.uses, leaf.routes))
            else:
                uses = ", ".join(leaf.uses) or "-"
            extra = f"  [{leaf.reason}]" if leaf.reason else ""
            lines.append(
                f"  {leaf.path or '<root>'} {leaf.shape} {leaf.dtype}: "
                f"{leaf.treatment} ({uses}){extra}"
            )
        return "\n".join(lines)


def vector_like(shape: Sequence[int]) -> bool:
    return sum(1 for n in shape if n > 1) <= 1


class _Walker:
    def __init__(self):
        self.sites: list[Site] = []
        self.opaque: dict[int, list[str]] = {}
        self.relabel_eqns: set[int] = set()
        # container equation id -> uids of the sites inside it (transitively)
        self.containers: dict[int, set[int]] = {}
        # leaf -> most leading axes a scan slices off it (a stacked layer's axis)
        self.sliced: dict[int, int] = {}
        self._stack: list[int] = []

    def _opaque(self, alias: _Alias, reason: str) -> None:
        reasons = self.opaque.setdefault(alias.leaf, [])
        if reason not in reasons:
            reasons.append(reason)

    def _site(self, alias: _Alias, kind: str, eqn, operand: int) -> None:
        site = Site(
            uid=len(self.sites),
            leaf=alias.leaf,
            kind=kind,
            eqn=eqn,
            operand=operand,
            dims=alias.dims,
            context=alias.context,
            repeated=alias.repeated,
            slicers=alias.slicers,
        )
        self.sites.append(site)
        for container in self._stack:
            self.containers[container].add(site.uid)

    def walk(self, jaxpr, aliases: dict) -> None:
        for eqn in jaxpr.eqns:
            found = [
                (i, aliases[v])
                for i, v in enumerate(eqn.invars)
                if isinstance(v, jex.Var) and v in aliases
            ]
            if found:
                self._equation(eqn, found, aliases)
        for v in jaxpr.outvars:
            if isinstance(v, jex.Var) and v in aliases:
                self._opaque(aliases[v], "returned unchanged from a sub-computation")

    def _equation(self, eqn, found, aliases) -> None:
        name = eqn.primitive.name
        if name in RELABEL and len(eqn.invars) == 1:
            alias = found[0][1]
            aliases[eqn.outvars[0]] = dataclasses.replace(
                alias, dims=_relabel_dims(eqn, alias.dims)
            )
            self.relabel_eqns.add(id(eqn))
            return
        if name in INLINE_CALLS or name in REMAT:
            inner, _ = inner_jaxpr(eqn)
            inner_aliases = {}
            for i, alias in found:
                if name in REMAT:
                    alias = dataclasses.replace(
                        alias, context=alias.context + (id(eqn),)
                    )
                inner_aliases[inner.invars[i]] = alias
            self.containers[id(eqn)] = set()
            self._stack.append(id(eqn))
            self.walk(inner, inner_aliases)
            self._stack.pop()
            return
        if name == "scan":
            self._scan(eqn, found)
            return
        if len(found) == 1:
            i, alias = found[0]
            kind = _classify(eqn, i, alias)
            if kind is not None:
                self._site(alias, kind, eqn, i)
                return
        for _, alias in found:
            self._opaque(alias, f"used by `{name}`")

    def _scan(self, eqn, found) -> None:
        body, _, n_consts, n_carry = scan_operands(eqn)
        inner_aliases = {}
        for i, alias in found:
            context = alias.context + (id(eqn),)
            if i < n_consts:
                inner_aliases[body.invars[i]] = dataclasses.replace(
                    alias, context=context, repeated=True
                )
            elif i < n_consts + n_carry:
                self._opaque(alias, "carried through `lax.scan`")
            else:
                dims = None if alias.dims is None else alias.dims[1:]
                inner_aliases[body.invars[i]] = dataclasses.replace(
                    alias,
                    dims=dims,
                    context=context,
                    sliced=alias.sliced + 1,
                    slicers=alias.slicers + (id(eqn),),
                )
                self.sliced[alias.leaf] = max(
                    self.sliced.get(alias.leaf, 0), alias.sliced + 1
                )
        self.containers[id(eqn)] = set()
        self._stack.append(id(eqn))
        self.walk(body, inner_aliases)
        self._stack.pop()


def _relabel_dims(eqn, dims):
    if dims is None:
        return None
    name = eqn.primitive.name
    if name in VALUE_KEEPING:
        return dims
    if name == "transpose":
        return tuple(dims[p] for p in eqn.params["permutation"])
    return None


def _classify(eqn, i: int, alias: _Alias) -> str | None:
    """The ghost rule for a use of a parameter as operand `i` of `eqn`, if any."""
    name = eqn.primitive.name
    shape = eqn.invars[i].aval.shape
    if name == "dot_general" and i in (0, 1):
        (_, _), (lb, rb) = eqn.params["dimension_numbers"]
        if not lb and not rb:
            return "matmul"
        return None
    if name == "conv_general_dilated" and i == 1:
        p = eqn.params
        if p["feature_group_count"] == 1 and p["batch_group_count"] == 1:
            return "conv"
        return None
    if name == "gather" and i == 0:
        p = eqn.params
        dn = p["dimension_numbers"]
        if dn.operand_batching_dims or len(_selected(shape, p["slice_sizes"])) != 1:
            return None
        (k,) = _selected(shape, p["slice_sizes"])
        return "gather" if p["slice_sizes"][k] == 1 else None
    if name == "dynamic_slice" and i == 0:
        sizes = eqn.params["slice_sizes"]
        selected = _selected(shape, sizes)
        if len(selected) == 1 and sizes[selected[0]] == 1:
            return "dynamic_slice"
        return None
    if name == "slice" and i == 0:
        p = eqn.params
        strides = p["strides"] or (1,) * len(shape)
        selected = [
            d
            for d in range(len(shape))
            if (p["start_indices"][d], p["limit_indices"][d], strides[d])
            != (0, shape[d], 1)
        ]
        return "slice" if len(selected) == 1 else None
    return None


def _selected(shape, slice_sizes) -> list[int]:
    return [d for d, (n, s) in enumerate(zip(shape, slice_sizes)) if s < n]


@dataclasses.dataclass
class Analysis:
    """The traced per-example loss and the ghost treatment of every leaf."""

    closed: Any
    n_leaves: int
    treatment: list[str]
    sliced: list[int]
    sites: dict[int, Site]
    live_containers: set[int]
    relabel_eqns: set[int]
    plan: GhostPlan
    # Whether the passes unroll a scan that steps through leaves with ghost uses (a
    # stack of layers); see `_ghost_eval._unroll`.
    unroll_layers: bool


def analyse(
    per_example: Callable,
    leaves: Sequence[Any],
    example: Sequence[Any],
    *,
    mode: Mode,
    paths: Sequence[str],
    unroll_layers: bool,
) -> Analysis:
    """Trace `per_example(leaves, *example)` and decide how each leaf is handled.

    `mode="dots"` needs only that every use of a leaf has a rule (contributions of
    separate uses add). `mode="norms"` also needs the cross terms between uses, which
    are formed only for uses in one context (not across scan iterations) whose axes
    split the leaf the same way. `unroll_layers` is recorded for the passes: whether
    they unroll a scan over stacked layers (resolved by the caller, not `"auto"`).
    """
    avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    ex_avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in example]
    closed = jax.make_jaxpr(per_example)(avals, *ex_avals)
    jaxpr = closed.jaxpr
    walker = _Walker()
    leaf_vars = jaxpr.invars[: len(leaves)]
    aliases = {
        v: _Alias(
            leaf=n, dims=tuple(range(len(avals[n].shape))), context=(), repeated=False
        )
        for n, v in enumerate(leaf_vars)
    }
    walker.walk(jaxpr, aliases)

    by_leaf: dict[int, list[Site]] = {}
    for site in walker.sites:
        by_leaf.setdefault(site.leaf, []).append(site)
    treatment, reasons = [], []
    for n, aval in enumerate(avals):
        uses = by_leaf.get(n, [])
        reason = "; ".join(walker.opaque.get(n, []))
        if not uses and not reason:
            treatment.append("unused")
        elif vector_like(aval.shape[walker.sliced.get(n, 0) :]):
            treatment.append("materialised")
        elif reason:
            treatment.append("fallback")
        elif mode == "norms" and (why := _norm_cross_problem(uses)):
            treatment.append("fallback")
            reason = why
        elif mode == "project" and (
            why := _projection_problem(uses, walker.sliced.get(n, 0))
        ):
            treatment.append("fallback")
            reason = why
        else:
            treatment.append("ghost")
        reasons.append(reason if treatment[-1] == "fallback" else "")

    sites = {}
    for n, uses in by_leaf.items():
        if treatment[n] != "ghost":
            continue
        for j, site in enumerate(uses):
            if mode == "norms":
                site.partners = tuple(uses[:j])
                site.has_later = j < len(uses) - 1
            sites[id(site.eqn)] = site
    live_uids = {s.uid for s in sites.values()}
    live_containers = {c for c, uids in walker.containers.items() if uids & live_uids}
    plan = GhostPlan(
        mode=mode,
        leaves=tuple(
            GhostLeaf(
                path=paths[n],
                shape=tuple(avals[n].shape),
                dtype=str(avals[n].dtype),
                treatment=treatment[n],
                uses=tuple(s.kind for s in by_leaf.get(n, [])),
                reason=reasons[n],
                routes=tuple(norm_route(rule_for(s)) for s in by_leaf.get(n, []))
                if mode == "norms" and treatment[n] == "ghost"
                else (),
            )
            for n in range(len(avals))
        ),
    )
    return Analysis(
        closed=closed,
        n_leaves=len(leaves),
        treatment=treatment,
        sliced=[walker.sliced.get(n, 0) for n in range(len(avals))],
        sites=sites,
        live_containers=live_containers,
        relabel_eqns=walker.relabel_eqns,
        plan=plan,
        unroll_layers=unroll_layers,
    )


def _norm_cross_problem(uses: list[Site]) -> str:
    if any(site.repeated for site in uses):
        return "used inside a `lax.scan` body it is closed over (cross-iteration terms)"
    if len(uses) == 1:
        return ""
    if len({site.context for site in uses}) > 1:
        return "used in more than one scan/remat body"
    partitions = set()
    for site in uses:
        if site.dims is None:
            return "used several times through a reshape or reversal"
        partitions.add(frozenset(leaf_side(site)))
    first = next(iter(partitions))
    every = frozenset(uses[0].dims or ())
    if len(partitions) > 1 and not all(p in (first, every - first) for p in partitions):
        return "used several times with different splits of its axes"
    return ""


def _projection_problem(uses: list[Site], sliced: int) -> str:
    """Why the projected uses of a leaf cannot be summed into its projection, if so.

    A projection splits a leaf (after the `sliced` leading axes a `lax.scan` steps
    through) into its first axis and the rest; every use must split it that way,
    one way round or the other, and be sliced by as many scans as the leaf is.
    """
    for site in uses:
        if len(site.slicers) != sliced:
            return "stacked along a `lax.scan` axis in some uses only"
        if site.dims is None:
            return "used through a reshape or reversal"
        k_side = set(leaf_side(site))
        first = {sliced}
        rest = set(site.dims) - first
        if k_side not in (first, rest):
            return "used with a split of its axes other than (first axis | the rest)"
    return ""


def leaf_side(site: Site) -> set[int]:
    """The leaf axes on the output-gradient side of a use."""
    return set(rule_for(site).layout.k_leaf_dims)
