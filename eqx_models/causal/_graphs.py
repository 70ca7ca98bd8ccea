"""Random DAGs from a fixed list of graph families, and the acyclicity check.

The family may be given as a traced code, so a curriculum can change the mix of
families without recompiling the task sampler. Graph structure is kept apart from
the mechanisms (`_scm.py`), which take any DAG and use `check_acyclic` to refuse a
graph with a cycle.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_choice,
    check_ids,
    check_in_range,
    check_size,
    fail,
    is_traced,
    typechecked,
)


GRAPH_FAMILIES = ("chain", "fork", "collider", "erdos_renyi", "scale_free")
"""Names of the random DAG families, in the order of their integer codes."""


def family_index(family: str | int | Int[Array, ""]) -> int | Int[Array, ""]:
    """The integer code of a family given by name or code (codes pass through,
    checked: `lax.switch` would clamp a traced code out of range)."""
    if isinstance(family, str):
        check_choice("sample_dag", "family", family, GRAPH_FAMILIES)
        return GRAPH_FAMILIES.index(family)
    return check_ids("sample_dag", "family", family, len(GRAPH_FAMILIES))


def _has_walk(xp, adjacency, length: int):
    """Whether the graph has a walk of `length` edges: a boolean matrix power by
    repeated squaring, clipped to {0, 1} so that counts never overflow."""
    step = adjacency.astype(xp.float32)
    walks = xp.eye(adjacency.shape[0], dtype=xp.float32)
    while length:
        if length & 1:
            walks = xp.minimum(walks @ step, 1)
        step = xp.minimum(step @ step, 1)
        length >>= 1
    return xp.any(walks > 0)


def check_acyclic(fn: str, arg: str, adjacency: Bool[Array, "d d"], guard=None):
    """Check that `adjacency` is a DAG: a linear SCM on a cycle has no solution, and
    its sampler would return NaN or garbage without a word.

    At once when concrete; when traced, by an `eqx.error_if` on `guard` (default
    `adjacency`), returned: pass a value the result depends on."""
    guard = adjacency if guard is None else guard
    # A graph is acyclic iff it has no walk of d edges (its matrix is nilpotent).
    d = adjacency.shape[0]
    if is_traced(adjacency):
        return eqx.error_if(
            guard,
            _has_walk(jnp, adjacency, d),
            f"{fn}: `{arg}` must be a directed acyclic graph, got a graph with a "
            "cycle (checked at run time).",
        )
    if _has_walk(np, np.asarray(adjacency), d):
        raise fail(fn, arg, "a directed acyclic graph", "a graph with a cycle")
    return guard


def topological_order(adjacency: Bool[Array, "d d"]) -> Int[Array, " d"]:
    """A topological order of a DAG: nodes sorted by their longest path from a root."""
    d = adjacency.shape[0]

    def deepen(_, depth):
        return jnp.max(jnp.where(adjacency, depth[:, None] + 1, 0), axis=0)

    depth = jax.lax.fori_loop(0, d, deepen, jnp.zeros((d,), jnp.int32))
    return jnp.argsort(depth, stable=True)


def _choose(
    scores: Float[Array, "d d"], allowed: Bool[Array, "d d"], counts, cap: int
) -> Bool[Array, "d d"]:
    """For every column j, the `counts[j] <= cap` allowed rows of highest score (all
    allowed rows if fewer); with i.i.d. uniform scores, a uniform random subset."""
    scores = jnp.where(allowed, scores, -1.0)
    top = jax.lax.top_k(scores.T, min(cap, scores.shape[0]))[0]
    index = jnp.clip(counts - 1, 0, top.shape[1] - 1)
    threshold = jnp.take_along_axis(
        top, jnp.broadcast_to(index, (top.shape[0],))[:, None], 1
    )
    return allowed & (scores >= threshold[:, 0][None, :]) & (counts > 0)


# Every builder takes i.i.d. uniforms `u` of shape (3, d, d) (one random draw per
# graph keeps the compiled sampler small) and returns the adjacency in topological
# order.


def _chain(u, d, max_parents, edges_per_node):
    i = jnp.arange(d)
    return i[:, None] + 1 == i[None, :]


def _fork(u, d, max_parents, edges_per_node):
    i = jnp.arange(d)
    return (i[:, None] == 0) & (i[None, :] > 0)


def _collider(u, d, max_parents, edges_per_node):
    # Two layers: ceil(d/2) causes, and floor(d/2) colliders each with between 2
    # and max_parents of the causes as parents (fewer if there are fewer causes).
    n_causes = (d + 1) // 2
    i = jnp.arange(d)
    allowed = (i[:, None] < n_causes) & (i[None, :] >= n_causes)
    high = max(min(max_parents, n_causes), 1)
    low = min(2, high)
    counts = low + jnp.floor(u[1, 0] * (high - low + 1)).astype(jnp.int32)
    return _choose(u[0], allowed, jnp.minimum(counts, high), max_parents)


def _erdos_renyi(u, d, max_parents, edges_per_node):
    p = jnp.minimum(1.0, 2.0 * edges_per_node / max(d - 1, 1))
    i = jnp.arange(d)
    edges = (i[:, None] < i[None, :]) & (u[1] < p)
    # Cap the in-degree by keeping a uniformly chosen subset of the parents.
    return _choose(u[0], edges, jnp.full((d,), max_parents), max_parents)


def _scale_free(u, d, max_parents, edges_per_node):
    # Preferential attachment: node j links from min(m, j) earlier nodes drawn
    # without replacement with probability proportional to (degree + 1)
    # (Gumbel top-k), so out-degrees are heavy-tailed and in-degrees are <= m.
    m_max = max(min(2, max_parents), 1)
    m = 1 + jnp.floor(u[2, 0, 0] * m_max).astype(jnp.int32)
    m = jnp.minimum(m, m_max)
    gumbel = -jnp.log(-jnp.log(jnp.clip(u[0], 1e-12, 1.0 - 1e-7)))
    i = jnp.arange(d)

    def attach(degree, j):
        earlier = i < j
        score = jnp.where(earlier, jnp.log1p(degree) + gumbel[j], -jnp.inf)
        top = jax.lax.top_k(score, min(m_max, d))[0]
        threshold = top[jnp.clip(m - 1, 0, top.shape[0] - 1)]
        parents = earlier & (score >= threshold)
        degree = degree + parents + (j == i) * jnp.sum(parents)
        return degree, parents

    _, columns = jax.lax.scan(attach, jnp.zeros((d,), u.dtype), i)
    return columns.T


_BUILDERS = (_chain, _fork, _collider, _erdos_renyi, _scale_free)


@typechecked
def sample_dag(
    key: PRNGKeyArray,
    n_vars: int,
    family: str | int | Int[Array, ""],
    *,
    max_parents: int = 3,
    edges_per_node: float | Float[Array, ""] = 1.5,
) -> Bool[Array, "d d"]:
    """Draw a random DAG from one of the graph families.

    The graph is built in a topological order and its nodes are then relabelled by
    a uniformly random permutation, so a variable's index says nothing about its
    place in the order. Families (`GRAPH_FAMILIES`; in topological order `0..d-1`):

    - `"chain"`: `0 → 1 → ... → d-1`.
    - `"fork"`: a common cause, `0 → j` for every `j ≥ 1`.
    - `"collider"`: the first `⌈d/2⌉` nodes are causes; each of the others is a
        collider with between 2 and `max_parents` parents drawn among the causes.
    - `"erdos_renyi"`: each forward edge independently with probability
        `min(1, 2·edges_per_node/(d-1))`, then every in-degree capped at
        `max_parents` by keeping a random subset of the parents.
    - `"scale_free"`: preferential attachment (Barabási–Albert), node `j` gets
        `min(m, j)` parents among earlier nodes drawn proportionally to their degree
        plus one, with `m ∈ {1, 2}` drawn per graph (and at most `max_parents`).

    Every family has in-degree at most `max_parents` (the chain and fork at most 1).
    Deterministic given `key`; jittable, with `family` a traced integer code too
    (then all families are traced and `lax.switch` picks one).

    **Arguments:**

    - `key`: a PRNG key.
    - `n_vars`: the number of nodes `d ≥ 1` (static).
    - `family`: a name from `GRAPH_FAMILIES` or its integer code.
    - `max_parents`: the in-degree cap (static), at least 1.
    - `edges_per_node`: expected edges per node of the Erdős–Rényi family.

    **Returns:**

    A boolean adjacency matrix of shape `(d, d)` with `A[i, j]` true iff `i → j`.

    **Raises:**

    `ValueError` for an unknown family or code (a traced code at run time),
    `n_vars < 1`, `max_parents < 1`, or a negative or non-finite `edges_per_node`;
    `TypeError` for a size that is not an integer.

    !!! example

        ```python
        adjacency = sample_dag(jr.key(0), 10, "scale_free")
        parents_of_3 = jnp.flatnonzero(adjacency[:, 3])
        ```
    """
    check_size("sample_dag", "n_vars", n_vars)
    check_size("sample_dag", "max_parents", max_parents)
    edges_per_node = check_in_range(
        "sample_dag", "edges_per_node", edges_per_node, low=0
    )
    code = family_index(family)
    u = jr.uniform(key, (4, n_vars, n_vars))
    branches = [
        (lambda u, b=b: b(u, n_vars, max_parents, edges_per_node)) for b in _BUILDERS
    ]
    if isinstance(code, int):
        topological = branches[code](u[:3])
    else:
        topological = jax.lax.switch(code, branches, u[:3])
    # The rank of i.i.d. uniforms is a uniformly random permutation; `inverse[l]` is
    # the topological position of the node labelled l.
    inverse = jnp.argsort(u[3, 0])
    return topological[inverse][:, inverse]
