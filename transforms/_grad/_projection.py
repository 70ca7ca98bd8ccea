"""Low-rank projections of per-example gradients, formed from the ghost taps.

Every inexact leaf of the model gets a block of the projected row. A matrix-like
leaf `W` (after the leading axes a `lax.scan` steps through, e.g. a stack of layers)
is split into its first axis (`n₀`, the output axis of an `eqx.nn.Linear`) and the
rest (`m`, flattened), and projected on both sides, `P_out W P_inᵀ` with
`P_out: [k_out, n₀]` and `P_in: [k_in, m]`. A use of `W` with input rows `a_t` and
output gradients `b_t` (the ghost taps) contributes `Σ_t (P_out b_t)(P_in a_t)ᵀ`, so
the `n₀ × m` per-example gradient is never formed; an embedding lookup gathers
columns of `P_out` by index; a leaf used twice (a head tied to the embedding) adds
both uses' projections, since projection is linear. Vector-like leaves (biases,
LayerNorm) have their small per-example gradients formed directly and are kept
exactly up to `k_vector` entries (default `k_out`), projected to `k_vector` beyond:
in a transformer they are many, and a block of `k_out·k_in` each would outweigh
the matrices' blocks. Any other leaf
goes through the exact fallback: its own per-example gradients (`vmap(grad)` of that
leaf only), projected with the same matrices; the `GhostPlan` names it and a
`GhostFallbackWarning` is raised when `method="ghost"` was asked for.

The matrices are Gaussian with variance `1/k` (so that a projected dot product is an
unbiased estimate of the full one), drawn from `seed` and the leaf's position in the
model's flattened leaves: the same seed gives the same matrices on any machine. A
projector of kind `"pca"` (from `transforms.calibrate_projection`) holds its matrices
as data instead, identified by their SHA-256 in its configuration.
"""

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_size,
    typechecked,
)
from ._ghost_eval import ghost_pass
from ._ghost_plan import Analysis, GhostPlan, leaf_side, vector_like
from ._per_sample import report_fallback, Setup, setup, UNROLL_LAYERS


_NAME = "projected_grads"
_METHODS = ("auto", "ghost", "vmap")
_KINDS = ("gaussian", "identity")


@dataclasses.dataclass(frozen=True)
class ProjectionBlock:
    """Where one parameter leaf's projected gradient sits in a projected row.

    Returned by [`transforms.ProjectedGrads.layout`][]. `shape` is the leaf's
    shape; its first `stacked` axes are stepped through by a `lax.scan` (stacked
    layers), each slice projected on its own with the same matrices. `kind` is
    `"matrix"` (projected to `[k_out, k_in]` per slice) or `"vector"` (to `[k]`);
    `k` holds those sizes; the block is `row[offset : offset + size]`, in the
    order `(*shape[:stacked], *k)`. `treatment` is the leaf's treatment in the
    projection's [`transforms.GhostPlan`][] (`"ghost"`, `"materialised"`,
    `"fallback"` or `"unused"`).
    """

    path: str
    shape: tuple[int, ...]
    stacked: int
    kind: str
    k: tuple[int, ...]
    offset: int
    size: int
    treatment: str

    @property
    def slices(self) -> int:
        """The number of separately projected slices (stacked layers), at least 1."""
        return math.prod(self.shape[: self.stacked])


def _blocks(
    name: str,
    s: Setup,
    analysis: Analysis,
    k_out: int,
    k_in: int,
    k_vector: int,
    kind: str,
    fit: bool,
) -> tuple[ProjectionBlock, ...]:
    blocks, offset = [], 0
    for n, leaf in enumerate(s.leaves):
        shape = tuple(jnp.shape(leaf))
        stacked = analysis.sliced[n]
        inner = shape[stacked:]
        if vector_like(inner):
            size = math.prod(inner)
            k = (size,) if kind == "identity" else (min(size, k_vector),)
            block_kind = "vector"
        else:
            n0, m = inner[0], math.prod(inner[1:])
            if kind == "identity":
                k = (n0, m)
            elif fit:
                k = (min(k_out, n0), min(k_in, m))
            else:
                for arg, want, have, side in (
                    ("k_out", k_out, n0, "first axis"),
                    ("k_in", k_in, m, "other axes"),
                ):
                    if want > have:
                        raise ValueError(
                            f"{name}: `{arg}` must be at most the size of every "
                            f"matrix parameter's {side} ({have} for "
                            f"{s.paths[n]} of shape {shape}), got {want}; pass "
                            "smaller sizes or `fit=True` to cap them per layer."
                        )
                k = (k_out, k_in)
            block_kind = "matrix"
        size = math.prod(shape[:stacked]) * math.prod(k)
        blocks.append(
            ProjectionBlock(
                path=s.paths[n],
                shape=shape,
                stacked=stacked,
                kind=block_kind,
                k=k,
                offset=offset,
                size=size,
                treatment=analysis.treatment[n],
            )
        )
        offset += size
    return tuple(blocks)


def _matrices(blocks, seed: int, kind: str, dtype) -> list[tuple]:
    """Per leaf: `(P_out, P_in)` for a matrix block, `(P,)` or `()` (kept exactly)
    for a vector block."""
    mats = []
    for n, b in enumerate(blocks):
        inner = b.shape[b.stacked :]
        sides = (
            [(b.k[0], inner[0]), (b.k[1], math.prod(inner[1:]))]
            if b.kind == "matrix"
            else [(b.k[0], math.prod(inner))]
        )
        if b.kind == "vector" and b.k[0] == sides[0][1] and kind != "identity":
            mats.append(())
            continue
        keys = jr.split(jr.fold_in(jr.key(seed), n), len(sides))
        out = []
        for key, (k, size) in zip(keys, sides):
            if kind == "identity":
                out.append(jnp.eye(size, dtype=dtype))
            else:
                out.append(jr.normal(key, (k, size), dtype) / math.sqrt(k))
        mats.append(tuple(out))
    return mats


def matrices_sha256(matrices: list) -> str:
    """The SHA-256 of a list of projection matrices (shapes, dtypes and values): what
    identifies a projector whose matrices are data rather than a seed."""
    digest = hashlib.sha256()
    for n, mats in enumerate(matrices):
        for j, m in enumerate(mats):
            m = np.ascontiguousarray(np.asarray(m))
            digest.update(f"{n}.{j}:{m.shape}:{m.dtype};".encode())
            digest.update(m.tobytes())
    return digest.hexdigest()


def with_matrices(projector: "ProjectedGrads", matrices: list) -> "ProjectedGrads":
    """`projector` turned into a `"pca"` one holding `matrices` (as `.matrices`
    returns them), which its configuration names by their SHA-256."""
    return dataclasses.replace(
        projector,
        kind="pca",
        seed=0,
        pca=matrices,
        pca_sha256=matrices_sha256(matrices),
    )


def check_matrices(name: str, arg: str, matrices: list, blocks) -> None:
    """Raise unless `matrices` has the shapes the blocks of a row need."""
    want = []
    for b in blocks:
        inner = b.shape[b.stacked :]
        if b.kind == "matrix":
            want.append(((b.k[0], inner[0]), (b.k[1], math.prod(inner[1:]))))
        elif b.k[0] < math.prod(inner):
            want.append(((b.k[0], math.prod(inner)),))
        else:
            want.append(())
    got = [tuple(tuple(jnp.shape(m)) for m in mats) for mats in matrices]
    if got != want:
        raise ValueError(
            f"{name}: `{arg}` must hold matrices of the shapes this model's layout "
            f"needs ({want}), got {got}: matrices calibrated for another model?"
        )


def project_leaf(g: jax.Array, block: ProjectionBlock, mats: tuple) -> jax.Array:
    """Project per-example gradients `g` (`[B, *block.shape]`) of one leaf to the
    leaf's block, `[B, block.size]`."""
    B = g.shape[0]
    lead = block.shape[: block.stacked]
    inner = block.shape[block.stacked :]
    if block.kind == "vector":
        v = g.reshape((B,) + lead + (-1,))
        if mats:
            v = jnp.einsum("...n,kn->...k", v, mats[0].astype(v.dtype))
        return v.reshape(B, -1)
    G = g.reshape((B,) + lead + (inner[0], -1))
    p_out, p_in = mats
    out = jnp.einsum(
        "...ij,ai,bj->...ab", G, p_out.astype(G.dtype), p_in.astype(G.dtype)
    )
    return out.reshape(B, -1)


class ProjectedGrads(eqx.Module):
    """Projected per-example gradients; build with [`transforms.projected_grads`][]."""

    loss_fn: Callable
    k_out: int = eqx.field(static=True)
    k_in: int = eqx.field(static=True)
    k_vector: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)
    kind: str = eqx.field(static=True)
    method: str = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    fit: bool = eqx.field(static=True)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")
    # kind "pca": the calibrated matrices (as `.matrices` returns them) and their
    # SHA-256, computed once rather than at every query's configuration check.
    pca: list | None = None
    pca_sha256: str = eqx.field(static=True, default="")

    @property
    def config(self) -> dict[str, Any]:
        """What determines the projection besides the model's shapes (JSON-ready):
        stored with a gradient store, compared by every query."""
        config: dict[str, Any] = {
            "kind": self.kind,
            "seed": self.seed,
            "k_out": self.k_out,
            "k_in": self.k_in,
            "k_vector": self.k_vector,
            "fit": self.fit,
        }
        if self.kind == "pca":
            del config["seed"]
            config["matrices_sha256"] = self.pca_sha256
        return config

    def _setup(self, model, batch) -> tuple[Setup, Analysis, tuple]:
        s = setup(_NAME, self.loss_fn, model, batch, unroll_layers=self.unroll_layers)
        analysis = s.analyse("project")
        blocks = _blocks(
            _NAME,
            s,
            analysis,
            self.k_out,
            self.k_in,
            self.k_vector,
            self.kind,
            self.fit,
        )
        return s, analysis, blocks

    def layout(self, model: Any, batch: Any) -> tuple[ProjectionBlock, ...]:
        """The blocks of a projected row, one per inexact leaf of `model`, in the
        order of `jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))`.

        **Returns:**

        A tuple of [`transforms.ProjectionBlock`][]; only the shapes of `batch`
        matter.

        **Raises:**

        As `__call__`.
        """
        return self._setup(model, batch)[2]

    def plan(self, model: Any, batch: Any) -> GhostPlan:
        """How the ghost path treats each parameter for this model and batch.

        **Returns:**

        A [`transforms.GhostPlan`][] (mode `"project"`); only the shapes of `batch`
        matter.

        **Raises:**

        As `__call__`.
        """
        return self._setup(model, batch)[1].plan

    def matrices(self, model: Any, batch: Any) -> list[tuple]:
        """The projection matrices, one entry per inexact leaf: `(P_out, P_in)` of
        shapes `[k_out, n₀]`, `[k_in, m]` for a matrix block, `(P,)` for a projected
        vector block, `()` for a vector kept exactly. A `"pca"` projector returns
        its calibrated matrices.

        Computing them once and passing them to `__call__` (`matrices=`) keeps the
        random draws out of compiled code.

        **Raises:**

        As `__call__`; `ValueError` if a `"pca"` projector's matrices do not fit
        `model` (calibrated for another architecture).
        """
        s, _, blocks = self._setup(model, batch)
        if self.pca is not None:
            check_matrices(_NAME, "projector", self.pca, blocks)
            return self.pca
        return _matrices(blocks, self.seed, self.kind, s.acc)

    @typechecked
    def __call__(
        self, model: Any, batch: Any, matrices: list | None = None
    ) -> Float[Array, "batch dim"]:
        """Projected gradients of `loss_fn(model, *example)` for every example.

        **Arguments:**

        - `model`: any pytree; its inexact arrays are the parameters.
        - `batch`: a tuple of arrays sharing a leading batch axis of size `B`.
        - `matrices`: the output of `.matrices(model, batch)`, or `None` to draw them
            here.

        **Returns:**

        The `[B, dim]` projected rows, the blocks of `.layout(model, batch)`
        concatenated; float32 (float64 under float64 parameters).

        **Raises:**

        `ValueError`/`TypeError` for bad inputs (see
        [`transforms.per_sample_grads`][]); `ValueError` if `k_out` or `k_in`
        exceeds a matrix parameter's size (unless `fit=True`), or if
        `fallback=False` and a parameter is outside the layer rules.
        """
        s, analysis, blocks = self._setup(model, batch)
        if matrices is None and self.pca is not None:
            check_matrices(_NAME, "projector", self.pca, blocks)
            matrices = self.pca
        elif matrices is None:
            matrices = _matrices(blocks, self.seed, self.kind, s.acc)
        if len(matrices) != len(blocks):
            raise ValueError(
                f"{_NAME}: `matrices` must hold one entry per inexact leaf "
                f"({len(blocks)}), got {len(matrices)}."
            )
        if self.method == "vmap":
            grads = s.per_example_grads(s.leaves, s.batch)
            parts = [
                project_leaf(g.astype(s.acc), b, m)
                for g, b, m in zip(grads, blocks, matrices)
            ]
            return jnp.concatenate(parts, axis=1)
        report_fallback(_NAME, analysis.plan, self.method, self.fallback)
        projections = {}
        for site in analysis.sites.values():
            p_out, p_in = matrices[site.leaf]
            stacked = analysis.sliced[site.leaf]
            direct = leaf_side(site) == {stacked}
            projections[site.uid] = (p_out, p_in) if direct else (p_in, p_out)
        out = ghost_pass(
            analysis,
            s.leaves,
            s.batch,
            mode="project",
            acc=s.acc,
            projections=projections,
        )
        per_leaf: list[Any] = [None] * len(blocks)
        for site in analysis.sites.values():
            value = out["sites"][site.uid]
            if projections[site.uid][0] is not matrices[site.leaf][0]:
                value = jnp.swapaxes(value, -1, -2)
            prev = per_leaf[site.leaf]
            per_leaf[site.leaf] = value if prev is None else prev + value
        parts = []
        for n, b in enumerate(blocks):
            if n in out["per_example"]:
                g = out["per_example"][n].astype(s.acc)
                parts.append(project_leaf(g, b, matrices[n]))
            elif per_leaf[n] is not None:
                parts.append(per_leaf[n].reshape(s.size, -1))
            else:
                parts.append(jnp.zeros((s.size, b.size), s.acc))
        return jnp.concatenate(parts, axis=1)


@typechecked
def projected_grads(
    loss_fn: Callable,
    *,
    k_out: int = 16,
    k_in: int = 16,
    k_vector: int | None = None,
    seed: int = 0,
    kind: str = "gaussian",
    method: str = "auto",
    fallback: bool = True,
    fit: bool = False,
    unroll_layers: bool | str = "auto",
) -> ProjectedGrads:
    """Per-example gradients projected to a low dimension, layer by layer, without
    forming them.

    Each matrix parameter `W` (first axis `n₀`, the output axis of an
    `eqx.nn.Linear`; the other axes flattened to `m`) is projected on both sides to
    the `[k_out, k_in]` block `P_out ∇W P_inᵀ`. On the ghost path a layer with
    inputs `a_t` and output gradients `b_t` contributes `Σ_t (P_out b_t)(P_in
    a_t)ᵀ`: the cost per example is `~T(n₀·k_out + m·k_in + k_out·k_in)` a layer
    instead of `T·n₀·m`. Embedding lookups gather columns of `P_out`; a parameter
    used twice (a tied head) adds both uses. Layers stacked for a `lax.scan` are
    projected slice by slice. Vector-like parameters (biases, LayerNorm) are kept
    exactly up to `k_vector` entries and projected to that beyond. Other
    parameters fall back to their own projected per-example gradients (reported by
    `.plan` and, for `method="ghost"`, a [`transforms.GhostFallbackWarning`][]).

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example.
    - `k_out`, `k_in`: the projected sizes of the two sides of every matrix
        parameter (e.g. 16 and 16 for a 16² block per layer).
    - `k_vector`: the projected size of vector-like parameters (biases, LayerNorm);
        default `k_out`.
    - `seed`: the seed of the Gaussian matrices (variance `1/k`, so projected dot
        products estimate the full ones without bias).
    - `kind`: `"gaussian"` (default), or `"identity"`: no projection (`P = I` at
        full size, for tests and tiny models).
    - `method`: `"ghost"`/`"auto"` (the taps, default) or `"vmap"` (`vmap(grad)`
        then the same projections: the reference).
    - `fallback`: with `False`, raise instead of falling back.
    - `fit`: cap `k_out`/`k_in` at each matrix's sizes instead of raising.
    - `unroll_layers`: how the ghost passes run a `lax.scan` of the loss
        over stacked layers: `True` unrolls it fully, `False` keeps the loss's own
        `unroll`, `"auto"` (default) unrolls it on a GPU or TPU only. The results
        are the same; unrolled runs faster in less memory on a GPU and compiles
        slower (the ghost engines' guide, "A scanned stack of layers").

    **Returns:**

    A [`transforms.ProjectedGrads`][], called as `fn(model, batch)` and returning
    `[B, dim]` rows; `.layout`, `.plan` and `.matrices` describe them. Call it
    under `eqx.filter_jit`, passing `matrices=fn.matrices(model, batch)`.

    **Raises:**

    `TypeError` if `loss_fn` is not callable or a size is not an integer;
    `ValueError` for a size below 1 or an unknown `kind`, `method` or
    `unroll_layers`. The returned
    function raises as [`transforms.per_sample_grads`][]'s, and if a size exceeds a
    matrix parameter's (without `fit`).

    !!! example

        ```python
        project = projected_grads(loss_fn, k_out=4, k_in=4)
        rows = project(model, (xs, ys))  # (B, dim)
        ```
    """
    check_callable(_NAME, "loss_fn", loss_fn)
    k_out = check_size(_NAME, "k_out", k_out)
    k_in = check_size(_NAME, "k_in", k_in)
    k_vector = k_out if k_vector is None else check_size(_NAME, "k_vector", k_vector)
    seed = check_size(_NAME, "seed", seed, minimum=0)
    check_choice(_NAME, "kind", kind, _KINDS)
    check_choice(_NAME, "method", method, _METHODS)
    check_bool(_NAME, "fallback", fallback)
    check_bool(_NAME, "fit", fit)
    check_choice(_NAME, "unroll_layers", unroll_layers, UNROLL_LAYERS)
    return ProjectedGrads(
        loss_fn=loss_fn,
        k_out=k_out,
        k_in=k_in,
        k_vector=k_vector,
        seed=seed,
        kind=kind,
        method=method,
        fallback=fallback,
        fit=fit,
        unroll_layers=unroll_layers,
    )
