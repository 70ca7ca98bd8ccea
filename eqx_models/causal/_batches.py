"""Training batches for the causal surrogate: tasks drawn on the device and labelled
by the exact expert.

Why a module of its own: making the data is the costly half of a training step and
has its own compile key (task shape, batch size, `K`); the loss, the optimiser and
the curriculum only consume its `TrainingBatch`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from transforms.validation import check_size, typechecked

from ._candidates import CandidateSets, checked_table
from ._data import Channel
from ._expert import posterior_core, relative_to_variables
from ._graphs import GRAPH_FAMILIES
from ._tasks import check_family_weights, sample_task, TaskConfig


class TrainingBatch(eqx.Module):
    """A batch of tasks of one shape, labelled by the exact expert.

    **Fields:**

    - `data`: `(B, N, d, 3)` AVICI data.
    - `expert_log_probs`: `(B, C)` the labels: the expert's log posterior over the
        canonical candidate sets (NaN for tasks whose posterior is degenerate), or,
        for configs labelled by the truth (`TaskConfig.truth_labels`), the log of
        the (smoothed) indicator of the true parent set.
    - `valid`: `(B,)` boolean, false for degenerate tasks (and, with truth labels,
        for tasks whose true parent set is larger than `K`), which the loss skips
        and counts.
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
            config.expert_degree,
        )
        return log_probs, ~degenerate

    if config.truth_labels:
        table = checked_table("sample_training_batch", d, max_parents)
        log_probs, valid = jax.vmap(
            lambda truth, target: truth_log_probs(
                truth, target, table, config.label_smoothing
            )
        )(tasks.true_parents, tasks.target)
    else:
        log_probs, valid = jax.vmap(label)(tasks)
    return TrainingBatch(tasks.data, log_probs, valid)


def set_membership(table: CandidateSets, target, n_vars: int) -> Bool[Array, "C d"]:
    """`member[c, i]`: whether variable `i` is in candidate set `c`."""
    members = relative_to_variables(table.members, target)
    hits = (members[..., None] == jnp.arange(n_vars)) & table.mask[..., None]
    return jnp.any(hits, axis=1)


def truth_log_probs(
    truth: Bool[Array, " d"], target, table: CandidateSets, smoothing: float
) -> tuple[Float[Array, " C"], Bool[Array, ""]]:
    """Log of `(1 - ε)·δ_S* + ε/C` for the true set `S*`, and whether `S*` is a
    candidate (a true set larger than `K` is not: the label is then NaN)."""
    d = truth.shape[0]
    is_true = jnp.all(set_membership(table, target, d) == truth, axis=1)
    found = jnp.any(is_true)
    n_sets = table.n_sets
    rest = smoothing / n_sets
    probs = jnp.where(is_true, 1.0 - smoothing + rest, rest)
    log_probs = jnp.log(probs.astype(jnp.result_type(float)))
    return jnp.where(found, log_probs, jnp.nan), found


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
    device, so training tasks are made on the fly at accelerator speed. Tasks of a
    config with `truth_labels` (by default the nonlinear mechanisms, where the
    linear expert is misspecified) are labelled by their true parent set instead,
    smoothed by `config.label_smoothing`. A task whose
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
