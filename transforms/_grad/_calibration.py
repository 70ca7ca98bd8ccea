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
from ._per_sample import as_batch, report_fallback, setup
from ._projection import (
    _blocks,
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


def _batch_moments(analysis, blocks, acc) -> Callable:
    """A compiled function of `(leaves, batch)`: per use, its two moments summed over
    the batch (and a stack); per leaf with formed per-example gradients, theirs."""

    def moments(leaves, batch):
        out = ghost_pass(analysis, leaves, batch, mode="moments", acc=acc)
        sites = {
            uid: tuple(jnp.sum(m.reshape((-1,) + m.shape[-2:]), axis=0) for m in pair)
            for uid, pair in out["sites"].items()
        }
        direct = {}
        for n, g in out["per_example"].items():
            block = blocks[n]
            inner = block.shape[block.stacked :]
            g = g.astype(acc)
            if block.kind == "vector":
                v = g.reshape(-1, math.prod(inner))
                direct[n] = (v.T @ v,)
            else:
                G = g.reshape((-1, block.shape[block.stacked], math.prod(inner[1:])))
                direct[n] = (
                    jnp.einsum("bij,bkj->ik", G, G),
                    jnp.einsum("bij,bik->jk", G, G),
                )
        return sites, direct

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
    method: str = "auto",
    fallback: bool = True,
    fit: bool = False,
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
    projector saves them, and queries must use the same ones. Memory: each side of
    size `d` needs `d²` floats per example of a batch (a vocabulary-sized side of an
    output head or embedding is out of reach for large vocabularies).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `model`: the model (e.g. the checkpoint whose gradients will be stored).
    - `data`: the calibration examples, a tuple of arrays sharing a leading axis
        (NumPy arrays are read one batch at a time).
    - `k_out`, `k_in`, `k_vector`, `method`, `fallback`, `fit`: as for
        [`transforms.projected_grads`][].
    - `batch_size`: examples per compiled calibration call.

    **Returns:**

    A [`transforms.ProjectedGrads`][] of kind `"pca"`, used as any other
    projector; its configuration names its matrices by their SHA-256.

    **Raises:**

    `TypeError`/`ValueError` if `loss_fn` is not callable, `data` is empty or
    ragged, a size is not a positive integer or `method` is unknown; `ValueError`
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
    check_choice(_NAME, "method", method, _METHODS)
    check_bool(_NAME, "fallback", fallback)
    check_bool(_NAME, "fit", fit)
    data = as_batch(_NAME, "data", data, to_device=False)
    n = data[0].shape[0]
    s = setup(_NAME, loss_fn, model, tuple(jnp.asarray(x[:batch_size]) for x in data))
    analysis = s.analyse("project")
    # The calibration reads the taps whatever `method` the projector will use; only
    # a ghost path asked for by name warns about parameters it does not cover.
    report_fallback(
        _NAME, analysis.plan, "ghost" if method == "ghost" else "auto", fallback
    )
    blocks = _blocks(_NAME, s, analysis, k_out, k_in, k_vector, "pca", fit)
    moments = _batch_moments(analysis, blocks, s.acc)
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
    # Each leaf's moments: [out side, in side] of a matrix, [moment] of a vector.
    per_leaf = [[np.zeros((d, d)) for d in _sides(b)] for b in blocks]
    for site in analysis.sites.values():
        kk, ff = sums[site.uid]
        direct = leaf_side(site) == {analysis.sliced[site.leaf]}
        out, inp = per_leaf[site.leaf]
        out += kk if direct else ff
        inp += ff if direct else kk
    for key, parts in sums.items():
        if isinstance(key, tuple):
            for total, part in zip(per_leaf[key[1]], parts):
                total += part
    matrices = []
    for b, leaf_moments in zip(blocks, per_leaf):
        if not all(np.all(np.isfinite(m)) for m in leaf_moments):
            raise ValueError(
                f"{_NAME}: the calibration pass over `data` gave non-finite second "
                f"moments for {b.path} {b.shape} (non-finite inputs, losses or "
                "gradients in the calibration examples); check the data and the loss."
            )
        if b.kind == "vector" and b.k[0] == math.prod(b.shape[b.stacked :]):
            matrices.append(())
            continue
        matrices.append(
            tuple(
                jnp.asarray(top_eigenvectors(m, k), s.acc)
                for m, k in zip(leaf_moments, b.k)
            )
        )
    sizes = dict(k_out=k_out, k_in=k_in, k_vector=k_vector, fit=fit)
    base = projected_grads(loss_fn, method=method, fallback=fallback, **sizes)
    return with_matrices(base, matrices)


def _sides(block) -> tuple[int, ...]:
    """The sizes of a block's moments: `(n₀, m)` for a matrix, `(n,)` for a vector."""
    inner = block.shape[block.stacked :]
    if block.kind == "matrix":
        return (inner[0], math.prod(inner[1:]))
    return (math.prod(inner),)
