"""The causal surrogate's trainer: the curriculum's batches, the behavioural-cloning
loss and the optimiser handed to `transforms.fit`.

Why a module of its own: it only wires the family's parts (`_curriculum.py`,
`_loss.py`, `_optimizer.py`) into the library's training loop, and records the
configuration its checkpoints are checked against.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.random as jr
import optax
from jaxtyping import PRNGKeyArray

from transforms import (
    check_resumed_config,
    copy_for_donation,
    describe_config,
    fit,
    FitResult,
    make_train_step,
    static_fields,
    with_fallback,
)
from transforms.validation import (
    check_bool,
    check_callable,
    check_optimizer,
    check_size,
    check_type,
)

from ._curriculum import check_buckets, check_curriculum, Curriculum, TaskStream
from ._loss import BehaviouralCloningLoss
from ._model import ParentSetPredictionModel
from ._optimizer import make_optimizer, with_run_length
from ._tasks import config_record, TaskConfig


def _optimizer_record(optimizer, n_steps: int) -> Any:
    """What the checkpoints record of the optimiser: its description, less the run
    length of a `make_optimizer` one (the trainer sets it to `n_steps`, recorded on
    its own)."""
    record = describe_config(
        make_optimizer(n_steps) if optimizer is None else optimizer
    )
    if isinstance(record, dict):
        record.pop("run_length", None)
    return record


def train(
    model: ParentSetPredictionModel,
    buckets: Sequence[tuple[TaskConfig, int]],
    *,
    n_steps: int,
    key: PRNGKeyArray,
    curriculum: Curriculum | None = None,
    loss: Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
    opt_state=None,
    stop_after: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    fallback: bool = True,
    eval_fn: Callable | None = None,
    eval_every: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    allow_config_change: bool = False,
    deterministic: bool = False,
    progress: bool | None = None,
) -> FitResult:
    """Train a parent-set model by behavioural cloning of the exact expert.

    (Formerly `train_surrogate`, a name that still works, with a
    `DeprecationWarning`, until the next release.)

    Tasks are drawn on the fly (never reused) from `buckets` — one
    `(TaskConfig, batch_size)` per task shape; every batch has a single shape, so
    each bucket compiles once — following `curriculum`, labelled by the exact expert
    and fed to a step from [`transforms.make_train_step`][] (wrapped in
    [`transforms.with_fallback`][] so that a custom loss that cannot be compiled
    still runs), looped by [`transforms.fit`][] with its checkpoints and resume.

    The checkpoints record the run's configuration: the model's hyperparameters,
    the buckets (every task setting and batch size), the curriculum, the loss and
    the optimiser (each by [`transforms.describe_config`][]: the settings of the
    library's, the names and closed-over values of yours, within that function's
    stated limits), `n_steps` and the data seed (drawn from `key`). A resumed run
    must match it field by field, unless `allow_config_change=True`. Two calls with
    equal configurations share one compiled step (with the default optimiser,
    whatever `n_steps`; a custom optax optimiser compares by identity unless built
    with [`transforms.hashable_optimizer`][]).

    **Arguments:**

    - `model`: the [`eqx_models.causal.ParentSetPredictionModel`][] to train.
    - `buckets`: `(config, batch_size)` pairs; `config.max_parents` need not equal
        the model's `K` (it caps the true graphs' in-degrees).
    - `n_steps`: the length of the run: the learning-rate schedule and the
        curriculum are laid out over it (the run length of a
        [`eqx_models.causal.make_optimizer`][] state, fresh or restored, is set to
        `n_steps`; see [`eqx_models.causal.set_run_length`][]).
    - `key`: the run's PRNG key (data and steps derive from it).
    - `curriculum`: default [`eqx_models.causal.Curriculum.easy_to_hard`][] with
        `d·N` as the cost.
    - `loss`: default `BehaviouralCloningLoss(weight_decay=1e-4)`.
    - `optimizer`: default `make_optimizer(n_steps)`; a custom optimiser's
        learning rate is reported if it is injected (`optax.inject_hyperparams`,
        [`transforms.inject_learning_rate`][]).
    - `opt_state`: the optimiser state (default: a fresh `optimizer.init`).
    - `stop_after`: stop after this many steps (default `n_steps`); with a
        checkpoint, a later call with `resume=True` continues the same run, so a
        wall-clock budget can be met in chunks.
    - `mesh`: a `jax.sharding.Mesh` for data parallelism over its `data` axis
        (batch sizes must divide by its size).
    - `fallback`: wrap the step in `with_fallback`.
    - `eval_fn`, `eval_every`, `checkpoint_path`, `checkpoint_every`, `resume`,
        `deterministic`, `progress`: as in [`transforms.fit`][] (`deterministic=True`
        makes a resumed run bit-identical on a GPU, at a cost in speed).
    - `allow_config_change`: resume from a checkpoint written with another
        configuration, e.g. a longer `n_steps`: the run continues from the stored
        parameters and optimiser state with the configuration given now, the
        learning-rate schedule and the curriculum laid out over the new `n_steps`.
        The optimiser state must still fit the optimiser (same structure). `False`
        (default) refuses such a checkpoint.

    **Returns:**

    The [`transforms.FitResult`][] of the run; its history has, per step, the
    metrics of [`eqx_models.causal.BehaviouralCloningLoss`][] plus `grad_norm`,
    `learning_rate` and `step_time`.

    **Raises:**

    `ValueError` for an empty `buckets`, a curriculum with another number of
    buckets, or a `mesh` without a `data` axis or whose size does not divide a
    batch size; `TypeError`/`ValueError` (before anything is built) for a bucket
    that is not a `(TaskConfig, positive int)` pair, an `n_steps`, `stop_after`,
    `eval_every` or `checkpoint_every` that is not a positive (the last three:
    non-negative) integer, a `model`, `optimizer` or `key` of another type, a
    `loss` or `eval_fn` that is not callable, or a flag that is not a bool;
    [`transforms.NonFiniteLossError`][] if the loss, the gradient, the updated
    parameters or the optimiser state become non-finite (the last good
    checkpoint is kept); [`transforms.CheckpointError`][] when resuming from a
    checkpoint written for another configuration (the message names every
    differing field, e.g. `n_steps` or `buckets[0].batch_size`, with both values)
    unless `allow_config_change`, or from one that is corrupted or does not fit the
    model and optimiser state.
    """
    name = "train"
    check_type(
        name, "model", model, ParentSetPredictionModel, "a ParentSetPredictionModel"
    )
    buckets = check_buckets(name, buckets)
    check_size(name, "n_steps", n_steps)
    check_type(name, "key", key, jax.Array, "a PRNG key")
    if stop_after is not None:
        check_size(name, "stop_after", stop_after, minimum=0)
    check_size(name, "eval_every", eval_every, minimum=0)
    check_size(name, "checkpoint_every", checkpoint_every, minimum=0)
    for arg, function in (("loss", loss), ("eval_fn", eval_fn)):
        if function is not None:
            check_callable(name, arg, function)
    if optimizer is not None:
        check_optimizer(name, "optimizer", optimizer)
    for arg, flag in (
        ("fallback", fallback),
        ("resume", resume),
        ("allow_config_change", allow_config_change),
        ("deterministic", deterministic),
    ):
        check_bool(name, arg, flag)
    if progress is not None:
        check_bool(name, "progress", progress)
    if curriculum is None:
        curriculum = Curriculum.easy_to_hard(
            [c.n_vars * c.n_samples for c, _ in buckets]
        )
    check_curriculum(name, curriculum, len(buckets))
    if mesh is not None:
        n_devices = dict(mesh.shape).get("data")
        if n_devices is None:
            raise ValueError(
                f"train: `mesh` has no `data` axis (axes {mesh.axis_names})."
            )
        sizes = [size for _, size in buckets]
        if any(size % n_devices for size in sizes):
            raise ValueError(
                f"train: every bucket's batch size must divide by the "
                f"{n_devices} devices of the mesh, got {sizes}."
            )
    if loss is None:
        loss = BehaviouralCloningLoss(weight_decay=1e-4)
    data_key, step_key = jr.split(key)
    stream = TaskStream(buckets, model.max_parents, n_steps, curriculum, data_key)
    config = {
        "model": static_fields(model),
        "buckets": [
            {**config_record(task), "batch_size": int(size)} for task, size in buckets
        ],
        "curriculum": static_fields(curriculum),
        "loss": describe_config(loss),
        "optimizer": _optimizer_record(optimizer, n_steps),
        "n_steps": n_steps,
        "data_seed": stream.seed,
    }
    check_resumed_config(
        "train",
        checkpoint_path,
        config,
        resume=resume,
        allow_config_change=allow_config_change,
    )
    if optimizer is None:
        optimizer = make_optimizer(n_steps)
    if opt_state is None:
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    opt_state, _ = with_run_length(opt_state, n_steps)
    # The step donates its inputs' buffers; copies keep the caller's model and
    # optimiser state usable.
    model, opt_state = copy_for_donation((model, opt_state))
    step = make_train_step(loss, optimizer, has_aux=True, mesh=mesh)
    if fallback:
        step = with_fallback(step)
    return fit(
        step,
        model,
        opt_state,
        stream,
        n_steps=n_steps if stop_after is None else min(stop_after, n_steps),
        key=step_key,
        eval_fn=eval_fn,
        eval_every=eval_every,
        checkpoint_path=checkpoint_path,
        checkpoint_every=checkpoint_every,
        resume=resume,
        metadata=config,
        # A restored schedule follows this run's length (changed only when allowed).
        on_resume=lambda model, opt_state: (
            model,
            with_run_length(opt_state, n_steps)[0],
        ),
        deterministic=deterministic,
        progress=progress,
    )
