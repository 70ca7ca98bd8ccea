"""Compile time against run time under XLA's GPU compiler options.

Usage: `python benchmarks/compile_options.py [--tiny] [--workloads NAME ...]
[--variants NAME ...] [--repeats N] [--timeout S] [--results-dir DIR]`.

Issue 19 asks that each of the library's big programs compile in seconds: the
parallel CHMM passes of the large workload in at most 10 s, a causal surrogate
training bucket in at most 15 s. On a GPU much of XLA's compile time can go to
autotuning (timing candidate kernels for every matrix product and, with the fusion
autotuner, candidate code generators for fusions), which XLA's options switch off
per compiled function (`jax.jit(..., compiler_options=...)`). This script measures,
for each workload and each set of options (`VARIANTS`), the lowering and compile
time and then the run time of the compiled program, each compilation in a fresh
process: XLA keeps its autotuning results for the life of a process, so a second
compilation of the same shapes in one process would be cheaper than a user's first.

Workloads (`WORKLOADS`): the CHMM's parallel log-likelihood, posteriors and EM
iteration on the large model (4 x 70 clones, T = 50 000); the causal surrogate's
train step on its largest bucket (d = 20, N = 500, the benchmark's batch) and its
inference in bfloat16 (d = 20, N = 500, 64 tasks). `--tiny` shrinks all of them to
check the pipeline on a CPU, where the options do nothing.
"""

import argparse
import json
import os
import sys
import time

import causal as causal_bench
import chmm as chmm_bench
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from _harness import positive_int, Results, RESULTS_DIR, run_worker, time_callable

from eqx_models.causal import (
    BehaviouralCloningLoss,
    make_optimizer,
    sample_task,
    sample_training_batch,
    TaskConfig,
)
from eqx_models.chmm import expected_counts, log_likelihood, posteriors
from transforms import cast_floating, make_train_step


VARIANTS = {
    "default": {},
    "no fusion autotuner": {"xla_gpu_experimental_enable_fusion_autotuner": False},
    # Level 1 still times the candidates but skips initialising their buffers and
    # checking their results (levels 2-4; XLA's default is 4): the same choices
    # for less compile time, if the checks are where the time goes.
    "autotune level 1": {"xla_gpu_autotune_level": 1},
    "autotune level 0": {"xla_gpu_autotune_level": 0},
}

CHMM_SIZES = {
    "full": dict(n_obs=4, clones=70, n_actions=4, batch=None, length=50_000),
    "tiny": dict(n_obs=3, clones=4, n_actions=2, batch=None, length=300),
}
CAUSAL_SIZES = {
    "full": dict(d=20, n=500, inference_batch=64),
    "tiny": dict(d=4, n=30, inference_batch=4),
}


def _chmm(workload: str, size: str):
    cfg = CHMM_SIZES[size]
    model, x, a, _ = chmm_bench.make_data(cfg, cfg["length"], jr.key(0))
    fn = {
        "forward": lambda m, x, a: log_likelihood(m, x, a, method="parallel"),
        "posteriors": lambda m, x, a: posteriors(m, x, a, method="parallel").smoothed,
        "em_iteration": lambda m, x, a: expected_counts(m, x, a, method="parallel"),
    }[workload]
    return fn, (model, x, a)


def _causal(workload: str, size: str):
    bench = causal_bench
    cfg = dict(bench.SIZES["small" if size == "tiny" else "full"])
    sizes = CAUSAL_SIZES[size]
    d, n = sizes["d"], sizes["n"]
    model = bench.build_model(cfg, jr.key(0))
    if workload == "train step":
        optimizer = make_optimizer(10**6)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = make_train_step(
            BehaviouralCloningLoss(weight_decay=1e-4), optimizer, has_aux=True
        )
        batch_size = bench._batch_size(d, n, cfg["cells"], 1)
        batch = sample_training_batch(
            jr.key(1), TaskConfig(n_vars=d, n_samples=n), batch_size, bench.K
        )
        return (lambda m, o, b: step(m, o, b, None)), (model, opt_state, batch)
    config = TaskConfig(n_vars=d, n_samples=n, target="any")
    tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(
        jr.split(jr.key(2), sizes["inference_batch"])
    )
    return (lambda m, data: jax.vmap(m)(data)), (
        cast_floating(model, jnp.bfloat16),
        tasks.data,
    )


WORKLOADS = {
    "chmm large forward": lambda size: _chmm("forward", size),
    "chmm large posteriors": lambda size: _chmm("posteriors", size),
    "chmm large em_iteration": lambda size: _chmm("em_iteration", size),
    "causal train step": lambda size: _causal("train step", size),
    "causal inference bfloat16": lambda size: _causal("inference", size),
}


def worker(workload: str, variant: str, size: str, repeats: int) -> dict:
    """One compilation and its runs, in this (fresh) process."""
    fn, args = WORKLOADS[workload](size)
    # `filter_jit` passes `compiler_options` on to `jax.jit`.
    jitted = eqx.filter_jit(fn, compiler_options=VARIANTS[variant] or None)  # pyright: ignore[reportCallIssue]
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # A train step donates its model and optimiser state: every call gets copies.
    copies = workload == "causal train step"

    def call():
        given = jax.tree.map(jnp.copy, args) if copies else args
        return compiled(*given)

    timing = time_callable(call, warmup=1, repeats=repeats)
    timing.pop("first_call_s")
    return {"lower_s": lower_s, "compile_s": compile_s, **timing}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compile time against run time under XLA's GPU compiler options."
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "VARIANT"))
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    if args.worker is not None:
        workload, variant = args.worker
        print(json.dumps(worker(workload, variant, size, args.repeats)), flush=True)
        return
    results = Results(
        "compile_options",
        "Compile time against run time under XLA's GPU compiler options",
        "Each of the library's largest programs compiled with XLA's default options "
        "and with its GPU autotuning switched off in part "
        "(`xla_gpu_experimental_enable_fusion_autotuner=False`), without the "
        "autotuner's buffer initialisation and result checks "
        "(`xla_gpu_autotune_level=1`) or in whole (`xla_gpu_autotune_level=0`), "
        "each compilation in a fresh process; then the "
        "compiled program's run time. Workloads: the CHMM's parallel passes on the "
        "large model (4 x 70 clones, T = 50 000); the causal surrogate's train step "
        "on its largest bucket (d = 20, N = 500) and its inference in bfloat16 "
        "(d = 20, N = 500, 64 tasks).",
    )
    results.note(
        "Issue 19's compile-time targets: each parallel CHMM workload of the large "
        "model <= 10 s; a causal training bucket's first step (sampler and step) "
        "<= 15 s. An option is worth applying where it cuts the compile time and "
        "leaves the run time within its spread."
    )
    here = os.path.abspath(__file__)
    for workload in args.workloads or list(WORKLOADS):
        for variant in args.variants or list(VARIANTS):
            command = [here, "--worker", workload, variant, "--repeats"]
            command += [str(args.repeats)] + (["--tiny"] if args.tiny else [])
            results.add(
                workload=workload,
                impl=variant,
                compiler_options=json.dumps(VARIANTS[variant]),
                size=size,
                **run_worker(command, args.timeout, cwd=os.path.dirname(here)),
            )
            # After every row, merged into the file by (workload, variant): a run
            # cut short (a device call's time limit) keeps what it measured, and a
            # run of some workloads or variants updates only theirs.
            results.save(
                args.results_dir, merge_key=lambda row: (row["workload"], row["impl"])
            )


if __name__ == "__main__":
    sys.exit(main())
