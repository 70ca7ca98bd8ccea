import itertools

import jax
import jax.random as jr
import numpy as np
import pytest

from eqx_models.causal import (
    candidate_variables,
    evaluate_by_mechanism,
    evaluate_surrogate,
    exact_parent_posterior,
    ParentSetPredictionModel,
    sample_task,
    TaskConfig,
)
from eqx_models.causal._evaluation import _auroc


def _brute_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 4, size=30).astype(float)
        labels = rng.random(30) < 0.4
        assert _auroc(scores, labels) == pytest.approx(_brute_auroc(scores, labels))
    assert np.isnan(_auroc(np.ones(3), np.zeros(3, bool)))


def _brute_ece(scores, labels):
    """ECE over the bins [0, .1), [.1, .2), ..., [.9, 1], by explicit grouping."""
    groups = {}
    for p, y in zip(scores, labels):
        groups.setdefault(min(int(np.floor(p * 10)), 9), []).append((p, y))
    return sum(
        len(g)
        / len(scores)
        * abs(np.mean([p for p, _ in g]) - np.mean([y for _, y in g]))
        for g in groups.values()
    )


def _f1(predicted, truth):
    hits = len(predicted & truth)
    total = len(predicted) + len(truth)
    return 1.0 if total == 0 else 2 * hits / total


@pytest.mark.parametrize("degree", [1, 2])
def test_metrics_against_direct_computation(degree):
    d, k = 5, 2
    model = ParentSetPredictionModel(k, width=8, n_layers=1, n_heads=2, key=jr.key(0))
    config = TaskConfig(n_vars=d, n_samples=30, target="any")
    tasks = jax.vmap(lambda key: sample_task(key, config))(jr.split(jr.key(1), 10))
    got = evaluate_surrogate(model, tasks, batch_size=4, expert_degree=degree)
    # One task at a time, each call compiled once (eagerly, every operation of the
    # first task's calls would compile on its own).
    expert = jax.jit(lambda x: exact_parent_posterior(x, k, degree=degree).log_probs)
    surrogate = jax.jit(lambda x: jax.nn.log_softmax(model(x)))
    kls, tvs, top1, f1, exact_f1, scores, exact_scores, labels = ([] for _ in range(8))
    truth_hits, exact_truth_hits = [], []
    for i in range(10):
        data, target = tasks.data[i], int(tasks.target[i])
        log_p = np.asarray(expert(data), np.float64)
        log_q = np.asarray(surrogate(data), np.float64)
        p, q = np.exp(log_p), np.exp(log_q)
        kls.append(np.sum(p * (log_p - log_q)))
        tvs.append(0.5 * np.abs(p - q).sum())
        top1.append(np.argmax(p) == np.argmax(q))
        sets = [
            set(int(v) for v in row if v >= 0)
            for row in candidate_variables(target, d, k)
        ]
        truth = set(np.flatnonzero(np.asarray(tasks.adjacency[i])[:, target]).tolist())
        f1.append(_f1(sets[int(np.argmax(q))], truth))
        truth_hits.append(sets[int(np.argmax(q))] == truth)
        exact_truth_hits.append(sets[int(np.argmax(p))] == truth)
        exact_f1.append(_f1(sets[int(np.argmax(p))], truth))
        for v in range(d):
            if v != target:
                scores.append(sum(qq for qq, s in zip(q, sets) if v in s))
                exact_scores.append(sum(pp for pp, s in zip(p, sets) if v in s))
                labels.append(v in truth)
    labels = np.array(labels)
    assert got["tasks"] == 10 and got["degenerate"] == 0
    assert got["kl"] == pytest.approx(np.mean(kls), rel=1e-4)
    assert got["kl_median"] == pytest.approx(np.median(kls), rel=1e-4)
    assert got["tv"] == pytest.approx(np.mean(tvs), rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(np.mean(top1))
    assert got["map_f1"] == pytest.approx(np.mean(f1))
    assert got["exact_map_f1"] == pytest.approx(np.mean(exact_f1))
    assert got["auroc"] == pytest.approx(
        _brute_auroc(np.array(scores), labels), abs=0.02
    )
    assert got["exact_auroc"] == pytest.approx(
        _brute_auroc(np.array(exact_scores), labels), abs=0.02
    )
    assert got["top1_truth"] == pytest.approx(np.mean(truth_hits))
    assert got["exact_top1_truth"] == pytest.approx(np.mean(exact_truth_hits))
    assert got["ece"] == pytest.approx(_brute_ece(scores, labels), abs=1e-4)
    assert got["exact_ece"] == pytest.approx(_brute_ece(exact_scores, labels), abs=1e-4)
    with pytest.raises(
        ValueError, match="evaluate_surrogate: `tasks` must be a non-empty batch"
    ):
        evaluate_surrogate(model, jax.tree.map(lambda x: x[0], tasks))
    with pytest.raises(ValueError, match="evaluate_surrogate: `max_parents`=3 differs"):
        evaluate_surrogate(model, tasks, max_parents=3)


def test_evaluate_by_mechanism_reports_the_gains():
    model = ParentSetPredictionModel(2, width=8, n_layers=1, n_heads=2, key=jr.key(0))
    tasks = {
        name: jax.vmap(lambda key, c=config: sample_task(key, c))(
            jr.split(jr.key(2), 3)
        )
        for name, config in (
            ("linear", TaskConfig(n_vars=3, n_samples=20)),
            ("mlp", TaskConfig(n_vars=3, n_samples=20, mechanism="mlp", n_hidden=4)),
        )
    }
    report = evaluate_by_mechanism(model, tasks)
    assert set(report) == {"linear", "mlp"}
    for metrics in report.values():
        assert metrics["map_f1_gain"] == pytest.approx(
            metrics["map_f1"] - metrics["exact_map_f1"]
        )
        assert metrics["ece_gain"] == pytest.approx(
            metrics["exact_ece"] - metrics["ece"]
        )
    with pytest.raises(ValueError, match="`tasks`"):
        evaluate_by_mechanism(model, {})
    with pytest.raises(TypeError, match="tasks"):
        evaluate_by_mechanism(model, [tasks["linear"]])
