"""Parallel-in-time inference over a `Chain`: associative products of step matrices.

Every step is an `S x S` matrix kept in a row-normalised form `(A, c)`: the matrix is
`diag(exp(c)) @ A` with each row of `A` summing to one (or all zero, with `c = -inf`).
Two such elements combine as

    (A1, c1) * (A2, c2) = normalise_rows(A1 @ (exp(c2 - m)[:, None] * A2)),
                          c1 + m + log(row sums),         m = max(c2),

which is associative and keeps a separate log scale per starting state, so products
of tens of thousands of steps neither underflow nor lose a state whose continuation
is unlikely. The first element has every row equal to the initial message, so every
prefix product has identical rows: the filtered message and the log-likelihood so far.

- `tree_log_likelihood`: a pairwise tree reduction (`T - 1` products, depth
  `ceil(log2 T)`); differentiating it gives a parallel E-step.
- `parallel_forward` / `parallel_backward`: `lax.associative_scan` prefix and suffix
  products (about `2T` products each, depth `O(log T)`).
"""

import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from ._chain import Chain, evidence_weights, safe_divide, safe_log, window


HIGHEST = lax.Precision.HIGHEST


def _tree_sum(x: Array) -> Array:
    """Pairwise sum over the leading axis."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
        x = x[0::2] + x[1::2]
    return x[0]


def _n_chunks(n: int, src_size: int, window_size: int) -> int:
    # Accumulating the cotangent of each chunk of steps separately and summing the
    # chunks pairwise bounds the float error by about (n / chunks + log2(chunks))
    # ulps instead of n; the chunk buffers are capped at the size of the gathered
    # windows themselves.
    return max(1, min(math.isqrt(n), (n * window_size) // max(src_size, 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gather_windows(src: Array, pos: Array, size: int) -> Array:
    """Every step's window, `[n, size, size]`."""
    return jax.vmap(lambda p: window(src, p, size))(pos)


def _gather_fwd(src, pos, size):
    return gather_windows(src, pos, size), (pos, src)


def _gather_bwd(size, residuals, g):
    pos, src = residuals
    shape, n = src.shape, pos.shape[0]
    if n == 0:
        return jnp.zeros_like(src), None
    chunks = _n_chunks(n, math.prod(shape), size * size)
    per_chunk = -(-n // chunks)
    pad = chunks * per_chunk - n
    g = jnp.concatenate([g, jnp.zeros((pad, size, size), g.dtype)])
    pos = jnp.concatenate([pos, jnp.zeros((pad, 3), pos.dtype)])
    chunk = jnp.repeat(jnp.arange(chunks, dtype=pos.dtype), per_chunk)
    indices = jnp.concatenate([chunk[:, None], pos], axis=-1)
    indices = indices.reshape(chunks, per_chunk, 4)
    g = g.reshape(chunks, per_chunk, size, size)
    numbers = lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3),
        inserted_window_dims=(0, 1),
        scatter_dims_to_operand_dims=(0, 1, 2, 3),
    )
    sums = lax.scatter_add(
        jnp.zeros((chunks,) + tuple(shape), g.dtype),
        indices,
        g,
        numbers,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return _tree_sum(sums), None


gather_windows.defvjp(_gather_fwd, _gather_bwd)


def _combine(first, second):
    A1, c1 = first
    A2, c2 = second
    shift = lax.stop_gradient(jnp.max(c2, axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0)
    scaled = jnp.exp(c2 - shift)[..., :, None] * A2
    B = jnp.einsum("...ij,...jk->...ik", A1, scaled, precision=HIGHEST)
    s = B.sum(-1)
    return safe_divide(B, s[..., None]), c1 + shift + safe_log(s)


def _steps(chain: Chain):
    """Weighted step matrices `[T-1, S, S]`, the initial message and the offsets."""
    size = chain.size
    B = cast(Array, gather_windows(chain.src, chain.pos, size))
    if chain.psi is None:
        return B, chain.pi0, jnp.zeros((chain.length,), chain.pi0.dtype)
    weights, offset = evidence_weights(chain.psi)
    # A state without evidence at t-1 cannot be left at t: zeroing its row keeps
    # rows of unrelated states (padded windows) out of the backward products.
    rows = lax.stop_gradient(weights[:-1] > 0)
    B = B * weights[1:, None, :] * rows[:, :, None]
    return B, chain.pi0 * weights[0], offset


def _elements(B, v0, offset):
    size = v0.shape[0]
    n0 = v0.sum()
    first_A = jnp.broadcast_to(safe_divide(v0, n0), (1, size, size))
    first_c = jnp.full((1, size), safe_log(n0) + offset[0])
    s = B.sum(-1)
    A = safe_divide(B, s[..., None])
    c = safe_log(s) + offset[1:, None]
    return jnp.concatenate([first_A, A]), jnp.concatenate([first_c, c])


def tree_log_likelihood(chain: Chain) -> Float[Array, ""]:
    """`lnL` of a chain by a pairwise tree of products."""
    A, c = _elements(*_steps(chain))
    size = chain.size
    while A.shape[0] > 1:
        if A.shape[0] % 2:
            A = jnp.concatenate([A, jnp.eye(size, dtype=A.dtype)[None]])
            c = jnp.concatenate([c, jnp.zeros((1, size), c.dtype)])
        A, c = _combine((A[0::2], c[0::2]), (A[1::2], c[1::2]))
    return c[0, 0]


def parallel_forward(chain: Chain) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """Filtered messages and per-step log normalisers, as `forward_scan`."""
    B, v0, offset = _steps(chain)
    A, c = _elements(B, v0, offset)
    prefix_A, _ = lax.associative_scan(_combine, (A, c))
    alphas = prefix_A[:, 0, :]
    predicted = jnp.einsum("ti,tij->tj", alphas[:-1], B, precision=HIGHEST)
    norms = jnp.concatenate([v0.sum()[None], predicted.sum(-1)])
    return alphas, safe_log(norms) + offset


def parallel_backward(
    chain: Chain, alphas: Float[Array, "T S"]
) -> tuple[Float[Array, "T S"], Float[Array, "T S"]]:
    """Backward messages `u` and smoothed marginals `gamma`, as `backward_scan`."""
    B, v0, offset = _steps(chain)
    A, c = _elements(B, v0, offset)
    size = chain.size
    if A.shape[0] > 1:
        _, suffix_c = lax.associative_scan(
            lambda later, earlier: _combine(earlier, later),
            (A[1:], c[1:]),
            reverse=True,
        )
        log_beta = jnp.concatenate([suffix_c, jnp.zeros((1, size), c.dtype)])
    else:
        log_beta = jnp.zeros((1, size), c.dtype)
    if chain.psi is None:
        log_w = jnp.zeros_like(log_beta).at[-1].set(safe_log(chain.last))
    else:
        log_w = chain.psi - offset[:, None]
    return _normalise_log(log_w + log_beta), _normalise_log(safe_log(alphas) + log_beta)


def _normalise_log(log_v: Array) -> Array:
    top = jnp.max(log_v, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0)
    v = jnp.exp(log_v - top)
    return safe_divide(v, v.sum(-1, keepdims=True))
