"""TiDHy's inner loop as Pallas kernels (`InferenceConfig(implementation="pallas")`).

Why: on a GPU the XLA loop runs about 28 small kernels per inner iteration, each
around 2 µs however little it computes, and a paper-size epoch is some 20 000
iterations. Here one iteration of a block of windows is one piece of kernel code:
the energy's gradient written out by hand (decoder, mixture of the precomputed
basis, hypernetwork with its LayerNorm), the Nesterov step, the soft thresholds and
the relative-change test.

- Per-window mode: every window stops on its own, so a program runs the whole loop
    for its block of windows: one kernel launch per time step.
- Reference mode: the stopping test and the step size (`lr / B`) involve the whole
    batch, so an iteration is two launches: the update of every block, writing
    partial sums of its squared changes and norms, then a single program that
    folds them into the loop's state (step, converged, finite, relative change).
    No XLA operation sits between them, so the iterates are the same whatever
    `check_every` is.

Every dimension is zero-padded to a power of two of at least 16 (Triton's block
shapes and matrix products); the padding provably stays zero (the padded rows and
columns of every weight are zero) and the LayerNorm's statistics use the real width
only. Products run in full float32 (`Precision.HIGHEST`). On a CPU the kernels run
in Pallas' interpreter, for tests only: it is slow.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ._model import TiDHy


# Windows per program. 32 keeps the block of basis predictions (32 x 16 x 16) in
# registers; the tuning on a GPU is still to be measured.
BLOCK_WINDOWS = 32
_NUM_WARPS = 4
_LN_EPS = 1e-5  # the hypernetwork's LayerNorm (`eqx.nn.LayerNorm(H, eps=1e-5)`)
# Columns of the reference mode's per-block partial sums.
_PARTIALS = 8
# The reference mode's loop state: step, converged, finite, relative change.
_STATUS = 4


def _padded(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def unsupported_reason(model: TiDHy) -> str | None:
    """Why the kernels cannot run `model`, or `None` if they can."""
    if model.nonlinear_decoder:
        return "a nonlinear decoder (`nonlinear_decoder=True`)"
    if model.dyn_bias:
        return "the gated dynamics bias (`dyn_bias=True`)"
    return None


class _Weights(NamedTuple):
    """The model's parameters, zero-padded, in both orientations where a product
    needs them (a transpose inside a kernel costs a shuffle)."""

    dec_t: jax.Array  # (R, D)
    dec: jax.Array  # (D, R)
    dec_b: jax.Array  # (D,)
    in_t: jax.Array  # (R2, H)
    in_: jax.Array  # (H, R2)
    in_b: jax.Array  # (H,)
    gamma: jax.Array  # (H,)
    beta: jax.Array  # (H,)
    hid_t: jax.Array  # (H, H)
    hid: jax.Array  # (H, H)
    hid_b: jax.Array  # (H,)
    out_t: jax.Array  # (H, M)
    out: jax.Array  # (M, H)
    out_b: jax.Array  # (M,)
    h_mask: jax.Array  # (H,) 1 on the real hidden units


class _Sizes(NamedTuple):
    D: int
    R: int
    R2: int
    M: int
    H: int


def _pad_to(a, shape):
    return jnp.pad(a, [(0, s - n) for s, n in zip(shape, a.shape)])


def _weights(model: TiDHy, s: _Sizes, dtype) -> _Weights:
    hyper = model.hypernet

    def matrix(w, rows, cols):
        w = _pad_to(w.astype(dtype), (rows, cols))
        return w.T, w

    def vector(v, n):
        return _pad_to(v.astype(dtype), (n,))

    dec_t, dec = matrix(model.decoder.linear_in.weight, s.D, s.R)
    in_t, in_ = matrix(hyper.linear_in.weight, s.H, s.R2)
    hid_t, hid = matrix(hyper.linear_hidden.weight, s.H, s.H)
    out_t, out = matrix(hyper.linear_out.weight, s.M, s.H)
    H = model.hyper_hid_dim
    return _Weights(
        dec_t=dec_t,
        dec=dec,
        dec_b=vector(model.decoder.linear_in.bias, s.D),
        in_t=in_t,
        in_=in_,
        in_b=vector(hyper.linear_in.bias, s.H),
        gamma=vector(hyper.norm.weight, s.H),
        beta=vector(hyper.norm.bias, s.H),
        hid_t=hid_t,
        hid=hid,
        hid_b=vector(hyper.linear_hidden.bias, s.H),
        out_t=out_t,
        out=out,
        out_b=vector(hyper.linear_out.bias, s.M),
        h_mask=(jnp.arange(s.H) < H).astype(dtype),
    )


class _Static(NamedTuple):
    """Everything the kernels specialise on (hashable)."""

    loss: str
    temp_weight: float
    hidden: int  # the real hidden width, for the LayerNorm's statistics
    momentum: float
    lr_r: float
    lr_r2: float
    halvings: tuple[int, ...]  # iterations at which `lr_r` halves
    lmda_r: float
    lmda_r2: float
    l1_r: float
    l1_r2: float
    l1_w: float
    tol: float
    max_iter: int
    eps: float
    n_windows: int  # B, the reference mode's mean
    batch_converge: bool


def _static(model: TiDHy, config, n_windows: int) -> _Static:
    lr_r, lr_r2 = config.learning_rates
    every = config.max_iter // 10
    halvings = tuple(range(every, config.max_iter, every)) if config.halve_lr_r else ()
    return _Static(
        loss=model.loss_type,
        temp_weight=model.temp_weight,
        hidden=model.hyper_hid_dim,
        momentum=config.momentum,
        lr_r=lr_r,
        lr_r2=lr_r2,
        halvings=halvings,
        lmda_r=config.lmda_r,
        lmda_r2=config.lmda_r2,
        l1_r=config.l1_r,
        l1_r2=config.l1_r2,
        l1_w=config.l1_w,
        tol=config.tol,
        max_iter=config.max_iter,
        eps=1e-16,
        n_windows=n_windows,
        batch_converge=config.batch_converge,
    )


def _dot(a, b):
    return jnp.dot(
        a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=a.dtype
    )


def _gradients(st: _Static, w: _Weights, r, r2, x, f_mask, basis, smooth, penalty):
    """The gradients of the energy `smooth · (spatial + tw · temporal) + penalty ·
    (L1 terms)` with respect to `r` `(n, R)` and `r2` `(n, R2)`, for a block of
    windows; `smooth` and `penalty` `(n, 1)` are the weights of each window's two
    parts (0 for a skipped window; `1/B` for the smooth part in the reference
    mode). `f_mask` `(n, D)` is 1 on the observed, real features."""
    z = _dot(r, w.dec_t) + w.dec_b[None, :]
    if st.loss == "poisson":
        dz = jnp.exp(z) - x
    elif st.loss == "bce":
        dz = jax.nn.sigmoid(z) - x
    else:
        dz = 2 * (z - x)
    dz = dz * f_mask * smooth
    # The hypernetwork forward: w = ReLU(out(hidden(ELU(LayerNorm(in(r2)))))).
    inv_h = 1.0 / st.hidden
    a1 = _dot(r2, w.in_t) + w.in_b[None, :]
    mean = jnp.sum(a1, axis=1, keepdims=True) * inv_h  # the padding is 0
    centred = (a1 - mean) * w.h_mask[None, :]
    inv = jax.lax.rsqrt(
        jnp.sum(centred * centred, axis=1, keepdims=True) * inv_h + _LN_EPS
    )
    x_hat = centred * inv
    y = x_hat * w.gamma[None, :] + w.beta[None, :]
    h1 = jnp.where(y > 0, y, jnp.expm1(y))
    h2 = _dot(h1, w.hid_t) + w.hid_b[None, :]
    a3 = _dot(h2, w.out_t) + w.out_b[None, :]
    mix = jnp.maximum(a3, 0)
    r_bar = jnp.sum(mix[:, :, None] * basis, axis=1)
    # The temporal term tw · ||r - r̄||² and its pull on the mixture weights.
    e = (2 * st.temp_weight) * (r - r_bar) * smooth
    g_r = _dot(dz, w.dec) + e
    d_mix = -jnp.sum(e[:, None, :] * basis, axis=2)
    if st.l1_r:
        g_r = g_r + st.l1_r * jnp.sign(r) * penalty
    if st.l1_w:
        d_mix = d_mix + st.l1_w * jnp.sign(mix) * penalty
    # The hypernetwork backward (ReLU' = 0 at 0, ELU'(y) = e^y for y <= 0, as JAX).
    d_a3 = jnp.where(a3 > 0, d_mix, 0)
    d_h1 = _dot(_dot(d_a3, w.out), w.hid)
    d_y = jnp.where(y > 0, d_h1, d_h1 * jnp.exp(y))
    d_xhat = d_y * w.gamma[None, :]
    m1 = jnp.sum(d_xhat, axis=1, keepdims=True) * inv_h
    m2 = jnp.sum(d_xhat * x_hat, axis=1, keepdims=True) * inv_h
    d_a1 = inv * (d_xhat - m1 - x_hat * m2) * w.h_mask[None, :]
    g_r2 = _dot(d_a1, w.in_)
    if st.l1_r2:
        g_r2 = g_r2 + st.l1_r2 * jnp.sign(r2) * penalty
    return g_r, g_r2


def _running(st: _Static, status_ref):
    """The reference loop's iteration count and whether it is still running."""
    step = status_ref[0].astype(jnp.int32)
    return step, (step < st.max_iter) & (status_ref[1] == 0) & (status_ref[2] == 1)


def _neg_lr_r(st: _Static, step, dtype):
    """`-lr_r` at iteration `step`: optax's piecewise-constant schedule, halved at
    every milestone <= step. (Negated here: Pallas cannot negate a constant.)"""
    neg_lr = -st.lr_r
    for m in st.halvings:
        # A factor of exactly 1 or 1/2 (Pallas' Triton lowering cannot select
        # between scalars).
        neg_lr = neg_lr * (1.0 - 0.5 * (step >= m).astype(dtype))
    return neg_lr


def _sgd(st: _Static, latent, trace, grad, neg_lr, threshold, shrink):
    """optax's SGD with Nesterov momentum, then the soft threshold."""
    if st.momentum:
        trace = grad + st.momentum * trace
        update = grad + st.momentum * trace
    else:
        update = grad
    new = latent + update * neg_lr
    if shrink:
        new = jnp.where(jnp.abs(new) > threshold, new - jnp.sign(new) * threshold, 0)
    return new, trace


def _step(st: _Static, w, state, x, f_mask, basis, smooth, penalty, neg_lr_r):
    """One update of a block: the new latents and traces."""
    r, r2, tr_r, tr_r2 = state
    g_r, g_r2 = _gradients(st, w, r, r2, x, f_mask, basis, smooth, penalty)
    shrink = bool(st.lmda_r or st.lmda_r2)
    new_r, tr_r = _sgd(st, r, tr_r, g_r, neg_lr_r, st.lmda_r, shrink)
    new_r2, tr_r2 = _sgd(st, r2, tr_r2, g_r2, -st.lr_r2, st.lmda_r2, shrink)
    return new_r, new_r2, tr_r, tr_r2


def _row_change(new, old, eps):
    """Every window's relative change, `||new - old|| / (||old|| + eps)`."""
    return jnp.sqrt(jnp.sum((new - old) ** 2, axis=1)) / (
        jnp.sqrt(jnp.sum(old**2, axis=1)) + eps
    )


def _finite_rows(*arrays):
    """1 where every entry of the row is finite, per row (int32)."""
    flags = [jnp.min(jnp.isfinite(a).astype(jnp.int32), axis=1) for a in arrays]
    return functools.reduce(jnp.minimum, flags)


def _load_weights(refs) -> _Weights:
    return _Weights(*(ref[...] for ref in refs))


def _per_window_kernel(st: _Static, *refs):
    (x_ref, m_ref, p_ref, r2_ref, basis_ref), rest = refs[:5], refs[5:]
    w_refs, out_refs = rest[: len(_Weights._fields)], rest[len(_Weights._fields) :]
    r_out, r2_out, step_out, conv_out, rel_out, fin_out = out_refs
    r2 = r2_ref[...]
    r = jnp.zeros((r2.shape[0], r_out.shape[1]), r2.dtype)
    n = r2.shape[0]
    zeros_i = jnp.zeros((n,), jnp.int32)
    init = (
        (r, r2, jnp.zeros_like(r), jnp.zeros_like(r2)),
        zeros_i,  # step
        zeros_i,  # converged
        _finite_rows(r, r2),
        jnp.full((n,), jnp.inf, r2.dtype),
        jnp.zeros((), jnp.int32),  # the block's iteration
    )

    def active(carry):
        _, step, conv, fin, _, _ = carry
        return (step < st.max_iter) & (conv == 0) & (fin == 1)

    def body(carry):
        state, step, conv, fin, rel, it = carry
        on = active(carry)
        # Loaded at every iteration rather than held across the loop: the weights
        # and the block's basis would not fit a thread's registers beside the
        # loop's state; these loads hit the cache.
        present = p_ref[...][:, None]
        new = _step(
            st,
            _load_weights(w_refs),
            state,
            x_ref[...],
            m_ref[...],
            basis_ref[...],
            present,
            present,
            _neg_lr_r(st, it, r2.dtype),
        )
        rel_r = _row_change(new[0], state[0], st.eps)
        rel_r2 = _row_change(new[1], state[1], st.eps)
        keep = on[:, None]
        state = tuple(jnp.where(keep, a, b) for a, b in zip(new, state))
        passed = ((rel_r < st.tol) & (rel_r2 < st.tol)).astype(jnp.int32)
        return (
            state,
            step + on.astype(jnp.int32),
            jnp.where(on, passed, conv),
            jnp.where(on, _finite_rows(new[0], new[1]), fin),
            jnp.where(on, jnp.maximum(rel_r, rel_r2), rel),
            it + 1,
        )

    def cond(carry):
        return jnp.max(active(carry).astype(jnp.int32)) > 0

    state, step, conv, fin, rel, _ = jax.lax.while_loop(cond, body, init)
    r_out[...] = state[0]
    r2_out[...] = state[1]
    step_out[...] = step
    conv_out[...] = conv
    rel_out[...] = rel
    fin_out[...] = fin


def _reference_step_kernel(st: _Static, *refs):
    """One reference-mode iteration of one block, if the loop is still running.

    The state's outputs alias its inputs: once the loop has stopped, the kernel
    writes nothing and costs only its launch.
    """
    (x_ref, m_ref, p_ref, basis_ref, status_ref), rest = refs[:5], refs[5:]
    n_w = len(_Weights._fields)
    w_refs, state_refs = rest[:n_w], rest[n_w : n_w + 4]
    out_refs, partial_ref = rest[n_w + 4 : n_w + 8], rest[n_w + 8]
    step, running = _running(st, status_ref)

    @pl.when(running)
    def _():
        state = tuple(ref[...] for ref in state_refs)
        present = p_ref[...][:, None]
        new = _step(
            st,
            _load_weights(w_refs),
            state,
            x_ref[...],
            m_ref[...],
            basis_ref[...],
            present / st.n_windows,
            present,
            _neg_lr_r(st, step, state[0].dtype),
        )
        r, r2 = state[0], state[1]
        if st.batch_converge:
            # Frobenius norms over the batch: partial sums of squares per block.
            sums = [
                jnp.sum((new[0] - r) ** 2),
                jnp.sum(r**2),
                jnp.sum((new[1] - r2) ** 2),
                jnp.sum(r2**2),
            ]
        else:
            # Every window on its own: the block's largest relative changes (rows
            # of padding, which never move, give 0).
            zero = jnp.zeros((), r.dtype)
            sums = [
                jnp.max(_row_change(new[0], r, st.eps)),
                zero,
                jnp.max(_row_change(new[1], r2, st.eps)),
                zero,
            ]
        finite = jnp.min(_finite_rows(new[0], new[1])).astype(r.dtype)
        partial_ref[...] = _vector([*sums, finite], _PARTIALS, r.dtype)[None, :]
        for ref, a in zip(out_refs, new):
            ref[...] = a


def _vector(values, n, dtype):
    """`values` (scalars) in the first entries of a length-`n` vector of zeros
    (Triton has no scatter of scalars into a tensor)."""
    index = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    out = jnp.zeros((n,), dtype)
    for j, value in enumerate(values):
        out = jnp.where(index == j, value, out)
    return out


def _fold_kernel(st: _Static, n_blocks: int, partials_ref, status_ref, out_ref):
    """The loop's state after an iteration, from every block's partial sums.

    `out_ref` aliases `status_ref`: once the loop has stopped it stays as it is.
    """
    step, running = _running(st, status_ref)

    @pl.when(running)
    def _():
        # Rows past the last block are padding (the array's length is a power of
        # 2) and never written: read them as neutral values.
        rows = jax.lax.broadcasted_iota(jnp.int32, (partials_ref.shape[0],), 0)
        real = rows < n_blocks

        def column(j, neutral):
            return jnp.where(real, partials_ref[:, j], neutral)

        if st.batch_converge:
            rel_r = jnp.sqrt(jnp.sum(column(0, 0))) / (
                jnp.sqrt(jnp.sum(column(1, 0))) + st.eps
            )
            rel_r2 = jnp.sqrt(jnp.sum(column(2, 0))) / (
                jnp.sqrt(jnp.sum(column(3, 0))) + st.eps
            )
        else:
            rel_r, rel_r2 = jnp.max(column(0, 0)), jnp.max(column(2, 0))
        dtype = out_ref.dtype
        out_ref[...] = _vector(
            [
                (step + 1).astype(dtype),
                ((rel_r < st.tol) & (rel_r2 < st.tol)).astype(dtype),
                jnp.min(column(4, 1)).astype(dtype),
                jnp.maximum(rel_r, rel_r2).astype(dtype),
            ],
            _STATUS,
            dtype,
        )


def _full(shape):
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _rows(block, *tail):
    return pl.BlockSpec((block, *tail), lambda i: (i,) + (0,) * len(tail))


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, aliases=None):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases or {},
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
    )


class FusedResult(NamedTuple):
    r: jax.Array
    r2: jax.Array
    n_iter: jax.Array
    converged: jax.Array
    rel_change: jax.Array
    finite: jax.Array


def fused_infer(model: TiDHy, x, r2_prev, basis, config, mask, present) -> FusedResult:
    """The inner loop of `infer_impl` for a batch of windows, in Pallas kernels.

    `x` `(B, D)` (0 where missing), `r2_prev` `(B, R2)`, `basis` `(B, M, R)`;
    `mask` `(B, D)` and `present` `(B,)` or `None`. Returns the latents and, per
    window, the diagnostics of `InferenceStats` but the energy.
    """
    x, r2_prev, basis, model = jax.lax.stop_gradient((x, r2_prev, basis, model))
    B, D = x.shape
    dtype = r2_prev.dtype
    s = _Sizes(
        D=_padded(D),
        R=_padded(model.r_dim),
        R2=_padded(model.r2_dim),
        M=_padded(model.mix_dim),
        H=_padded(model.hyper_hid_dim),
    )
    n_blocks = -(-B // BLOCK_WINDOWS)
    Bp = n_blocks * BLOCK_WINDOWS
    weights = _weights(model, s, dtype)
    f_mask = jnp.ones((B, D), dtype) if mask is None else mask.astype(dtype)
    present = jnp.ones((B,), dtype) if present is None else present.astype(dtype)
    x_p = _pad_to(x.astype(dtype), (Bp, s.D))
    m_p = _pad_to(f_mask, (Bp, s.D))
    p_p = _pad_to(present, (Bp,))
    r2_p = _pad_to(r2_prev, (Bp, s.R2))
    basis_p = _pad_to(basis.astype(dtype), (Bp, s.M, s.R))
    st = _static(model, config, B)
    interpret = jax.default_backend() == "cpu"
    w_specs = [_full(a.shape) for a in weights]
    block = BLOCK_WINDOWS
    data_specs = [_rows(block, s.D), _rows(block, s.D), _rows(block)]
    if config.batch_mode == "per_window":
        out_shape = [
            jax.ShapeDtypeStruct((Bp, s.R), dtype),
            jax.ShapeDtypeStruct((Bp, s.R2), dtype),
            *(jax.ShapeDtypeStruct((Bp,), jnp.int32) for _ in range(2)),
            jax.ShapeDtypeStruct((Bp,), dtype),
            jax.ShapeDtypeStruct((Bp,), jnp.int32),
        ]
        out_specs = [_rows(block, s.R), _rows(block, s.R2)] + [_rows(block)] * 4
        r, r2, step, conv, rel, fin = _call(
            functools.partial(_per_window_kernel, st),
            (n_blocks,),
            data_specs + [_rows(block, s.R2), _rows(block, s.M, s.R)] + w_specs,
            out_specs,
            out_shape,
            interpret,
        )(x_p, m_p, p_p, r2_p, basis_p, *weights)
        return FusedResult(
            r[:B, : model.r_dim],
            r2[:B, : model.r2_dim],
            step[:B],
            conv[:B].astype(bool),
            rel[:B],
            fin[:B].astype(bool),
        )
    state_shapes = [(Bp, s.R), (Bp, s.R2), (Bp, s.R), (Bp, s.R2)]
    partial_rows = 1 << (n_blocks - 1).bit_length()
    state_specs = [_rows(block, *shape[1:]) for shape in state_shapes]
    # Inputs: x, mask, present, basis, status, the weights, then the state.
    first_state = 5 + len(weights)
    step_call = _call(
        functools.partial(_reference_step_kernel, st),
        (n_blocks,),
        data_specs
        + [_rows(block, s.M, s.R), _full((_STATUS,))]
        + w_specs
        + state_specs,
        state_specs + [pl.BlockSpec((1, _PARTIALS), lambda i: (i, 0))],
        [jax.ShapeDtypeStruct(shape, dtype) for shape in state_shapes]
        + [jax.ShapeDtypeStruct((partial_rows, _PARTIALS), dtype)],
        interpret,
        aliases={first_state + j: j for j in range(4)},
    )
    fold_call = _call(
        functools.partial(_fold_kernel, st, n_blocks),
        (1,),
        [_full((partial_rows, _PARTIALS)), _full((_STATUS,))],
        _full((_STATUS,)),
        jax.ShapeDtypeStruct((_STATUS,), dtype),
        interpret,
        aliases={1: 0},
    )

    def iteration(carry):
        state, status = carry
        *state, partials = step_call(x_p, m_p, p_p, basis_p, status, *weights, *state)
        return tuple(state), fold_call(partials, status)

    def running(carry):
        status = carry[1]
        return (status[0] < st.max_iter) & (status[1] == 0) & (status[2] == 1)

    def chunk(carry):
        # Unrolled: nothing of XLA's sits between the kernels, so the iterates do
        # not depend on how many run per test.
        for _ in range(min(config.iterations_per_check, config.max_iter)):
            carry = iteration(carry)
        return carry

    r0 = jnp.zeros((Bp, s.R), dtype)
    finite0 = jnp.all(jnp.isfinite(r2_prev))
    status0 = jnp.stack(
        [
            jnp.zeros((), dtype),
            jnp.zeros((), dtype),
            finite0.astype(dtype),
            jnp.asarray(jnp.inf, dtype),
        ]
    )
    init = ((r0, r2_p, jnp.zeros_like(r0), jnp.zeros_like(r2_p)), status0)
    (state, status) = jax.lax.while_loop(running, chunk, init)
    r, r2 = state[0][:B, : model.r_dim], state[1][:B, : model.r2_dim]
    n_iter = jnp.broadcast_to(status[0].astype(jnp.int32), (B,))
    return FusedResult(
        r,
        r2,
        n_iter,
        jnp.broadcast_to(status[1] == 1, (B,)),
        jnp.broadcast_to(status[3], (B,)),
        jnp.broadcast_to(status[2] == 1, (B,)),
    )
