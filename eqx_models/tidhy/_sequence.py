"""Latent inference over whole windows: a scan over time of the per-step solve."""

import jax
import jax.numpy as jnp

from ._inference import (
    infer_first_step_impl,
    infer_impl,
    InferenceConfig,
    InferenceStats,
)
from ._model import TiDHy


def infer_sequence(
    model: TiDHy, X, config: InferenceConfig, *, first_step: bool
) -> tuple[jax.Array, jax.Array, InferenceStats]:
    """Infer `r_t`, `r2_t` for every step of a batch of windows `X` of shape (B, T, D).

    `model` must already be frozen (stopped gradients). `r_0` comes from the
    first-step inference if `first_step`, else it is 0; `r2_0 = 0`. Returns `R` of
    shape (B, T, r_dim), `R2` of shape (B, T, r2_dim) and the statistics with arrays
    of shape (B, T) (at t = 0: those of the first-step inference, or zero iterations).
    """
    B, T, _ = X.shape
    r2_0 = jnp.zeros((B, model.r2_dim), X.dtype)
    if first_step:
        r0, stats0 = infer_first_step_impl(model, X[:, 0], config)
    else:
        r0 = jnp.zeros((B, model.r_dim), X.dtype)
        stats0 = InferenceStats(
            n_iter=jnp.zeros((B,), jnp.int32),
            converged=jnp.ones((B,), bool),
            rel_change=jnp.zeros((B,), X.dtype),
            energy=jnp.zeros((B,), X.dtype),
            finite=jnp.ones((B,), bool),
        )

    def step(carry, x_t):
        r_prev, r2_prev = carry
        r, r2, stats = infer_impl(model, x_t, r_prev, r2_prev, config)
        return (r, r2), (r, r2, stats)

    _, (R, R2, stats) = jax.lax.scan(step, (r0, r2_0), jnp.swapaxes(X[:, 1:], 0, 1))
    R = jnp.concatenate([r0[:, None], jnp.swapaxes(R, 0, 1)], axis=1)
    R2 = jnp.concatenate([r2_0[:, None], jnp.swapaxes(R2, 0, 1)], axis=1)
    stats = jax.tree.map(
        lambda first, rest: jnp.concatenate(
            [first[:, None], jnp.swapaxes(rest, 0, 1).astype(first.dtype)], axis=1
        ),
        stats0,
        stats,
    )
    return R, R2, stats
