"""PCA-initialised projections, calibrated on data (LoGra's choice of matrices).

A use of a matrix parameter with input rows `a_t` and output gradients `g_t` has the
per-example gradient `Σ_t g_t a_tᵀ`. A calibration pass over some examples sums,
per parameter, the uncentred second moments `Σ a aᵀ` (`m × m`) and `Σ g gᵀ`
(`n₀ × n₀`) over positions and examples, from the taps the ghost path already has;
`P_in` and `P_out` are their top `k_in` and `k_out` eigenvectors. Under the
Kronecker-factored approximation of the gradients' second moment (KFAC's), these
are the directions that carry the most gradient energy, so a projected dot product
keeps more of the exact one than a random projection of the same size does; the
price is the calibration pass and matrices that must be stored, since no seed
reproduces them.

A parameter used several times (a head tied to the embedding) sums the moments of
all its uses on each side; stacked layers (a `lax.scan` over a layer axis) share one
pair of matrices, from the moments summed over the stack, as random projections do.
Parameters whose per-example gradients are formed anyway get the eigenvectors of the
gradients' own second moments: vector-like ones (biases, LayerNorm) projected beyond
`k_vector` use `Σ_i v_i v_iᵀ`, and a matrix parameter on the exact fallback path
uses `Σ_i G_i G_iᵀ` and `Σ_i G_iᵀ G_i` in place of the factors it has no taps for.
A side longer than `max_side` (a vocabulary) is not calibrated, its `d²` moment and
`d³` eigendecomposition being out of reach: it keeps the Gaussian matrix
`projected_grads` draws from the seed.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_size,
    typechecked,
)
from ._ghost_eval import ghost_pass
from ._ghost_plan import leaf_side
from ._ghost_rules import rule_for
from ._per_sample import as_batch, report_fallback, setup, UNROLL_LAYERS
from ._projection import (
    _blocks,
    _matrices,
    _METHODS,
    projected_grads,
    ProjectedGrads,
    with_matrices,
)


_NAME = "calibrate_projection"


def top_eigenvectors(moment: np.ndarray, k: int) -> np.ndarray:
    """The `[k, d]` eigenvectors (as rows) of a symmetric matrix with the `k` largest
    eigenvalues, largest first, each signed so that its entry of largest magnitude
    is positive: `eigh`'s signs are arbitrary and differ between LAPACK builds."""
    w, v = np.linalg.eigh(moment)
    top = v[:, np.argsort(-w, kind="stable")[:k]].T
    pivot = top[np.arange(k), np.argmax(np.abs(top), axis=1)]
    return top * np.where(pivot < 0, -1.0, 1.0)[:, None]


def _batch_moments(analysis, blocks, acc, max_side: int) -> Callable:
    """A compiled function of `(leaves, batch)`: per use, its two moments summed over
    the batch (and a stack); per leaf with formed per-example gradients, theirs.
    Sides longer than `max_side` are left out (`[0, 0]`)."""
    sides = {
        site.uid: (layout.Pk <= max_side, layout.Pf <= max_side)
        for site in analysis.sites.values()
        for layout in [rule_for(site).layout]
    }

    def second(x):  # rows of x: [n, d] -> [d, d], or [0, 0] for a side left out
        if x.shape[1] > max_side:
            return jnp.zeros((0, 0), x.dtype)
        return x.T @ x

    def summed(leaves, batch):
        out = ghost_pass(analysis, leaves, batch, mode="moments", acc=acc, sides=sides)
        totals = {
            uid: tuple(jnp.sum(m, axis=tuple(range(m.ndim - 2))) for m in pair)
            for uid, pair in out["sites"].items()
        }
        direct = {}
        for n, g in out["per_example"].items():
            block = blocks[n]
            inner = block.shape[block.stacked :]
            g = g.astype(acc)
            if block.kind == "vector":
                direct[n] = (second(g.reshape(-1, math.prod(inner))),)
            else:
                # A matrix off the ghost path: its gradients' rows and columns.
                G = g.reshape((-1, inner[0], math.prod(inner[1:])))
                direct[n] = (
                    second(jnp.swapaxes(G, 1, 2).reshape(-1, inner[0])),
                    second(G.reshape(-1, G.shape[2])),
                )
        return totals, direct

    def moments(leaves, batch):
        # One example at a time into a running sum: the ghost pass of a batch
        # holds every example's d × d moments of every layer at once (about 1.3 GB
        # per example on GPT-2 small); the scan holds one example's and the sum.
        examples = jax.tree.map(lambda x: x[:, None], batch)
        one = jax.tree.map(lambda x: x[0], examples)
        shapes = jax.eval_shape(summed, leaves, one)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        def add(total, example):
            return jax.tree.map(jnp.add, total, summed(leaves, example)), None

        return jax.lax.scan(add, zeros, examples)[0]

    return jax.jit(moments)


@typechecked
def calibrate_projection(
    loss_fn: Callable,
    model: Any,
    data: Any,
    *,
    k_out: int = 16,
    k_in: int = 16,
    k_vector: int | None = None,
    batch_size: int | np.integer = 32,
    max_side: int | np.integer = 4096,
    seed: int = 0,
    method: str = "auto",
    fallback: bool = True,
    fit: bool = False,
    unroll_layers: bool | str = "auto",
) -> ProjectedGrads:
    """A projector whose matrices are the top eigenvectors of each layer's input and
    output-gradient second moments on calibration data (PCA-initialised, as LoGra).

    One pass over `data` sums, for every matrix parameter, `Σ a aᵀ` over its input
    rows and `Σ g gᵀ` over its output gradients (all positions of all examples,
    from the ghost taps); `P_in`/`P_out` are their top `k_in`/`k_out`
    eigenvectors (float64 `eigh`, largest first, each signed so that its largest
    entry is positive). At the same `k` this keeps the directions in which the
    gradients are largest, so projected dot products lose less than with random
    matrices; at full `k` (and `fit=True`) the projection is a rotation and dot
    products are exact. Vector-like parameters are kept exactly up to `k_vector`
    entries, and projected to the top eigenvectors of their per-example gradients'
    second moment beyond. The matrices are data: a gradient store built with the
    projector saves them, and queries must use the same ones.

    Memory: a side of size `d` needs `d²` floats twice (one example's moment and
    the running sum; the examples of a batch are summed one after another), and
    an eigendecomposition of cost `d³`; a side longer than `max_side` (a vocabulary)
    keeps a Gaussian matrix drawn from `seed`, as
    [`transforms.projected_grads`][] draws it.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `model`: the model (e.g. the checkpoint whose gradients will be stored).
    - `data`: the calibration examples, a tuple of arrays sharing a leading axis
        (NumPy arrays are read one batch at a time).
    - `k_out`, `k_in`, `k_vector`, `method`, `fallback`, `fit`, `unroll_layers`: as
        for [`transforms.projected_grads`][] (`unroll_layers` for the calibration
        pass too).
    - `batch_size`: examples per compiled calibration call.
    - `max_side`: the longest side calibrated (default 4096).
    - `seed`: the seed of the Gaussian matrices of longer sides.

    **Returns:**

    A [`transforms.ProjectedGrads`][] of kind `"pca"`, used as any other
    projector; its configuration names its matrices by their SHA-256.

    **Raises:**

    `TypeError`/`ValueError` if `loss_fn` is not callable, `data` is empty or
    ragged, a size is not a positive integer or `method` or `unroll_layers` is
    unknown; `ValueError`
    if `k_out`/`k_in` exceeds a matrix parameter's size (without `fit`), if
    `fallback=False` and a parameter is off the ghost path, or if the taps are not
    finite on `data` (naming the parameter).

    !!! example

        ```python
        project = calibrate_projection(loss_fn, model, (xs, ys), k_out=2, k_in=2)
        rows = project(model, (xs, ys))  # (B, dim)
        ```
    """
    check_callable(_NAME, "loss_fn", loss_fn)
    k_out = check_size(_NAME, "k_out", k_out)
    k_in = check_size(_NAME, "k_in", k_in)
    k_vector = k_out if k_vector is None else check_size(_NAME, "k_vector", k_vector)
    batch_size = check_size(_NAME, "batch_size", batch_size)
    max_side = check_size(_NAME, "max_side", max_side)
    seed = check_size(_NAME, "seed", seed, minimum=0)
    check_choice(_NAME, "method", method, _METHODS)
    check_bool(_NAME, "fallback", fallback)
    check_bool(_NAME, "fit", fit)
    check_choice(_NAME, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    data = as_batch(_NAME, "data", data, to_device=False)
    n = data[0].shape[0]
    first = tuple(jnp.asarray(x[:batch_size]) for x in data)
    s = setup(_NAME, loss_fn, model, first, unroll_layers=unroll_layers)
    analysis = s.analyse("project")
    # The calibration reads the taps whatever `method` the projector will use; only
    # a ghost path asked for by name warns about parameters it does not cover.
    report_fallback(
        _NAME, analysis.plan, "ghost" if method == "ghost" else "auto", fallback
    )
    blocks = _blocks(_NAME, s, analysis, k_out, k_in, k_vector, "pca", fit)
    moments = _batch_moments(analysis, blocks, s.acc, max_side)
    # Per use (uid) and per leaf with formed gradients (("leaf", n)): the moments
    # summed over the batches in float64 on the host.
    sums: dict[Any, list[np.ndarray]] = {}
    for b0 in range(0, n, batch_size):
        batch = tuple(jnp.asarray(x[b0 : b0 + batch_size]) for x in data)
        sites, direct = moments(s.leaves, batch)
        found = [*sites.items(), *((("leaf", i), m) for i, m in direct.items())]
        for key, pair in found:
            parts = [np.asarray(m, np.float64) for m in pair]
            old = sums.get(key)
            sums[key] = parts if old is None else [a + b for a, b in zip(old, parts)]
    # Each leaf's moments: [out side, in side] of a matrix, [moment] of a vector;
    # None for a side longer than `max_side`.
    per_leaf = [
        [np.zeros((d, d)) if d <= max_side else None for d in _sides(b)] for b in blocks
    ]
    for site in analysis.sites.values():
        kk, ff = sums[site.uid]
        direct = leaf_side(site) == {analysis.sliced[site.leaf]}
        _add(per_leaf[site.leaf], [kk, ff] if direct else [ff, kk])
    for key, parts in sums.items():
        if isinstance(key, tuple):
            _add(per_leaf[key[1]], parts)
    gaussian = _matrices(blocks, seed, "gaussian", s.acc)
    matrices = []
    for b, leaf_moments, drawn in zip(blocks, per_leaf, gaussian):
        if any(m is not None and not np.all(np.isfinite(m)) for m in leaf_moments):
            raise ValueError(
                f"{_NAME}: the calibration pass over `data` gave non-finite second "
                f"moments for {b.path} {b.shape} (non-finite inputs, losses or "
                "gradients in the calibration examples); check the data and the loss."
            )
        if not drawn:  # a vector kept exactly
            matrices.append(())
            continue
        matrices.append(
            tuple(
                p if m is None else jnp.asarray(top_eigenvectors(m, k), s.acc)
                for m, k, p in zip(leaf_moments, b.k, drawn)
            )
        )
    sizes = dict(k_out=k_out, k_in=k_in, k_vector=k_vector, fit=fit)
    base = projected_grads(
        loss_fn,
        method=method,
        fallback=fallback,
        unroll_layers=unroll_layers,
        **sizes,
    )
    return with_matrices(base, matrices)


def _add(totals: list, parts: list) -> None:
    for total, part in zip(totals, parts):
        if total is not None:
            total += part


def _sides(block) -> tuple[int, ...]:
    """The sizes of a block's moments: `(n₀, m)` for a matrix, `(n,)` for a vector."""
    inner = block.shape[block.stacked :]
    if block.kind == "matrix":
        return (inner[0], math.prod(inner[1:]))
    return (math.prod(inner),)
