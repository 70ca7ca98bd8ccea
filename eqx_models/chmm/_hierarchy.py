"""Hierarchical planning: communities of the clone graph, then a plan inside them.

Flat planning (`plan`) relaxes every state at every step: `max_steps x n_actions x N^2`
work on a dense model. On a large map most of those states are far from the way
between start and goal. Here the learned clone graph is split into communities
(Louvain modularity, networkx, an optional extra), the communities form a graph of
their own (an edge wherever some learned transition crosses), the shortest route of
communities from the start's to the goal's is found by breadth-first search, and the
flat search runs on the clones of the communities along the route only.

A community route is only a guide: Louvain communities need not be connected inside,
and the shortest route of communities need not hold the shortest route of states.
When the search inside the route fails, the corridor grows by the communities next to
it, and so on until it holds every clone, where the search is the flat one: the
hierarchical plan reaches the goal whenever flat planning does (tested), and it
reports how many clones it touched.
"""

import collections
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from transforms.validation import (
    check_ids,
    check_in_range,
    check_size,
    fail,
    is_traced,
)

from ._model import AbstractCHMM, CHMM
from ._plan import dense_relax, Plan, search
from ._sparse import SparseCHMM, transition_row


def _edges(model: AbstractCHMM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(i, j, weight)` of every transition with positive probability, the weight
    summed over actions; from the blocks for a `SparseCHMM` (no dense tensor)."""
    if isinstance(model, SparseCHMM):
        blocks = np.asarray(model.blocks)
        keys = np.asarray(model.keys)
        loc = model.state_loc
        b, m, n = np.nonzero(blocks)
        i = loc[keys[b, 1]] + m
        j = loc[keys[b, 2]] + n
        w = blocks[b, m, n]
    else:
        assert isinstance(model, CHMM)
        W = np.asarray(model.T).sum(0)
        i, j = np.nonzero(W)
        w = W[i, j]
    return i, j, w


def _concrete(fn: str, model: AbstractCHMM) -> None:
    if not isinstance(model, AbstractCHMM):
        got = type(model).__name__
        raise fail(fn, "model", "a CHMM or a SparseCHMM", got, TypeError)
    if any(is_traced(leaf) for leaf in jax.tree.leaves(model)):
        raise TypeError(f"{fn}: `model` must hold concrete arrays (not traced).")


def _networkx():
    try:
        import networkx
    except ImportError:
        raise ImportError(
            "clone_communities needs networkx: pip install 'eqx-models[graph]'"
        ) from None
    return networkx


def clone_communities(
    model: AbstractCHMM,
    *,
    resolution: float = 1.0,
    threshold: float = 0.0,
    seed: int = 0,
) -> Int[np.ndarray, " n_states"]:
    """Communities of the learned clone graph (Louvain modularity maximisation).

    The graph has an undirected edge between clones `i` and `j` weighted by `sum_u
    T[u, i, j] + T[u, j, i]`, for weights above `threshold`; its communities come
    from `networkx.community.louvain_communities`. Needs the optional `graph` extra
    (`pip install 'eqx-models[graph]'`), imported on the first call.

    **Arguments:**

    - `model`: a trained `CHMM` or `SparseCHMM` with concrete arrays.
    - `resolution`: Louvain's resolution; above 1 gives more, smaller communities.
    - `threshold`: edges of at most this weight are dropped.
    - `seed`: the seed of Louvain's random node order (the result is deterministic
        for a seed).

    **Returns:**

    An int NumPy array of shape `(N,)`: the community of each clone, numbered from
    0 by decreasing size (ties by smallest clone). A clone without edges is a
    community of its own.

    **Raises:**

    `ImportError` without networkx; `TypeError` for a model that is not a `CHMM`
    or `SparseCHMM` or holds traced arrays, or a `resolution` that is not a real
    number (a bool included); `ValueError` for a non-positive or non-finite
    `resolution`, or a NaN `threshold`.
    """
    fn = "clone_communities"
    _concrete(fn, model)
    check_in_range(fn, "resolution", resolution, low=0, inclusive=(False, True))
    if not isinstance(threshold, (int, float)) or np.isnan(threshold):
        raise fail(fn, "threshold", "a number", repr(threshold))
    nx = _networkx()
    i, j, w = _edges(model)
    graph = nx.Graph()
    graph.add_nodes_from(range(model.n_states))
    weights = collections.defaultdict(float)
    for a, b, v in zip(i.tolist(), j.tolist(), w.tolist()):
        if a != b:
            weights[(min(a, b), max(a, b))] += v
    graph.add_weighted_edges_from(
        (a, b, v) for (a, b), v in weights.items() if v > threshold
    )
    found = nx.community.louvain_communities(
        graph, weight="weight", resolution=resolution, seed=seed
    )
    found = sorted(found, key=lambda c: (-len(c), min(c)))
    labels = np.empty(model.n_states, np.int32)
    for k, members in enumerate(found):
        labels[list(members)] = k
    return labels


def _check_communities(fn: str, model: AbstractCHMM, communities) -> np.ndarray:
    if is_traced(communities):
        raise TypeError(f"{fn}: `communities` must be a concrete array.")
    labels = np.asarray(communities)
    if labels.shape != (model.n_states,):
        raise fail(
            fn,
            "communities",
            f"a community for every clone, shape (N,) = ({model.n_states},)",
            f"shape {labels.shape}",
        )
    check_ids(fn, "communities", labels, model.n_states)
    return labels.astype(np.int64)


def community_graph(
    model: AbstractCHMM, communities: Int[ArrayLike, " n_states"]
) -> Bool[np.ndarray, "n_communities n_communities"]:
    """Which communities a learned transition leads between.

    **Arguments:**

    - `model`: a `CHMM` or `SparseCHMM` with concrete arrays.
    - `communities`: the community of each clone, shape `(N,)` (e.g. from
        [`eqx_models.chmm.clone_communities`][]).

    **Returns:**

    A boolean NumPy array `edges[c, d]`: some clone of `c` moves to some clone of `d`
    with positive probability under some action (`c != d`). Its size is
    `max(communities) + 1`.

    **Raises:**

    `ValueError` if `communities` does not give every clone a community (wrong
    shape, or an id outside `[0, N)`); `TypeError` for traced arrays.
    """
    fn = "community_graph"
    _concrete(fn, model)
    labels = _check_communities(fn, model, communities)
    n = int(labels.max()) + 1
    i, j, _ = _edges(model)
    edges = np.zeros((n, n), bool)
    edges[labels[i], labels[j]] = True
    np.fill_diagonal(edges, False)
    return edges


def _route(edges: np.ndarray, source: int, target: int) -> list[int] | None:
    """The shortest path of communities (breadth-first, lowest ids first)."""
    previous = {source: source}
    queue = collections.deque([source])
    while queue:
        c = queue.popleft()
        if c == target:
            path = [c]
            while path[-1] != source:
                path.append(previous[path[-1]])
            return path[::-1]
        for d in np.flatnonzero(edges[c]).tolist():
            if d not in previous:
                previous[d] = c
                queue.append(d)
    return None


class HierarchicalPlan(NamedTuple):
    """What [`eqx_models.chmm.hierarchical_plan`][] returns."""

    plan: Plan
    """The plan, in global clone ids (as [`eqx_models.chmm.plan`][] returns)."""
    route: Int[np.ndarray, " n_route"]
    """The communities from the start's to the goal's, in order (empty if there is
    no route of communities)."""
    touched: int
    """How many clones the search relaxed (the last, successful corridor)."""
    widenings: int
    """How many times the corridor grew before the search succeeded."""


@eqx.filter_jit
def _search_within(T_sub, begin, goal, max_steps):
    relax = dense_relax(T_sub)
    return search(relax, begin, goal, max_steps, T_sub.shape[1], T_sub.dtype)


def _sub_tensor(model: AbstractCHMM, states: np.ndarray) -> Array:
    """`T[:, states][:, :, states]`, gathered from the blocks for a `SparseCHMM`."""
    index = jnp.asarray(states)
    if isinstance(model, SparseCHMM):
        # One row per (action, state) kept: O(n_actions |S| N), never N^2.
        rows = jax.vmap(
            jax.vmap(lambda u, i: transition_row(model, u, i)[index], (None, 0)),
            (0, None),
        )(jnp.arange(model.n_actions), index)
        return rows
    assert isinstance(model, CHMM)
    return model.T[:, index][:, :, index]


def hierarchical_plan(
    model: AbstractCHMM,
    start: int,
    goal: int,
    *,
    communities: Int[ArrayLike, " n_states"],
    max_steps: int,
) -> HierarchicalPlan:
    """Plan over communities of clones, then within the communities on the way.

    Finds the shortest route of communities from the start clone's community to the
    goal's in [`eqx_models.chmm.community_graph`][], then the shortest, most
    probable action sequence (the search of [`eqx_models.chmm.plan`][]) using only
    the clones of those communities. If that fails, the corridor grows by every
    community next to it and the search runs again, until it holds every clone (the
    flat search); so the goal is reached whenever `plan` reaches it, possibly by a
    longer plan than `plan`'s. Runs from Python (a graph search on the host, then a
    compiled search per corridor size).

    **Arguments:**

    - `model`: a `CHMM` or `SparseCHMM` with concrete arrays.
    - `start`, `goal`: clone ids in `[0, N)`.
    - `communities`: the community of every clone, shape `(N,)`, e.g. from
        [`eqx_models.chmm.clone_communities`][].
    - `max_steps`: the largest plan length searched.

    **Returns:**

    A [`eqx_models.chmm.HierarchicalPlan`][]: the plan (global clone ids), the route
    of communities, the number of clones touched and of widenings.

    **Raises:**

    `ValueError` if `communities` does not cover every clone, an id is out of range,
    `max_steps` is negative, or the goal cannot be reached within `max_steps` steps
    even by the flat search; `TypeError` for traced arrays.

    **Example:**

    ```python
    labels = clone_communities(model)
    result = hierarchical_plan(model, 3, 250, communities=labels, max_steps=100)
    result.touched  # clones searched, out of model.n_states
    ```
    """
    fn = "hierarchical_plan"
    _concrete(fn, model)
    check_size(fn, "max_steps", max_steps, minimum=0)
    n_states = model.n_states
    start = int(check_ids(fn, "start", np.asarray(start), n_states, upper_name="N"))
    goal = int(check_ids(fn, "goal", np.asarray(goal), n_states, upper_name="N"))
    labels = _check_communities(fn, model, communities)
    edges = community_graph(model, labels)
    route = _route(edges, int(labels[start]), int(labels[goal]))
    corridor = np.zeros(edges.shape[0], bool)
    if route is not None:
        corridor[route] = True
    else:
        corridor[:] = True
    widenings = 0
    while True:
        states = np.flatnonzero(corridor[labels])
        local = np.full(n_states, -1)
        local[states] = np.arange(states.size)
        T_sub = _sub_tensor(model, states)
        begin = jnp.arange(states.size) == local[start]
        result, reached = _search_within(
            T_sub, begin, jnp.asarray(local[goal], jnp.int32), max_steps
        )
        if bool(reached):
            break
        if corridor.all():
            raise ValueError(
                f"{fn}: the goal cannot be reached from the start within max_steps="
                f"{max_steps} steps (no path of positive probability)."
            )
        grown = corridor | edges[corridor].any(0) | edges[:, corridor].any(1)
        corridor = grown if (grown != corridor).any() else np.ones_like(corridor)
        widenings += 1
    lookup = jnp.asarray(np.concatenate([states, [-1]]), jnp.int32)
    plan = result._replace(states=lookup[result.states])
    return HierarchicalPlan(
        plan=plan,
        route=np.asarray(route if route is not None else [], np.int32),
        touched=int(states.size),
        widenings=widenings,
    )
