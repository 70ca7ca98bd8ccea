"""A large four-room maze: streaming EM on a long walk, then a hierarchical plan.

An agent walks at random in a square of four rooms joined by doors, seeing only cell
colours (a few colours, so most cells look alike). A `SparseCHMM` with the
transitions the walk uses learns the maze by streaming EM (the walk is cut into
chunks, the E-step is exact), then Viterbi EM prunes it. The learned clone graph is
split into communities (Louvain, networkx: the `graph` extra), and a plan between
two decoded clones is found first over communities, then inside the corridor of
communities on the way, touching a fraction of the clones; the flat plan is computed
for comparison and both are replayed in the real maze. The figure (in
`examples/out/`) shows the maze coloured by the community of the clone decoded at
each cell, and the hierarchical plan.

Usage: `python examples/chmm_maze.py [--smoke]`.
"""

import time

import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np


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
    return dict(size=21, colours=12, clones=30, steps=100_000, em=60, chunk=20_000)


def four_rooms(size: int, colours: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    room = rng.integers(0, colours, (size, size))
    mid = size // 2
    room[mid, :] = -1
    room[:, mid] = -1
    for r, c in ((mid, 1), (mid, size - 2), (1, mid), (size - 2, mid)):
        room[r, c] = rng.integers(0, colours)
    return room


def replay(room, cell, actions):
    cells = [tuple(cell)]
    for u in actions:
        target = np.asarray(cells[-1]) + MOVES[u]
        inside = np.all(target >= 0) and np.all(target < room.shape)
        cells.append(
            tuple(target) if inside and room[tuple(target)] >= 0 else cells[-1]
        )
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
    # A goal the walk reached later: the plan exists within that many steps.
    later = min(3 * cfg["size"], cfg["steps"] - 1)
    source, target = int(states[0]), int(states[later])
    flat = plan(model, source, target, max_steps=later)
    result = hierarchical_plan(
        model, source, target, communities=labels, max_steps=later
    )
    n = int(result.plan.length)
    cells = replay(room, positions[0], np.asarray(result.plan.actions[:n]))
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
    ax.plot(path[:, 1], path[:, 0], "k.-", lw=2, label="hierarchical plan")
    ax.set_title(
        f"{labels.max() + 1} communities; plan touched {result.touched} of "
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
            "communities": int(labels.max() + 1),
            "flat plan length": int(flat.length),
            "hierarchical plan length": n,
            "clones touched": f"{result.touched} of {model.n_states}",
            "plan ends at the goal's cell in the maze": cells[-1]
            == tuple(positions[later]),
            "learning seconds": round(seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
