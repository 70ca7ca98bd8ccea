"""TiDHy's inner loop as Pallas kernels (`InferenceConfig(implementation="pallas")`).

Why: on a GPU the XLA loop runs about 28 small kernels per inner iteration, each
around 2 µs however little it computes, and a paper-size epoch is some 20 000
iterations. Here one iteration of a block of windows is one piece of kernel code:
the energy's gradient written out by hand (linear or MLP decoder, mixture of the
precomputed basis and gated bias, hypernetwork with its LayerNorm), the Nesterov
step, the soft thresholds and the relative-change test.

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

JAX 0.11.2 deprecated Pallas' Triton backend in favour of Mosaic GPU, and warns at
every lowering of these kernels. The warning is addressed to this module, not to its
users (they cannot act on it), so it is ignored, by its exact text, once these
kernels are built for a GPU; moving them to Mosaic GPU is the way out before JAX
drops Triton.
"""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._functional import RELATIVE_CHANGE_EPS
from ._model import TiDHy


# Windows and warps per program, tuned on an H100 at paper size
# (benchmarks/tidhy_pallas_tuning.py): 16 windows and 4 warps were the fastest in
# both modes (reference mode 36.5 us per iteration against 74.8 us with 32 windows;
# 2 warps spill, 10-20x slower). 16 is the smallest block Triton's products take.
BLOCK_WINDOWS = 16
_NUM_WARPS = 4
# Full float32 products, as XLA's loop computes them (see `_inference.py`'s
# `_in_full_float32`).
_PRECISION = jax.lax.Precision.HIGHEST
_LN_EPS = 1e-5  # both networks' LayerNorms (`eqx.nn.LayerNorm(H, eps=1e-5)`)
# Iterations per trip of the reference mode's rolled inner loop (see `chunk`).
_UNROLL = 4
# Columns of the reference mode's per-block partial sums.
_PARTIALS = 8
# The reference mode's loop state: step, converged, finite, relative change.
_STATUS = 4


_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


def _ignore_triton_deprecation() -> None:
    # Issued when the enclosing jit lowers the kernels, after this module's code has
    # returned, so a filter around the call would miss it: a filter for the
    # process, installed on every build (pytest restores the filters after each
    # test; `filterwarnings` replaces an equal filter instead of adding one).
    warnings.filterwarnings(
        "ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning
    )


# The most shared memory one program (thread block) may use, in bytes, by CUDA
# compute capability (NVIDIA's CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability"). Triton keeps every weight matrix of the
# kernels there for the whole loop: measured on an H100, a kernel asked for its
# weights' bytes plus 2.4 kB, whatever the number of windows per program.
_SHARED_MEMORY_BYTES = {
    "7.0": 96 * 1024,
    "7.2": 96 * 1024,
    "7.5": 64 * 1024,
    "8.0": 163 * 1024,
    "8.6": 99 * 1024,
    "8.7": 163 * 1024,
    "8.9": 99 * 1024,
    "9.0": 227 * 1024,
    "10.0": 227 * 1024,
    "10.3": 227 * 1024,
    "12.0": 99 * 1024,
}
_SHARED_MEMORY_RESERVE = 8 * 1024


def _compute_capability() -> str | None:
    """The first device's CUDA compute capability (`"9.0"`), or `None` off CUDA."""
    if jax.default_backend() != "gpu":
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return None if capability is None else str(capability)


def _shared_memory_bytes() -> int | None:
    """This GPU's shared memory per program, or `None` where it is not known."""
    return _SHARED_MEMORY_BYTES.get(_compute_capability() or "")


def weight_bytes(model: TiDHy, dtype) -> int:
    """The bytes of the model's zero-padded weights as the kernels hold them."""
    s = _sizes(model)
    leaves = jax.tree.leaves(jax.eval_shape(lambda: _weights(model, s, dtype)))
    return sum(leaf.size * jnp.dtype(dtype).itemsize for leaf in leaves)


def shared_memory_shortfall(model: TiDHy, dtype) -> tuple[int, int] | None:
    """`(needed, available)` bytes of shared memory per program where this GPU's
    cannot hold the kernels' weights; `None` where it can or is not known."""
    available = _shared_memory_bytes()
    needed = weight_bytes(model, dtype) + _SHARED_MEMORY_RESERVE
    if available is None or needed <= available:
        return None
    return needed, available


def default_on_this_device(model: TiDHy, dtype) -> bool:
    """Whether `implementation="auto"` runs these kernels: on one CUDA GPU of a
    known compute capability whose shared memory holds the weights, with Pallas'
    Triton backend present. XLA does not partition a Pallas kernel across
    devices (it would run the whole batch on each), so with several devices
    the XLA loop is the default."""
    if jax.device_count() != 1 or _shared_memory_bytes() is None:
        return False
    if shared_memory_shortfall(model, dtype) is not None:
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _sizes(model: TiDHy) -> "_Sizes":
    return _Sizes(
        D=_padded(model.input_dim),
        R=_padded(model.r_dim),
        R2=_padded(model.r2_dim),
        M=_padded(model.mix_dim),
        H=_padded(model.hyper_hid_dim),
    )


def _padded(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class _Linear(NamedTuple):
    """A zero-padded linear layer in both orientations (a transpose inside a
    kernel costs a shuffle): `t` `(in, out)` for the forward product, `w`
    `(out, in)` for the backward one."""

    t: jax.Array
    w: jax.Array
    b: jax.Array


class _Norm(NamedTuple):
    """A zero-padded LayerNorm and the mask of its real units."""

    gamma: jax.Array
    beta: jax.Array
    mask: jax.Array


class _Weights(NamedTuple):
    """The model's parameters as the kernels use them (a pytree; the parts a
    model does not have are `None`)."""

    dec_in: _Linear
    dec_norm: _Norm | None
    dec_hidden: _Linear | None
    dec_out: _Linear | None
    hyper_in: _Linear
    hyper_norm: _Norm
    hyper_hidden: _Linear
    hyper_mix: _Linear  # the rows of the output layer that give the weights w
    hyper_gain: _Linear | None  # and those that give the bias gains (`dyn_bias`)
    temporal_bias: jax.Array | None


class _Sizes(NamedTuple):
    D: int
    R: int
    R2: int
    M: int
    H: int


def _pad_to(a, shape):
    return jnp.pad(a, [(0, s - n) for s, n in zip(shape, a.shape)])


def _weights(model: TiDHy, s: _Sizes, dtype) -> _Weights:
    def linear(layer, n_out, n_in, rows=slice(None)):
        w = _pad_to(layer.weight[rows].astype(dtype), (n_out, n_in))
        bias = jnp.zeros((n_out,), dtype)
        if layer.bias is not None:
            bias = _pad_to(layer.bias[rows].astype(dtype), (n_out,))
        return _Linear(t=w.T, w=w, b=bias)

    def norm(layer, n):
        return _Norm(
            gamma=_pad_to(layer.weight.astype(dtype), (n,)),
            beta=_pad_to(layer.bias.astype(dtype), (n,)),
            mask=(jnp.arange(n) < layer.weight.shape[0]).astype(dtype),
        )

    dec, hyper, M = model.decoder, model.hypernet, model.mix_dim
    nonlinear = model.nonlinear_decoder
    assert dec.norm is not None or not nonlinear
    return _Weights(
        dec_in=linear(dec.linear_in, s.H if nonlinear else s.D, s.R),
        dec_norm=norm(dec.norm, s.H) if dec.norm is not None else None,
        dec_hidden=(linear(dec.linear_hidden, s.H, s.H) if dec.linear_hidden else None),
        dec_out=linear(dec.linear_out, s.D, s.H) if dec.linear_out else None,
        hyper_in=linear(hyper.linear_in, s.H, s.R2),
        hyper_norm=norm(hyper.norm, s.H),
        hyper_hidden=linear(hyper.linear_hidden, s.H, s.H),
        hyper_mix=linear(hyper.linear_out, s.M, s.H, slice(0, M)),
        hyper_gain=(
            linear(hyper.linear_out, s.R, s.H, slice(M, None))
            if model.dyn_bias
            else None
        ),
        temporal_bias=(
            _pad_to(model.temporal_bias.astype(dtype), (s.R,))
            if model.dyn_bias and model.temporal_bias is not None
            else None
        ),
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
    n_windows: int  # B, the reference mode's mean
    batch_converge: bool


def _static(model: TiDHy, config, n_windows: int) -> _Static:
    lr_r, lr_r2 = config.learning_rates
    return _Static(
        loss=model.loss_type,
        temp_weight=model.temp_weight,
        hidden=model.hyper_hid_dim,
        momentum=config.momentum,
        lr_r=lr_r,
        lr_r2=lr_r2,
        halvings=config.halvings,
        lmda_r=config.lmda_r,
        lmda_r2=config.lmda_r2,
        l1_r=config.l1_r,
        l1_r2=config.l1_r2,
        l1_w=config.l1_w,
        tol=config.tol,
        max_iter=config.max_iter,
        n_windows=n_windows,
        batch_converge=config.batch_converge,
    )


def _dot(a, b):
    return jnp.dot(a, b, precision=_PRECISION, preferred_element_type=a.dtype)


def _forward(layer: _Linear, a):
    return _dot(a, layer.t) + layer.b[None, :]


def _backward(layer: _Linear, d):
    """The gradient with respect to a layer's input, from its output's."""
    return _dot(d, layer.w)


def _norm_elu(norm: _Norm, a, inv_n):
    """`ELU(LayerNorm(a))` over the real units (the padding of `a` is 0 and stays
    0), and what its backward pass needs."""
    mean = jnp.sum(a, axis=1, keepdims=True) * inv_n
    centred = (a - mean) * norm.mask[None, :]
    var = jnp.sum(centred * centred, axis=1, keepdims=True) * inv_n
    inv = jax.lax.rsqrt(var + _LN_EPS)
    x_hat = centred * inv
    y = x_hat * norm.gamma[None, :] + norm.beta[None, :]
    return jnp.where(y > 0, y, jnp.expm1(y)), (x_hat, inv, y)


def _norm_elu_backward(norm: _Norm, d_h, cache, inv_n):
    """The gradient of `_norm_elu` with respect to `a` (ELU'(y) = e^y for y <= 0,
    as JAX differentiates it)."""
    x_hat, inv, y = cache
    d_y = jnp.where(y > 0, d_h, d_h * jnp.exp(y))
    d_xhat = d_y * norm.gamma[None, :]
    m1 = jnp.sum(d_xhat, axis=1, keepdims=True) * inv_n
    m2 = jnp.sum(d_xhat * x_hat, axis=1, keepdims=True) * inv_n
    return inv * (d_xhat - m1 - x_hat * m2) * norm.mask[None, :]


def _gradients(st: _Static, w: _Weights, r, r2, x, f_mask, basis, smooth, penalty):
    """The gradients of the energy `smooth · (spatial + tw · temporal) + penalty ·
    (L1 terms)` with respect to `r` `(n, R)` and `r2` `(n, R2)`, for a block of
    windows; `smooth` and `penalty` `(n, 1)` are the weights of each window's two
    parts (0 for a skipped window; `1/B` for the smooth part in the reference
    mode). `f_mask` `(n, D)` is 1 on the observed, real features."""
    inv_h = 1.0 / st.hidden
    # The decoder: W r + b, or out(hidden(ELU(LayerNorm(in(r))))).
    z = _forward(w.dec_in, r)
    if w.dec_norm is not None and w.dec_hidden is not None and w.dec_out is not None:
        h, dec_cache = _norm_elu(w.dec_norm, z, inv_h)
        z = _forward(w.dec_out, _forward(w.dec_hidden, h))
    if st.loss == "poisson":
        dz = jnp.exp(z) - x
    elif st.loss == "bce":
        dz = jax.nn.sigmoid(z) - x
    else:
        dz = 2 * (z - x)
    dz = dz * f_mask * smooth
    if w.dec_norm is not None and w.dec_hidden is not None and w.dec_out is not None:
        d_h = _backward(w.dec_hidden, _backward(w.dec_out, dz))
        dz = _norm_elu_backward(w.dec_norm, d_h, dec_cache, inv_h)
    g_r = _backward(w.dec_in, dz)
    # The hypernetwork: w = ReLU(out(hidden(ELU(LayerNorm(in(r2)))))), and with
    # `dyn_bias` the gains g from the output layer's last rows.
    h, hyper_cache = _norm_elu(w.hyper_norm, _forward(w.hyper_in, r2), inv_h)
    h2 = _forward(w.hyper_hidden, h)
    a_mix = _forward(w.hyper_mix, h2)
    mix = jnp.maximum(a_mix, 0)
    r_bar = jnp.sum(mix[:, :, None] * basis, axis=1)
    if w.hyper_gain is not None and w.temporal_bias is not None:
        a_gain = _forward(w.hyper_gain, h2)
        r_bar = r_bar + jnp.maximum(a_gain, 0) * w.temporal_bias[None, :]
    # The temporal term tw · ||r - r̄||² and its pull on the hypernetwork's output.
    e = (2 * st.temp_weight) * (r - r_bar) * smooth
    g_r = g_r + e
    d_mix = -jnp.sum(e[:, None, :] * basis, axis=2)
    if st.l1_r:
        g_r = g_r + st.l1_r * jnp.sign(r) * penalty
    if st.l1_w:
        d_mix = d_mix + st.l1_w * jnp.sign(mix) * penalty
    # ReLU' = 0 at 0, as JAX differentiates it.
    d_h2 = _backward(w.hyper_mix, jnp.where(a_mix > 0, d_mix, 0))
    if w.hyper_gain is not None and w.temporal_bias is not None:
        d_gain = -e * w.temporal_bias[None, :]
        d_h2 = d_h2 + _backward(w.hyper_gain, jnp.where(a_gain > 0, d_gain, 0))
    d_a = _norm_elu_backward(
        w.hyper_norm, _backward(w.hyper_hidden, d_h2), hyper_cache, inv_h
    )
    g_r2 = _backward(w.hyper_in, d_a)
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


def _step(st: _Static, treedef, refs, state, step, mean_over: int):
    """One update of a block: the new latents and traces.

    `refs`: the block's `x`, mask, `present` and basis, then the weights' leaves
    (flattened by `treedef`), all loaded here, at every iteration rather than held
    across a loop: beside the loop's state they would not fit a thread's
    registers, and these loads hit the cache. `mean_over`: the number of windows
    the smooth part of the energy is averaged over (1 per window, B in the
    reference mode).
    """
    x_ref, m_ref, p_ref, basis_ref = refs[:4]
    r, r2, tr_r, tr_r2 = state
    present = p_ref[...][:, None]
    g_r, g_r2 = _gradients(
        st,
        _load_weights(treedef, refs[4:]),
        r,
        r2,
        x_ref[...],
        m_ref[...],
        basis_ref[...],
        present / mean_over,
        present,
    )
    shrink = bool(st.lmda_r or st.lmda_r2)
    neg_lr_r = _neg_lr_r(st, step, r.dtype)
    new_r, tr_r = _sgd(st, r, tr_r, g_r, neg_lr_r, st.lmda_r, shrink)
    new_r2, tr_r2 = _sgd(st, r2, tr_r2, g_r2, -st.lr_r2, st.lmda_r2, shrink)
    return new_r, new_r2, tr_r, tr_r2


def _row_change(new, old):
    """Every window's relative change, `||new - old|| / (||old|| + eps)`."""
    return jnp.sqrt(jnp.sum((new - old) ** 2, axis=1)) / (
        jnp.sqrt(jnp.sum(old**2, axis=1)) + RELATIVE_CHANGE_EPS
    )


def _finite_rows(*arrays):
    """1 where every entry of the row is finite, per row (int32)."""
    flags = [jnp.min(jnp.isfinite(a).astype(jnp.int32), axis=1) for a in arrays]
    return functools.reduce(jnp.minimum, flags)


def _load_weights(treedef, refs) -> _Weights:
    return jax.tree.unflatten(treedef, [ref[...] for ref in refs])


def _per_window_kernel(st: _Static, treedef, *refs):
    """The whole per-window loop of one block of windows: every window stops on
    its own (the later iterations leave it as it is, as under `vmap`), the block
    when its last window has. A running window has run every iteration of the
    block, so the block's iteration count is its step for the `lr_r` schedule."""
    n_in = 4 + treedef.num_leaves
    in_refs, r2_ref, out_refs = refs[:n_in], refs[n_in], refs[n_in + 1 :]
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
        new = _step(st, treedef, in_refs, state, it, mean_over=1)
        rel_r = _row_change(new[0], state[0])
        rel_r2 = _row_change(new[1], state[1])
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


def _reference_step_kernel(st: _Static, treedef, *refs):
    """One reference-mode iteration of one block, if the loop is still running.

    The state's outputs alias its inputs: once the loop has stopped, the kernel
    writes nothing and costs only its launch.
    """
    n_in = 4 + treedef.num_leaves
    in_refs, status_ref = refs[:n_in], refs[n_in]
    state_refs, out_refs = refs[n_in + 1 : n_in + 5], refs[n_in + 5 : n_in + 9]
    partial_ref = refs[n_in + 9]
    step, running = _running(st, status_ref)

    @pl.when(running)
    def _():
        state = tuple(ref[...] for ref in state_refs)
        new = _step(st, treedef, in_refs, state, step, mean_over=st.n_windows)
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
                jnp.max(_row_change(new[0], r)),
                zero,
                jnp.max(_row_change(new[1], r2)),
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
                jnp.sqrt(jnp.sum(column(1, 0))) + RELATIVE_CHANGE_EPS
            )
            rel_r2 = jnp.sqrt(jnp.sum(column(2, 0))) / (
                jnp.sqrt(jnp.sum(column(3, 0))) + RELATIVE_CHANGE_EPS
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
    # Imported here: the Triton options are the part of Pallas' API that moves
    # between JAX versions, and only this path needs them.
    from jax.experimental.pallas import triton as pltriton

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
    """The latents and, per window, `InferenceStats`' diagnostics but the energy
    (which `infer_impl` computes from the latents, as for the XLA loop)."""

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
    s = _sizes(model)
    block = BLOCK_WINDOWS
    n_blocks = -(-B // block)
    Bp = n_blocks * block
    weights, treedef = jax.tree.flatten(_weights(model, s, dtype))
    f_mask = jnp.ones((B, D), dtype) if mask is None else mask.astype(dtype)
    present = jnp.ones((B,), dtype) if present is None else present.astype(dtype)
    x_p = _pad_to(x.astype(dtype), (Bp, s.D))
    m_p = _pad_to(f_mask, (Bp, s.D))
    p_p = _pad_to(present, (Bp,))
    r2_p = _pad_to(r2_prev, (Bp, s.R2))
    basis_p = _pad_to(basis.astype(dtype), (Bp, s.M, s.R))
    st = _static(model, config, B)
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu"):
        raise ValueError(
            "InferenceConfig: `implementation` must be 'auto' or 'xla' on backend "
            f"{backend!r}: the Pallas kernels are written for GPUs (Triton) and run "
            "interpreted on a CPU, got 'pallas'."
        )
    interpret = backend == "cpu"
    if not interpret:
        shortfall = shared_memory_shortfall(model, dtype)
        if shortfall is not None:
            raise ValueError(
                "InferenceConfig: `implementation='pallas'` keeps the model's weights "
                "in one GPU program's shared memory: expected at most "
                f"{shortfall[1]} bytes on this GPU (compute capability "
                f"{_compute_capability()}), got {shortfall[0]} for its padded "
                f"{jnp.dtype(dtype).name} weights; use implementation='auto' or "
                "'xla' (or float32)."
            )
        _ignore_triton_deprecation()
    # Every kernel's first inputs (see `_step`): x, mask, present, basis, weights.
    inputs = (x_p, m_p, p_p, basis_p, *weights)
    in_specs = [_rows(block, s.D), _rows(block, s.D), _rows(block)]
    in_specs += [_rows(block, s.M, s.R)] + [_full(a.shape) for a in weights]
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
            functools.partial(_per_window_kernel, st, treedef),
            (n_blocks,),
            in_specs + [_rows(block, s.R2)],
            out_specs,
            out_shape,
            interpret,
        )(*inputs, r2_p)
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
    # The state's inputs (after the common ones and the status) alias its outputs.
    first_state = len(inputs) + 1
    step_call = _call(
        functools.partial(_reference_step_kernel, st, treedef),
        (n_blocks,),
        in_specs + [_full((_STATUS,))] + state_specs,
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
        *state, partials = step_call(*inputs, status, *state)
        return tuple(state), fold_call(partials, status)

    def running(carry):
        status = carry[1]
        return (status[0] < st.max_iter) & (status[1] == 0) & (status[2] == 1)

    def unrolled(carry, n):
        for _ in range(n):
            carry = iteration(carry)
        return carry

    def chunk(carry):
        # Only kernels run between two tests, nothing of XLA's, so the iterates
        # do not depend on how many run per test. Unrolled by `_UNROLL`: a trip of
        # a rolled loop costs several microseconds on a GPU, while every unrolled
        # copy is one more Triton kernel to compile.
        n = min(config.iterations_per_check, config.max_iter)
        trips, rest = divmod(n, _UNROLL)
        if trips > 1:
            carry = jax.lax.fori_loop(
                0, trips, lambda _, c: unrolled(c, _UNROLL), carry
            )
        elif trips == 1:
            carry = unrolled(carry, _UNROLL)
        return unrolled(carry, rest)

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
