"""Gridworld rooms for cognitive-map experiments, and the analysis of what was learned.

A room is a grid of random colours (aliased observation ids) explored by a random
walk of four moves; `place_fields` and `clone_graph` read a decoded state path back
in terms of the room. None of this is needed to use a `CHMM`: it is the example
environment and its diagnostics, kept out of the model's core.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_ids,
    check_in_range,
    check_size,
    checked_eagerly,
    fail,
    typechecked,
)

from ._model import _normalise_rows, CHMM


# Row and column offsets of the four actions: left, right, up, down.
MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))


@typechecked
def random_room(
    height: int, width: int, n_colours: int, *, key: PRNGKeyArray
) -> Int[Array, "height width"]:
    """A rectangular room whose cells have random colours (observation ids).

    **Arguments:**

    - `height`, `width`: the size of the room in cells.
    - `n_colours`: the number of colours; each cell gets one uniformly at random,
        so with fewer colours than cells many cells look alike (aliasing).
    - `key`: a JAX PRNG key.

    **Returns:**

    An int32 array of shape `(height, width)` with values in `[0, n_colours)`.

    **Raises:**

    `TypeError`/`ValueError` if a size is not a positive integer.
    """
    for arg, value in (("height", height), ("width", width), ("n_colours", n_colours)):
        check_size("random_room", arg, value)
    return jr.randint(key, (height, width), 0, n_colours, dtype=jnp.int32)


def _precheck(room, length, *, key=None, start=None):
    """The start cell of a concrete call, checked at once."""
    if start is None or not isinstance(room, (np.ndarray, jax.Array)):
        return
    if room.ndim != 2 or not jnp.issubdtype(room.dtype, jnp.integer):
        return
    cell = np.asarray(start)
    room = np.asarray(room)
    if cell.shape != (2,) or not np.issubdtype(cell.dtype, np.integer):
        return
    row, column = int(cell[0]), int(cell[1])
    height, width = room.shape[:2]
    if not (0 <= row < height and 0 <= column < width and room[row, column] >= 0):
        raise fail(
            "room_walk",
            "start",
            "an enterable cell of the room (inside it, not marked -1)",
            repr((row, column)),
        )


@checked_eagerly(_precheck)
@eqx.filter_jit
@typechecked
def room_walk(
    room: Int[Array, "height width"],
    length: int,
    *,
    key: PRNGKeyArray,
    start: tuple[int, int] | Int[Array, " 2"] | None = None,
) -> tuple[Int[Array, " length"], Int[Array, " length"], Int[Array, "length 2"]]:
    """A uniformly random walk in a gridworld room, observing cell colours.

    Four actions: `0` left, `1` right, `2` up, `3` down. A move that would leave the
    room, or enter a cell marked `-1` (an obstacle), leaves the agent in place. The
    walk is deterministic given `key`.

    **Arguments:**

    - `room`: cell colours, an int array of shape `(height, width)`; `-1` marks
        cells that cannot be entered.
    - `length`: the number of steps `T`.
    - `key`: a JAX PRNG key.
    - `start`: the `(row, column)` of the first cell; random (among enterable
        cells) if omitted.

    **Returns:**

    A tuple `(x, a, positions)`: observations `x[t] = room[positions[t]]` and
    actions `a`, both of shape `(T,)` (with the convention of this subpackage:
    `a[t]` moves from `positions[t]` to `positions[t + 1]`; `a[-1]` is drawn but
    unused), and the `(T, 2)` cell positions.

    **Raises:**

    `TypeError`/`ValueError` if `length` is not a positive integer; `ValueError`
    if the start cell cannot be entered (at once for a concrete call, else by
    `eqx.error_if` at run time).
    """
    check_size("room_walk", "length", length)
    height, width = room.shape
    start_key, action_key = jr.split(key)
    if start is None:
        open_cells = (room >= 0).reshape(-1)
        flat = jr.categorical(start_key, jnp.where(open_cells, 0.0, -jnp.inf))
        start_cell = jnp.stack([flat // width, flat % width]).astype(jnp.int32)
    else:
        start_cell = jnp.asarray(start, jnp.int32)
    bad_start = (
        (start_cell[0] < 0)
        | (start_cell[0] >= height)
        | (start_cell[1] < 0)
        | (start_cell[1] >= width)
        | (room[start_cell[0], start_cell[1]] < 0)
    )
    actions = jr.randint(action_key, (length,), 0, 4, dtype=jnp.int32)
    moves = jnp.asarray(MOVES, jnp.int32)

    def step(cell, action):
        target = cell + moves[action]
        inside = (
            (target[0] >= 0)
            & (target[0] < height)
            & (target[1] >= 0)
            & (target[1] < width)
        )
        clipped = jnp.clip(target, 0, jnp.asarray([height - 1, width - 1]))
        allowed = inside & (room[clipped[0], clipped[1]] >= 0)
        following = jnp.where(allowed, target, cell)
        return following, following

    _, rest = lax.scan(step, start_cell, actions[:-1])
    positions = jnp.concatenate([start_cell[None], rest])
    x = room[positions[:, 0], positions[:, 1]]
    return eqx.error_if(
        (x, actions, positions),
        bad_start,
        "room_walk: `start` must be an enterable cell of the room.",
    )


@typechecked
def place_fields(
    states: Int[Array, " T"],
    positions: Int[Array, "T_positions 2"],
    *,
    n_states: int,
    shape: tuple[int, int],
) -> Float[Array, "n_states height width"]:
    """How often each clone was occupied at each cell of a gridworld.

    **Arguments:**

    - `states`: a decoded state path, e.g. from [`eqx_models.chmm.viterbi`][],
        shape `(T,)`.
    - `positions`: the true `(row, column)` at each step, shape `(T, 2)` (e.g. from
        [`eqx_models.chmm.room_walk`][]).
    - `n_states`: `N`, the number of states of the model.
    - `shape`: the `(height, width)` of the room.

    **Returns:**

    A float array of shape `(N, height, width)` of visit counts; a clone that is a
    good "place cell" has its counts concentrated on one cell.

    **Raises:**

    `ValueError` if `states` and `positions` differ in length, if a state lies
    outside `[0, n_states)` or a position outside the room (at once for concrete
    arrays, by `eqx.error_if` under `jit`; a scatter would drop or wrap them
    silently); `TypeError`/`ValueError` if `n_states` or a side of `shape` is not a
    positive integer.
    """
    fn = "place_fields"
    if states.shape[0] != positions.shape[0]:
        raise ValueError(
            f"{fn}: `states` and `positions` must have the same length, got "
            f"{states.shape[0]} and {positions.shape[0]}."
        )
    n_states = check_size(fn, "n_states", n_states)
    height = check_size(fn, "shape[0]", shape[0])
    width = check_size(fn, "shape[1]", shape[1])
    states = check_ids(fn, "states", states, n_states)
    rows = check_ids(fn, "positions[:, 0]", positions[:, 0], height)
    columns = check_ids(fn, "positions[:, 1]", positions[:, 1], width)
    fields = jnp.zeros((n_states, height, width), jnp.zeros(()).dtype)
    return fields.at[states, rows, columns].add(1)


@typechecked
def clone_graph(
    model: CHMM, states: Int[Array, " T"], *, threshold: float = 0.0
) -> tuple[Float[Array, "n_states n_states"], Bool[Array, " n_states"]]:
    """The learned transition graph between the clones a decoding actually uses.

    **Arguments:**

    - `model`: the `CHMM`.
    - `states`: a decoded state path (e.g. from [`eqx_models.chmm.viterbi`][]);
        the clones it visits are the *active* ones.
    - `threshold`: edges with a weight at most this are dropped.

    **Returns:**

    A tuple `(adjacency, active)`: `adjacency[i, j]` is the probability of moving
    from clone `i` to clone `j` under a uniformly random action, `sum_u T[u, i, j] /
    n_actions`, restricted to active clones and renormalised over them (rows and
    columns of inactive clones are zero), and `active`, a boolean mask of shape
    `(N,)`.

    **Raises:**

    `ValueError` if a state lies outside `[0, N)` (at once for concrete arrays, by
    `eqx.error_if` under `jit`), or if `threshold` is NaN.
    """
    fn = "clone_graph"
    states = check_ids(fn, "states", states, model.n_states)
    check_in_range(fn, "threshold", threshold, finite=False)
    active = jnp.zeros((model.n_states,), bool).at[states].set(True)
    mask = active[:, None] & active[None, :]
    adjacency = _normalise_rows(jnp.where(mask, model.T.mean(0), 0))
    return jnp.where(adjacency > threshold, adjacency, 0), active
