"""Attribution queries against gradient stores: TracIn, influence functions,
top-k retrieval and self-influence.

Every query streams the store chunk by chunk (memory-mapped from disk, one chunk on
the device at a time), so a store may be larger than device memory. Query examples
are checked against the store's model fingerprint and projection first, then
projected in batches of the store's batch size.

With `g_i` the projected gradient of training example `i` (a store row) and `g_q`
that of a query example:

- TracIn: `Σ_c w_c <g_q^c, g_i^c>` over checkpoints `c` (one store each), `w_c`
  typically the learning rate around checkpoint `c`;
- influence: `g_qᵀ (F + λI)⁻¹ g_i` with `F = (1/N) Σ_i g_i g_iᵀ`, the empirical Fisher
  of the projected gradients (the Gauss-Newton matrix of a log-likelihood loss in
  expectation over the model's labels), block-diagonal per layer or full, and
  `λ = damping · tr(F_b) / k_b` per block `b` of size `k_b`;
- self-influence: `<g_i, g_i>` or `g_iᵀ (F + λI)⁻¹ g_i`.
"""

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .._grad._per_sample import as_batch
from .._grad._projection import ProjectedGrads
from .._validation import (
    check_choice,
    check_in_range,
    check_size,
    check_type,
    describe,
    fail,
    typechecked,
)
from ._store import _rows, GradientStore


_BLOCKS = ("layer", "full")


class FisherInverse(eqx.Module):
    """The damped inverse `(F + λI)⁻¹` of a store's projected Fisher, block by
    block; build it with [`transforms.fisher_inverse`][].

    `starts[j]` (`[n_b]`) are the first coordinates of the blocks of size
    `sizes[j]`, and `inverses[j]` (`[n_b, s, s]`) their inverses.
    """

    sizes: tuple[int, ...] = eqx.field(static=True)
    starts: tuple[Int[Array, " _blocks"], ...]
    inverses: tuple[Float[Array, "_blocks _size _size"], ...]
    dim: int = eqx.field(static=True)
    store_sha256: str = eqx.field(static=True)

    def precondition(self, g: Float[Array, "n dim"]) -> Float[Array, "n dim"]:
        """`(F + λI)⁻¹ g` for each row of `g`.

        **Raises:**

        `ValueError` if `g`'s rows do not have the store's size.
        """
        if g.shape[-1] != self.dim:
            raise fail(
                "FisherInverse.precondition",
                "g",
                f"rows of size {self.dim}",
                f"shape {g.shape}",
            )
        out = g
        for size, starts, inv in zip(self.sizes, self.starts, self.inverses):
            idx = starts[:, None] + jnp.arange(size)
            out = out.at[:, idx].set(
                jnp.einsum("nbs,bts->nbt", g[:, idx], inv.astype(g.dtype))
            )
        return out


def _blocks(store: GradientStore, blocks: str) -> dict[int, list[int]]:
    if blocks == "full":
        return {store.dim: [0]}
    groups: dict[int, list[int]] = {}
    for b in store.layout:
        per = b.size // b.slices
        for j in range(b.slices):
            groups.setdefault(per, []).append(b.offset + j * per)
    return groups


@typechecked
def fisher_inverse(
    store: GradientStore, *, damping: float | int = 0.1, blocks: str = "layer"
) -> FisherInverse:
    """The damped inverse of the projected empirical Fisher of a store.

    `F = (1/N) Σ_i g_i g_iᵀ` over the store's rows, accumulated chunk by chunk in
    float64 on the host, per block: `blocks="layer"` keeps one `k × k` block per
    parameter leaf (per stacked layer), `"full"` the whole `dim × dim` matrix. Each
    block `b` gets `λ_b = damping · tr(F_b) / k_b` (damping relative to its mean
    eigenvalue) and is inverted once by an eigendecomposition.

    **Arguments:**

    - `store`: a complete [`transforms.GradientStore`][].
    - `damping`: the relative damping, a finite number > 0.
    - `blocks`: `"layer"` (default) or `"full"`.

    **Returns:**

    A [`transforms.FisherInverse`][] for [`transforms.influence_scores`][],
    [`transforms.top_k_scores`][] and [`transforms.self_influence`][].

    **Raises:**

    `TypeError` if `store` is not a `GradientStore`; `ValueError` for an
    incomplete store, a `damping` that is not finite and positive, or an unknown
    `blocks`.
    """
    name = "fisher_inverse"
    check_type(name, "store", store, GradientStore, "a GradientStore")
    if np.ndim(damping) != 0:
        raise fail(name, "damping", "a real number > 0", describe(damping), TypeError)
    damping = float(
        check_in_range(name, "damping", damping, low=0.0, inclusive=(False, True))
    )
    check_choice(name, "blocks", blocks, _BLOCKS)
    store.check_complete(name)
    groups = _blocks(store, blocks)
    sums = {s: np.zeros((len(st), s, s)) for s, st in groups.items()}
    for _, rows in store.chunks():
        rows = np.asarray(rows, np.float64)
        for s, st in groups.items():
            x = rows[:, np.asarray(st)[:, None] + np.arange(s)]
            sums[s] += np.einsum("nbs,nbt->bst", x, x)
    starts, inverses = [], []
    dtype = jnp.result_type(float)
    for s, st in groups.items():
        fisher = sums[s] / store.n_rows
        lam = damping * np.trace(fisher, axis1=1, axis2=2) / s
        # A block of zeros (an unused parameter) gets λ = damping, not 0.
        lam = np.where(lam > 0, lam, damping)
        w, v = np.linalg.eigh(fisher)
        inv = np.einsum("bij,bj,bkj->bik", v, 1 / (w + lam[:, None]), v)
        starts.append(jnp.asarray(np.asarray(st, np.int32)))
        inverses.append(jnp.asarray(inv, dtype))
    return FisherInverse(
        sizes=tuple(groups),
        starts=tuple(starts),
        inverses=tuple(inverses),
        dim=store.dim,
        store_sha256=store.metadata["model_sha256"],
    )


def _as_list(value, kind) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _checked(
    caller: str,
    stores: Any,
    projector: Any,
    models: Any,
    queries: Any,
    weights: Any,
    fisher: Any,
) -> tuple[list[GradientStore], list[jax.Array], list[float]]:
    """The stores, each store's `[Q, dim]` (preconditioned) query rows, weights."""
    stores = _as_list(stores, GradientStore)
    for j, store in enumerate(stores):
        check_type(caller, "stores", store, GradientStore, "a GradientStore")
        store.check_complete(caller)
    check_type(caller, "projector", projector, ProjectedGrads, "a ProjectedGrads")
    models = models if isinstance(models, (list, tuple)) else [models]
    if len(models) != len(stores):
        raise fail(
            caller,
            "models",
            f"one model per store ({len(stores)})",
            f"{len(models)} models",
        )
    ref = stores[0]
    for store in stores[1:]:
        if (store.n_rows, store.chunk_size) != (ref.n_rows, ref.chunk_size):
            raise fail(
                caller,
                "stores",
                "stores of the same rows and chunking",
                f"{store.path!r} with {store.n_rows} rows in chunks of "
                f"{store.chunk_size} beside {ref.n_rows} in {ref.chunk_size}",
            )
    if weights is None:
        weights = [1.0] * len(stores)
    weights = list(weights) if isinstance(weights, (list, tuple)) else None
    if (
        weights is None
        or len(weights) != len(stores)
        or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w)
            for w in weights
        )
    ):
        raise fail(
            caller,
            "weights",
            f"a sequence of {len(stores)} finite numbers (one per store)",
            repr(weights),
        )
    fishers = [None] * len(stores) if fisher is None else _as_list(fisher, None)
    if len(fishers) != len(stores) or not all(
        f is None or isinstance(f, FisherInverse) for f in fishers
    ):
        raise fail(
            caller,
            "fisher",
            f"None or one FisherInverse per store ({len(stores)})",
            repr(fisher)[:80],
        )
    queries = as_batch(caller, "queries", queries)
    rows = []
    for store, model, f in zip(stores, models, fishers):
        store.check_model(caller, projector, model, arg="models")
        g = _project_queries(projector, model, queries, store.metadata["batch_size"])
        if g.shape[1] != store.dim:
            raise fail(
                caller,
                "queries",
                f"examples whose projected rows have the store's size {store.dim}",
                f"rows of size {g.shape[1]}",
            )
        if f is not None:
            if f.store_sha256 != store.metadata["model_sha256"] or f.dim != store.dim:
                raise fail(
                    caller,
                    "fisher",
                    "the FisherInverse of the store queried",
                    "one computed from another store",
                )
            g = _precondition(f, g)
        rows.append(g)
    return stores, rows, [float(w) for w in weights]


def _project_queries(projector, model, queries, batch_size: int) -> jax.Array:
    """The queries' projected rows, `[Q, dim]`, computed in batches of the store's
    batch size (the last one padded), so that a thousand queries need no more
    memory than building the store did."""
    Q = queries[0].shape[0]
    mats = projector.matrices(model, tuple(x[:1] for x in queries))
    parts = []
    for b0 in range(0, Q, batch_size):
        b1 = min(b0 + batch_size, Q)
        idx = jnp.minimum(jnp.arange(b0, b0 + batch_size), b1 - 1)
        batch = tuple(x[idx] for x in queries)
        parts.append(_rows(projector, model, mats, batch)[: b1 - b0])
    return jnp.concatenate(parts)


@eqx.filter_jit
def _precondition(fisher, g):
    return fisher.precondition(g)


@jax.jit
def _scores(q, rows):
    return jnp.einsum("qd,nd->qn", q, rows.astype(q.dtype))


def _score_chunks(stores, rows, weights):
    """`(first row, [Q, n] scores)` for every chunk, summed over the stores."""
    iters = [store.chunks() for store in stores]
    for parts in zip(*iters):
        start = parts[0][0]
        total = None
        for (_, chunk), q, w in zip(parts, rows, weights):
            s = w * _scores(q, jnp.asarray(chunk))
            total = s if total is None else total + s
        assert total is not None
        yield start, total


@typechecked
def tracin_scores(
    stores: Any,
    projector: ProjectedGrads,
    models: Any,
    queries: Any,
    *,
    weights: Sequence[float | int] | None = None,
) -> np.ndarray:
    """TracIn scores of every stored training example for a batch of queries.

    `score[q, i] = Σ_c w_c <g_q^c, g_i^c>`: the projected-gradient dot products at
    each checkpoint `c` (one store and one model each), weighted. Positive scores
    mark training examples whose gradient steps lowered the query's loss (to first
    order): proponents; negative ones, opponents.

    **Arguments:**

    - `stores`: a [`transforms.GradientStore`][] or a sequence of them (one per
        checkpoint, same rows and chunking).
    - `projector`: the stores' [`transforms.ProjectedGrads`][].
    - `models`: the model of each store (a model, or a sequence).
    - `queries`: a tuple of arrays with a leading axis of `Q` query examples.
    - `weights`: one number per store (e.g. the learning rate); default 1.

    **Returns:**

    The `[Q, N]` scores as a NumPy array (on the host; for large stores use
    [`transforms.top_k_scores`][]).

    **Raises:**

    `TypeError`/`ValueError` for a store that is not a complete `GradientStore`, a
    model or projection other than a store's, a number of models or weights other
    than of stores, or bad `queries`.
    """
    stores, rows, weights = _checked(
        "tracin_scores", stores, projector, models, queries, weights, None
    )
    return np.concatenate(
        [np.asarray(s) for _, s in _score_chunks(stores, rows, weights)], axis=1
    )


@typechecked
def influence_scores(
    store: GradientStore,
    projector: ProjectedGrads,
    model: Any,
    queries: Any,
    *,
    fisher: FisherInverse | None = None,
) -> np.ndarray:
    """Influence-function scores `g_qᵀ (F + λI)⁻¹ g_i` of every stored example.

    Upweighting training example `i` by `ε` moves the parameters by `-ε H⁻¹ g_i`
    and the query's loss by `-ε g_qᵀ H⁻¹ g_i`; here `H` is the damped projected
    Fisher of the store ([`transforms.fisher_inverse`][]). A positive score: the
    example helps the query (removing it raises the query's loss by about
    `score / N`).

    **Arguments:**

    - `store`: a complete [`transforms.GradientStore`][].
    - `projector`: its [`transforms.ProjectedGrads`][].
    - `model`: the store's model.
    - `queries`: a tuple of arrays with a leading axis of `Q` query examples.
    - `fisher`: from `fisher_inverse(store)`; computed here (defaults) if `None`.

    **Returns:**

    The `[Q, N]` scores, a NumPy array.

    **Raises:**

    As [`transforms.tracin_scores`][], and `ValueError` for a `fisher` of another
    store.
    """
    if fisher is None and isinstance(store, GradientStore) and store.complete:
        fisher = fisher_inverse(store)
    stores, rows, weights = _checked(
        "influence_scores", store, projector, model, queries, None, fisher
    )
    return np.concatenate(
        [np.asarray(s) for _, s in _score_chunks(stores, rows, weights)], axis=1
    )


@jax.jit
def _merge(values, indices, scores, start):
    ids = start + jnp.arange(scores.shape[1], dtype=indices.dtype)
    all_values = jnp.concatenate([values, scores.astype(values.dtype)], axis=1)
    all_ids = jnp.concatenate([indices, jnp.broadcast_to(ids, scores.shape)], axis=1)
    best, where = jax.lax.top_k(all_values, values.shape[1])
    return best, jnp.take_along_axis(all_ids, where, axis=1)


@typechecked
def top_k_scores(
    stores: Any,
    projector: ProjectedGrads,
    models: Any,
    queries: Any,
    k: int | np.integer,
    *,
    weights: Sequence[float | int] | None = None,
    fisher: Any = None,
    largest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` highest- (or lowest-) scoring stored examples for each query.

    Scores are TracIn's ([`transforms.tracin_scores`][]) or, with `fisher`, the
    influence scores ([`transforms.influence_scores`][]); a running top-k is kept
    on the device while the store streams by, so the `[Q, N]` matrix is never
    formed.

    **Arguments:**

    - `stores`, `projector`, `models`, `queries`, `weights`: as for
        [`transforms.tracin_scores`][].
    - `k`: how many examples per query, at most the number of rows.
    - `fisher`: `None` (TracIn) or one [`transforms.FisherInverse`][] per store.
    - `largest`: the highest scores (proponents, default) or the lowest
        (opponents).

    **Returns:**

    `(values, indices)`, both `[Q, k]` NumPy arrays, best first.

    **Raises:**

    As [`transforms.tracin_scores`][], and `TypeError`/`ValueError` for a `k`
    that is not an integer in `[1, N]`.
    """
    name = "top_k_scores"
    first = _as_list(stores, None)[0]
    n = first.n_rows if isinstance(first, GradientStore) else None
    k = check_size(name, "k", k, maximum=n)
    stores, rows, weights = _checked(
        name, stores, projector, models, queries, weights, fisher
    )
    Q = rows[0].shape[0]
    sign = 1.0 if largest else -1.0
    values = jnp.full((Q, k), -jnp.inf, rows[0].dtype)
    indices = jnp.full((Q, k), -1, jnp.int32)
    for start, s in _score_chunks(stores, rows, weights):
        values, indices = _merge(values, indices, sign * s, jnp.int32(start))
    return sign * np.asarray(values), np.asarray(indices)


@typechecked
def self_influence(
    store: GradientStore, *, fisher: FisherInverse | None = None
) -> np.ndarray:
    """Each stored example's score against itself, for outlier and mislabel
    detection: `‖g_i‖²` (TracIn), or `g_iᵀ (F + λI)⁻¹ g_i` with `fisher`.

    Examples the model finds hard or contradictory (a wrong label) have large
    gradients, and large self-influence.

    **Arguments:**

    - `store`: a complete [`transforms.GradientStore`][].
    - `fisher`: `None` or the store's [`transforms.FisherInverse`][].

    **Returns:**

    The `[N]` scores, a NumPy array.

    **Raises:**

    `TypeError` if `store` is not a `GradientStore`; `ValueError` if it is
    incomplete or `fisher` belongs to another store.
    """
    name = "self_influence"
    check_type(name, "store", store, GradientStore, "a GradientStore")
    store.check_complete(name)
    if fisher is not None:
        check_type(name, "fisher", fisher, FisherInverse, "a FisherInverse or None")
        if fisher.store_sha256 != store.metadata["model_sha256"]:
            raise fail(
                name, "fisher", "the FisherInverse of `store`", "another store's"
            )
    out = []
    for _, chunk in store.chunks():
        g = jnp.asarray(chunk).astype(jnp.promote_types(chunk.dtype, jnp.float32))
        h = g if fisher is None else _precondition(fisher, g)
        out.append(np.asarray(jnp.sum(g * h.astype(g.dtype), axis=1)))
    return np.concatenate(out)
