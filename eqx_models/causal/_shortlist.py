"""Parent-set posteriors beyond the enumeration cap: edge scores pick a shortlist of
candidate parents, and the posterior over sets is computed on the shortlist only.

At d = 100 and K = 3 there are ~160 000 candidate sets, beyond
`MAX_CANDIDATE_SETS`; on a shortlist of L variables there are `Σ_{k≤K} C(L, k)`
(299 for L = 12). The exact expert or a model trained at small d then scores the
sets of the shortlist as a task of L + 1 variables.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from transforms.validation import check_size, fail, typechecked

from ._candidates import checked_table, count_candidate_sets, MAX_CANDIDATE_SETS
from ._data import Channel, check_shapes, check_values
from ._expert import marginals_from_sets, posterior_core
from ._model import _forward, ParentSetPredictionModel


class ShortlistPosterior(eqx.Module):
    """A posterior over parent sets drawn from a shortlist of candidate parents.

    **Fields:**

    - `shortlist`: `(L,)` the shortlisted variables in increasing index order.
    - `log_probs`: `(C_L,)` log posterior over the candidate sets of the
        shortlist, in the canonical order of `candidate_parent_sets(L + 1, K)` with
        relative index `r` meaning variable `shortlist[r]`.
    - `edge_probs`: `(d,)` marginal probability that each variable is a parent (0
        off the shortlist and at the target).
    - `edge_scores`: `(d,)` the screening scores (`-inf` at the target).
    - `target`: the target variable.
    """

    shortlist: Int[Array, " L"]
    log_probs: Float[Array, " C"]
    edge_probs: Float[Array, " d"]
    edge_scores: Float[Array, " d"]
    target: Int[Array, ""]


@typechecked
def shortlist_parent_posterior(
    data: Float[Array, "N d 3"],
    max_parents: int,
    *,
    shortlist_size: int | None = 12,
    model: ParentSetPredictionModel | None = None,
    max_model_vars: int | None = None,
    degree: int = 1,
) -> ShortlistPosterior:
    """The posterior over the target's parent sets, restricted to a shortlist.

    1. **Edge scores**: the exact g-prior log Bayes factor of each single variable
        as the target's only parent (`K = 1` of
        [`eqx_models.causal.exact_parent_posterior`][] with the same `degree`: `d`
        one-variable regressions, marginal screening; with `degree > 1` it also
        sees effects that are even, which have no linear correlation).
    2. **Shortlist**: the `L = shortlist_size` variables of largest score.
    3. **Posterior**: the exact expert (or `model`) on the data of the target and
        the shortlist only, a task of `L + 1` variables, over all its sets of size
        `≤ K`.

    The approximation: sets with a member off the shortlist get probability 0, and
    the posterior is that of the sub-model of the shortlisted variables (the other
    variables are marginalised out, not conditioned on). Marginal screening can
    miss a parent whose dependence on the target is weak marginally (cancelled
    along other paths, or masked by stronger parents at small N), so measure the
    recall of the true set in the shortlist (the benchmark reports it).
    `shortlist_size=None` enumerates all variables (the plain posterior).

    **Arguments:**

    - `data`: AVICI data `(N, d, 3)`.
    - `max_parents`: `K`.
    - `shortlist_size`: `L`, at most `d - 1`; `None` for no shortlist.
    - `model`: score the sets with this model instead of the exact expert.
    - `max_model_vars`: the largest `d` the model was trained on; with a model
        and no shortlist, a `d` above it is refused.
    - `degree`: the degree of the additive polynomial model of the screening and
        of the exact expert (1: linear; see `exact_parent_posterior`).

    **Returns:**

    A [`eqx_models.causal.ShortlistPosterior`][].

    **Raises:**

    `ValueError` for data that are not valid AVICI data, a `degree` below 1, a
    `shortlist_size` below `1` or above `d - 1`, no shortlist where `(d, K)` exceeds
    `MAX_CANDIDATE_SETS`, a model with another `K`, or, with a model and no
    shortlist, a `d` above `max_model_vars` (the model's trained range); a
    degenerate posterior as `exact_parent_posterior`; `TypeError` for a size that
    is not an integer.
    """
    name = "shortlist_parent_posterior"
    check_shapes(name, data, None, None)
    n, d, _ = data.shape
    check_size(name, "max_parents", max_parents, minimum=0)
    check_size(name, "degree", degree)
    if model is not None and model.max_parents != max_parents:
        raise fail(
            name, "max_parents", f"the model's {model.max_parents}", f"{max_parents}"
        )
    if max_model_vars is not None:
        check_size(name, "max_model_vars", max_model_vars, minimum=2)
    if shortlist_size is None:
        if model is not None and max_model_vars is not None and d > max_model_vars:
            raise fail(
                name,
                "shortlist_size",
                f"a shortlist for d = {d}, above the model's trained range "
                f"(max_model_vars = {max_model_vars})",
                "None",
            )
        if count_candidate_sets(d, max_parents) > MAX_CANDIDATE_SETS:
            raise fail(
                name,
                "shortlist_size",
                f"a shortlist: (d, K) = ({d}, {max_parents}) has "
                f"{count_candidate_sets(d, max_parents)} sets, beyond "
                f"MAX_CANDIDATE_SETS = {MAX_CANDIDATE_SETS}",
                "None",
            )
        shortlist_size = d - 1
    check_size(name, "shortlist_size", shortlist_size, maximum=d - 1)
    checked_table(name, shortlist_size + 1, max_parents)
    data, _ = check_values(name, data, jnp.ones((n,), bool), jnp.ones((d,), bool))
    out = _shortlist(data, max_parents, shortlist_size, model, degree)
    if bool(jnp.any(jnp.isnan(out.log_probs))):
        raise ValueError(
            f"{name}: the posterior on the shortlist is degenerate for these data "
            "(too few rows without an intervention on the target, a constant "
            "variable, or collinear variables)."
        )
    return out


@eqx.filter_jit
def _shortlist(data, max_parents, size, model, degree=1) -> ShortlistPosterior:
    n, d, _ = data.shape
    target = jnp.argmax(data[0, :, Channel.TARGET]).astype(jnp.int32)
    values = data[..., Channel.VALUE]
    intervened_target = data[:, target, Channel.INTERVENED] == 1
    rows, variables = jnp.ones((n,), bool), jnp.ones((d,), bool)
    # Singletons: the log Bayes factors of sets {i} are entries 1.. of the K = 1
    # table, in relative order.
    _, log_bf, *_ = posterior_core(
        values, intervened_target, target, rows, variables, 1, degree
    )
    i = jnp.arange(d)
    relative = jnp.clip(i - (i > target), 0, d - 2)
    scores = jnp.where(i == target, -jnp.inf, log_bf[1 + relative])
    shortlist = jax.lax.top_k(scores, size)[1].astype(jnp.int32)
    # The sub-task: the shortlist in increasing index order plus the target, so
    # that the canonical table of L + 1 variables maps back by sorting.
    keep = jnp.sort(jnp.append(shortlist, target))
    sub = data[:, keep]
    sub_target = jnp.argmax(keep == target)
    sub_rows, sub_vars = jnp.ones((n,), bool), jnp.ones((size + 1,), bool)
    if model is None:
        log_probs, *_ = posterior_core(
            sub[..., Channel.VALUE],
            intervened_target,
            sub_target,
            sub_rows,
            sub_vars,
            max_parents,
            degree,
        )
    else:
        log_probs = jax.nn.log_softmax(_forward(model, sub, sub_rows, sub_vars))
    table = checked_table("shortlist_parent_posterior", size + 1, max_parents)
    sub_edges = marginals_from_sets(jnp.exp(log_probs), table, sub_target, size + 1)
    edge_probs = jnp.zeros((d,), sub_edges.dtype).at[keep].set(sub_edges)
    # Relative index r of the sub-task is the r-th non-target entry of `keep`.
    others = jnp.where(keep == target, d, keep)
    ordered = jnp.sort(others)[:size]
    return ShortlistPosterior(ordered, log_probs, edge_probs, scores, target)
