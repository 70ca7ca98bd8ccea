import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms import (
    entropy,
    fit,
    FitResult,
    kl_divergence,
    make_train_step,
    uncertainty_weighted,
    with_fallback,
)
from transforms.validation import (
    check_bool,
    check_callable,
    check_in_range,
    check_size,
    check_type,
    describe,
    fail,
    typechecked,
)

from .._misc import check_resumed_config, static_fields
from ._candidates import checked_table
from ._data import Channel
from ._expert import posterior_core
from ._graphs import GRAPH_FAMILIES
from ._model import ParentSetPredictionModel
from ._tasks import check_family_weights, sample_task, TaskConfig


class TrainingBatch(eqx.Module):
    """A batch of tasks of one shape, labelled by the exact expert.

    **Fields:**

    - `data`: `(B, N, d, 3)` AVICI data.
    - `expert_log_probs`: `(B, C)` the expert's log posterior over the canonical
        candidate sets; NaN for tasks whose posterior is degenerate.
    - `valid`: `(B,)` boolean, false for degenerate tasks, which the loss skips and
        counts.
    """

    data: Float[Array, "B N d 3"]
    expert_log_probs: Float[Array, "B C"]
    valid: Bool[Array, " B"]


@eqx.filter_jit
def _sample_batch(key, config, batch_size, max_parents, family_weights):
    tasks = jax.vmap(lambda k: sample_task(k, config, family_weights))(
        jr.split(key, batch_size)
    )
    n, d = config.n_samples, config.n_vars

    def label(task):
        intervened_target = task.data[:, task.target, Channel.INTERVENED] == 1
        log_probs, _, _, _, degenerate = posterior_core(
            task.data[..., Channel.VALUE],
            intervened_target,
            task.target,
            jnp.ones((n,), bool),
            jnp.ones((d,), bool),
            max_parents,
        )
        return log_probs, ~degenerate

    log_probs, valid = jax.vmap(label)(tasks)
    return TrainingBatch(tasks.data, log_probs, valid)


@typechecked
def sample_training_batch(
    key: PRNGKeyArray,
    config: TaskConfig,
    batch_size: int,
    max_parents: int,
    family_weights: Float[Array, " families"] | None = None,
) -> TrainingBatch:
    """Draw `batch_size` tasks and label each with the exact expert posterior.

    Runs compiled (once per `config`, `batch_size`, `max_parents`) on the default
    device, so training tasks are made on the fly at accelerator speed. A task whose
    expert posterior is degenerate (see
    [`eqx_models.causal.exact_parent_posterior`][]) is kept in the batch with
    `valid = False` and NaN labels, so the loss can skip it and count it.

    **Arguments:**

    - `key`: a PRNG key; the batch is a deterministic function of it.
    - `config`: a [`eqx_models.causal.TaskConfig`][] (sizes and distributions).
    - `batch_size`: the number of tasks `B`.
    - `max_parents`: `K` of the candidate sets.
    - `family_weights`: weights over `GRAPH_FAMILIES` (uniform if `None`); an array,
        so changing it does not recompile.

    **Returns:**

    A [`eqx_models.causal.TrainingBatch`][].

    **Raises:**

    `ValueError` if `batch_size < 1`, `config.n_samples < K' + 2`, `(d, K)`
    exceeds the enumeration limit, or `family_weights` are not finite, non-negative
    weights with a positive sum; `TypeError` for a size that is not an integer.
    """
    name = "sample_training_batch"
    check_size(name, "batch_size", batch_size)
    table = checked_table(name, config.n_vars, max_parents)
    if config.n_samples < table.max_parents + 2:
        raise ValueError(
            f"sample_training_batch: `config.n_samples` = {config.n_samples} is too "
            f"few for parent sets of size {table.max_parents} (need >= "
            f"{table.max_parents + 2})."
        )
    if family_weights is None:
        family_weights = jnp.ones((len(GRAPH_FAMILIES),))
    family_weights = check_family_weights(name, family_weights)
    return _sample_batch(key, config, batch_size, max_parents, family_weights)


def _decayed(model) -> list[Array]:
    """The weight matrices (fields named `w_*`): what weight decay applies to."""
    leaves = jax.tree_util.tree_flatten_with_path(
        eqx.filter(model, eqx.is_inexact_array)
    )[0]
    return [leaf for path, leaf in leaves if _is_weight(path)]


def _is_weight(path) -> bool:
    if not path:
        return False
    last = path[-1]
    return isinstance(last, jax.tree_util.GetAttrKey) and last.name.startswith("w_")


def _weight_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _is_weight(path), params)


def weight_decay_mask(params):
    """`True` for the weight matrices of a model (fields named `w_*`), else `False`.

    The mask optax's `adamw` takes: biases, LayerNorm gains and embeddings of set
    sizes are not decayed.

    **Raises:**

    `ValueError` if `params` holds no weight matrix (no array in a field named
    `w_*`): its mask would be all `False`, i.e. no weight decay, without a word.
    """
    mask = _weight_mask(params)
    if not any(jax.tree.leaves(mask)):
        raise fail(
            "weight_decay_mask",
            "params",
            "a model with weight matrices (fields named `w_*`)",
            describe(params) + " with none",
        )
    return mask


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
        n_valid = jnp.sum(valid)
        denominator = jnp.maximum(n_valid, 1).astype(log_q.dtype)

        def mean(x):
            return jnp.sum(jnp.where(valid, x, 0.0)) / denominator

        loss = mean(objective)
        reg = (
            0.5
            * self.weight_decay
            * sum(
                (jnp.sum(w**2) for w in _decayed(jax.lax.stop_gradient(model))),
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


def _loss_config(loss) -> dict | str:
    """What a checkpoint records of the loss: the settings of the library's, or
    `"custom"`."""
    if not isinstance(loss, BehaviouralCloningLoss):
        return "custom"
    scale = loss.uncertainty_scale
    return {
        "uncertainty_scale": None if scale is None else float(scale),
        "weight_decay": loss.weight_decay,
    }


class WarmupCosineState(NamedTuple):
    """State of the learning-rate stage of [`eqx_models.causal.surrogate_optimizer`][].

    `count` is the number of updates so far, `total_steps` the run length the cosine
    is laid out over (an array, so it can be changed without recompiling; see
    [`eqx_models.causal.set_run_length`][]) and `learning_rate` the rate of the last
    update (what `make_train_step` reports).
    """

    # The field name follows optax's states; it shadows `tuple.count` on purpose.
    count: Int[Array, ""]  # pyright: ignore[reportIncompatibleMethodOverride]
    total_steps: Int[Array, ""]
    learning_rate: Float[Array, ""]


def _warmup_cosine(count, total, peak, warmup, end):
    count = count.astype(jnp.float32)
    total = jnp.maximum(total.astype(jnp.float32), warmup + 1.0)
    rising = peak * count / max(warmup, 1)
    progress = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
    falling = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, rising, falling)


def _scale_by_warmup_cosine(peak, warmup, end, total):
    def init(params):
        del params
        return WarmupCosineState(
            jnp.zeros((), jnp.int32),
            jnp.asarray(total, jnp.int32),
            jnp.zeros((), jnp.float32),
        )

    def update(updates, state, params=None):
        del params
        lr = _warmup_cosine(state.count, state.total_steps, peak, warmup, end)
        updates = jax.tree.map(lambda u: -lr.astype(u.dtype) * u, updates)
        return updates, WarmupCosineState(state.count + 1, state.total_steps, lr)

    return optax.GradientTransformation(init, update)


def surrogate_optimizer(
    n_steps: int,
    *,
    peak_learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    end_learning_rate: float | None = None,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, weight decay on weight matrices only.

    The chain is `clip_by_global_norm → scale_by_adam → add_decayed_weights (w_*
    matrices only, see [`eqx_models.causal.weight_decay_mask`][]) → learning rate`,
    i.e. optax's AdamW. The learning rate rises linearly from 0 over `warmup_steps`
    and then follows a cosine from the peak to `end_learning_rate` at `n_steps`.
    The run length lives in the optimiser state, so a run on a wall-clock budget can
    measure its speed first and then fix the length with
    [`eqx_models.causal.set_run_length`][], without recompiling the step. The rate
    used by the last update is in the state as `learning_rate`, which
    [`transforms.make_train_step`][] reports.

    **Arguments:**

    - `n_steps`: the run length (the cosine reaches its end value there).
    - `peak_learning_rate`: the learning rate after warmup.
    - `warmup_steps`: linear warmup from 0; default 5% of `n_steps` (at least 1).
    - `end_learning_rate`: the final value; default 1% of the peak.
    - `weight_decay`: AdamW's decoupled decay, applied to the `w_*` matrices only.
    - `clip_norm`: global-norm gradient clipping before Adam.

    **Returns:**

    An `optax.GradientTransformation`.

    **Raises:**

    `ValueError` if `n_steps < 1`, the warmup is not shorter than the run, a
    learning rate is not positive (the end one: negative) and finite, or
    `weight_decay` is negative or `clip_norm` not positive (or either is NaN);
    `TypeError` for a step count that is not an integer.
    """
    name = "surrogate_optimizer"
    check_size(name, "n_steps", n_steps)
    if warmup_steps is None:
        warmup_steps = max(1, n_steps // 20)
    check_size(name, "warmup_steps", warmup_steps, minimum=0)
    if not warmup_steps < max(n_steps, 2):
        raise ValueError(
            f"surrogate_optimizer: `warmup_steps` must be in [0, n_steps), got "
            f"{warmup_steps} with n_steps={n_steps}."
        )
    check_in_range(
        name, "peak_learning_rate", peak_learning_rate, low=0, inclusive=(False, True)
    )
    if end_learning_rate is None:
        end_learning_rate = 0.01 * peak_learning_rate
    check_in_range(name, "end_learning_rate", end_learning_rate, low=0)
    check_in_range(name, "weight_decay", weight_decay, low=0)
    check_in_range(
        name, "clip_norm", clip_norm, finite=False, low=0, inclusive=(False, True)
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(),
        # Unchecked: the optimiser also serves pytrees without weight matrices.
        optax.add_decayed_weights(weight_decay, mask=_weight_mask),
        _scale_by_warmup_cosine(
            peak_learning_rate, warmup_steps, end_learning_rate, n_steps
        ),
    )


def _with_run_length(opt_state, n_steps: int) -> tuple[object, bool]:
    """`opt_state` with the `total_steps` of its `WarmupCosineState`s replaced, and
    whether it held one."""
    found = False

    def replace(node):
        nonlocal found
        if isinstance(node, WarmupCosineState):
            found = True
            return node._replace(total_steps=jnp.asarray(n_steps, jnp.int32))
        return node

    new = jax.tree.map(
        replace, opt_state, is_leaf=lambda x: isinstance(x, WarmupCosineState)
    )
    return new, found


def set_run_length(opt_state, n_steps: int):
    """Change the run length of a [`eqx_models.causal.surrogate_optimizer`][] state.

    **Arguments:**

    - `opt_state`: the optimiser state.
    - `n_steps`: the new total number of steps of the run.

    **Returns:**

    The state with its `total_steps` replaced (same shapes and dtypes, so a compiled
    step is reused).

    **Raises:**

    `ValueError` if the state has no [`eqx_models.causal.WarmupCosineState`][] or
    `n_steps` is not positive; `TypeError` if it is not an integer.
    """
    check_size("set_run_length", "n_steps", n_steps)
    new, found = _with_run_length(opt_state, n_steps)
    if not found:
        raise ValueError(
            "set_run_length: `opt_state` holds no WarmupCosineState (it does not come "
            "from surrogate_optimizer)."
        )
    return new


class Curriculum(eqx.Module):
    """An easy-to-hard schedule over task buckets and graph families.

    At training progress `s = step / n_steps` the probability of each bucket (a task
    shape, e.g. `(d, N)`) and the weights of the graph families are interpolated
    linearly from their start to their end values over `s ∈ [0, ramp]`, then stay
    at the end values. The sampler draws each step's bucket from these
    probabilities and passes the family weights to
    [`eqx_models.causal.sample_training_batch`][], so what is sampled really
    changes over the run.

    **Fields:**

    - `start_buckets`, `end_buckets`: bucket weights (one per bucket).
    - `start_families`, `end_families`: weights over `GRAPH_FAMILIES`.
    - `ramp`: the fraction of the run over which the weights move.

    **Raises:**

    `ValueError` if the bucket weights differ in length, the family weights are not
    one per family, a weight is negative, NaN or infinite, a set of weights sums to
    0, or `ramp` is outside `[0, 1]`.
    """

    start_buckets: tuple[float, ...] = eqx.field(static=True)
    end_buckets: tuple[float, ...] = eqx.field(static=True)
    start_families: tuple[float, ...] = eqx.field(
        static=True, default=(1.0, 1.0, 1.0, 0.0, 0.0)
    )
    end_families: tuple[float, ...] = eqx.field(
        static=True, default=(1.0, 1.0, 1.0, 1.0, 1.0)
    )
    ramp: float = eqx.field(static=True, default=0.3)

    def __check_init__(self):
        check_in_range("Curriculum", "ramp", self.ramp, low=0, high=1)
        if len(self.start_buckets) != len(self.end_buckets):
            raise ValueError(
                "Curriculum: `start_buckets` and `end_buckets` must have the same "
                f"length, got {len(self.start_buckets)} and {len(self.end_buckets)}."
            )
        n = len(GRAPH_FAMILIES)
        for name, weights in (
            ("start_buckets", self.start_buckets),
            ("end_buckets", self.end_buckets),
            ("start_families", self.start_families),
            ("end_families", self.end_families),
        ):
            for i, weight in enumerate(weights):
                check_in_range("Curriculum", f"{name}[{i}]", weight, low=0)
            if not sum(weights) > 0:
                raise ValueError(
                    f"Curriculum: `{name}` must be non-negative with a positive sum, "
                    f"got {weights}."
                )
            if "families" in name and len(weights) != n:
                raise ValueError(
                    f"Curriculum: `{name}` needs one weight per family ({n}), got "
                    f"{len(weights)}."
                )

    @classmethod
    def easy_to_hard(
        cls, costs: Sequence[int | float], ramp: float = 0.3
    ) -> "Curriculum":
        """Start on the cheapest bucket(s) and chain/fork/collider graphs; end uniform.

        **Arguments:**

        - `costs`: a difficulty per bucket (e.g. `d·N`); the buckets of the smallest
            cost get all the weight at the start.
        - `ramp`: the fraction of the run over which the weights move.

        **Raises:**

        `ValueError` if `costs` is empty or holds NaN; as `Curriculum` for `ramp`.
        """
        if len(costs) == 0:
            raise fail("Curriculum.easy_to_hard", "costs", "one cost per bucket", "[]")
        for i, cost in enumerate(costs):
            check_in_range("Curriculum.easy_to_hard", f"costs[{i}]", cost)
        low = min(costs)
        start = tuple(1.0 if c == low else 0.0 for c in costs)
        return cls(start, tuple(1.0 for _ in costs), ramp=ramp)

    def weights(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Bucket probabilities and family weights at `progress ∈ [0, 1]`."""
        t = 1.0 if self.ramp == 0 else min(max(progress / self.ramp, 0.0), 1.0)

        def mix(a, b):
            # A mixture of the two normalised distributions.
            a, b = np.asarray(a, float), np.asarray(b, float)
            return (1 - t) * a / a.sum() + t * b / b.sum()

        return mix(self.start_buckets, self.end_buckets), mix(
            self.start_families, self.end_families
        )


def _check_buckets(fn: str, buckets) -> list:
    """A non-empty sequence of `(TaskConfig, batch_size)` pairs, as a list."""
    expected = "a non-empty sequence of (TaskConfig, batch_size) pairs"
    if not isinstance(buckets, Sequence) or isinstance(buckets, str):
        raise fail(fn, "buckets", expected, describe(buckets), TypeError)
    buckets = list(buckets)
    if not buckets:
        raise fail(fn, "buckets", expected, "an empty sequence")
    for i, bucket in enumerate(buckets):
        if not (isinstance(bucket, (tuple, list)) and len(bucket) == 2):
            raise fail(fn, f"buckets[{i}]", expected, describe(bucket), TypeError)
        check_type(fn, f"buckets[{i}][0]", bucket[0], TaskConfig, "a TaskConfig")
        check_size(fn, f"buckets[{i}][1]", bucket[1])
    return buckets


def _check_curriculum(fn: str, curriculum, n_buckets: int) -> None:
    check_type(fn, "curriculum", curriculum, Curriculum, "a Curriculum")
    if len(curriculum.start_buckets) != n_buckets:
        raise fail(
            fn,
            "curriculum",
            f"a curriculum over the {n_buckets} buckets",
            f"one over {len(curriculum.start_buckets)}",
        )


class TaskStream:
    """Deterministic training batches as a function of the step index.

    `stream(i)` is the batch of step `i` of an `n_steps` run: the bucket is drawn
    with NumPy from a generator seeded by `(seed, i)` with the curriculum's
    probabilities at `i / n_steps`, and the tasks from `fold_in(key, i)`. Batches
    are a pure function of `i`, so a resumed run sees the same data.

    **Arguments:**

    - `buckets`: `(TaskConfig, batch_size)` pairs.
    - `max_parents`: `K` of the labels (the model's).
    - `n_steps`: the run length the curriculum is laid out over.
    - `curriculum`: a [`eqx_models.causal.Curriculum`][] over the buckets.
    - `key`: the data's PRNG key.

    **Raises:**

    `TypeError`/`ValueError` for an empty `buckets` or a bucket that is not a
    `(TaskConfig, positive int)` pair, a `max_parents` or `n_steps` that is not a
    non-negative (resp. positive) integer, a curriculum over another number of
    buckets, or a `key` that is not a JAX array.
    """

    def __init__(self, buckets, max_parents, n_steps, curriculum, key):
        name = "TaskStream"
        buckets = _check_buckets(name, buckets)
        check_size(name, "max_parents", max_parents, minimum=0)
        check_size(name, "n_steps", n_steps)
        _check_curriculum(name, curriculum, len(buckets))
        check_type(name, "key", key, jax.Array, "a PRNG key")
        self.buckets = list(buckets)
        self.max_parents = max_parents
        self.n_steps = n_steps
        self.curriculum = curriculum
        self.key = key
        self.seed = int(jr.randint(key, (), 0, 2**31 - 1))

    def bucket_and_families(self, i: int) -> tuple[int, np.ndarray]:
        """The bucket index and family weights of step `i`."""
        bucket_p, family_w = self.curriculum.weights(i / max(self.n_steps, 1))
        rng = np.random.default_rng([self.seed, i])
        return int(rng.choice(len(self.buckets), p=bucket_p)), family_w

    def __call__(self, i: int) -> TrainingBatch:
        b, family_w = self.bucket_and_families(i)
        config, batch_size = self.buckets[b]
        return sample_training_batch(
            jr.fold_in(self.key, i),
            config,
            batch_size,
            self.max_parents,
            jnp.asarray(family_w, jnp.float32),
        )


def train_surrogate(
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
    checkpoint_path: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    allow_config_change: bool = False,
    deterministic: bool = False,
    progress: bool | None = None,
) -> FitResult:
    """Train a parent-set model by behavioural cloning of the exact expert.

    Tasks are drawn on the fly (never reused) from `buckets` — one
    `(TaskConfig, batch_size)` per task shape; every batch has a single shape, so
    each bucket compiles once — following `curriculum`, labelled by the exact expert
    and fed to a step from [`transforms.make_train_step`][] (wrapped in
    [`transforms.with_fallback`][] so that a custom loss that cannot be compiled
    still runs), looped by [`transforms.fit`][] with its checkpoints and resume.

    The checkpoints record the run's configuration: the model's hyperparameters,
    the buckets (every task setting and batch size), the curriculum, the loss's
    settings, the optimiser (`"surrogate_optimizer"` for the default, `"custom"`
    for one of yours, whose settings you answer for), `n_steps` and the data seed
    (drawn from `key`). A resumed run must match it field by field, unless
    `allow_config_change=True`.

    **Arguments:**

    - `model`: the [`eqx_models.causal.ParentSetPredictionModel`][] to train.
    - `buckets`: `(config, batch_size)` pairs; `config.max_parents` need not equal
        the model's `K` (it caps the true graphs' in-degrees).
    - `n_steps`: the length of the run: the learning-rate schedule and the
        curriculum are laid out over it (the run length of a
        `surrogate_optimizer` state, fresh or restored, is set to `n_steps`; see
        [`eqx_models.causal.set_run_length`][]).
    - `key`: the run's PRNG key (data and steps derive from it).
    - `curriculum`: default [`eqx_models.causal.Curriculum.easy_to_hard`][] with
        `d·N` as the cost.
    - `loss`: default `BehaviouralCloningLoss(weight_decay=1e-4)`.
    - `optimizer`: default `surrogate_optimizer(n_steps)`; a custom optimiser's
        learning rate is reported if it records it in its state as
        `learning_rate` (e.g. `optax.inject_hyperparams`).
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
    name = "train_surrogate"
    check_type(
        name, "model", model, ParentSetPredictionModel, "a ParentSetPredictionModel"
    )
    buckets = _check_buckets(name, buckets)
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
        check_type(
            name,
            "optimizer",
            optimizer,
            optax.GradientTransformation,
            "an optax.GradientTransformation",
        )
    for arg, flag in (
        ("fallback", fallback),
        ("resume", resume),
        ("allow_config_change", allow_config_change),
        ("deterministic", deterministic),
        ("progress", progress),
    ):
        check_bool(name, arg, flag)
    if curriculum is None:
        curriculum = Curriculum.easy_to_hard(
            [c.n_vars * c.n_samples for c, _ in buckets]
        )
    _check_curriculum(name, curriculum, len(buckets))
    if mesh is not None:
        n_devices = dict(mesh.shape).get("data")
        if n_devices is None:
            raise ValueError(
                f"train_surrogate: `mesh` has no `data` axis (axes {mesh.axis_names})."
            )
        sizes = [size for _, size in buckets]
        if any(size % n_devices for size in sizes):
            raise ValueError(
                f"train_surrogate: every bucket's batch size must divide by the "
                f"{n_devices} devices of the mesh, got {sizes}."
            )
    if loss is None:
        loss = BehaviouralCloningLoss(weight_decay=1e-4)
    data_key, step_key = jr.split(key)
    stream = TaskStream(buckets, model.max_parents, n_steps, curriculum, data_key)
    config = {
        "model": static_fields(model),
        "buckets": [
            {**static_fields(task), "batch_size": int(size)} for task, size in buckets
        ],
        "curriculum": static_fields(curriculum),
        "loss": _loss_config(loss),
        "optimizer": "surrogate_optimizer" if optimizer is None else "custom",
        "n_steps": n_steps,
        "data_seed": stream.seed,
    }
    check_resumed_config(
        "train_surrogate",
        checkpoint_path,
        config,
        resume=resume,
        allow_config_change=allow_config_change,
    )
    if optimizer is None:
        optimizer = surrogate_optimizer(n_steps)
    if opt_state is None:
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    opt_state, _ = _with_run_length(opt_state, n_steps)
    # The step donates its inputs' buffers; copies keep the caller's model and
    # optimiser state usable.
    model, opt_state = jax.tree.map(
        lambda x: jnp.copy(x) if eqx.is_array(x) else x, (model, opt_state)
    )
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
            _with_run_length(opt_state, n_steps)[0],
        ),
        deterministic=deterministic,
        progress=progress,
    )
