"""The multimodal LM's trainer: its settings, schedule and optimiser, evaluation, and
the run handed to `transforms.fit`.

Why a module of its own: everything that turns a model and a loss into a training
run lives here, following the trainer contract of `transforms` (the schedule
injected into an optimiser that compares by value, the whole configuration recorded
for the resume check); the model and the loss know nothing of it.
"""

import dataclasses
import os
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import PRNGKeyArray

from transforms import (
    batch_sharding,
    check_resumed_config,
    copy_for_donation,
    describe_config,
    fit,
    FitResult,
    hashable_optimizer,
    inject_learning_rate,
    make_train_step,
    ParameterSharding,
    shard_batch,
)
from transforms._train._parameter_sharding import auto_axes
from transforms._train._train_step import check_parameter_sharding
from transforms.validation import (
    check_bool,
    check_callable,
    check_in_range,
    check_type,
    describe,
    fail,
)

from ._model import CausalTransformerLM
from ._sequence import TokenBatch


@dataclasses.dataclass(frozen=True)
class MultimodalTrainConfig:
    """Optimisation settings of [`eqx_models.multimodal.train`][] (formerly
    `TrainConfig`, a name that still works, with a `DeprecationWarning`, until the
    next release).

    A frozen dataclass: equal settings compare equal and hash alike, which is how
    two runs with equal settings share one compiled step.

    Steps are **optimiser steps**: with `accumulation_steps = k`, each consumes `k`
    micro-batches, and the schedule, evaluation and checkpoint periods count
    optimiser steps, so the cosine decay ends exactly at the end of the run
    whatever its length.

    **Arguments:**

    - `n_steps`: optimiser steps of the whole run.
    - `learning_rate`: peak learning rate.
    - `min_lr_ratio`: the cosine decays to `learning_rate * min_lr_ratio`.
    - `warmup_steps`: linear warmup from 0, in optimiser steps (`< n_steps`).
    - `weight_decay`: AdamW decoupled weight decay, applied to matrices and
        embeddings only (see [`eqx_models.multimodal.weight_decay_mask`][]).
    - `b1`, `b2`: AdamW moment decay rates.
    - `clip_norm`: global gradient-norm clipping threshold, or `None`.
    - `accumulation_steps`: micro-batches averaged per optimiser step
        (`optax.MultiSteps`).
    - `eval_every`: evaluation period in optimiser steps (0: never).
    - `checkpoint_every`: checkpoint period in optimiser steps (0: at the end only;
        ignored when training without a checkpoint path).

    **Raises:**

    `ValueError` for inconsistent values, or a value out of its range, NaN or
    infinite (a negative learning rate, `b2` outside `[0, 1)`, ...); `TypeError`
    for a count that is not an integer.
    """

    n_steps: int
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float | None = 1.0
    accumulation_steps: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        from transforms.validation import check_in_range, check_size

        name = "MultimodalTrainConfig"
        check_size(name, "n_steps", self.n_steps)
        check_size(name, "warmup_steps", self.warmup_steps, minimum=0)
        if not self.warmup_steps < self.n_steps:
            raise ValueError(
                f"{name}: `warmup_steps` must be in [0, n_steps), got "
                f"{self.warmup_steps} with n_steps={self.n_steps}."
            )
        check_in_range(
            name, "learning_rate", self.learning_rate, low=0, inclusive=(False, True)
        )
        check_in_range(name, "min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_in_range(name, "weight_decay", self.weight_decay, low=0)
        for arg in ("b1", "b2"):
            value = getattr(self, arg)
            check_in_range(name, arg, value, low=0, high=1, inclusive=(True, False))
        if self.clip_norm is not None:
            check_in_range(
                name, "clip_norm", self.clip_norm, low=0, inclusive=(False, True)
            )
        check_size(name, "accumulation_steps", self.accumulation_steps)
        check_size(name, "eval_every", self.eval_every, minimum=0)
        check_size(name, "checkpoint_every", self.checkpoint_every, minimum=0)


def _check_config(fn: str, config) -> None:
    check_type(
        fn,
        "config",
        config,
        MultimodalTrainConfig,
        "a multimodal.MultimodalTrainConfig",
    )


def learning_rate_schedule(config: MultimodalTrainConfig) -> optax.Schedule:
    """Linear warmup, then cosine decay to a floor over the optimiser steps.

    `lr(s) = peak * (s + 1) / warmup` for `s < warmup` (the original's warmup: the
    first step already moves, at `peak / warmup`, and step `warmup - 1` reaches the
    peak), then
    `floor + (peak - floor) * (1 + cos(pi * (s - warmup) / (n_steps - warmup))) / 2`
    with `floor = peak * min_lr_ratio`, constant at the floor after `n_steps`.
    (optax's `warmup_cosine_decay_schedule` starts at `init_value` instead, so its
    first step has rate 0 and each warmup step lags the original's by one.)

    **Arguments:**

    - `config`: the [`eqx_models.multimodal.MultimodalTrainConfig`][].

    **Returns:**

    An optax schedule of the optimiser step count.

    **Raises:**

    `TypeError` if `config` is not a `MultimodalTrainConfig`.
    """
    _check_config("learning_rate_schedule", config)
    peak, warmup = config.learning_rate, config.warmup_steps
    decay = optax.cosine_decay_schedule(
        init_value=peak,
        decay_steps=config.n_steps - warmup,
        alpha=config.min_lr_ratio,
    )
    if warmup == 0:
        return decay
    # peak / W + (peak - peak / W) * s / (W - 1) = peak * (s + 1) / W.
    ramp = optax.linear_schedule(
        init_value=peak / warmup, end_value=peak, transition_steps=warmup - 1
    )
    return optax.join_schedules([ramp, decay], [warmup])


def weight_decay_mask(model: CausalTransformerLM) -> CausalTransformerLM:
    """Which parameters get weight decay: matmul weights and embeddings, not biases
    or LayerNorm parameters.

    **Arguments:**

    - `model`: a [`eqx_models.multimodal.CausalTransformerLM`][].

    **Returns:**

    A pytree of the model's structure with a bool per array (the `mask` of
    `optax.adamw`).

    **Raises:**

    `TypeError` if `model` is not a `CausalTransformerLM` (another pytree would get
    a mask of all `False`, i.e. no weight decay, without a word).
    """
    check_type(
        "weight_decay_mask",
        "model",
        model,
        CausalTransformerLM,
        "a CausalTransformerLM",
    )
    decayed = {
        "token_embedding",
        "type_embedding",
        "position_embedding",
        "head_weight",
        "qkv_weight",
        "out_weight",
        "fc_weight",
        "proj_weight",
    }

    def mark(path, leaf):
        if not eqx.is_array(leaf):
            return leaf
        names = [p.name for p in path if isinstance(p, jax.tree_util.GetAttrKey)]
        return bool(names) and names[-1] in decayed

    mask = jax.tree_util.tree_map_with_path(mark, model)
    return eqx.filter(mask, lambda x: isinstance(x, bool))


def _per_optimizer_step(schedule: optax.Schedule, every: int) -> optax.Schedule:
    """`schedule` of the optimiser step, given the count of micro-steps."""
    return lambda count: schedule(jnp.asarray(count) // every)


def _optimizer(
    config: MultimodalTrainConfig, accumulator_dtype: np.dtype
) -> optax.GradientTransformation:
    """What [`eqx_models.multimodal.make_optimizer`][] builds, from its settings."""

    def clipped_adamw(learning_rate):
        adamw = optax.adamw(
            learning_rate,
            b1=config.b1,
            b2=config.b2,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
        if config.clip_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)

    schedule = learning_rate_schedule(config)
    every = config.accumulation_steps
    if every == 1:
        return inject_learning_rate(clipped_adamw, schedule)

    # The rate is injected outside the accumulation, so that the state records, at
    # every micro-step, the rate of the optimiser step it belongs to.
    def accumulated(learning_rate):
        return optax.MultiSteps(
            clipped_adamw(learning_rate),
            every_k_schedule=every,
            accumulator_dtype=accumulator_dtype,
        ).gradient_transformation()

    return inject_learning_rate(accumulated, _per_optimizer_step(schedule, every))


def make_optimizer(
    config: MultimodalTrainConfig, model: CausalTransformerLM | None = None
) -> optax.GradientTransformation:
    """The trainer's optimiser: clipping, AdamW with a decay mask, warmup-cosine
    schedule, wrapped in `optax.MultiSteps` for gradient accumulation (when
    `accumulation_steps > 1`).

    The schedule is injected (`optax.inject_hyperparams`): the optimiser state
    records the learning rate of the current optimiser step at every micro-step,
    which the training step reports. The optimiser compares by value
    ([`transforms.hashable_optimizer`][]): equal configurations give equal
    optimisers, so a step compiled for one run is reused by the next (e.g. a
    resumed run in the same process), without any cache.

    **Arguments:**

    - `config`: the [`eqx_models.multimodal.MultimodalTrainConfig`][].
    - `model`: not needed (the weight-decay mask is computed from the parameters
        the optimiser is given); accepted so that existing calls keep working.

    **Returns:**

    An `optax.GradientTransformation`; initialise it with
    `opt.init(eqx.filter(model, eqx.is_inexact_array))`.

    **Raises:**

    `TypeError` if `config` is not a `MultimodalTrainConfig` or `model` neither a
    `CausalTransformerLM` nor `None`.
    """
    _check_config("make_optimizer", config)
    if model is not None:
        check_type(
            "make_optimizer",
            "model",
            model,
            CausalTransformerLM,
            "a CausalTransformerLM or None",
        )
    # The accumulator follows the parameters' dtype (float64 under x64).
    accumulator = np.dtype(jnp.zeros((), float).dtype)
    return hashable_optimizer(_optimizer, config=config, accumulator_dtype=accumulator)


def _flatten(config: dict, prefix: str) -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, so that differences name single fields."""
    out = {}
    for name, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


@eqx.filter_jit
def _evaluate_batch(model, loss, batch, mesh):
    # Traced with the activations pinned to the batch split, as in the training
    # step: with split parameters XLA would otherwise gather whole batches.
    with batch_sharding(mesh, "data"):
        return loss(model, batch, None)


def evaluate(
    model: CausalTransformerLM,
    loss: Callable,
    batches: TokenBatch | Sequence[TokenBatch],
    *,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Deterministic evaluation: the loss and its parts, averaged over batches.

    Runs the loss with `key=None`: no dropout, every valid position counted (no
    sampling), so the result depends only on the model and the data. Without
    sampling each modality's head is applied to every position of the batch (a
    `(batch * length, slice)` array), so keep evaluation batches moderate.

    **Arguments:**

    - `model`: the model.
    - `loss`: the [`eqx_models.multimodal.MultimodalLoss`][].
    - `batches`: one [`eqx_models.multimodal.TokenBatch`][] or a sequence of them.
    - `mesh`: split each batch over this mesh's `"data"` axis.

    **Returns:**

    `{"loss", "ce", "image", "scalar", "spectrum"}` as floats (means over the
    batches).

    **Raises:**

    `TypeError` if `model` is not a `CausalTransformerLM`, `loss` not callable, or
    `batches` neither a `TokenBatch` nor a sequence of them; `ValueError` for an
    empty sequence (there is no mean of nothing).
    """
    name = "evaluate"
    check_type(name, "model", model, CausalTransformerLM, "a CausalTransformerLM")
    check_callable(name, "loss", loss)
    if isinstance(batches, TokenBatch):
        batches = [batches]
    expected = "a TokenBatch or a non-empty sequence of them"
    if not isinstance(batches, (list, tuple)) or not all(
        isinstance(b, TokenBatch) for b in batches
    ):
        raise fail(name, "batches", expected, describe(batches), TypeError)
    if not batches:
        raise fail(name, "batches", expected, "an empty sequence")
    if mesh is not None:
        mesh = auto_axes(mesh)
    totals: dict[str, float] = {}
    for batch in batches:
        if mesh is not None:
            batch = shard_batch(batch, mesh)
        total, aux = _evaluate_batch(model, loss, batch, mesh)
        values = {"loss": total, **aux}
        for name, value in jax.device_get(values).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return {name: value / len(batches) for name, value in totals.items()}


def train(
    model: CausalTransformerLM,
    loss: Callable,
    data: Callable[[int], TokenBatch],
    config: MultimodalTrainConfig,
    *,
    key: PRNGKeyArray,
    eval_batches: TokenBatch | Sequence[TokenBatch] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    allow_config_change: bool = False,
    mesh: Mesh | None = None,
    parameter_sharding: ParameterSharding | None = None,
    peak_flops: float | None = None,
    deterministic: bool = False,
    progress: bool | None = None,
) -> FitResult:
    """Train the multimodal LM: AdamW, warmup-cosine, clipping, accumulation,
    evaluation, checkpoints and data parallelism, on the shared training loop.

    Builds [`eqx_models.multimodal.make_optimizer`][], a step with
    [`transforms.make_train_step`][] (compute in the loss's `compute_dtype`,
    float32 master weights and optimiser state) and runs it with
    [`transforms.fit`][]: a progress bar, a history of metrics, periodic
    deterministic evaluation ([`eqx_models.multimodal.evaluate`][]), atomic
    checkpoints whose metadata records the whole configuration: the model's
    (`model.*`, the vocabulary layout and the attention, unroll and remat options
    included), the `MultimodalTrainConfig` (`train.*`: optimiser and schedule),
    the loss (`loss.*`, by [`transforms.describe_config`][]) and the micro-batch
    shape (`data.tokens_shape`, from `data(0)`). Two calls with equal
    configurations share one compiled step. With
    `resume=True` a run continues from `checkpoint_path` bit-identically (on a GPU
    with `deterministic=True`), and refuses a checkpoint written for another
    configuration (listing the differing fields; only `train.eval_every` and
    `train.checkpoint_every` may change freely) unless `allow_config_change=True`.
    A non-finite loss, gradient, parameter or optimiser state stops the run with
    [`transforms.NonFiniteLossError`][]; the last good checkpoint stays on disk.

    **Arguments:**

    - `model`: the [`eqx_models.multimodal.CausalTransformerLM`][] (float32); it is
        copied, not consumed (the copy's buffers are donated to the updates).
    - `loss`: the [`eqx_models.multimodal.MultimodalLoss`][] (or any callable
        with its signature and return value).
    - `data`: `data(i) -> TokenBatch`, the micro-batch of micro-step `i`
        (a function of the index, so a resumed run sees the same data).
    - `config`: the [`eqx_models.multimodal.MultimodalTrainConfig`][].
    - `key`: the run's PRNG key (dropout and position sampling; step `i` uses
        `fold_in(key, i)`).
    - `eval_batches`: held-out batches evaluated every `config.eval_every`
        optimiser steps (metrics prefixed `eval_`).
    - `checkpoint_path`: where checkpoints go; `resume`: continue from it.
    - `allow_config_change`: resume from a checkpoint written with another
        configuration, e.g. a longer `config.n_steps` or another learning rate:
        the run continues from the stored parameters and optimiser state with the
        configuration given now, its schedule laid out over the new `n_steps`. The
        model's shapes and the optimiser state's structure (e.g. the same
        `accumulation_steps > 1` or not) must still match. `False` (default)
        refuses such a checkpoint.
    - `mesh`: a `jax.sharding.Mesh` with a `"data"` axis: data-parallel training
        (each micro-batch split over the devices, whose number must divide the
        micro-batch size). Its axes are used as `Auto` axes (sharding propagated
        by XLA).
    - `parameter_sharding`: with a `mesh`, how parameters and optimiser state are
        split over it (a [`transforms.ParameterSharding`][]: FSDP over the
        `"data"` axis, [`eqx_models.multimodal.TensorParallelRule`][] over a
        model axis, or both); `None` replicates them. With a layout,
        `checkpoint_path` is a directory of [`transforms.ShardedCheckpoints`][]
        (written asynchronously by orbax, each device its own shards; needs the
        `orbax` extra), else a single file. Either kind resumes under another
        layout or device count.
    - `peak_flops`: the peak (or measured) FLOP/s of the devices used, together;
        when given, each record gets `mfu`, the model FLOPs utilisation (matmul
        FLOPs of the step, `CausalTransformerLM.flops_per_token`, over step time
        and `peak_flops`).
    - `deterministic`: compile the step for run-to-run determinism on a GPU, so that
        a resumed run is bit-identical there too, at a cost in speed (see
        [`transforms.fit`][]).
    - `progress`: show a progress bar (`None`, the default: only on a terminal; see
        [`transforms.fit`][]).

    **Returns:**

    The [`transforms.FitResult`][] of [`transforms.fit`][]; `step` counts
    micro-steps. Each history record has the step's `loss`, `ce`, `image`,
    `scalar`, `spectrum`, `grad_norm`, `learning_rate`, `step_time`, `tokens`
    (positions in the micro-batch), `tokens_per_s`, `flops` and `mfu` (if
    `peak_flops`).

    **Raises:**

    [`transforms.NonFiniteLossError`][]; [`transforms.CheckpointError`][] when
    resuming from a checkpoint written for another configuration (the message
    names every differing field, e.g. `train.learning_rate`, with both values)
    unless `allow_config_change`, or from one that is corrupted or incompatible;
    before anything is built: `TypeError` if `model`, `config` or `key` is not of
    its type, `loss` or `data` not callable, or a flag not a bool; `ValueError` for
    a `peak_flops` that is not positive and finite, `resume` without a
    `checkpoint_path`, or `config.eval_every` without `eval_batches`, or a
    `parameter_sharding` without a `mesh` or naming an axis the mesh lacks.
    """
    name = "train"
    check_type(name, "model", model, CausalTransformerLM, "a CausalTransformerLM")
    check_callable(name, "loss", loss)
    check_callable(name, "data", data)
    _check_config(name, config)
    check_type(name, "key", key, jax.Array, "a PRNG key")
    if peak_flops is not None:
        check_in_range(name, "peak_flops", peak_flops, low=0, inclusive=(False, True))
    for arg, flag in (
        ("resume", resume),
        ("allow_config_change", allow_config_change),
        ("deterministic", deterministic),
    ):
        check_bool(name, arg, flag)
    if progress is not None:  # None: a bar only on a terminal
        check_bool(name, "progress", progress)
    if config.eval_every and eval_batches is None:
        raise ValueError("train: `config.eval_every` > 0 needs `eval_batches`.")
    if resume and checkpoint_path is None:
        raise ValueError("train: `resume=True` needs a `checkpoint_path`.")
    if mesh is not None:
        check_type(name, "mesh", mesh, Mesh, "a jax.sharding.Mesh or None")
    check_parameter_sharding(name, parameter_sharding, mesh)
    metadata = {
        **_flatten(model.config(), "model."),
        **_flatten(dataclasses.asdict(config), "train."),
        **_flatten({"loss": describe_config(loss)}, ""),
        "data.tokens_shape": list(data(0).tokens.shape),
    }
    # How often the run evaluates and saves does not change what it trains.
    check_resumed_config(
        "train",
        checkpoint_path,
        {
            k: v
            for k, v in metadata.items()
            if k not in ("train.eval_every", "train.checkpoint_every")
        },
        resume=resume,
        allow_config_change=allow_config_change,
    )
    if mesh is not None:
        mesh = auto_axes(mesh)
    k = config.accumulation_steps
    # The compiled step donates its inputs' buffers; train on a copy so the
    # caller's model stays usable.
    model = copy_for_donation(model)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(
        loss,
        optimizer,
        has_aux=True,
        mesh=mesh,
        deterministic=deterministic,
        parameter_sharding=parameter_sharding,
    )

    # Laid out before `fit` so that a resumed run reads its checkpoint straight
    # into the layout.
    model, opt_state = step.place(model, opt_state)

    def counted_step(model, opt_state, batch, key):
        model, opt_state, metrics = step(model, opt_state, batch, key)
        n_tokens = int(batch.tokens.size)
        flops = n_tokens * model.flops_per_token(batch.tokens.shape[-1])
        return model, opt_state, {**metrics, "tokens": n_tokens, "flops": flops}

    eval_fn: Callable | None = None
    if eval_batches is not None:
        held_out = eval_batches
        eval_fn = lambda model: evaluate(model, loss, held_out, mesh=mesh)

    result = fit(
        counted_step,
        model,
        opt_state,
        data,
        n_steps=config.n_steps * k,
        key=key,
        eval_fn=eval_fn,
        eval_every=config.eval_every * k,
        checkpoint_path=checkpoint_path,
        checkpoint_every=config.checkpoint_every * k if checkpoint_path else 0,
        checkpoint_format="file" if parameter_sharding is None else "sharded",
        resume=resume,
        metadata=metadata,
        progress=progress,
    )
    for record in result.history:
        record["tokens_per_s"] = record["tokens"] / record["step_time"]
        if peak_flops is not None:
            record["mfu"] = record["flops"] / record["step_time"] / peak_flops
    return result
