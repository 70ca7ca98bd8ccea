"""Max-product (Viterbi) decoding of a `Chain` with backtracking."""

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from transforms import pairwise_sum

from ._chain import Chain, safe_log, window


def _shift(v: Array) -> tuple[Array, Array]:
    top = jnp.max(v)
    top = jnp.where(jnp.isfinite(top), top, 0)
    return v - top, top


def viterbi_scan(chain: Chain) -> tuple[Int[Array, " T"], Float[Array, ""]]:
    """The most probable slot path and its log-probability.

    Works in log space (max-plus), so no path is lost to underflow however unlikely
    its transitions; the running scores are shifted to a maximum of zero at every
    step (for full relative precision in the comparisons) and the shifts are summed
    pairwise for the path log-probability. Ties go to the lowest index, both for the
    final state and for every back-pointer (`argmax` returns the first maximum).
    """
    size = chain.size
    log_src = safe_log(chain.src)
    log_w = chain.psi
    score0 = safe_log(chain.pi0)
    if log_w is not None:
        score0 = score0 + log_w[0]
    score0, top0 = _shift(score0)

    def step(score, inputs):
        p, lw = inputs
        candidates = score[:, None] + window(log_src, p, size)
        pointer = jnp.argmax(candidates, axis=0).astype(jnp.int32)
        score = candidates.max(axis=0)
        if lw is not None:
            score = score + lw
        score, top = _shift(score)
        return score, (pointer, top)

    xs = (chain.pos, None if log_w is None else log_w[1:])
    score, (pointers, tops) = lax.scan(step, score0, xs)
    final = jnp.argmax(score).astype(jnp.int32)
    log_prob = pairwise_sum(jnp.concatenate([top0[None], tops])) + score[final]

    def back(state, pointer):
        previous = pointer[state]
        return previous, previous

    _, path = lax.scan(back, final, pointers, reverse=True)
    return jnp.concatenate([path, final[None]]), log_prob
