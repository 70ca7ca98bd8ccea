"""The TiDHy trainer: batches of windows, the learner, the optimiser and the loss
handed to `transforms.fit`.

Why a module of its own: it only wires the family's parts (`_training.py`'s loss
and learner, `_optimizer.py`'s optimiser) into the library's training loop, and
records the configuration its checkpoints are checked against.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax.random as jr
from beartype import beartype
from jaxtyping import Array, Bool, Float, jaxtyped

import transforms
from transforms import check_resumed_config, static_fields

from ._inference import check_features, check_mask, InferenceConfig, observed_only
from ._model import TiDHy
from ._optimizer import make_optimizer, resolved_milestones
from ._training import init_learner, Learner, TiDHyTrainConfig, training_loss


class _Loss(eqx.Module):
    """`training_loss` with its configurations bound; equal configurations compare
    equal, so the compiled step is reused."""

    inference: InferenceConfig
    train: TiDHyTrainConfig

    def __call__(self, learner: Learner, windows, key):
        return training_loss(
            learner, windows, key, inference=self.inference, train=self.train
        )


@jaxtyped(typechecker=beartype)
def train(
    model: TiDHy,
    windows: Float[Array, "N T D"],
    *,
    n_epochs: int,
    inference: InferenceConfig = InferenceConfig(),
    train: TiDHyTrainConfig = TiDHyTrainConfig(),
    batch_size: int | None = None,
    key=None,
    eval_fn: Callable[[TiDHy], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    allow_config_change: bool = False,
    deterministic: bool = False,
    progress: bool | None = None,
    mask: Bool[Array, "*shape"] | None = None,
) -> transforms.FitResult:
    """Train a TiDHy model with the library's training step, loop and checkpoints.

    (Formerly `tidhy.fit`, a name that shadowed [`transforms.fit`][]; it still works,
    with a `DeprecationWarning`, until the next release.)

    Builds a [`eqx_models.tidhy.Learner`][] (recording GradNorm's initial losses on
    the first batch), the optimiser of [`eqx_models.tidhy.make_optimizer`][], a step
    from [`transforms.make_train_step`][] on [`eqx_models.tidhy.training_loss`][], and
    runs [`transforms.fit`][]. An epoch is one pass over the windows: one full-batch
    step when `batch_size` is `None` (the original's setting for the synthetic
    data), else `N // batch_size` steps over a permutation drawn per epoch from
    `key` (a function of the step index, so a resumed run sees the same batches).

    Training stops with [`transforms.NonFiniteLossError`][], naming the step and
    keeping the last good checkpoint, as soon as the loss, the gradient, the updated
    parameters or optimiser state, or `latent_max_abs` is not finite: a diverging
    inner loop is never trained on. The `learning_rate` of the history is the
    decoder's (the optimiser state's first injected rate; the temporal and
    hypernetwork groups have their own).

    The checkpoints record the whole configuration: the model's hyperparameters
    (`model`), `inference` (all of it but `check_every`, which changes no result,
    and `implementation`, which changes results by rounding only),
    `train` (with the milestones resolved, so the schedule itself), the windows'
    shape, `batch_size` and `n_epochs`. A resumed run must match it field by field,
    unless `allow_config_change=True`. Two calls with equal
    configurations and shapes share one compiled step.

    **Arguments:**

    - `model`: the initial [`eqx_models.tidhy.TiDHy`][] (not modified; its arrays
        are copied before the step donates them).
    - `windows`: training windows, shape `(N, T, D)`, e.g. from
        [`eqx_models.tidhy.stack_windows`][].
    - `n_epochs`: the number of epochs.
    - `inference`, `train`: the configurations.
    - `batch_size`: windows per step, or `None` for full-batch epochs.
    - `key`: PRNG key for the batch permutations (default `jr.key(0)`).
    - `eval_fn`: `eval_fn(model) -> dict` of scalars, every `eval_every` steps.
    - `checkpoint_path`, `checkpoint_every`, `resume`: as in [`transforms.fit`][];
        the checkpoint holds the learner (model and GradNorm state), the optimiser
        state and the configuration as metadata.
    - `allow_config_change`: resume from a checkpoint written with another
        configuration (a longer run, new learning rates, another inference
        setting): training continues from the stored parameters and optimiser
        state with the configuration given now, and the learning-rate milestones
        are laid out over the new `n_epochs` (with `train.milestones=None`). The
        parameter shapes must still match. `False` (default) refuses it.
    - `deterministic`: compile the step for run-to-run determinism on a GPU, so that
        a resumed run is bit-identical there too, at a cost in speed (see
        [`transforms.fit`][]).
    - `progress`: show a progress bar (`None`, the default: only on a terminal; see
        [`transforms.fit`][]).
    - `mask`: optional bool observation mask of `windows`, shape `(N, T, D)` (or
        `(N, T)` for whole frames), True where observed, e.g. from
        [`eqx_models.tidhy.Sessions.windows`][]. Missing entries add nothing to the
        inference energies and to the losses (they may hold NaN), and windows with
        nothing observed are skipped; see [`eqx_models.tidhy.training_loss`][].

    **Returns:**

    A [`transforms.FitResult`][] whose `model` is the trained TiDHy (the optimiser
    state is that of the learner) and whose `history` holds the metrics of every
    step (see [`eqx_models.tidhy.training_loss`][]).

    **Raises:**

    `ValueError` for windows that do not match the model, are shorter than 2 steps
    or not finite (where observed), a `mask` of another shape, or a `batch_size`
    outside `[1, N]`; `TypeError` for a `mask` that is not bool;
    [`transforms.NonFiniteLossError`][] as above;
    [`transforms.CheckpointError`][] when resuming from a checkpoint written for
    another configuration (the message names every differing field, e.g.
    `train.lr_decoder`, with both values) unless `allow_config_change`, or from one
    that is corrupted or does not fit the model.
    """
    check_features("train", "windows", windows, model)
    n, length, _ = windows.shape
    if length < 2:
        raise ValueError(
            "train: `windows` must hold at least 2 time steps, got shape "
            f"{windows.shape}."
        )
    if isinstance(n_epochs, bool) or n_epochs < 1:
        raise ValueError(f"train: `n_epochs` must be >= 1, got {n_epochs!r}.")
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(
            f"train: `batch_size` must be in [1, {n}] (the number of windows) or None, "
            f"got {batch_size!r}."
        )
    mask = check_mask("train", mask, windows)
    windows = observed_only("train", "windows", windows, mask)
    key = jr.key(0) if key is None else key
    steps_per_epoch = 1 if batch_size is None else n // batch_size

    def data(i: int):
        if batch_size is None:
            return windows if mask is None else (windows, mask)
        epoch, position = divmod(i, steps_per_epoch)
        order = jr.permutation(jr.fold_in(key, epoch), n)
        index = order[position * batch_size : (position + 1) * batch_size]
        return windows[index] if mask is None else (windows[index], mask[index])

    # With the milestones made explicit the step no longer depends on `n_epochs`, so
    # runs of different lengths (a resumed run, say) share one compiled step.
    train = dataclasses.replace(train, milestones=resolved_milestones(train, n_epochs))
    # `check_every` sets the inner loop's speed, never its results, and
    # `implementation` changes them only by rounding: a run resumed with other
    # values (on another device, say) is the same run.
    inference_fields = static_fields(inference)
    del inference_fields["check_every"]
    del inference_fields["implementation"]
    # Recorded only when switched off, so that checkpoints written before the option
    # existed still resume.
    if inference_fields.get("batch_converge", True):
        inference_fields.pop("batch_converge", None)
    config = {
        "model": static_fields(model),
        "inference": inference_fields,
        "train": static_fields(train),
        "windows": list(windows.shape),
        "batch_size": batch_size,
        "n_epochs": n_epochs,
    }
    if mask is not None:
        config["masked"] = True
    check_resumed_config(
        "train",
        checkpoint_path,
        config,
        resume=resume,
        allow_config_change=allow_config_change,
    )
    # The step donates its inputs' buffers; the caller's model stays usable.
    model = transforms.copy_for_donation(model)
    first = data(0)
    learner = (
        init_learner(model, first, inference=inference, train=train)
        if mask is None
        else init_learner(
            model, first[0], inference=inference, train=train, mask=first[1]
        )
    )
    optimizer = make_optimizer(
        learner, train, steps_per_epoch=steps_per_epoch, n_epochs=1
    )
    step = transforms.make_train_step(
        _Loss(inference=inference, train=train), optimizer, has_aux=True
    )
    opt_state = optimizer.init(eqx.filter(learner, eqx.is_inexact_array))
    result = transforms.fit(
        step,
        learner,
        opt_state,
        data,
        n_steps=n_epochs * steps_per_epoch,
        key=key,
        eval_fn=None if eval_fn is None else (lambda learner: eval_fn(learner.model)),
        eval_every=eval_every,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
        resume=resume,
        metadata=config,
        finite_metrics=("loss", "latent_max_abs"),
        deterministic=deterministic,
        progress=progress,
    )
    return result._replace(model=result.model.model)
