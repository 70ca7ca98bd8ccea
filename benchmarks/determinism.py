"""Run-to-run determinism of the training steps on a GPU, and what it costs.

Usage: `python benchmarks/determinism.py [--size small|gpt2] [--batch B]`

For the multimodal LM step (the GPT-2-small shape on a GPU) and the causal surrogate
step, each compiled the default way and with `deterministic=True`
(`xla_gpu_deterministic_ops`), this script
- runs the step twice from the same model, optimiser state, batch and key, and says
  whether the two results are bit-identical (`bit_identical`), with the largest
  parameter difference otherwise;
- times the step (median of repeats) and reports the deterministic step's time over
  the default's (`time_ratio`).

A third row per workload uses XLA's `xla_gpu_exclude_nondeterministic_ops` instead
(deterministic kernels, autotuning kept), for comparison. On a CPU every mode is
deterministic and costs the same; the numbers that matter come from a GPU. Results
go to `benchmarks/results/determinism-<platform>.json`.
"""

import argparse
import os
import sys
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _harness import Results, time_callable


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


def _max_difference(a, b) -> float:
    pairs = zip(
        jax.tree.leaves(eqx.filter(a, eqx.is_array)),
        jax.tree.leaves(eqx.filter(b, eqx.is_array)),
    )
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in pairs
    )


# XLA options compared: the library's two modes, and XLA's weaker option that only
# avoids non-deterministic kernels (autotuning stays on), for reference.
MODES = {
    "default": None,
    "deterministic": {"xla_gpu_deterministic_ops": True},
    "exclude_nondeterministic_ops": {"xla_gpu_exclude_nondeterministic_ops": True},
}


def _compiled(train_step, options):
    """`train_step` (a `TrainStep` with `donate=False`) compiled with `options`."""
    from transforms._train._train_step import _step

    jit_options: dict[str, Any] = {"compiler_options": options}
    compiled = eqx.filter_jit(_step, **jit_options)
    return lambda model, opt_state, batch, key: compiled(
        (train_step, batch, key), model, opt_state
    )


def _measure(results, workload, sizes, build_step, model, opt_state, batch, repeats):
    """Every mode of one step: bitwise repeatability, then timing."""
    times = {}
    for mode, options in MODES.items():
        step = _compiled(build_step(False), options)
        runs = [
            step(_copy(model), _copy(opt_state), batch, jr.key(3)) for _ in range(2)
        ]
        difference = _max_difference(runs[0][0], runs[1][0])
        state = {"model": _copy(model), "opt": _copy(opt_state)}

        def run():
            state["model"], state["opt"], metrics = step(
                state["model"], state["opt"], batch, jr.key(3)
            )
            return metrics

        timing = time_callable(run, warmup=2, repeats=repeats)
        times[mode] = timing["median_s"]
        results.add(
            workload=workload,
            impl=f"jax, {mode}",
            sizes=sizes,
            median_s=timing["median_s"],
            iqr_s=timing["iqr_s"],
            first_call_s=timing["first_call_s"],
            bit_identical=difference == 0.0,
            max_param_difference=difference,
            time_ratio=times[mode] / times["default"],
        )


def lm(results: Results, args) -> None:
    import multimodal as bench

    from eqx_models.multimodal import (
        CausalTransformerLM,
        Codebooks,
        make_optimizer,
        MultimodalLoss,
        MultimodalTrainConfig,
        TokenBatch,
    )
    from transforms import make_train_step

    size = bench.SIZES[args.size]
    length = size["seqs"][0]
    gpu = jax.devices()[0].platform == "gpu"
    layout = bench._layout(size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        bench.make_data(size, args.batch, length, path)
        data = dict(np.load(path))
    model = CausalTransformerLM(
        layout,
        d_model=size["d_model"],
        n_layers=size["n_layers"],
        n_heads=size["n_heads"],
        max_len=length,
        dropout=0.0,
        init="gpt",
        key=jr.key(0),
    )
    codebooks = Codebooks(
        layout,
        image=data["table:image"],
        scalar=data["table:scalar"],
        spectrum={g: data[f"table:spectrum:{g}"] for g in layout.spectrum_groups},
    )
    loss = MultimodalLoss(
        codebooks, sample_k=1024, compute_dtype="bfloat16" if gpu else "float32"
    )
    optimizer = make_optimizer(
        MultimodalTrainConfig(n_steps=1000, warmup_steps=10), model
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    batch = TokenBatch(
        tokens=jnp.asarray(data["tokens"]),
        type_ids=jnp.asarray(data["type_ids"]),
        columns=jnp.asarray(data["columns"]),
        values=jnp.full(data["tokens"].shape, jnp.nan),
    )
    _measure(
        results,
        "multimodal LM train step",
        {"size": args.size, "batch": args.batch, "length": length},
        lambda d: make_train_step(
            loss, optimizer, has_aux=True, donate=False, deterministic=d
        ),
        model,
        opt_state,
        batch,
        args.repeats,
    )


def causal(results: Results, args) -> None:
    from eqx_models.causal import (
        BehaviouralCloningLoss,
        make_optimizer,
        ParentSetPredictionModel,
        sample_training_batch,
        TaskConfig,
    )
    from transforms import make_train_step

    full = args.size == "gpt2"
    config = TaskConfig(n_vars=20 if full else 5, n_samples=200 if full else 40)
    n_tasks = 64 if full else 8
    model = ParentSetPredictionModel(
        3, width=64 if full else 16, n_layers=4 if full else 1, key=jr.key(0)
    )
    loss = BehaviouralCloningLoss(weight_decay=1e-4)
    optimizer = make_optimizer(1000)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    batch = sample_training_batch(jr.key(2), config, n_tasks, 3)
    again = sample_training_batch(jr.key(2), config, n_tasks, 3)
    results.note(
        "causal training batches drawn twice from one key are "
        + ("bit-identical" if _max_difference(batch, again) == 0.0 else "DIFFERENT")
        + "."
    )
    _measure(
        results,
        "causal train step",
        {"tasks": n_tasks, "n_vars": config.n_vars, "n_samples": config.n_samples},
        lambda d: make_train_step(
            loss, optimizer, has_aux=True, donate=False, deterministic=d
        ),
        model,
        opt_state,
        batch,
        args.repeats,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    gpu = jax.devices()[0].platform == "gpu"
    parser.add_argument(
        "--size", choices=["small", "gpt2"], default="gpt2" if gpu else "small"
    )
    parser.add_argument("--batch", type=int, default=32 if gpu else 4)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    results = Results(
        "determinism",
        "Deterministic training steps",
        "Each step run twice from the same state (bit_identical) and timed, compiled "
        "the default way and with `deterministic=True` (xla_gpu_deterministic_ops).",
    )
    lm(results, args)
    causal(results, args)
    results.save()


if __name__ == "__main__":
    main()
