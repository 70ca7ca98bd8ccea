"""Evaluation of a fixed `TiDHy` over whole windows, recording every intermediate.

Unlike the training loss, which predicts with the freshly inferred slow latent,
`evaluate_record` makes genuine one-step-ahead predictions with the previous one,
and returns latents, predictions and losses as a `Record` for metrics and plots.
The whole run is one compiled scan over time.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from transforms.validation import typechecked

from ._inference import (
    check_features,
    check_mask,
    frozen,
    InferenceConfig,
    observed_only,
)
from ._model import TiDHy
from ._sequence import infer_sequence, window_mean, window_presence


class Record(NamedTuple):
    """What [`eqx_models.tidhy.evaluate_record`][] returns; arrays of shape
    `(B, T, ...)` unless stated.

    - `x_hat`: the reconstruction `decode(r_t)` from the inferred latent.
    - `x_bar`: the one-step-ahead prediction `decode(r̄_t)`; `decode(0)` at t = 0.
    - `r`, `r2`: the inferred latents (`r2_0 = 0`).
    - `r_bar`: the prediction `V(w(r2_{t-1})) r_{t-1}` made before seeing `x_t`
        (0 at t = 0).
    - `w`: the mixture weights `w(r2_t)`; `gains`: the bias gains with
        `dyn_bias` (else `None`).
    - `spatial_loss_hat`, `spatial_loss_bar`: the per-feature losses of `x_hat` and
        `x_bar`; `temporal_loss`: `(r_t - r̄_t)²` per latent (0 at t = 0).
    - `n_iter`, `converged`, `finite`: the inference diagnostics per window and step
        (t = 0: the first-step inference), shape `(B, T)`.
    - `loss_hat`, `loss_bar`: the spatial losses summed over time and features,
        averaged over windows; `loss_temp`: likewise for the temporal loss, times
        `temp_weight`. Scalars.

    With a `mask`, the spatial losses are 0 at missing entries (so the sums run
    over the observed ones), `x_hat` and `x_bar` are still given everywhere (at a
    missing entry they are the model's imputation), and a window with no observed
    entry is skipped: its latents, predictions' latents and losses are 0, its
    `n_iter` 0, and the scalar losses average over the other windows.
    """

    x_hat: Float[Array, "B T D"]
    x_bar: Float[Array, "B T D"]
    r: Float[Array, "B T r"]
    r_bar: Float[Array, "B T r"]
    r2: Float[Array, "B T r2"]
    w: Float[Array, "B T mix"]
    gains: Float[Array, "B T r"] | None
    spatial_loss_hat: Float[Array, "B T D"]
    spatial_loss_bar: Float[Array, "B T D"]
    temporal_loss: Float[Array, "B T r"]
    n_iter: Int[Array, "B T"]
    converged: Bool[Array, "B T"]
    finite: Bool[Array, "B T"]
    loss_hat: Float[Array, ""]
    loss_bar: Float[Array, ""]
    loss_temp: Float[Array, ""]


def evaluate_impl(model: TiDHy, X, config: InferenceConfig, mask=None) -> Record:
    """`evaluate_record` without checks (`X` already 0 where `mask` is False)."""
    model = frozen(model)
    present = window_presence(mask)
    R, R2, stats = infer_sequence(model, X, config, first_step=True, mask=mask)
    over_bt = lambda f: jax.vmap(jax.vmap(f))
    r_bar = over_bt(model.predict)(R[:, :-1], R2[:, :-1])
    r_bar = jnp.concatenate([jnp.zeros_like(R[:, :1]), r_bar], axis=1)
    w, gains = over_bt(model.mixture)(R2)
    spatial_hat = over_bt(model.spatial_loss)(R, X)
    spatial_bar = over_bt(model.spatial_loss)(r_bar, X)
    temporal = (R - r_bar) ** 2
    temporal = temporal.at[:, 0].set(0.0)
    if mask is not None and present is not None:
        spatial_hat = jnp.where(mask, spatial_hat, 0)
        spatial_bar = jnp.where(mask, spatial_bar, 0)
        temporal = jnp.where(present[:, None, None], temporal, 0)
    return Record(
        x_hat=over_bt(model.decode)(R),
        x_bar=over_bt(model.decode)(r_bar),
        r=R,
        r_bar=r_bar,
        r2=R2,
        w=w,
        gains=gains,
        spatial_loss_hat=spatial_hat,
        spatial_loss_bar=spatial_bar,
        temporal_loss=temporal,
        n_iter=stats.n_iter,
        converged=stats.converged,
        finite=stats.finite,
        loss_hat=window_mean(spatial_hat.sum(-1), present),
        loss_bar=window_mean(spatial_bar.sum(-1), present),
        loss_temp=model.temp_weight * window_mean(temporal.sum(-1), present),
    )


_evaluate = eqx.filter_jit(evaluate_impl)


@typechecked
def evaluate_record(
    model: TiDHy,
    X: Float[Array, "B T D"],
    config: InferenceConfig = InferenceConfig(),
    *,
    mask: Bool[Array, "*shape"] | None = None,
) -> Record:
    """Run the model over whole windows without updating it, recording everything.

    At t = 0, `r_0` comes from [`eqx_models.tidhy.infer_first_step`][] and
    `r2_0 = 0`. At every t ≥ 1 the model first predicts `r̄_t = V(w(r2_{t-1}))
    r_{t-1}` and `x̄_t = decode(r̄_t)` (a genuine one-step-ahead prediction, made
    with the previous `r2`; the training loss instead uses the freshly inferred
    `r2_t`), then infers `(r_t, r2_t)` from `x_t` with
    [`eqx_models.tidhy.infer`][]. The whole computation is one compiled function: a
    scan over time whose steps solve every window at once (a `vmap` in the
    per-window mode).

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `X`: windows of observations, shape `(B, T, D)` with `T >= 2`.
    - `config`: an [`eqx_models.tidhy.InferenceConfig`][].
    - `mask`: optional bool array of shape `(B, T, D)` (or `(B, T)` for whole
        frames), True where `X` is observed. Missing entries add nothing to the
        losses and to the inference energies (they may hold NaN); the latent
        inference still runs at every step, from the temporal prior where a frame
        is missing entirely; a window with nothing observed is skipped.

    **Returns:**

    An [`eqx_models.tidhy.Record`][].

    For a long recording, [`eqx_models.tidhy.evaluate_recording`][] runs this in
    chunks of windows and stitches the windows into one trajectory.

    **Raises:**

    `ValueError` if `D` differs from the model's `input_dim`, `T < 2`, `mask` has
    another shape than `X`, or (the observed entries of) `X` is not finite;
    `TypeError` for a `mask` that is not a bool array.
    """
    check_features("evaluate_record", "X", X, model)
    if X.shape[1] < 2:
        raise ValueError(
            f"evaluate_record: `X` must hold windows of at least 2 time steps, got "
            f"shape {X.shape}."
        )
    mask = check_mask("evaluate_record", mask, X)
    X = observed_only("evaluate_record", "X", X, mask)
    return _evaluate(model, X, config, mask)
