"""The behavioural-cloning loss of the causal surrogate: KL from the exact expert's
posterior to the model's, over the canonical candidate parent sets.

Why a module of its own: the loss is what `transforms.make_train_step`
differentiates; it knows the batch and the model's output, not the optimiser or the
data stream.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from transforms import entropy, kl_divergence, masked_mean, uncertainty_weighted
from transforms.validation import check_in_range

from ._batches import TrainingBatch
from ._optimizer import decayed_weights


class BehaviouralCloningLoss(eqx.Module):
    """KL(expert ‖ model) over the canonical candidate index, for `make_train_step`.

    Call it as `loss(model, batch, key)` with a
    [`eqx_models.causal.TrainingBatch`][]; it returns `(loss, aux)`:

    - `loss`: the mean over the valid tasks of `KL(p_expert ‖ q_model)`, or of its
        uncertainty-weighted version `exp(-s·H(p_expert))·KL` when
        `uncertainty_scale = s` is set (see [`transforms.uncertainty_weighted`][]);
        this is what is differentiated.
    - `aux` (all scalars): `kl` (the unweighted mean KL), `reg_loss`
        (`½·weight_decay·Σ‖W‖²` over the decayed weight matrices: the penalty that
        AdamW's decoupled decay applies; reported, not differentiated), `total_loss`
        (`loss + reg_loss`), `pred_entropy` and `expert_entropy` (mean entropies of
        the model's and the expert's posteriors, nats), `top1_agreement` (fraction
        of valid tasks whose model argmax is the expert's argmax), `skipped` (the
        number of degenerate tasks left out), `tasks` (the batch size) and
        `n_vars`, `n_samples` (the batch's shape).

    Degenerate tasks never enter the loss or the metrics: their labels are replaced
    by a finite placeholder before any arithmetic (so no NaN reaches the gradient)
    and their terms are masked out.
    """

    uncertainty_scale: Float[Array, ""] | None
    weight_decay: float = eqx.field(static=True)

    def __init__(
        self, *, uncertainty_scale: float | None = None, weight_decay: float = 0.0
    ):
        """**Arguments:**

        - `uncertainty_scale`: `None` for plain KL, or the scale `s ≥ 0` of the
            uncertainty weighting.
        - `weight_decay`: the optimiser's weight decay, to report `reg_loss`.

        **Raises:**

        `ValueError` if `uncertainty_scale` or `weight_decay` is negative, NaN or
        infinite.
        """
        name = "BehaviouralCloningLoss"
        if uncertainty_scale is not None:
            check_in_range(name, "uncertainty_scale", uncertainty_scale, low=0)
        check_in_range(name, "weight_decay", weight_decay, low=0)
        self.uncertainty_scale = (
            None if uncertainty_scale is None else jnp.asarray(uncertainty_scale)
        )
        self.weight_decay = weight_decay

    def __call__(self, model, batch: TrainingBatch, key=None):
        """`(loss, aux)` for a batch; see the class description."""
        logits = jax.vmap(model)(batch.data)
        log_q = jax.nn.log_softmax(logits, axis=-1)
        valid = batch.valid
        placeholder = jnp.full_like(log_q, -math.log(log_q.shape[-1]))
        log_p = jnp.where(valid[:, None], batch.expert_log_probs, placeholder)
        kl = kl_divergence(log_p, log_q)
        if self.uncertainty_scale is None:
            objective = kl
        else:
            objective = uncertainty_weighted(kl_divergence, self.uncertainty_scale)(
                log_p, log_q
            )

        def mean(x):
            return masked_mean(x.astype(log_q.dtype), valid)

        loss = mean(objective)
        reg = (
            0.5
            * self.weight_decay
            * sum(
                (jnp.sum(w**2) for w in decayed_weights(jax.lax.stop_gradient(model))),
                jnp.zeros((), log_q.dtype),
            )
        )
        agree = jnp.argmax(log_q, axis=-1) == jnp.argmax(log_p, axis=-1)
        _, n, d, _ = batch.data.shape
        aux = {
            "kl": jax.lax.stop_gradient(mean(kl)),
            "reg_loss": reg,
            "total_loss": jax.lax.stop_gradient(loss) + reg,
            "pred_entropy": jax.lax.stop_gradient(mean(entropy(log_q))),
            "expert_entropy": mean(entropy(log_p)),
            "top1_agreement": mean(agree.astype(log_q.dtype)),
            "skipped": jnp.sum(~valid).astype(log_q.dtype),
            "tasks": jnp.asarray(valid.shape[0], log_q.dtype),
            "n_vars": jnp.asarray(d, log_q.dtype),
            "n_samples": jnp.asarray(n, log_q.dtype),
        }
        return loss, aux
