"""A large four-room maze: streaming EM on a long walk, then a hierarchical plan.

An agent walks at random in a square of four rooms joined by doors, seeing only cell
colours (a few colours, so most cells look alike). A `SparseCHMM` with the
transitions the walk uses learns the maze by streaming EM (the walk is cut into
chunks, the E-step is exact), then Viterbi EM prunes it. The learned clone graph is
split into communities (Louvain, networkx: the `graph` extra), and a plan between
two decoded clones is found first over communities, then inside the corridor of
communities on the way, touching a fraction of the clones; the flat plan is computed
for comparison. The hierarchical plan, and flat plans to 20 other goals the walk
reached, are executed in the real maze open loop (the actions replayed) and closed
loop (an agent that re-plans from what it observes; docs/chmm.md explains the
misses). The figure (in `examples/out/`) shows the maze coloured by the community of
the clone decoded at each cell, and both paths to the farthest cell.

Usage: `python examples/chmm_maze.py [--smoke]`.
"""

import time

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
from equinox import EquinoxRuntimeError


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402

from eqx_models.chmm import (  # noqa: E402
    bits_per_step,
    clone_communities,
    hierarchical_plan,
    place_fields,
    plan,
    room_walk,
    seen_transitions,
    SparseCHMM,
    streaming_em,
    viterbi,
    viterbi_em,
)


MOVES = np.array([(0, -1), (0, 1), (-1, 0), (1, 0)])


def sizes(args) -> dict:
    if args.smoke:
        return dict(size=9, colours=6, clones=6, steps=3_000, em=10, chunk=1_000)
    return dict(size=21, colours=12, clones=100, steps=100_000, em=100, chunk=20_000)


def four_rooms(size: int, colours: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    room = rng.integers(0, colours, (size, size))
    mid = size // 2
    room[mid, :] = -1
    room[:, mid] = -1
    for r, c in ((mid, 1), (mid, size - 2), (1, mid), (size - 2, mid)):
        room[r, c] = rng.integers(0, colours)
    return room


def move(room, cell, u):
    """The cell after action `u` (walls and the border stop the move)."""
    target = tuple(int(v) for v in np.asarray(cell) + MOVES[u])
    inside = all(0 <= v < n for v, n in zip(target, room.shape))
    return target if inside and room[target] >= 0 else cell


def replay(room, cell, actions):
    """Open loop: the cells visited by taking `actions` from `cell`."""
    cells = [tuple(int(v) for v in cell)]
    for u in actions:
        cells.append(move(room, cells[-1], u))
    return cells


def navigate(model, room, cell, start, goal, horizon, budget):
    """Closed loop, as an agent: follow the plan, observe the colour after each
    action and update the belief over clones (a filter step); when the colour
    contradicts the clone the plan expected, remove that transition from the
    agent's copy of the model (a clone that stands for two cells offers shortcuts
    between them that the maze does not have) and re-plan from the most probable
    clone. Returns the cells visited."""
    dense = model.to_dense()
    T = np.array(dense.T)
    symbol = np.repeat(np.arange(len(model.n_clones)), model.n_clones)
    belief = np.zeros(T.shape[1])
    belief[start] = 1.0
    cells = [tuple(int(v) for v in cell)]
    route, i = None, 0
    for _ in range(budget):
        clone = int(np.argmax(belief))
        if clone == goal:
            break
        if route is None or i >= int(route.length) or int(route.states[i]) != clone:
            agent = eqx.tree_at(lambda m: m.T, dense, jnp.asarray(T))
            try:
                route = plan(
                    agent, jnp.asarray(clone), jnp.asarray(goal), max_steps=horizon
                )
            except EquinoxRuntimeError:  # out of reach in the agent's model
                break
            i = 0
        u, expected = int(route.actions[i]), int(route.states[i + 1])
        cells.append(move(room, cells[-1], u))
        colour = room[cells[-1]]
        if symbol[expected] != colour:
            T[u, clone, expected] = 0.0
        belief = (belief @ T[u]) * (symbol == colour)
        if belief.sum() == 0:  # lost: no clone explains the colour
            break
        belief /= belief.sum()
        i += 1
    return cells


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg = sizes(args)
    room = four_rooms(cfg["size"], cfg["colours"])
    x, a, positions = room_walk(jnp.asarray(room), cfg["steps"], key=jr.key(0))
    x, a, positions = np.asarray(x), np.asarray(a), np.asarray(positions)
    n_clones = [cfg["clones"]] * cfg["colours"]
    model = SparseCHMM.random(
        n_clones, 4, key=jr.key(1), allowed=seen_transitions(x, a), pseudocount=1e-3
    )
    start = time.perf_counter()
    model, curve = streaming_em(
        model, x, a, n_iter=cfg["em"], chunk_size=cfg["chunk"], progress=True
    )
    model, _ = viterbi_em(model, jnp.asarray(x), jnp.asarray(a), n_iter=2)
    seconds = time.perf_counter() - start
    states, _ = viterbi(model, jnp.asarray(x), jnp.asarray(a))
    states = np.asarray(states)
    labels = clone_communities(model)
    # The goal: the clone decoded where the walk first stood farthest from its start
    # (usually across a door or two). Any shortest path in the four rooms is shorter
    # than 4 sides.
    distance = np.abs(positions - positions[0]).sum(axis=1)
    later = int(np.argmax(distance))
    farthest = tuple(int(v) for v in positions[later])
    source, target = int(states[0]), int(states[later])
    horizon = 4 * cfg["size"]
    flat = plan(model, source, target, max_steps=horizon)
    result = hierarchical_plan(
        model, source, target, communities=labels, max_steps=horizon
    )
    n = int(result.plan.length)
    cells = replay(room, positions[0], np.asarray(result.plan.actions[:n]))
    # Plans are found on the learned graph. Replayed open loop, a plan ends at the
    # goal's cell unless it passes a clone that still stands for two cells (a
    # shortcut between them); closed loop (`navigate`) the agent re-plans from what
    # it observes. Counted over goals the walk reached.
    goals = np.random.default_rng(0).integers(1, cfg["steps"], 20)
    budget = 2 * horizon
    reached = {"open loop": 0, "closed loop": 0}
    for t in goals:
        goal_cell = tuple(int(v) for v in positions[t])
        route = plan(model, source, jnp.asarray(states[t]), max_steps=horizon)
        path = replay(room, positions[0], np.asarray(route.actions[: route.length]))
        reached["open loop"] += path[-1] == goal_cell
        path = navigate(model, room, positions[0], source, states[t], horizon, budget)
        reached["closed loop"] += path[-1] == goal_cell
    walked = navigate(model, room, positions[0], source, target, horizon, budget)
    fields = np.asarray(
        place_fields(
            jnp.asarray(states),
            jnp.asarray(positions),
            n_states=model.n_states,
            shape=room.shape,
        )
    )
    shown = np.full(room.shape, np.nan)
    visited = fields.sum(0) > 0
    shown[visited] = labels[fields.argmax(0)][visited]
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(shown, cmap="tab20", interpolation="nearest")
    ax.imshow(np.where(room < 0, 1.0, np.nan), cmap="gray_r", vmin=0, vmax=1)
    path = np.array(cells)
    ax.plot(path[:, 1], path[:, 0], "k.-", lw=2, label="hierarchical plan, open loop")
    path = np.array(walked)
    ax.plot(path[:, 1] + 0.15, path[:, 0] + 0.15, "w.-", lw=1.5, label="closed loop")
    # Clones the walk never decodes (pruned by Viterbi EM) are communities of their
    # own: count the communities of the clones in use.
    in_use = len(np.unique(labels[np.unique(states)]))
    ax.set_title(
        f"{in_use} communities in use; plan touched {result.touched} of "
        f"{model.n_states} clones"
    )
    ax.legend(loc="lower right")
    fig.savefig(out_path("chmm_maze.png"), dpi=100)
    save_summary(
        "chmm_maze",
        {
            "clones": model.n_states,
            "blocks": model.n_blocks,
            "final bits/step": round(float(bits_per_step(curve[-1], len(x))), 3),
            "communities of the clones in use": in_use,
            "start and farthest cell": f"{cells[0]} -> {farthest}",
            "flat plan length": int(flat.length),
            "hierarchical plan length": n,
            "clones touched": f"{result.touched} of {model.n_states}",
            "plan ends at the goal's cell in the maze": cells[-1] == farthest,
            "closed loop to the farthest cell: steps, arrived": (
                f"{len(walked) - 1}, {walked[-1] == farthest}"
            ),
            **{
                f"{loop}: goals of the walk reached": f"{count} of {len(goals)}"
                for loop, count in reached.items()
            },
            "learning seconds": round(seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
