"""Latent inference over whole windows: a scan over time of the per-step solve."""

import jax
import jax.numpy as jnp

from transforms import pairwise_sum

from ._inference import (
    infer_first_step_impl,
    infer_impl,
    InferenceConfig,
    InferenceStats,
)
from ._model import TiDHy


def window_mean(per_step, present=None):
    """Sum over time (pairwise), then mean over windows, of an array (B, T).

    With `present` (B,), the mean runs over the windows present only (a skipped
    window has no observed entry and no loss); the plain mean is kept without it so
    that unmasked results stay bit-identical.
    """
    totals = jax.vmap(pairwise_sum)(per_step)
    if present is None:
        return jnp.mean(totals)
    count = jnp.maximum(jnp.sum(present), 1).astype(totals.dtype)
    return jnp.sum(jnp.where(present, totals, 0)) / count


def window_presence(mask):
    """`(B,)`: whether a window has any observed entry (`None` without a mask)."""
    return None if mask is None else jnp.any(mask, axis=(1, 2))


def infer_sequence(
    model: TiDHy, X, config: InferenceConfig, *, first_step: bool, mask=None
) -> tuple[jax.Array, jax.Array, InferenceStats]:
    """Infer `r_t`, `r2_t` for every step of a batch of windows `X` of shape (B, T, D).

    `model` must already be frozen (stopped gradients). `r_0` comes from the
    first-step inference if `first_step`, else it is 0; `r2_0 = 0`. Returns `R` of
    shape (B, T, r_dim), `R2` of shape (B, T, r2_dim) and the statistics with arrays
    of shape (B, T) (at t = 0: those of the first-step inference, or zero iterations).

    `mask` (B, T, D), True where observed, drops the spatial terms of missing
    entries (whose `X` must be 0); a window with no observed entry is skipped: its
    latents stay 0 and its statistics report 0 iterations, converged.
    """
    B, T, _ = X.shape
    present = window_presence(mask)
    r2_0 = jnp.zeros((B, model.r2_dim), X.dtype)
    if first_step:
        r0, stats0 = infer_first_step_impl(
            model, X[:, 0], config, None if mask is None else mask[:, 0], present
        )
    else:
        r0 = jnp.zeros((B, model.r_dim), X.dtype)
        stats0 = InferenceStats(
            n_iter=jnp.zeros((B,), jnp.int32),
            converged=jnp.ones((B,), bool),
            rel_change=jnp.zeros((B,), X.dtype),
            energy=jnp.zeros((B,), X.dtype),
            finite=jnp.ones((B,), bool),
        )

    def step(carry, inputs):
        x_t, mask_t = inputs
        r_prev, r2_prev = carry
        r, r2, stats = infer_impl(model, x_t, r_prev, r2_prev, config, mask_t, present)
        return (r, r2), (r, r2, stats)

    over_time = lambda a: None if a is None else jnp.swapaxes(a[:, 1:], 0, 1)
    _, (R, R2, stats) = jax.lax.scan(step, (r0, r2_0), (over_time(X), over_time(mask)))
    R = jnp.concatenate([r0[:, None], jnp.swapaxes(R, 0, 1)], axis=1)
    R2 = jnp.concatenate([r2_0[:, None], jnp.swapaxes(R2, 0, 1)], axis=1)
    stats = jax.tree.map(
        lambda first, rest: jnp.concatenate(
            [first[:, None], jnp.swapaxes(rest, 0, 1).astype(first.dtype)], axis=1
        ),
        stats0,
        stats,
    )
    if present is not None:
        # A skipped window's solve is a no-op (zero energy): report it as such.
        keep = present[:, None]
        stats = stats._replace(
            n_iter=jnp.where(keep, stats.n_iter, 0),
            converged=jnp.where(keep, stats.converged, True),
            rel_change=jnp.where(keep, stats.rel_change, 0),
        )
    return R, R2, stats
