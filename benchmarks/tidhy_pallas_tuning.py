"""Tuning sweep of TiDHy's Pallas inner loop on a GPU (issue 19).

The first GPU run of `InferenceConfig(implementation="pallas")` found the
reference mode (the paper's semantics: two launches per inner iteration) no faster
than XLA's loop, 73 us per iteration on an H100, limited by the kernels' own time,
not by launches. This script times that iteration at the paper's size (9 991
windows, D = 20, r = 10, r2 = 5, M = 15, 200 fixed iterations) and the per-window
mode's inference step (one launch per time step) for combinations of:

- windows per program (16, 32, 64): fewer windows give more programs, each with
  fewer registers, so more of them share an SM to hide latency;
- warps per program (2, 4, 8);
- the products' precision: full float32 (`HIGHEST`, the library's choice, which
  the tests' float64 comparisons assume), TF32 x3 (about float32's accuracy on the
  tensor cores) and TF32 (XLA's default on these GPUs for float32).

Each row states the largest difference of its latents, and the number of windows
whose iteration count differs, from XLA's loop in the same process (at the
platform's default precision, TF32 on these GPUs, and with full float32 products),
so a faster precision's cost is on the same line. A combination that does not
compile (shared memory) is a row with its error. The XLA loop's rows come first.

Usage (on a GPU; on a CPU the kernels run in Pallas' interpreter and the timings
mean nothing): `python benchmarks/tidhy_pallas_tuning.py [--quick | --defaults]`.
"""

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
from _harness import Results, time_jax

from eqx_models import tidhy
from eqx_models.tidhy import _fused
from eqx_models.tidhy._inference import frozen, infer_first_step_impl, infer_impl


FIXED = tidhy.InferenceConfig(max_iter=200, tol=0.0, batch_mode="reference")
PER_WINDOW = tidhy.InferenceConfig(max_iter=2000, tol=0.01)
PRECISIONS = {
    "float32 (HIGHEST)": jax.lax.Precision.HIGHEST,
    "TF32 x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "TF32 (DEFAULT)": jax.lax.Precision.DEFAULT,
}


def _inputs(windows: int, length: int, stride: int):
    """The training forward's state at t = 1 at the paper's size, as
    `benchmarks/tidhy.py` builds it."""
    system = tidhy.SwitchingLDS(key=jr.key(10))
    sample = system.sample(windows, key=jr.key(11))
    data = tidhy.stack_windows(sample.observations, length, stride)
    model = tidhy.TiDHy(data.shape[-1], key=jr.key(0))
    r_prev, _ = jax.jit(lambda m, x: infer_first_step_impl(frozen(m), x, FIXED))(
        model, data[:, 0]
    )
    r2_prev = jnp.zeros((data.shape[0], model.r2_dim))
    return model, data[:, 1], r_prev, r2_prev


def _timed(results, workload, impl, config, args, references, tuning):
    step = jax.jit(lambda m, x, a, b: infer_impl(frozen(m), x, a, b, config))
    try:
        timing = time_jax(step, *args, warmup=1, repeats=5)
    except Exception as error:  # a combination that does not compile is a result
        results.add(workload=workload, impl=impl, error=str(error)[:300], **tuning)
        return None
    r, _, stats = step(*args)
    n = int(stats.n_iter.max())
    against = {}
    for name, (r_ref, n_ref) in references.items():
        against[f"max_abs_diff_from_{name}"] = float(jnp.max(jnp.abs(r - r_ref)))
        against[f"windows_n_iter_differs_from_{name}"] = int(
            jnp.sum(stats.n_iter != n_ref)
        )
    results.add(
        workload=workload,
        impl=impl,
        iterations=n,
        us_per_iteration=timing["median_s"] * 1e6 / n,
        **against,
        **tuning,
        **timing,
    )
    return r, stats.n_iter


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small size and two combinations (a check of the script, on a CPU)",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="only the library's choice of windows, warps and precision",
    )
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    inputs = _inputs(600, 50, 25) if args.quick else _inputs(200_000, 200, 20)
    if args.quick:
        grid = [(16, 4, "float32 (HIGHEST)"), (32, 2, "TF32 (DEFAULT)")]
    elif args.defaults:
        grid = [(_fused.BLOCK_WINDOWS, _fused._NUM_WARPS, "float32 (HIGHEST)")]
    else:
        # Windows x warps in full float32, then the faster precisions at 4 warps.
        grid = list(itertools.product((16, 32, 64), (2, 4, 8), ["float32 (HIGHEST)"]))
        grid += itertools.product((16, 32), (4,), ["TF32 x3", "TF32 (DEFAULT)"])
    results = Results(
        "tidhy_pallas_tuning",
        "TiDHy: tuning the Pallas inner loop (windows and warps per program, "
        "precision of the products)",
        "\n\n".join((__doc__ or "").split("\n\n")[1:-1]),
    )
    defaults = (_fused.BLOCK_WINDOWS, _fused._NUM_WARPS, _fused._PRECISION)
    for name, base in (
        ("reference mode, 200 fixed iterations", FIXED),
        ("per-window mode, paper stopping (tol 0.01)", PER_WINDOW),
    ):
        workload = f"inference step, {name}"
        xla = dataclasses.replace(base, implementation="xla")
        references = {}
        references["xla"] = _timed(results, workload, "XLA loop", xla, inputs, {}, {})
        with jax.default_matmul_precision("highest"):
            references["xla_highest"] = _timed(
                results, workload, "XLA loop, float32 products", xla, inputs, {}, {}
            )
        pallas = dataclasses.replace(base, implementation="pallas")
        for block, warps, precision in grid:
            # Read when the kernels are traced: each combination is a new trace.
            _fused.BLOCK_WINDOWS, _fused._NUM_WARPS = block, warps
            _fused._PRECISION = PRECISIONS[precision]
            impl = f"Pallas, {block} windows, {warps} warps, {precision}"
            tuning = dict(block_windows=block, num_warps=warps, precision=precision)
            _timed(results, workload, impl, pallas, inputs, references, tuning)
        _fused.BLOCK_WINDOWS, _fused._NUM_WARPS, _fused._PRECISION = defaults
    results.save(args.results_dir)


if __name__ == "__main__":
    main()
