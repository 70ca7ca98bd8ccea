"""Learn a room from a random walk with a cloned HMM, then plan a route in it.

An agent walks at random in a 6 x 8 room whose cells have one of four colours, so
most colours repeat across the room and a single observation says little about where
the agent is. A cloned HMM (30 clones per colour) learns the room's layout from the
colours and actions alone: soft EM, then Viterbi (hard) EM to prune unused
transitions. After learning, most clones behave like place cells: each is active at
one cell. The script reports bits per step during learning, plans a route between
two cells on the learned graph, checks it in the real room, and saves three figures
to `examples/out/`: the learning curve, the learned graph and the place fields.

Usage: `python examples/chmm_room.py [--smoke] [--large]`.
"""

import time

import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from eqx_models.chmm import (  # noqa: E402
    bits_per_step,
    CHMM,
    clone_graph,
    em,
    log_likelihood,
    place_fields,
    plan,
    random_room,
    room_walk,
    viterbi,
    viterbi_em,
)


MOVES = np.array([(0, -1), (0, 1), (-1, 0), (1, 0)])
COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def sizes(args) -> dict:
    if args.smoke:
        return dict(height=6, width=8, colours=4, clones=12, steps=2000, em=30, hard=3)
    if args.large:
        return dict(
            height=10, width=10, colours=5, clones=40, steps=100_000, em=300, hard=20
        )
    return dict(height=6, width=8, colours=4, clones=30, steps=20_000, em=150, hard=20)


def execute(room: np.ndarray, cell, actions) -> np.ndarray:
    """Follow actions in the true room (staying in place at walls)."""
    height, width = room.shape
    cell = np.array(cell)
    for action in actions:
        target = cell + MOVES[action]
        if 0 <= target[0] < height and 0 <= target[1] < width:
            cell = target
    return cell


def main(argv=None):
    args = parse_args(
        __doc__,
        argv,
        extra=lambda p: p.add_argument(
            "--large", action="store_true", help="a 10 x 10 room and a longer walk"
        ),
    )
    cfg = sizes(args)
    shape = (cfg["height"], cfg["width"])
    room = random_room(*shape, cfg["colours"], key=jr.key(0))
    x, a, positions = room_walk(room, cfg["steps"], key=jr.key(1))
    n_clones = [cfg["clones"]] * cfg["colours"]
    model = CHMM.random(n_clones, 4, key=jr.key(2))
    n_steps = x.shape[0]
    print(f"room {shape}, {cfg['colours']} colours, walk of {n_steps} steps")

    t0 = time.perf_counter()
    chunks, curve = 10, []
    per_chunk = max(cfg["em"] // chunks, 1)
    for i in range(chunks):
        model, part = em(model, x, a, n_iter=per_chunk, pseudocount=1e-3)
        curve.extend(np.asarray(part[:-1]).tolist())
        print(
            f"  EM {(i + 1) * per_chunk:4d} iterations: "
            f"{float(bits_per_step(part[-1], n_steps)):.4f} bits/step"
        )
    curve.append(float(part[-1]))
    em_bits = float(bits_per_step(curve[-1], n_steps))
    model, hard_curve = viterbi_em(model, x, a, n_iter=cfg["hard"])
    learn_s = time.perf_counter() - t0
    viterbi_bits = float(bits_per_step(hard_curve[-1], n_steps))
    likelihood_bits = float(bits_per_step(log_likelihood(model, x, a), n_steps))
    print(
        f"  after Viterbi EM: {viterbi_bits:.4f} bits/step on the best path, "
        f"{likelihood_bits:.4f} bits/step likelihood ({learn_s:.1f} s learning)"
    )

    states, _ = viterbi(model, x, a)
    fields = np.asarray(
        place_fields(states, positions, n_states=model.n_states, shape=shape)
    )
    visits = fields.reshape(model.n_states, -1)
    active = np.flatnonzero(visits.sum(1) > 0)
    purity = visits[active].max(1) / visits[active].sum(1)
    print(
        f"  {len(active)} active clones for {shape[0] * shape[1]} cells; "
        f"{np.mean(purity > 0.9):.0%} of them fire at a single cell (>90% of visits)"
    )

    # Plan between opposite corners: from the clone that occupies the start cell
    # most to the one that occupies the goal cell most.
    start_cell, goal_cell = (0, 0), (shape[0] - 1, shape[1] - 1)
    start = int(np.argmax(fields[:, start_cell[0], start_cell[1]]))
    goal = int(np.argmax(fields[:, goal_cell[0], goal_cell[1]]))
    route = plan(model, start, goal, max_steps=4 * sum(shape))
    length = int(route.length)
    actions = np.asarray(route.actions[:length])
    arrived = execute(np.asarray(room), start_cell, actions)
    shortest = abs(goal_cell[0] - start_cell[0]) + abs(goal_cell[1] - start_cell[1])
    reached = bool(np.all(arrived == goal_cell))
    print(
        f"  plan {start_cell} -> {goal_cell}: {length} actions (shortest possible "
        f"{shortest}), executed in the room it ends at {tuple(int(v) for v in arrived)}"
    )

    _plot_curve(curve, hard_curve, n_steps)
    _plot_graph(model, states, fields, np.asarray(room), active)
    _plot_fields(fields, active, purity, np.asarray(room))
    save_summary(
        "chmm_room",
        {
            "bits_after_em": f"{em_bits:.4f}",
            "bits_after_viterbi": f"{likelihood_bits:.4f}",
            "plan_reaches_goal": reached,
            "plan_length": f"{length} (shortest {shortest})",
            "active_clones": f"{len(active)} for {shape[0] * shape[1]} cells",
            "learning_s": f"{learn_s:.1f}",
        },
    )
    # The smoke run learns too briefly for a reliable map; the full run must plan
    # correctly.
    if not reached and not args.smoke:
        raise SystemExit("the planned route does not reach the goal cell")


def _plot_curve(curve, hard_curve, n_steps):
    # Two quantities, two panels: soft EM raises the likelihood of the walk (all
    # paths), Viterbi EM the probability of its single best path.
    em_bits = np.asarray(bits_per_step(jnp.asarray(curve), n_steps))
    hard_bits = np.asarray(bits_per_step(hard_curve, n_steps))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(np.arange(len(em_bits)), em_bits, color="C0")
    left.set_yscale("log")
    left.set_xlabel("EM iteration")
    left.set_ylabel("−log₂ likelihood per step (bits)")
    left.set_title("1. soft EM: likelihood of the walk", fontsize=10)
    right.plot(np.arange(len(hard_bits)), hard_bits, "o-", color="C1", ms=3)
    right.set_xlabel("Viterbi EM iteration (after soft EM)")
    right.set_ylabel("−log₂ P(best path) per step (bits)")
    right.set_title("2. Viterbi EM: probability of the best path", fontsize=10)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"Cloned HMM learning a room from a walk of {n_steps} steps")
    fig.tight_layout()
    fig.savefig(out_path("chmm_learning_curve.png"), dpi=120)
    plt.close(fig)


def _plot_graph(model, states, fields, room, active):
    adjacency, _ = clone_graph(model, states, threshold=0.05)
    adjacency = np.asarray(adjacency)
    symbol = model.state_symbol
    # Draw each clone at the centroid of its place field (slightly jittered), so a
    # well-learned graph looks like the room's grid.
    rows, cols = np.indices(room.shape)
    weight = fields[active] / fields[active].sum((1, 2), keepdims=True)
    centre = np.stack([(weight * cols).sum((1, 2)), (weight * rows).sum((1, 2))], -1)
    centre += np.random.default_rng(0).normal(scale=0.08, size=centre.shape)
    where = {s: c for s, c in zip(active, centre)}
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for i in active:
        for j in active:
            if i != j and adjacency[i, j] > 0:
                (x0, y0), (x1, y1) = where[i], where[j]
                ax.plot([x0, x1], [y0, y1], color="0.75", lw=0.6, zorder=1)
    ax.scatter(
        centre[:, 0],
        centre[:, 1],
        c=[COLOURS[symbol[i] % len(COLOURS)] for i in active],
        s=40,
        edgecolors="k",
        linewidths=0.5,
        zorder=2,
    )
    handles = [
        Line2D([], [], marker="o", ls="none", color=COLOURS[k], mec="k", mew=0.5)
        for k in range(int(room.max()) + 1)
    ]
    labels = [f"clone of colour {k}" for k in range(len(handles))]
    handles.append(Line2D([], [], color="0.75", lw=1))
    labels.append("learned transition\n(P > 0.05, any action)")
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xlim(-0.7, room.shape[1] - 0.3)
    ax.set_ylim(room.shape[0] - 0.3, -0.7)
    ax.set_aspect("equal")
    ax.set_xlabel("room column (cell)")
    ax.set_ylabel("room row (cell)")
    ax.set_title(
        "Learned graph: each active clone at the centre of its place field", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out_path("chmm_graph.png"), dpi=120)
    plt.close(fig)


def _plot_fields(fields, active, purity, room):
    order = active[np.argsort(-fields[active].sum((1, 2)))][:12]
    fig, axes = plt.subplots(3, 5, figsize=(9.6, 5.2), gridspec_kw={"hspace": 0.6})
    cmap = ListedColormap(COLOURS[: room.max() + 1])
    axes[0, 0].imshow(room, cmap=cmap)
    axes[0, 0].set_title("room colours", fontsize=8)
    axes[1, 0].hist(purity, bins=10, range=(0, 1), color="0.4")
    axes[1, 0].set_title("share of a clone's visits\nat its top cell", fontsize=8)
    axes[1, 0].set_ylabel("clones", fontsize=7)
    axes[1, 0].tick_params(labelsize=7)
    axes[2, 0].axis("off")
    image = None
    for ax, clone in zip(axes[:, 1:].ravel(), order):
        share = fields[clone] / fields[clone].sum()
        image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"clone {clone}", fontsize=8)
    for ax in axes.ravel():
        if ax is not axes[1, 0]:
            ax.set_xticks([])
            ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=axes[:, 1:].ravel().tolist(), shrink=0.8)
        bar.set_label("share of the clone's visits per cell")
    fig.suptitle(
        "Place fields of the 12 most visited clones (decoded by Viterbi)", fontsize=10
    )
    fig.savefig(out_path("chmm_place_fields.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
