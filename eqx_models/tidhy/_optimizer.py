"""TiDHy's optimiser: AdamW per parameter group on epoch milestones, renormalising
projections and GradNorm's own optimiser, as one optax transformation.

Why a module of its own: the optimiser is a value built from the training
configuration and the learner's structure (see the trainer contract in
`transforms`), used by the trainer and by anyone writing their own loop; the loss
it optimises lives in `_training.py`.
"""

from collections.abc import Callable, Hashable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from transforms import hashable_optimizer, inject_learning_rate
from transforms.validation import check_size

from ._training import Learner, N_TASKS, TiDHyTrainConfig


_THETA_LABELS = (
    "decoder",
    "decoder_weight",
    "temporal",
    "temporal_matrices",
    "hypernet",
)


def _projection(name: str, fn: Callable) -> optax.GradientTransformation:
    """Turn `updates` into `fn(params + updates) - params`: a projection after the
    step (renormalisation), expressed as an update so optax can chain it."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name}: the optimiser update needs `params`.")
        projected = jax.tree.map(lambda u, p: fn(p + u) - p, updates, params)
        return projected, state

    return optax.GradientTransformation(init_fn, update_fn)


def _unit_columns(W):
    return W / jnp.maximum(jnp.linalg.norm(W, axis=0, keepdims=True), 1e-12)


def _unit_rows(U):
    flat = U.reshape(U.shape[0], -1)
    flat = flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    return flat.reshape(U.shape)


def _labels(params, train: TiDHyTrainConfig):
    def label(path, _):
        names = [getattr(k, "name", None) for k in path]
        if "gradnorm" in names:
            return "gradnorm" if names[-1] == "weights" else "frozen"
        if "decoder" in names:
            if train.normalize_decoder and names[-2:] == ["linear_in", "weight"]:
                return "decoder_weight"
            return "decoder"
        if "hypernet" in names:
            return "hypernet"
        if names[-1] == "temporal" and train.normalize_temporal:
            return "temporal_matrices"
        return "temporal"

    return jax.tree_util.tree_map_with_path(label, params)


def resolved_milestones(train: TiDHyTrainConfig, n_epochs: int) -> tuple[int, ...]:
    """The milestone epochs: `train.milestones`, or the original's rule
    `n_epochs // 5 * k` (k = 1..4) when it is `None`."""
    if train.milestones is not None:
        return tuple(train.milestones)
    return tuple(n_epochs // 5 * k for k in range(1, 5) if n_epochs // 5)


def epoch_schedule(
    learning_rate: float,
    train: TiDHyTrainConfig,
    *,
    steps_per_epoch: int,
    n_epochs: int,
) -> optax.Schedule:
    """A step-indexed schedule multiplying `learning_rate` by `gamma` at each
    milestone epoch."""
    milestones = resolved_milestones(train, n_epochs)
    if not milestones:
        return optax.constant_schedule(learning_rate)
    return optax.piecewise_constant_schedule(
        learning_rate, {m * steps_per_epoch: train.gamma for m in milestones}
    )


def make_optimizer(
    learner: Learner,
    train: TiDHyTrainConfig = TiDHyTrainConfig(),
    *,
    steps_per_epoch: int = 1,
    n_epochs: int = 1000,
) -> optax.GradientTransformation:
    """The optax optimiser of TiDHy training.

    Clips the global norm of θ's gradient at `clip_grad` (the GradNorm weights are not
    part of it), then applies AdamW with separate learning rates to the decoder,
    the temporal parameters (`temporal`, `temporal_bias`) and the hypernetwork, each
    with the milestone schedule (counted in epochs), followed by the optional
    renormalisations. With GradNorm the task weights get their own AdamW
    (`lr_gradnorm`) followed by the projection `w <- 3 softmax(w)`, and the recorded
    initial losses are frozen. Everything is one `optax.multi_transform`, so the
    state of every part, the GradNorm weights' included, persists across steps.

    The milestone schedules are injected (`optax.inject_hyperparams`): the state
    records each group's current rate, and the decoder's, the first in the state,
    is the `learning_rate` a training step reports. The optimiser compares by value
    ([`transforms.hashable_optimizer`][]): equal configurations and learner
    structures give equal optimisers, which share one compiled step.

    **Arguments:**

    - `learner`: a [`eqx_models.tidhy.Learner`][] (its structure sets the labels).
    - `train`: a [`eqx_models.tidhy.TiDHyTrainConfig`][].
    - `steps_per_epoch`: optimiser steps per epoch (1 with full-batch epochs).
    - `n_epochs`: the run length, for the default milestones.

    **Returns:**

    An `optax.GradientTransformation`; initialise it with
    `optimizer.init(eqx.filter(learner, eqx.is_inexact_array))`.

    **Raises:**

    `ValueError`/`TypeError` if `steps_per_epoch` or `n_epochs` is not a positive
    integer.
    """
    check_size("make_optimizer", "steps_per_epoch", steps_per_epoch)
    check_size("make_optimizer", "n_epochs", n_epochs)
    params = eqx.filter(learner, eqx.is_inexact_array)
    return hashable_optimizer(
        _optimizer,
        structure=jax.tree.structure(params),
        train=train,
        steps_per_epoch=steps_per_epoch,
        n_epochs=n_epochs,
    )


def _optimizer(
    structure, train: TiDHyTrainConfig, steps_per_epoch: int, n_epochs: int
) -> optax.GradientTransformation:
    """What `make_optimizer` builds, from the tree structure of the learner's
    parameters and the settings."""
    placeholder = jax.tree_util.tree_unflatten(structure, range(structure.num_leaves))
    labels = _labels(placeholder, train)

    def adamw(lr):
        schedule = epoch_schedule(
            lr, train, steps_per_epoch=steps_per_epoch, n_epochs=n_epochs
        )
        return inject_learning_rate(
            optax.adamw,
            schedule,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=train.weight_decay,
        )

    transforms: dict[Hashable, optax.GradientTransformation] = {
        "decoder": adamw(train.lr_decoder),
        "decoder_weight": optax.chain(
            adamw(train.lr_decoder),
            _projection("normalize_decoder", _unit_columns),
        ),
        "temporal": adamw(train.lr_temporal),
        "temporal_matrices": optax.chain(
            adamw(train.lr_temporal), _projection("normalize_temporal", _unit_rows)
        ),
        "hypernet": adamw(train.lr_hyper),
        "gradnorm": optax.chain(
            optax.adamw(
                train.lr_gradnorm,
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=train.weight_decay,
            ),
            _projection("grad_norm", lambda w: N_TASKS * jax.nn.softmax(w)),
        ),
        "frozen": optax.set_to_zero(),
    }
    used = set(jax.tree.leaves(labels))
    transforms = {k: v for k, v in transforms.items() if k in used}
    theta_mask = jax.tree.map(lambda label: label in _THETA_LABELS, labels)
    return optax.chain(
        optax.masked(optax.clip_by_global_norm(train.clip_grad), theta_mask),
        optax.multi_transform(transforms, labels),
    )
