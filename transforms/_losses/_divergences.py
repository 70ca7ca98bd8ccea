"""Divergences between categorical distributions given as log-probabilities.

Entropy, KL divergence and total variation, where zero-probability outcomes (`-inf`)
contribute exactly 0 with finite gradients, and `uncertainty_weighted`, which
down-weights a divergence by the entropy of the reference. The causal surrogate's
loss and evaluation use them.
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._validation import (
    check_callable,
    check_in_range,
    check_probabilities,
    check_type,
    Checks,
    fail,
    typechecked,
)


def _check_pair(name: str, log_p, log_q, axis: int) -> tuple[Array, Array]:
    log_p = jnp.asarray(log_p)
    log_q = jnp.asarray(log_q)
    if log_p.shape != log_q.shape:
        raise fail(
            name,
            "log_q",
            f"of the shape of `log_p` {log_p.shape} (aligned distributions)",
            f"shape {log_q.shape}",
        )
    # Traced, both checks share one conditional (`Checks` says why).
    checks = Checks()
    log_p = _check_log_probabilities(name, "log_p", log_p, axis, checks)
    log_q = _check_log_probabilities(name, "log_q", log_q, axis, checks)
    return checks.guard((log_p, log_q))


def _check_log_probabilities(
    name: str, arg: str, x: Array, axis: int, checks: Checks | None = None
) -> Array:
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise fail(name, "axis", f"an axis of `{arg}` (shape {x.shape})", f"{axis}")
    return check_probabilities(name, arg, x, axis=axis, log=True, checks=checks)


def _where_positive(p: Array, x: Array) -> Array:
    # Terms with p = 0 contribute exactly 0 even where the log-probabilities are
    # -inf; masking the inputs too keeps the gradient of the unused branch finite.
    return jnp.where(p > 0, x, 0.0)


@typechecked
def entropy(log_p: Float[ArrayLike, "..."], *, axis: int = -1) -> Float[Array, "..."]:
    """Shannon entropy `H(p) = -Σ_i p_i log p_i` in nats.

    **Arguments:**

    - `log_p`: log-probabilities, normalised along `axis`; entries of `-inf` (zero
        probability) contribute 0.
    - `axis`: the axis holding the distribution.

    **Returns:**

    The entropy, with `axis` removed from the shape.

    **Raises:**

    `ValueError` if `axis` is not an axis of `log_p`, or if `log_p` is not
    normalised (its exponentials must sum to 1 within the square root of the
    dtype's epsilon; no NaN or `+inf`), at once for concrete arrays and by
    `eqx.error_if` under `jit`.

    !!! example

        ```python
        entropy(jnp.log(jnp.array([0.5, 0.5])))  # log 2
        ```
    """
    log_p = _check_log_probabilities("entropy", "log_p", jnp.asarray(log_p), axis)
    p = jnp.exp(log_p)
    safe = _where_positive(p, log_p)
    return -jnp.sum(_where_positive(p, p * safe), axis=axis)


@typechecked
def kl_divergence(
    log_p: Float[ArrayLike, "..."],
    log_q: Float[ArrayLike, "..."],
    *,
    axis: int = -1,
) -> Float[Array, "..."]:
    """Kullback–Leibler divergence `KL(p ‖ q) = Σ_i p_i (log p_i - log q_i)` in nats.

    Both distributions are given as log-probabilities over the same, aligned
    outcomes (entry `i` of `log_p` and of `log_q` is the same event).

    **Arguments:**

    - `log_p`: log-probabilities of the reference distribution `p` (for behavioural
        cloning: the expert), normalised along `axis`. Entries of `-inf` contribute 0
        to the value and to the gradient.
    - `log_q`: log-probabilities of `q` (the model), same shape. Where `p_i > 0` and
        `q_i = 0` the divergence is `+inf`, as it should be.
    - `axis`: the axis holding the distributions.

    **Returns:**

    The divergence, with `axis` removed from the shape. Differentiable in both
    arguments; the gradient with respect to `log_q` is `-p` (plus whatever the
    caller's normalisation of `log_q` adds).

    **Raises:**

    `ValueError` if the shapes differ, `axis` is not an axis, or either input is not
    normalised along `axis` (as for [`transforms.entropy`][]); `TypeError` for
    non-floating inputs.

    !!! example

        ```python
        log_q = jax.nn.log_softmax(model_logits)
        loss = jnp.mean(kl_divergence(expert_log_probs, log_q))
        ```
    """
    log_p, log_q = _check_pair("kl_divergence", log_p, log_q, axis)
    p = jnp.exp(log_p)
    safe_p = _where_positive(p, log_p)
    safe_q = _where_positive(p, log_q)
    return jnp.sum(_where_positive(p, p * (safe_p - safe_q)), axis=axis)


@typechecked
def total_variation(
    log_p: Float[ArrayLike, "..."],
    log_q: Float[ArrayLike, "..."],
    *,
    axis: int = -1,
) -> Float[Array, "..."]:
    """Total variation distance `TV(p, q) = ½ Σ_i |p_i - q_i|`, in `[0, 1]`.

    **Arguments:**

    - `log_p`, `log_q`: log-probabilities of two aligned distributions, normalised
        along `axis`, same shape.
    - `axis`: the axis holding the distributions.

    **Returns:**

    The distance, with `axis` removed from the shape.

    **Raises:**

    `ValueError` if the shapes differ, `axis` is not an axis, or either input is not
    normalised along `axis` (as for [`transforms.entropy`][]); `TypeError` for
    non-floating inputs.
    """
    log_p, log_q = _check_pair("total_variation", log_p, log_q, axis)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=axis)


class UncertaintyWeighted(eqx.Module):
    """A divergence weighted by the reference distribution's certainty.

    Built by [`transforms.uncertainty_weighted`][]; call it like the wrapped
    divergence, `weighted(log_p, log_q)`.
    """

    divergence: Callable
    scale: Float[Array, ""]
    axis: int = eqx.field(static=True)

    def __call__(self, log_p, log_q):
        """The weighted divergence `exp(-scale·H(p)) · divergence(log_p, log_q)`.

        **Arguments:**

        - `log_p`: log-probabilities of the reference (expert) distribution.
        - `log_q`: log-probabilities of the model, same shape.

        **Returns:**

        The weighted divergence, one value per distribution (the shape of
        `divergence(log_p, log_q)`). The weight is a constant for the gradient
        with respect to `log_q`; it depends on `log_p` only.

        **Raises:**

        `ValueError` if `log_p` (checked by [`transforms.entropy`][]) or, with the
        default divergence, `log_q` does not hold log-probabilities along `axis`
        (NaN, `+inf`, or exponentials not summing to 1): at once for concrete
        arrays, by `eqx.error_if` under `jit`.
        """
        weight = jnp.exp(-self.scale * entropy(log_p, axis=self.axis))
        return weight * self.divergence(log_p, log_q)


def uncertainty_weighted(
    divergence: Callable = kl_divergence,
    scale: float | Float[ArrayLike, ""] = 1.0,
    *,
    axis: int = -1,
) -> UncertaintyWeighted:
    """Weight a divergence by `exp(-scale·H(p))`, the certainty of the reference.

    In behavioural cloning from a Bayesian expert, tasks on which the expert is
    uncertain (high entropy `H(p)`) carry less information about the right answer;
    this down-weights them smoothly. `scale = 0` recovers the plain divergence.

    **Arguments:**

    - `divergence`: `divergence(log_p, log_q)` returning one value per distribution,
        e.g. [`transforms.kl_divergence`][] (the default).
    - `scale`: a non-negative number (nats⁻¹); larger values ignore uncertain
        references more. It is stored as an array leaf, so changing it does not
        recompile a step that closes over the module.
    - `axis`: the axis of `log_p` holding the distribution (for the entropy).

    **Returns:**

    A [`transforms.UncertaintyWeighted`][] module, called as `weighted(log_p, log_q)`.

    **Raises:**

    `TypeError` if `divergence` is not callable or `axis` not an int; `ValueError`
    if `scale` is not a scalar, or is negative, NaN or infinite (at once for a
    concrete number, by `eqx.error_if` when traced).

    !!! example

        ```python
        weighted_kl = uncertainty_weighted(kl_divergence, scale=0.5)
        loss = jnp.mean(weighted_kl(expert_log_probs, jax.nn.log_softmax(logits)))
        ```
    """
    name = "uncertainty_weighted"
    check_callable(name, "divergence", divergence)
    check_type(name, "axis", axis, int, "an int")
    scale_array = jnp.asarray(check_in_range(name, "scale", scale, low=0))
    if scale_array.ndim != 0:
        raise fail(name, "scale", "a scalar", f"shape {scale_array.shape}")
    if not jnp.issubdtype(scale_array.dtype, jnp.floating):
        scale_array = scale_array.astype(jnp.result_type(float))
    return UncertaintyWeighted(divergence=divergence, scale=scale_array, axis=axis)
