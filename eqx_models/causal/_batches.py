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

from ._candidates import checked_table
from ._data import Channel
from ._expert import posterior_core
from ._graphs import GRAPH_FAMILIES
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
