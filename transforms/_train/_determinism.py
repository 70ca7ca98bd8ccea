"""Compiled training steps, with or without donation and run-to-run determinism.

Why a module of its own: the training step and the attribution step compile the same
four ways, and what "deterministic" means on each backend is stated once, here.

On a CPU, XLA's programs give the same bits on every run. On a GPU they need not:
scatter-adds (the gradient of an embedding lookup, of `take_along_axis`, of segment
sums) are lowered to atomic additions whose order changes from run to run, and so do
some reductions. A resumed run then drifts from the uninterrupted one in the last
bits, and training amplifies the drift. XLA's `xla_gpu_deterministic_ops` option makes
the GPU backend choose deterministic algorithms for those operations (sorted,
segmented scatters instead of atomics); it is ignored on a CPU.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx


DETERMINISTIC_COMPILER_OPTIONS = {"xla_gpu_deterministic_ops": True}


def compile_variants(fn: Callable) -> dict[tuple[bool, bool], Callable]:
    """`fn(static, *donatable)` compiled with `eqx.filter_jit` for every
    `(donate, deterministic)` pair.

    With `donate` the buffers of every argument but the first (the model and the
    optimiser state) are reused for the result; the first argument (the step's
    static parts, batch and key) is never donated since callers often reuse it.
    """
    variants = {}
    for donate in (False, True):
        for deterministic in (False, True):
            options: dict[str, Any] = {
                "donate": "all-except-first" if donate else "none",
                "compiler_options": (
                    dict(DETERMINISTIC_COMPILER_OPTIONS) if deterministic else None
                ),
            }
            variants[donate, deterministic] = eqx.filter_jit(fn, **options)
    return variants
