"""Evaluation of a trained parent-set model against the exact posterior and the truth.

`evaluate_surrogate` is a host-side report rather than a traced function: it runs
compiled chunks of tasks and pools their scores (KL, total variation, MAP agreement,
F1, AUROC) on the host. It needs the expert, the model and the tasks together, so it
sits above all three.
"""

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from transforms import kl_divergence, total_variation
from transforms.validation import check_size, check_type, fail

from ._candidates import candidate_parent_sets
from ._data import Channel
from ._expert import marginals_from_sets, posterior_core, relative_to_variables
from ._model import ParentSetPredictionModel
from ._tasks import Task


def _set_mask(table, index, target, d):
    members = relative_to_variables(jnp.asarray(table.members)[index], target)
    members = jnp.where(jnp.asarray(table.mask)[index], members, d)
    return jnp.zeros((d,), bool).at[members].set(True, mode="drop")


def _f1(predicted, truth):
    hits = jnp.sum(predicted & truth)
    total = jnp.sum(predicted) + jnp.sum(truth)
    # Both empty: the prediction is exactly right.
    return jnp.where(total > 0, 2.0 * hits / jnp.maximum(total, 1), 1.0)


@eqx.filter_jit
def _evaluate_chunk(model, tasks: Task, max_parents: int, degree: int):
    n, d = tasks.data.shape[1:3]
    table = candidate_parent_sets(d, max_parents)

    def one(data, target, truth):
        log_p, _, edge_p, _, degenerate = posterior_core(
            data[..., Channel.VALUE],
            data[:, target, Channel.INTERVENED] == 1,
            target,
            jnp.ones((n,), bool),
            jnp.ones((d,), bool),
            max_parents,
            degree,
        )
        log_q = jax.nn.log_softmax(model(data))
        safe_p = jnp.where(degenerate, log_q, log_p)
        exact_map = jnp.argmax(safe_p)
        model_map = jnp.argmax(log_q)
        model_set = _set_mask(table, model_map, target, d)
        exact_set = _set_mask(table, exact_map, target, d)
        return {
            "top1_truth": jnp.all(model_set == truth).astype(log_q.dtype),
            "exact_top1_truth": jnp.all(exact_set == truth).astype(log_q.dtype),
            "kl": kl_divergence(safe_p, log_q),
            "tv": total_variation(safe_p, log_q),
            "top1": (exact_map == model_map).astype(log_q.dtype),
            "map_f1": _f1(model_set, truth),
            "exact_map_f1": _f1(exact_set, truth),
            "model_edges": marginals_from_sets(jnp.exp(log_q), table, target, d),
            "exact_edges": edge_p,
            "degenerate": degenerate,
        }

    return jax.vmap(one)(tasks.data, tasks.target, tasks.true_parents)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties)."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, float)
    i = 0
    while i < scores.size:
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def _expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 10
) -> float:
    """`Σ_b (n_b/n)·|mean(p in b) - mean(y in b)|` over `n_bins` equal-width bins
    of `[0, 1]` (the last bin closed)."""
    if probs.size == 0:
        return float("nan")
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            gap = abs(probs[inside].mean() - labels[inside].mean())
            total += inside.sum() / probs.size * gap
    return float(total)


def evaluate_surrogate(
    model: ParentSetPredictionModel,
    tasks: Task,
    *,
    max_parents: int | None = None,
    batch_size: int = 128,
    expert_degree: int = 1,
) -> dict[str, float]:
    """Compare a parent-set model with the exact posterior and the truth on tasks.

    For every task: `KL(exact ‖ model)` and the total variation between the two
    posteriors over the canonical candidate sets; whether the model's most probable
    set is the exact MAP set (top-1 agreement); the F1 score of the model's MAP set
    and of the exact MAP set against the true parents (1 when both are empty). Over
    all tasks: the AUROC of the model's and of the exact edge marginals as scores
    for "is a true parent of the target" (pooled over tasks and non-target
    variables), and the expected calibration error (ECE, 10 equal-width bins) of
    those edge marginals as probabilities of being a parent; the fraction of tasks
    whose MAP set is exactly the true parent set (top-1 against the truth), for
    the model and for the exact expert. On nonlinear tasks the exact expert's
    linear model is misspecified, so its `exact_*` metrics show how far it
    degrades there (see [`eqx_models.causal.evaluate_by_mechanism`][]);
    `expert_degree=p` makes the expert the additive polynomial one
    (`exact_parent_posterior(..., degree=p)`), a non-amortised nonlinear
    baseline. Tasks whose exact posterior is degenerate are counted and left out.
    Evaluate sink-target and general-target tasks, or tasks of different `d`,
    with separate calls to report them separately.

    Runs on the host in chunks of `batch_size` tasks (each chunk compiled once per
    shape); not itself jittable.

    **Arguments:**

    - `model`: a [`eqx_models.causal.ParentSetPredictionModel`][].
    - `tasks`: a batch of tasks of one shape (from `jax.vmap(sample_task, ...)`).
    - `max_parents`: `K` (default: the model's).
    - `batch_size`: tasks per compiled chunk.
    - `expert_degree`: the `degree` of the exact expert (1: linear).

    **Returns:**

    A dict of floats: `tasks`, `degenerate`, `kl` (mean), `kl_median`, `tv`,
    `top1_agreement`, `map_f1`, `exact_map_f1`, `auroc`, `exact_auroc`,
    `top1_truth`, `exact_top1_truth`, `ece`, `exact_ece`.

    **Raises:**

    `ValueError` if `tasks` has no leading batch axis or no task, or if
    `max_parents` differs from the model's; `TypeError`/`ValueError` if
    `batch_size` or `expert_degree` is not a positive integer.
    """
    name = "evaluate_surrogate"
    check_type(name, "tasks", tasks, Task, "a batch of Tasks")
    if tasks.data.ndim != 4 or tasks.data.shape[0] == 0:
        raise ValueError(
            "evaluate_surrogate: `tasks` must be a non-empty batch of tasks (data of "
            f"shape [B, N, d, 3], B >= 1), got data of shape {tasks.data.shape}."
        )
    batch_size = check_size(name, "batch_size", batch_size)
    expert_degree = check_size(name, "expert_degree", expert_degree)
    if max_parents is not None:
        check_size(name, "max_parents", max_parents, minimum=0)
    k = model.max_parents if max_parents is None else max_parents
    if k != model.max_parents:
        raise ValueError(
            f"evaluate_surrogate: `max_parents`={k} differs from the model's "
            f"{model.max_parents}."
        )
    total = tasks.data.shape[0]
    chunks = []
    for start in range(0, total, batch_size):
        chunk = jax.tree.map(lambda x: x[start : start + batch_size], tasks)
        chunks.append(jax.device_get(_evaluate_chunk(model, chunk, k, expert_degree)))
    out = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    keep = ~out["degenerate"]
    truth = np.asarray(tasks.true_parents)[keep]
    not_target = np.ones_like(truth)
    not_target[np.arange(truth.shape[0]), np.asarray(tasks.target)[keep]] = False

    def pooled(edges):
        return _auroc(edges[keep][not_target], truth[not_target])

    def calibration(edges):
        return _expected_calibration_error(
            edges[keep][not_target], truth[not_target].astype(float)
        )

    def mean(name):
        return float(np.mean(out[name][keep])) if keep.any() else float("nan")

    return {
        "tasks": float(total),
        "degenerate": float((~keep).sum()),
        "kl": mean("kl"),
        "kl_median": float(np.median(out["kl"][keep])) if keep.any() else float("nan"),
        "tv": mean("tv"),
        "top1_agreement": mean("top1"),
        "map_f1": mean("map_f1"),
        "exact_map_f1": mean("exact_map_f1"),
        "auroc": pooled(out["model_edges"]),
        "exact_auroc": pooled(out["exact_edges"]),
        "top1_truth": mean("top1_truth"),
        "exact_top1_truth": mean("exact_top1_truth"),
        "ece": calibration(out["model_edges"]),
        "exact_ece": calibration(out["exact_edges"]),
    }


def evaluate_by_mechanism(
    model: ParentSetPredictionModel,
    tasks: Mapping[str, Task],
    *,
    batch_size: int = 128,
    expert_degree: int = 1,
) -> dict[str, dict[str, float]]:
    """Held-out metrics per mechanism family, the model next to the exact expert.

    Runs [`eqx_models.causal.evaluate_surrogate`][] on each family's tasks and adds
    the model's advantage over the exact g-prior expert (linear, or additive
    polynomial of `expert_degree`) on each metric
    against the truth: `map_f1_gain = map_f1 - exact_map_f1`, `auroc_gain`,
    `top1_truth_gain`, and `ece_gain = exact_ece - ece` (positive: the model is
    better calibrated). On linear tasks the expert is the exact Bayesian answer
    (gains near or below 0 are expected); on nonlinear ones its model is
    misspecified and the gains measure what amortisation buys.

    **Arguments:**

    - `model`: a [`eqx_models.causal.ParentSetPredictionModel`][].
    - `tasks`: `{family name: batch of tasks}` (e.g. `{"linear": ..., "mlp": ...}`,
        each from `jax.vmap(sample_task, ...)` with its `TaskConfig`).
    - `batch_size`: tasks per compiled chunk.
    - `expert_degree`: the `degree` of the exact expert (1: linear).

    **Returns:**

    `{family name: metrics}`, the metrics of `evaluate_surrogate` plus the gains.

    **Raises:**

    `TypeError` if `tasks` is not a mapping or has a key that is not a string;
    `ValueError` if it is empty; as `evaluate_surrogate` for each batch.
    """
    name = "evaluate_by_mechanism"
    check_type(name, "tasks", tasks, Mapping, "a mapping of family names to Tasks")
    if not tasks:
        raise fail(name, "tasks", "at least one family", "an empty mapping")
    report = {}
    for family, batch in tasks.items():
        check_type(name, f"tasks[{family!r}]", family, str, "a string key")
        metrics = evaluate_surrogate(
            model, batch, batch_size=batch_size, expert_degree=expert_degree
        )
        metrics["map_f1_gain"] = metrics["map_f1"] - metrics["exact_map_f1"]
        metrics["auroc_gain"] = metrics["auroc"] - metrics["exact_auroc"]
        metrics["top1_truth_gain"] = metrics["top1_truth"] - metrics["exact_top1_truth"]
        metrics["ece_gain"] = metrics["exact_ece"] - metrics["ece"]
        report[family] = metrics
    return report
