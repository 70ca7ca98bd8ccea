"""Sequential (`lax.scan`) forward-backward over a `Chain`.

Messages are normalised at every step: the forward message `alpha[t]` is the
filtered distribution and its normaliser `n[t]` the predictive probability of step
`t`, so `lnL = sum(log n)` (summed pairwise). The backward pass carries
`u[t] ∝ w[t] * beta[t]` (the evidence-weighted backward message, normalised), from
which the smoothed marginals and the gradient of `lnL` follow:

- `d[t] = alpha[t-1] @ B[t] @ u[t]`, so `xi[t] = alpha[t-1][:, None] * B[t] *
  u[t][None, :] / d[t]` (the two-slice posterior) and `dlnL/dB[t] = xi[t] / B[t]
  = outer(alpha[t-1], u[t]) / d[t]`;
- `gamma[t-1] = alpha[t-1] * (B[t] @ u[t]) / d[t]`;
- `dlnL/dpsi[t] = gamma[t]` and `dlnL/dpi0 = u[0] / (pi0 @ u[0])`.

`log_likelihood` is a `jax.custom_vjp` whose backward pass is that scan: autodiff
through a scan that slices `T` would add a full-size cotangent of `T` at every step.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from transforms import pairwise_sum

from ._chain import Chain, evidence_weights, safe_divide, safe_log, window


# The per-step vector-block products are written as an elementwise product and a
# sum rather than a dot: XLA fuses the window's `dynamic_slice` into that loop,
# whereas a dot first copies the window out of `src` (on a CPU, with 70 x 70
# windows, the copy took two thirds of a step). The arithmetic is plain float32
# (or float64) multiply-adds on every backend, never reduced-precision matmuls.


def _vector_block(alpha: Array, block: Array) -> Array:
    """`alpha @ block`."""
    return jnp.sum(alpha[:, None] * block, axis=0)


def _block_vector(block: Array, u: Array) -> Array:
    """`block @ u`."""
    return jnp.sum(block * u[None, :], axis=1)


def forward_step(
    src: Array, size: int, alpha: Array, p: Array, w: Array | None
) -> tuple[Array, Array]:
    """One filtering step: the next normalised message and its normaliser."""
    v = _vector_block(alpha, window(src, p, size))
    if w is not None:
        v = v * w
    n = v.sum()
    return safe_divide(v, n), n


def backward_step(
    src: Array, size: int, u: Array, p: Array, w_prev: Array | None
) -> tuple[Array, Array]:
    """One backward step from `u[t]` over the step at `p`: the normalised `u[t-1]`
    and the backward message `beta[t-1] = B[t] @ u[t]` (without the evidence of
    `t-1`)."""
    beta_prev = _block_vector(window(src, p, size), u)
    u_prev = beta_prev if w_prev is None else beta_prev * w_prev
    return safe_divide(u_prev, u_prev.sum()), beta_prev


def _weights(chain: Chain):
    if chain.psi is None:
        return None, jnp.zeros((chain.length,), chain.pi0.dtype)
    return evidence_weights(chain.psi)


def forward_scan(chain: Chain) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """Filtered messages `[T, S]` and per-step log normalisers `[T]`."""
    size = chain.size
    weights, offset = _weights(chain)
    v0 = chain.pi0 if weights is None else chain.pi0 * weights[0]
    n0 = v0.sum()
    alpha0 = safe_divide(v0, n0)

    def step(alpha, inputs):
        alpha, n = forward_step(chain.src, size, alpha, *inputs)
        return alpha, (alpha, n)

    xs = (chain.pos, None if weights is None else weights[1:])
    _, (alphas, norms) = lax.scan(step, alpha0, xs)
    alphas = jnp.concatenate([alpha0[None], alphas])
    norms = jnp.concatenate([n0[None], norms])
    return alphas, safe_log(norms) + offset


_CHUNK = 128


def backward_scan(
    chain: Chain, alphas: Float[Array, "T S"], *, accumulate: bool
) -> tuple[Float[Array, "T S"], Float[Array, "T S"], Array | None]:
    """Backward messages `u` and smoothed marginals `gamma` (both `[T, S]`), and, if
    `accumulate`, `dlnL/dsrc` summed over the steps.

    The sum is two-level: each chunk of `_CHUNK` steps accumulates into a zeroed
    buffer (updated in place), and the chunk sums are added to the total, so the
    float error grows like `_CHUNK + T / _CHUNK` ulps instead of `T`.
    """
    size = chain.size
    weights, _ = _weights(chain)
    u_last = chain.last if weights is None else weights[-1]
    u_last = safe_divide(u_last, u_last.sum())

    def step(carry, inputs):
        u, sums = carry
        p, alpha_prev, w_prev = inputs
        u_prev, beta_prev = backward_step(chain.src, size, u, p, w_prev)
        d = jnp.sum(alpha_prev * beta_prev)
        gamma_prev = safe_divide(alpha_prev * beta_prev, d)
        if sums is not None:
            grad = safe_divide(alpha_prev[:, None] * u[None, :], d)
            start = (p[0], p[1], p[2])
            sums = lax.dynamic_update_slice(
                sums, window(sums, p, size)[None] + grad[None], start
            )
        return (u_prev, sums), (u_prev, gamma_prev)

    xs = (chain.pos, alphas[:-1], None if weights is None else weights[:-1])
    if not accumulate:
        (_, _), (us, gammas) = lax.scan(step, (u_last, None), xs, reverse=True)
        total = None
    else:
        n = chain.pos.shape[0]
        length = max(min(_CHUNK, n), 1)
        chunks = -(-n // length)
        pad = chunks * length - n
        # Padding steps are identities (the last slab) with no forward mass: they
        # leave `u` unchanged and add nothing.
        identity = (
            jnp.zeros((pad, 3), chain.pos.dtype).at[:, 0].set(chain.src.shape[0] - 1)
        )
        padded = (
            jnp.concatenate([chain.pos, identity]),
            jnp.concatenate([alphas[:-1], jnp.zeros((pad, size), alphas.dtype)]),
            None
            if weights is None
            else jnp.concatenate([weights[:-1], jnp.ones((pad, size), alphas.dtype)]),
        )
        padded = jax.tree.map(
            lambda v: v.reshape((chunks, length) + v.shape[1:]), padded
        )

        def chunk(carry, inputs):
            u, total = carry
            (u, sums), outputs = lax.scan(
                step, (u, jnp.zeros_like(chain.src)), inputs, reverse=True
            )
            return (u, total + sums), outputs

        (_, total), (us, gammas) = lax.scan(
            chunk, (u_last, jnp.zeros_like(chain.src)), padded, reverse=True
        )
        us = us.reshape(chunks * length, size)[:n]
        gammas = gammas.reshape(chunks * length, size)[:n]
    us = jnp.concatenate([us, u_last[None]])
    gammas = jnp.concatenate([gammas, alphas[-1:]])
    return us, gammas, total


# On a CPU, the log-likelihood of a chain whose windows are whole slabs of `src`
# (equal clone counts: `hard_chain`'s pre-gathered blocks) runs `lax.switch` over
# the slabs: each branch multiplies by its slab where it lies, and a CPU runs a
# branch without synchronising. On the large workload (4 x 70 clones, T = 50 000)
# this takes 0.09 s instead of 0.13 s with the sliced product (2-core CPU). Under
# `vmap` a switch on a batched index would run every branch, so batched calls keep
# the sliced product; on a GPU a branch costs a device-to-host transfer of the
# index, so it is CPU-only; and the number of branches (slabs) is capped to bound
# compilation.
_MAX_SWITCH_SLABS = 256


def _slab_log_norms_sliced(src, pos, pi0, last):
    return forward_scan(Chain(src, pos, pi0, None, last, None))[1]


@jax.custom_batching.custom_vmap
def _slab_log_norms(src, pos, pi0, last):
    del last
    n0 = pi0.sum()
    branches = [functools.partial(_times_slab, i) for i in range(src.shape[0])]

    def step(alpha, slab):
        v = lax.switch(slab, branches, alpha, src)
        n = v.sum()
        # One fused select, where `safe_divide`'s guarded scalar adds a kernel per
        # step (a quarter of the step here). Nothing differentiates this function
        # (it is the primal of a custom VJP), so the unselected NaN is harmless.
        return jnp.where(n > 0, v / n, 0), n

    _, norms = lax.scan(step, safe_divide(pi0, n0), pos[:, 0])
    return safe_log(jnp.concatenate([n0[None], norms]))


@_slab_log_norms.def_vmap
def _slab_log_norms_vmap(axis_size, in_batched, src, pos, pi0, last):
    in_axes = tuple(0 if batched else None for batched in in_batched)
    run = jax.vmap(_slab_log_norms_sliced, in_axes=in_axes, axis_size=axis_size)
    return run(src, pos, pi0, last), True


def _times_slab(i, alpha, src):
    return jnp.dot(alpha, src[i], precision=lax.Precision.HIGHEST)


@jax.custom_vjp
def _log_likelihood(src, pi0, psi, pos, last):
    whole_slabs = psi is None and src.shape[1] == pi0.shape[0]
    if (
        whole_slabs
        and src.shape[0] <= _MAX_SWITCH_SLABS
        and jax.default_backend() == "cpu"
    ):
        return pairwise_sum(_slab_log_norms(src, pos, pi0, last))
    _, log_norms = forward_scan(Chain(src, pos, pi0, psi, last, None))
    return pairwise_sum(log_norms)


def _log_likelihood_fwd(src, pi0, psi, pos, last):
    chain = Chain(src, pos, pi0, psi, last, None)
    alphas, log_norms = forward_scan(chain)
    return pairwise_sum(log_norms), (chain, alphas)


def _log_likelihood_bwd(residuals, g):
    chain, alphas = residuals
    us, gammas, d_src = backward_scan(chain, alphas, accumulate=True)
    d_pi0 = safe_divide(us[0], jnp.sum(chain.pi0 * us[0]))
    d_psi = None if chain.psi is None else g * gammas
    return g * d_src, g * d_pi0, d_psi, None, None


_log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)


def scan_log_likelihood(chain: Chain) -> Float[Array, ""]:
    """`lnL` of a chain, with a forward-backward gradient."""
    return _log_likelihood(chain.src, chain.pi0, chain.psi, chain.pos, chain.last)
