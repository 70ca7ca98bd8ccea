"""Per-use rules of the ghost path.

Every supported use of a parameter `W` (seen through relabellings as a "view") gives the
per-example gradient of that use as a sum of outer products over the use's rows t,

    g = Σ_t K_t ⊗ F_t,

with `K_t` taken from the output gradient (the cotangent) and `F_t` known in the forward
pass: the input activation of a matrix product, the patches of a convolution, or a
one-hot row (kept as an index) for an embedding lookup. The view's axes are split into
the K side and the F side; both sides are flattened with their axes in the order of the
leaf's axes (when known), so that uses of one leaf can be paired for cross terms.

Every rule works on one example; the callers vmap over the batch.
"""

import abc
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class Index(NamedTuple):
    """A one-hot factor: row `rows[t]` of a leaf axis of size `n`, masked by `valid`."""

    rows: jax.Array
    valid: jax.Array
    n: int


def acc_dtype(*dtypes) -> Any:
    """float32 for low-precision inputs, else the inputs' own (e.g. float64) dtype."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _prod(xs) -> int:
    return int(math.prod(xs))


def _order(dims, axes):
    """`axes` of a view sorted by the leaf axis behind them (when known)."""
    if dims is None:
        return tuple(axes)
    return tuple(sorted(axes, key=lambda a: dims[a]))


def _leaf(dims, axes):
    return () if dims is None else tuple(dims[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The sizes of one use's factors: `K` is `[T, Pk]`, `F` is `[T, Pf]` (or an
    `Index` into an axis of size `Pf`), and the leaf axes behind the K side and the
    F side, in order (empty when the view's axes are not traced to the leaf)."""

    T: int
    Pk: int
    Pf: int
    k_leaf_dims: tuple[int, ...]
    f_leaf_dims: tuple[int, ...]


class AbstractRule(abc.ABC):
    """How to read one use's factors and view its gradient.

    Concrete rules are frozen dataclasses (hashable: they are static arguments of a
    `custom_vjp`) holding their `layout` and what their methods need.
    """

    layout: Layout

    @abc.abstractmethod
    def fwd_inputs(self, invals: list) -> Any:
        """What the F side needs from the use's inputs in the forward pass."""

    @abc.abstractmethod
    def K(self, ct: jax.Array) -> jax.Array:
        """The K side, `[T, Pk]`, from the cotangent of the use's output."""

    @abc.abstractmethod
    def F(self, fwd: Any) -> Any:
        """The F side, `[T, Pf]` or an `Index`, from `fwd_inputs`' result."""

    @abc.abstractmethod
    def G(self, g: jax.Array) -> jax.Array:
        """The view's gradient as a `[Pk, Pf]` matrix matching `K` and `F`."""


@dataclasses.dataclass(frozen=True)
class _Matmul(AbstractRule):
    layout: Layout
    param: int
    act_shape: tuple[int, ...]
    ct_perm: tuple[int, ...]
    act_perm: tuple[int, ...]
    g_perm: tuple[int, ...]

    def fwd_inputs(self, invals):
        return invals[1 - self.param]

    def K(self, ct):
        return jnp.transpose(ct, self.ct_perm).reshape(self.layout.T, self.layout.Pk)

    def F(self, fwd):
        return jnp.transpose(fwd, self.act_perm).reshape(self.layout.T, self.layout.Pf)

    def G(self, g):
        return jnp.transpose(g, self.g_perm).reshape(self.layout.Pk, self.layout.Pf)


def _matmul(eqn, param: int, dims) -> AbstractRule:
    (lc, rc), _ = eqn.params["dimension_numbers"]
    w_shape = eqn.invars[param].aval.shape
    act_shape = eqn.invars[1 - param].aval.shape
    cw, ca = (lc, rc) if param == 0 else (rc, lc)
    fw = [d for d in range(len(w_shape)) if d not in cw]
    fa = [d for d in range(len(act_shape)) if d not in ca]
    if param == 0:
        out_w = {d: j for j, d in enumerate(fw)}
        out_a = {d: len(fw) + j for j, d in enumerate(fa)}
    else:
        out_a = {d: j for j, d in enumerate(fa)}
        out_w = {d: len(fa) + j for j, d in enumerate(fw)}
    fw_c = _order(dims, fw)
    pairs = sorted(zip(cw, ca), key=lambda p: p[0] if dims is None else dims[p[0]])
    cw_c = tuple(int(p[0]) for p in pairs)
    ca_c = tuple(int(p[1]) for p in pairs)
    return _Matmul(
        layout=Layout(
            T=_prod(act_shape[d] for d in fa),
            Pk=_prod(w_shape[d] for d in fw),
            Pf=_prod(w_shape[d] for d in cw_c),
            k_leaf_dims=_leaf(dims, fw_c),
            f_leaf_dims=_leaf(dims, cw_c),
        ),
        param=param,
        act_shape=tuple(act_shape),
        ct_perm=tuple(out_a[d] for d in fa) + tuple(out_w[d] for d in fw_c),
        act_perm=tuple(fa) + ca_c,
        g_perm=tuple(fw_c) + cw_c,
    )


@dataclasses.dataclass(frozen=True)
class _Rows(AbstractRule):
    """Embedding-like uses: each row t of the output is row `rows[t]` of axis `k`."""

    layout: Layout
    kind: str  # "gather", "dynamic_slice" or "slice"
    k: int
    n: int
    rest_shape: tuple[int, ...]
    rest_perm: tuple[int, ...]
    g_perm: tuple[int, ...]
    ct_perm: tuple[int, ...]
    # gather: index column of axis k, bounds per index column, and the mode
    column: int | None = None
    bounds: tuple[int, ...] = ()
    fill: bool = False
    static_rows: tuple[int, ...] = ()

    def fwd_inputs(self, invals):
        if self.kind == "gather":
            return invals[1]
        if self.kind == "dynamic_slice":
            return invals[1 + self.k]
        return ()

    def K(self, ct):
        ct = jnp.transpose(ct, self.ct_perm).reshape((self.layout.T,) + self.rest_shape)
        ct = jnp.transpose(ct, (0,) + tuple(1 + p for p in self.rest_perm))
        return ct.reshape(self.layout.T, self.layout.Pk)

    def F(self, fwd):
        if self.kind == "slice":
            rows = jnp.asarray(np.asarray(self.static_rows, dtype=np.int32))
            return Index(rows, jnp.ones(self.layout.T, bool), self.n)
        if self.kind == "dynamic_slice":
            rows = jnp.clip(jnp.asarray(fwd, jnp.int32), 0, self.n - 1).reshape(1)
            return Index(rows, jnp.ones(1, bool), self.n)
        idx = jnp.asarray(fwd).reshape(self.layout.T, -1)
        if self.column is None:
            rows = jnp.zeros(self.layout.T, jnp.int32)
        else:
            rows = idx[:, self.column].astype(jnp.int32)
        if self.fill:
            valid = jnp.all((idx >= 0) & (idx <= jnp.asarray(self.bounds)), axis=1)
        else:
            valid = jnp.ones(self.layout.T, bool)
        return Index(jnp.clip(rows, 0, self.n - 1), valid, self.n)

    def G(self, g):
        return jnp.transpose(g, self.g_perm).reshape(self.layout.Pk, self.n)


def _rows_common(kind, shape, k, dims, T, ct_perm, **extra) -> AbstractRule:
    rest = [d for d in range(len(shape)) if d != k]
    rest_c = _order(dims, rest)
    return _Rows(
        layout=Layout(
            T=T,
            Pk=_prod(shape[d] for d in rest),
            Pf=shape[k],
            k_leaf_dims=_leaf(dims, rest_c),
            f_leaf_dims=_leaf(dims, (k,)),
        ),
        kind=kind,
        k=k,
        n=shape[k],
        rest_shape=tuple(shape[d] for d in rest),
        rest_perm=tuple(rest.index(d) for d in rest_c),
        g_perm=tuple(rest_c) + (k,),
        ct_perm=tuple(ct_perm),
        **extra,
    )


def _gather(eqn, dims) -> AbstractRule:
    p = eqn.params
    dn = p["dimension_numbers"]
    shape = eqn.invars[0].aval.shape
    idx_shape = eqn.invars[1].aval.shape
    out_ndim = len(eqn.outvars[0].aval.shape)
    sizes = p["slice_sizes"]
    (k,) = [d for d, (n, s) in enumerate(zip(shape, sizes)) if s < n]
    batch_pos = [d for d in range(out_ndim) if d not in dn.offset_dims]
    smap = tuple(dn.start_index_map)
    mode = p["mode"]
    fill = mode == lax.GatherScatterMode.FILL_OR_DROP
    return _rows_common(
        "gather",
        shape,
        k,
        dims,
        T=_prod(idx_shape[:-1]),
        ct_perm=tuple(batch_pos) + tuple(dn.offset_dims),
        column=smap.index(k) if k in smap else None,
        bounds=tuple(shape[m] - sizes[m] for m in smap),
        fill=fill,
    )


def _dynamic_slice(eqn, dims) -> AbstractRule:
    shape = eqn.invars[0].aval.shape
    sizes = eqn.params["slice_sizes"]
    (k,) = [d for d, (n, s) in enumerate(zip(shape, sizes)) if s < n]
    return _rows_common(
        "dynamic_slice", shape, k, dims, T=1, ct_perm=tuple(range(len(shape)))
    )


def _slice(eqn, dims) -> AbstractRule:
    p = eqn.params
    shape = eqn.invars[0].aval.shape
    strides = p["strides"] or (1,) * len(shape)
    (k,) = [
        d
        for d in range(len(shape))
        if (p["start_indices"][d], p["limit_indices"][d], strides[d])
        != (0, shape[d], 1)
    ]
    rows = tuple(range(p["start_indices"][k], p["limit_indices"][k], strides[k]))
    perm = (k,) + tuple(d for d in range(len(shape)) if d != k)
    return _rows_common(
        "slice", shape, k, dims, T=len(rows), ct_perm=perm, static_rows=rows
    )


@dataclasses.dataclass(frozen=True)
class _Conv(AbstractRule):
    layout: Layout
    lhs_perm: tuple[int, ...]
    filter_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    patch_shape: tuple[int, ...]
    patch_perm: tuple[int, ...]
    ct_perm: tuple[int, ...]
    g_perm: tuple[int, ...]

    def fwd_inputs(self, invals):
        return invals[0]

    def K(self, ct):
        return jnp.transpose(ct, self.ct_perm).reshape(self.layout.T, self.layout.Pk)

    def F(self, fwd):
        lhs = jnp.transpose(fwd, self.lhs_perm)
        patches = lax.conv_general_dilated_patches(
            lhs,
            self.filter_shape,
            self.strides,
            self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            precision=lax.Precision.HIGHEST,
        )
        patches = jnp.moveaxis(patches, 1, -1)
        patches = patches.reshape((self.layout.T,) + self.patch_shape)
        patches = jnp.transpose(patches, (0,) + tuple(1 + p for p in self.patch_perm))
        return patches.reshape(self.layout.T, self.layout.Pf)

    def G(self, g):
        return jnp.transpose(g, self.g_perm).reshape(self.layout.Pk, self.layout.Pf)


def _conv(eqn, dims) -> AbstractRule:
    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    rhs_shape = eqn.invars[1].aval.shape
    lhs_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    f_axes = tuple(rhs_spec[1:])
    f_c = _order(dims, f_axes)
    filter_shape = tuple(rhs_shape[d] for d in rhs_spec[2:])
    T = lhs_shape[lhs_spec[0]] * _prod(out_shape[d] for d in out_spec[2:])
    return _Conv(
        layout=Layout(
            T=T,
            Pk=rhs_shape[rhs_spec[0]],
            Pf=_prod(rhs_shape[d] for d in f_axes),
            k_leaf_dims=_leaf(dims, (rhs_spec[0],)),
            f_leaf_dims=_leaf(dims, f_c),
        ),
        lhs_perm=tuple(lhs_spec),
        filter_shape=filter_shape,
        strides=tuple(p["window_strides"]),
        padding=tuple(tuple(x) for x in p["padding"]),
        lhs_dilation=tuple(p["lhs_dilation"]),
        rhs_dilation=tuple(p["rhs_dilation"]),
        patch_shape=tuple(rhs_shape[d] for d in f_axes),
        patch_perm=tuple(f_axes.index(d) for d in f_c),
        ct_perm=(out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],),
        g_perm=(rhs_spec[0],) + tuple(f_c),
    )


_BUILDERS = {
    "matmul": lambda site: _matmul(site.eqn, site.operand, site.dims),
    "gather": lambda site: _gather(site.eqn, site.dims),
    "dynamic_slice": lambda site: _dynamic_slice(site.eqn, site.dims),
    "slice": lambda site: _slice(site.eqn, site.dims),
    "conv": lambda site: _conv(site.eqn, site.dims),
}


def rule_for(site) -> AbstractRule:
    """The rule of a use site (see `transforms._grad._ghost_plan.Site`)."""
    return _BUILDERS[site.kind](site)


# ---------------------------------------------------------------------------------
# The maths on factors, for one example.


def _einsum(spec, *xs, acc):
    return jnp.einsum(spec, *xs, preferred_element_type=acc)


def uses_gram(layout: Layout) -> bool:
    """Whether a use's squared norm goes through two `T × T` Gram matrices (cost
    about `T²(Pk + Pf)`) rather than its `Pk × Pf` gradient formed per example (cost
    about `T·Pk·Pf`): the Gram route when `2T² ≤ Pk·Pf`."""
    return 2 * layout.T * layout.T <= layout.Pk * layout.Pf


def norm_route(rule: AbstractRule) -> str:
    """How `self_norm` computes the squared norm of one use, in words.

    `"row sums"` for an embedding-like use (output gradients summed per index),
    `"Gram, T = ..."` for the Gram-matrix route, `"formed, Pk × Pf"` when the use's
    per-example gradient is formed.
    """
    if isinstance(rule, _Rows):
        return "row sums"
    layout = rule.layout
    if uses_gram(layout):
        return f"Gram, T = {layout.T}"
    return f"formed, {layout.Pk} × {layout.Pf}"


def self_norm(layout: Layout, K: jax.Array, F) -> jax.Array:
    """`‖Σ_t K_t ⊗ F_t‖²` of one use, accumulated in float32 or wider."""
    acc = acc_dtype(K.dtype)
    if isinstance(F, Index):
        # Rows with the same index add before squaring: sum them per distinct index.
        K = jnp.where(F.valid[:, None], K, 0)
        order = jnp.argsort(F.rows)
        rows = F.rows[order]
        segment = jnp.concatenate(
            [
                jnp.zeros(1, jnp.int32),
                jnp.cumsum(rows[1:] != rows[:-1], dtype=jnp.int32),
            ]
        )
        sums = jax.ops.segment_sum(K[order].astype(acc), segment, num_segments=layout.T)
        return jnp.sum(sums * sums)
    acc = acc_dtype(K.dtype, F.dtype)
    if uses_gram(layout):
        kk = _einsum("tk,sk->ts", K, K, acc=acc)
        ff = _einsum("tf,sf->ts", F, F, acc=acc)
        return jnp.sum(kk * ff)
    m = _einsum("tk,tf->kf", K, F, acc=acc)
    return jnp.sum(m * m)


def one_sided(rule: AbstractRule, K: jax.Array, F, g: jax.Array) -> jax.Array:
    """`<Σ_t K_t ⊗ F_t, G> = Σ_t K_tᵀ G F_t` for the view's gradient `g`."""
    gm = rule.G(g)
    if isinstance(F, Index):
        acc = acc_dtype(K.dtype, gm.dtype)
        rows = jnp.transpose(gm)[F.rows]
        rows = jnp.where(F.valid[:, None], rows, 0)
        return _einsum("tk,tk->", K, rows.astype(K.dtype), acc=acc)
    acc = acc_dtype(K.dtype, F.dtype)
    return _dense_one_sided(K, F, gm, products=acc, acc=acc)


def clip_direction(rule: AbstractRule, K: jax.Array, F, g: jax.Array, acc) -> jax.Array:
    """`one_sided(rule, K, F, g)`, written for its transpose.

    The `"clip"` mode never evaluates it: it transposes it into `Σ_i w_i Σ_t K_t ⊗
    F_t`, the weight gradient of a backward pass seeded with the clip factors, and
    is written so that this transpose costs what a plain backward pass's weight
    gradient does: its products run in the factors' own dtype (`one_sided` asks
    for `acc` products, whose transpose would multiply float32 copies of bfloat16
    factors: twice the memory and traffic, and slower products), and the clip
    factors scale the narrower side (see `_dense_one_sided`).

    An embedding-like use keeps `one_sided`: its transpose is a scatter-add, which
    must not accumulate in bfloat16.
    """
    if isinstance(F, Index):
        return one_sided(rule, K, F, g).astype(acc)
    dtype = jnp.result_type(K.dtype, F.dtype)
    G = rule.G(g).astype(dtype)
    return _dense_one_sided(K.astype(dtype), F.astype(dtype), G, products=None, acc=acc)


def _dense_one_sided(K, F, G, *, products, acc) -> jax.Array:
    """`Σ_t K_tᵀ G F_t`, with `G` multiplied against the wider of the two sides.

    The other order would form a `[T, wide]` intermediate (for a vocabulary-wide
    head, `T × vocabulary` per example, in `products`' dtype) where this one forms
    `[T, narrow]`, for the same multiply-adds; transposed (the `"clip"` mode), it
    scales the narrow side by the clip factors. `products` is the products'
    preferred dtype (`None`: the factors' own), `acc` the sum's.
    """
    if K.shape[-1] >= F.shape[-1]:
        narrow, h = F, _einsum("tk,kf->tf", K, G.astype(K.dtype), acc=products)
    else:
        narrow, h = K, _einsum("tf,kf->tk", F, G.astype(F.dtype), acc=products)
    return jnp.sum(narrow.astype(h.dtype) * h, dtype=acc)


def projected(K: jax.Array, F, P_K: jax.Array, P_F: jax.Array) -> jax.Array:
    """`Σ_t (P_K K_t)(P_F F_t)ᵀ`, the use's gradient projected on both sides to
    `[k_K, k_F]`, without forming its `Pk × Pf` gradient: each side is projected
    per row (cost `~T·(Pk·k_K + Pf·k_F)`), then one `[k_K, T] × [T, k_F]` product."""
    acc = acc_dtype(K.dtype, P_K.dtype)
    kp = _einsum("tk,ak->ta", K, P_K.astype(K.dtype), acc=acc)
    if isinstance(F, Index):
        fp = jnp.transpose(P_F)[F.rows].astype(acc)
        fp = jnp.where(F.valid[:, None], fp, 0)
    else:
        fp = _einsum("tf,bf->tb", F, P_F.astype(F.dtype), acc=acc)
    return _einsum("ta,tb->ab", kp, fp, acc=acc)


def moments(
    layout: Layout, K: jax.Array, F, sides: tuple[bool, bool] = (True, True)
) -> tuple[jax.Array, jax.Array]:
    """The uncentred second moments of one use's two sides, `(Σ_t K_tᵀK_t [Pk, Pk],
    Σ_t F_tᵀF_t [Pf, Pf])`; a one-hot side gives the diagonal of its row counts. A
    side left out by `sides` is a `[0, 0]` array: too large to be worth forming."""
    acc = acc_dtype(K.dtype) if isinstance(F, Index) else acc_dtype(K.dtype, F.dtype)
    kk = _einsum("tk,tl->kl", K, K, acc=acc) if sides[0] else jnp.zeros((0, 0), acc)
    if not sides[1]:
        return kk, jnp.zeros((0, 0), acc)
    if isinstance(F, Index):
        counts = jnp.zeros(layout.Pf, acc).at[F.rows].add(F.valid.astype(acc))
        return kk, jnp.diag(counts)
    return kk, _einsum("tf,tg->fg", F, F, acc=acc)


def _fdot(a, b) -> jax.Array:
    """`M[t, s] = a_t · b_s` for two factors on the same leaf axes."""
    if isinstance(a, Index) and isinstance(b, Index):
        same = a.rows[:, None] == b.rows[None, :]
        return (same & a.valid[:, None] & b.valid[None, :]).astype(jnp.float32)
    if isinstance(a, Index):
        m = jnp.transpose(b[:, a.rows])
        return jnp.where(a.valid[:, None], m, 0)
    if isinstance(b, Index):
        m = a[:, b.rows]
        return jnp.where(b.valid[None, :], m, 0)
    return _einsum("tf,sf->ts", a, b, acc=acc_dtype(a.dtype, b.dtype))


def cross_message(
    layout_i: Layout, F_i, layout_j: Layout, K_j: jax.Array, F_j
) -> jax.Array:
    """What a later use j sends back to an earlier use i of the same leaf.

    Returns `R` of shape `[T_i, Pk_i]` with `R_t = g_j · F_i,t` (g_j oriented so that
    its rows are i's K side); i then forms `<g_i, g_j> = Σ_t K_i,t · R_t`.
    """
    acc = acc_dtype(K_j.dtype)
    if set(layout_i.k_leaf_dims) == set(layout_j.k_leaf_dims):
        m = _fdot(F_i, F_j)
        return _einsum("ts,sk->tk", m.astype(acc), K_j.astype(acc), acc=acc)
    m = _fdot(F_i, K_j).astype(acc)
    if isinstance(F_j, Index):
        weights = jnp.where(F_j.valid[None, :], m, 0)
        out = jnp.zeros((m.shape[0], F_j.n), acc)
        return out.at[:, F_j.rows].add(weights)
    return _einsum("ts,sf->tf", m, F_j.astype(acc), acc=acc)


def cross_value(K_i: jax.Array, R: jax.Array) -> jax.Array:
    acc = acc_dtype(K_i.dtype, R.dtype)
    return jnp.sum(K_i.astype(acc) * R.astype(acc))
