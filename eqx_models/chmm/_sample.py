"""Ancestral sampling of a state path and its observations from a `CHMM`, given actions.

The generative direction, used to draw sequences from a known model (the decoding
and planning tests do). It needs only the model and a `lax.scan`, none of the
`Chain` machinery.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Int, PRNGKeyArray

from transforms.validation import check_ids, checked_eagerly, Checks, typechecked

from ._chain import safe_log
from ._model import AbstractCHMM
from ._sparse import transition_row


def _precheck(model, a, *, key=None):
    if (
        isinstance(model, AbstractCHMM)
        and isinstance(a, (np.ndarray, jax.Array))
        and a.ndim == 1
        and jnp.issubdtype(a.dtype, jnp.integer)
    ):
        check_ids("sample", "a[:-1]", a[:-1], model.n_actions, upper_name="n_actions")


@checked_eagerly(_precheck)
@eqx.filter_jit
@typechecked
def sample(
    model: AbstractCHMM, a: Int[Array, " T"], *, key: PRNGKeyArray
) -> tuple[Int[Array, " T"], Int[Array, " T"]]:
    """Sample a state path and its observations given a sequence of actions.

    `z[0] ~ Pi`, `z[t+1] ~ T[a[t], z[t], :]`, and `x[t]` is the symbol of clone
    `z[t]`.

    **Arguments:**

    - `model`: the `CHMM` or `SparseCHMM`.
    - `a`: actions, integer array of shape `(T,)`; `a[-1]` is unused.
    - `key`: a JAX PRNG key.

    **Returns:**

    A tuple `(x, states)`, two int32 arrays of shape `(T,)`.

    **Raises:**

    `ValueError` if an action is out of range (at once for concrete actions, else
    by `eqx.error_if` at run time); `EquinoxRuntimeError` (from `eqx.error_if`) if
    the path reaches a state whose row `T[a[t], z[t], :]` is all zeros.

    **Example:**

    ```python
    x, states = sample(model, a, key=jr.key(0))
    ```
    """
    fn = "sample"
    if a.shape[0] < 1:
        raise ValueError(f"{fn}: `a` is empty.")
    checks = Checks()
    actions = check_ids(
        fn, "a[:-1]", a[:-1], model.n_actions, checks=checks, upper_name="n_actions"
    )
    keys = jr.split(key, a.shape[0])
    first = jr.categorical(keys[0], safe_log(model.Pi)).astype(jnp.int32)

    def step(state, inputs):
        k, action = inputs
        row = transition_row(model, action, state)
        following = jr.categorical(k, safe_log(row)).astype(jnp.int32)
        return following, (following, row.sum() <= 0)

    _, (rest, stuck) = lax.scan(step, first, (keys[1:], actions))
    states = jnp.concatenate([first[None], rest])
    symbol = jnp.asarray(model.state_symbol, jnp.int32)
    checks.add(
        stuck,
        f"{fn}: the path reached a state with no transition under the given action "
        "(a row of zeros in T).",
    )
    return checks.guard((symbol[states], states))
