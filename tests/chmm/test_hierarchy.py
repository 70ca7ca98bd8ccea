"""Hierarchical planning over communities of clones, against flat planning."""

import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.chmm import (
    CHMM,
    clone_communities,
    community_graph,
    hierarchical_plan,
    plan,
    SparseCHMM,
)
from eqx_models.chmm._gridworld import MOVES

from ..helpers import import_optional


import_optional("networkx", extra="graph")


def four_rooms(size=9, n_colours=6, seed=0):
    """A square of four rooms joined by doors, random colours, walls marked -1."""
    rng = np.random.default_rng(seed)
    room = rng.integers(0, n_colours, (size, size))
    mid = size // 2
    room[mid, :] = -1
    room[:, mid] = -1
    for r, c in ((mid, 1), (mid, size - 2), (1, mid), (size - 2, mid)):
        room[r, c] = rng.integers(0, n_colours)
    return room


def true_model(room):
    """The CHMM that knows the room: one clone per open cell (clones of a colour
    numbered together), deterministic moves, staying in place at walls."""
    cells = [tuple(c) for c in np.argwhere(room >= 0)]
    colours = np.array([room[c] for c in cells])
    order = np.argsort(colours, kind="stable")
    cells = [cells[i] for i in order]
    state = {c: s for s, c in enumerate(cells)}
    n_clones = np.bincount(colours, minlength=colours.max() + 1)
    assert np.all(n_clones > 0)
    T = np.zeros((4, len(cells), len(cells)))
    height, width = room.shape
    for s, (r, c) in enumerate(cells):
        for u, (dr, dc) in enumerate(MOVES):
            target = (r + dr, c + dc)
            inside = 0 <= target[0] < height and 0 <= target[1] < width
            following = target if inside and room[target] >= 0 else (r, c)
            T[u, s, state[following]] = 1
    return CHMM(n_clones, jnp.asarray(T)), cells


def _valid(model, route, start, goal):
    T = np.asarray(model.T)
    n = int(route.length)
    states, actions = np.asarray(route.states), np.asarray(route.actions)
    assert states[0] == start and states[n] == goal
    for t in range(n):
        assert T[actions[t], states[t], states[t + 1]] > 0
    assert np.all(states[n + 1 :] == -1)


@pytest.mark.parametrize("sparse", [False, True])
def test_reaches_the_goal_whenever_flat_planning_does(sparse):
    room = four_rooms()
    dense, cells = true_model(room)
    model = SparseCHMM.from_dense(dense) if sparse else dense
    labels = clone_communities(model, seed=0)
    assert labels.shape == (dense.n_states,) and labels.max() >= 3
    rng = np.random.default_rng(1)
    touched = []
    for start, goal in rng.integers(0, dense.n_states, (6, 2)).tolist():
        flat = plan(dense, start, goal, max_steps=40)
        result = hierarchical_plan(model, start, goal, communities=labels, max_steps=40)
        _valid(dense, result.plan, start, goal)
        assert int(result.plan.length) >= int(flat.length)
        # The route of communities starts and ends where it should.
        assert result.route[0] == labels[start] and result.route[-1] == labels[goal]
        touched.append(result.touched)
    # On average the search touched well under all the clones.
    assert np.mean(touched) < 0.8 * dense.n_states, touched


def test_touches_far_fewer_states_on_a_large_map():
    room = four_rooms(size=21, n_colours=8, seed=3)
    model, cells = true_model(room)
    labels = clone_communities(model, seed=0, resolution=1.0)
    index = {c: s for s, c in enumerate(cells)}
    # Corner to corner of the same room: the corridor is a few communities.
    start, goal = index[(0, 0)], index[(8, 8)]
    result = hierarchical_plan(model, start, goal, communities=labels, max_steps=40)
    flat = plan(model, start, goal, max_steps=40)
    _valid(model, result.plan, start, goal)
    assert int(result.plan.length) == int(flat.length) == 16
    assert result.touched < model.n_states // 3, (result.touched, model.n_states)


def test_community_graph_and_bad_maps():
    model, _ = true_model(four_rooms())
    labels = clone_communities(model)
    edges = community_graph(model, labels)
    assert edges.shape == (labels.max() + 1,) * 2
    assert not np.any(np.diag(edges))
    with pytest.raises(ValueError, match="`communities`"):
        hierarchical_plan(model, 0, 1, communities=labels[:-1], max_steps=5)
    bad = labels.copy()
    bad[3] = -1
    with pytest.raises(ValueError, match="`communities`"):
        hierarchical_plan(model, 0, 1, communities=bad, max_steps=5)
    with pytest.raises(ValueError, match="cannot be reached"):
        hierarchical_plan(model, 0, 40, communities=labels, max_steps=0)
