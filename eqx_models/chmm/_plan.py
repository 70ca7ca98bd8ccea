"""Planning in a learned `CHMM`: the shortest, most probable action sequence to a goal.

Decoding maximises over states given the actions; planning chooses the actions, by a
max-product search in log space over the transition tensor alone. Its outputs have
a fixed size, padded with `-1` after the plan's end, so it compiles and vmaps.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from transforms import pairwise_sum
from transforms.validation import (
    check_choice,
    check_ids,
    check_size,
    checked_eagerly,
    Checks,
    typechecked,
)

from ._chain import safe_log
from ._model import AbstractCHMM, clone_table
from ._sparse import SparseCHMM


class Plan(NamedTuple):
    """What [`eqx_models.chmm.plan`][] returns; arrays have a fixed size so that `plan`
    can be compiled and vmapped, with `-1` after the plan's end."""

    actions: Int[Array, " max_steps"]
    """The actions to take, `actions[:length]`."""
    states: Int[Array, " max_steps_plus_1"]
    """The states visited, `states[:length + 1]`, from the start to the goal."""
    length: Int[Array, ""]
    """The number of actions."""
    log_prob: Float[Array, ""]
    """`ln` of the product of the transition probabilities along the plan."""


def _precheck(model, start, goal, *, max_steps=None, start_is="state"):
    if not isinstance(model, AbstractCHMM) or start_is not in ("state", "observation"):
        return
    upper = model.n_obs if start_is == "observation" else model.n_states
    for arg, value, bound, name in (
        ("start", start, upper, None),
        ("goal", goal, model.n_states, "N"),
    ):
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        array = (
            isinstance(value, (np.ndarray, jax.Array))
            and value.ndim == 0
            and jnp.issubdtype(value.dtype, jnp.integer)
        )
        if integral or array:
            check_ids("plan", arg, value, bound, upper_name=name)


def dense_relax(T: Float[Array, "n_actions S S"]):
    """The step of `_relax` for a dense `(n_actions, S, S)` tensor."""
    n_actions, n_states = T.shape[0], T.shape[1]
    # Rows (action, state), flattened so that argmax breaks ties by action first.
    log_T = safe_log(T).reshape(n_actions * n_states, n_states)

    def dense(score):
        candidates = jnp.tile(score, n_actions)[:, None] + log_T
        pointer = jnp.argmax(candidates, axis=0).astype(jnp.int32)
        return candidates.max(axis=0), pointer

    return dense


def _relax(model: AbstractCHMM):
    """One step of the max-product search: from the best log-probability of each
    state, that of each state one step later and its pointer, the `(action, state)`
    it came from as `action * N + state` (ties to the lowest pointer: action first,
    then state)."""
    n_states = model.n_states
    if not isinstance(model, SparseCHMM):
        return dense_relax(model.T)  # pyright: ignore
    # The same search on the blocks: the best row within each block (the lowest
    # clone on ties), then the best block into each symbol (the lowest pointer on
    # ties), so the plan is the dense one. Work per step: n_blocks * M^2.
    table, _ = clone_table(model.n_clones)
    table = jnp.asarray(table)
    width, n_obs = table.shape[1], model.n_obs
    log_blocks = safe_log(model.blocks)
    action, src, dst = model.keys[:, 0], model.keys[:, 1], model.keys[:, 2]
    rows = table[src]
    symbol = jnp.asarray(model.state_symbol, jnp.int32)
    local = jnp.arange(n_states) - jnp.asarray(model.state_loc[:-1])[symbol]
    flat = symbol * width + local
    no_pointer = jnp.iinfo(jnp.int32).max

    def sparse(score):
        score_ext = jnp.concatenate([score, jnp.full((1,), -jnp.inf, score.dtype)])
        candidates = score_ext[rows][:, :, None] + log_blocks
        best = candidates.max(axis=1)
        row = jnp.argmax(candidates, axis=1)
        key = action[:, None] * n_states + jnp.take_along_axis(rows, row, axis=1)
        top = jax.ops.segment_max(best, dst, num_segments=n_obs)
        key = jnp.where(best == top[dst], key, no_pointer).astype(jnp.int32)
        pointer = jax.ops.segment_min(key, dst, num_segments=n_obs)
        pointer = jnp.where(pointer == no_pointer, 0, pointer)
        return top.reshape(-1)[flat], pointer.reshape(-1)[flat]

    return sparse


def search(
    relax, begin: Array, goal: Array | int, max_steps: int, n_states: int, dtype
) -> tuple[Plan, Array]:
    """The max-product search of `plan` from the states in `begin` (a boolean mask)
    to `goal`, with the step `relax` (see `_relax`): the plan and whether the goal
    was reached within `max_steps`."""
    score0 = jnp.where(begin, jnp.zeros((), dtype), -jnp.inf)

    def step(score, _):
        score, pointer = relax(score)
        top = jnp.max(score)
        top = jnp.where(jnp.isfinite(top), top, 0)
        score = score - top
        return score, (pointer, top, score[goal])

    _, (pointers, tops, at_goal) = lax.scan(step, score0, None, length=max_steps)
    reached = jnp.isfinite(jnp.concatenate([score0[goal][None], at_goal]))
    length = jnp.argmax(reached).astype(jnp.int32)
    counted = jnp.arange(1, max_steps + 1) <= length
    log_prob = (
        pairwise_sum(jnp.where(counted, tops, 0))
        + jnp.concatenate([jnp.zeros((1,), tops.dtype), at_goal])[length]
    )

    def back(state, inputs):
        s, pointer = inputs
        row = pointer[state]
        active = s <= length
        action = jnp.where(active, row // n_states, -1)
        previous = jnp.where(active, row % n_states, state)
        return previous, (action, jnp.where(s <= length, state, -1))

    steps = jnp.arange(1, max_steps + 1)
    first, (actions, states) = lax.scan(back, goal, (steps, pointers), reverse=True)
    states = jnp.concatenate([jnp.reshape(first, (1,)), states])
    return (
        Plan(actions=actions, states=states, length=length, log_prob=log_prob),
        jnp.any(reached),
    )


@checked_eagerly(_precheck)
@eqx.filter_jit
@typechecked
def plan(
    model: AbstractCHMM,
    start: int | Int[Array, ""],
    goal: int | Int[Array, ""],
    *,
    max_steps: int,
    start_is: str = "state",
) -> Plan:
    """The shortest action sequence that reaches `goal` with positive probability,
    the most probable among those.

    A max-product search over actions and states (in log space, so that no path is
    lost to underflow): `score[s, j]` is the best log-probability of reaching state
    `j` in exactly `s` steps; the plan length is the first `s` with a finite
    `score[s, goal]`, and backtracking gives the actions and states. Ties go to the
    lowest action, then the lowest state, so planning is deterministic. The
    probability is that of the transitions only (no prior over actions).

    **Arguments:**

    - `model`: the `CHMM` or `SparseCHMM` (planning on the blocks gives the
        same plan as on the dense model).
    - `start`: the start state (a clone id in `[0, N)`), or a symbol id if
        `start_is="observation"` (then the plan may start from any clone of it).
    - `goal`: the goal state, a clone id in `[0, N)`.
    - `max_steps`: the largest plan length searched.
    - `start_is`: `"state"` or `"observation"`.

    **Returns:**

    A [`eqx_models.chmm.Plan`][]; `length` is 0 when the start is the goal.

    **Raises:**

    `ValueError` if an id is out of range (at once for concrete ids, else by
    `eqx.error_if` at run time), for a negative `max_steps` or an unknown
    `start_is`; `EquinoxRuntimeError` (from `eqx.error_if`) if the goal is not
    reachable within `max_steps` steps.

    **Example:**

    ```python
    route = plan(model, start=12, goal=40, max_steps=50)
    route.actions[: route.length]
    ```
    """
    fn = "plan"
    check_size(fn, "max_steps", max_steps, minimum=0)
    check_choice(fn, "start_is", start_is, ("state", "observation"))
    n_states = model.n_states
    start, goal = jnp.asarray(start, jnp.int32), jnp.asarray(goal, jnp.int32)
    upper = model.n_obs if start_is == "observation" else n_states
    checks = Checks()
    start = check_ids(fn, "start", start, upper, checks=checks)
    goal = check_ids(fn, "goal", goal, n_states, checks=checks, upper_name="N")
    if start_is == "state":
        begin = jnp.arange(n_states) == start
    else:
        begin = jnp.asarray(model.state_symbol) == start
    route, reached = search(
        _relax(model), begin, goal, max_steps, n_states, model.dtype
    )
    checks.add(
        ~reached,
        f"{fn}: the goal cannot be reached from the start within max_steps="
        f"{max_steps} steps (no path of positive probability).",
    )
    return checks.guard(route)
