"""The causal trainer called twice with one configuration: step time, and what the
second call costs now that it reuses the compiled step.

Usage: `python benchmarks/causal_trainer.py [--label NAME] [--vars D --samples N
--tasks B] [--steps S]`. Trains a `ParentSetPredictionModel` (width 64, 3 layers,
4 heads) on one task shape for `--steps` steps, twice, from the same model and key,
and records the median `step_time` of the second call (the compiled step alone,
from `fit`'s history; the first five steps skipped), the wall time of each call and
the final loss. `--label` names the row: run it once per tree to compare two
versions of the library (e.g. `PYTHONPATH=/path/to/old python -P ...`); rows of
another label are kept, a label measured again is replaced.
"""

import argparse
import json
import os
import time

import jax.random as jr
import numpy as np
from _harness import Results, RESULTS_DIR

from eqx_models import causal


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--vars", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    # Before the trainer contract the trainer was `train_surrogate`.
    train = getattr(causal, "train", None) or causal.train_surrogate
    config = causal.TaskConfig(n_vars=args.vars, n_samples=args.samples, max_parents=2)
    model = causal.ParentSetPredictionModel(
        2, width=64, n_layers=3, n_heads=4, key=jr.key(0)
    )
    walls, result = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        result = train(
            model,
            [(config, args.tasks)],
            n_steps=args.steps,
            key=jr.key(1),
            progress=False,
            fallback=False,
        )
        walls.append(time.perf_counter() - t0)
    assert result is not None
    steps = [r["step_time"] for r in result.history if "step_time" in r]
    results = Results(
        "causal_trainer",
        "Causal trainer: step time and a second call",
        "`causal.train` called twice with one configuration (width 64, 3 layers, "
        "4 heads): the median step time of the second call and each call's wall "
        "time. Rows are versions of the library.",
    )
    path = os.path.join(
        RESULTS_DIR, f"{results.name}-{results.environment['platform']}.json"
    )
    if os.path.exists(path):
        with open(path) as file:
            kept = json.load(file)
        results.rows = [r for r in kept["rows"] if r["impl"] != args.label]
        results.notes = kept.get("notes", [])
    results.add(
        workload="train twice",
        impl=args.label,
        sizes={
            "n_vars": args.vars,
            "n_samples": args.samples,
            "tasks": args.tasks,
            "steps": args.steps,
        },
        median_step_s=float(np.median(steps[5:])),
        first_call_s=walls[0],
        second_call_s=walls[1],
        final_loss=float(result.history[-1]["loss"]),
    )
    results.save()


if __name__ == "__main__":
    main()
