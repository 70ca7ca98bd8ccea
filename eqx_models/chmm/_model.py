"""The `CHMM` pytree: clone counts, the action-conditioned transition tensor and `Pi`.

The class holds the parameters, their constructors and checks, and derived sizes
(`state_loc`, `state_symbol`); every computation on sequences is a function of
another module that takes the model as its first argument, so inference, learning
and sampling grow without touching the class.
"""

import abc
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from transforms.validation import (
    check_in_range,
    check_probabilities,
    check_size,
    typechecked,
)


def initial_distribution(fn: str, Pi, n_states: int, dtype) -> Array:
    """A model's `Pi` before its probability check: uniform when `None`, else of
    shape `(n_states,)` and floating, cast to `dtype` (the transitions')."""
    if Pi is None:
        return jnp.full((n_states,), 1 / n_states, dtype)
    Pi = jnp.asarray(Pi)
    if Pi.shape != (n_states,):
        raise ValueError(f"{fn}: `Pi` must have shape ({n_states},), got {Pi.shape}.")
    if not jnp.issubdtype(Pi.dtype, jnp.floating):
        raise TypeError(f"{fn}: `Pi` must be a floating array, got {Pi.dtype}.")
    return Pi.astype(dtype)


def _as_clone_counts(fn: str, n_clones) -> tuple[int, ...]:
    """`n_clones` as a tuple of Python ints (a static field), with its checks."""
    try:
        counts = np.asarray(n_clones)
    except jax.errors.TracerArrayConversionError:
        raise TypeError(
            f"{fn}: `n_clones` sets array shapes and must be concrete (a sequence of "
            "ints or a NumPy array), not a traced JAX array."
        ) from None
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(
            f"{fn}: `n_clones` must be a non-empty 1-D sequence of ints, got shape "
            f"{counts.shape}."
        )
    if not np.issubdtype(counts.dtype, np.integer):
        raise TypeError(
            f"{fn}: `n_clones` must hold integers, got dtype {counts.dtype}."
        )
    if np.any(counts < 1):
        raise ValueError(
            f"{fn}: every symbol needs at least one clone; got n_clones="
            f"{counts.tolist()}."
        )
    return tuple(int(k) for k in counts)


def clone_table(n_clones: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`table[k, m]`: the state of the m-th clone of symbol k, or N when m is unused;
    and `used[k, m]`, whether m is a clone of k."""
    n_states, width = sum(n_clones), max(n_clones)
    loc = np.concatenate([[0], np.cumsum(n_clones)])
    m = np.arange(width)
    used = m[None, :] < np.asarray(n_clones)[:, None]
    table = np.where(used, loc[:-1, None] + m[None, :], n_states)
    return table.astype(np.int32), used


def _normalise_rows(counts: Float[Array, "... n"]) -> Float[Array, "... n"]:
    """Divide each row by its sum; rows summing to zero stay zero."""
    total = counts.sum(-1, keepdims=True)
    return counts / jnp.where(total > 0, total, 1)


class AbstractCHMM(eqx.Module):
    """What every representation of a cloned HMM shares: the clone counts, `Pi`,
    and the sizes derived from them.

    [`eqx_models.chmm.CHMM`][] stores the transitions as a dense `(n_actions, N, N)`
    tensor; [`eqx_models.chmm.SparseCHMM`][] stores only the allowed
    `(action, symbol, next symbol)` blocks. Inference, learning, sampling and
    planning accept either and give the same numbers.
    """

    n_clones: eqx.AbstractVar[tuple[int, ...]]
    Pi: eqx.AbstractVar[Float[Array, " n_states"]]

    @property
    @abc.abstractmethod
    def n_actions(self) -> int:
        """The number of actions."""

    @property
    @abc.abstractmethod
    def dtype(self) -> jnp.dtype:
        """The floating dtype of the transition probabilities."""

    @property
    def n_states(self) -> int:
        """`N`, the total number of hidden states (clones)."""
        return sum(self.n_clones)

    @property
    def n_obs(self) -> int:
        """The number of symbols (observation ids)."""
        return len(self.n_clones)

    @property
    def state_loc(self) -> np.ndarray:
        """`loc = cumsum([0] + n_clones)`: symbol `k` owns states `loc[k]:loc[k+1]`."""
        return np.concatenate([[0], np.cumsum(self.n_clones)])

    @property
    def state_symbol(self) -> np.ndarray:
        """The symbol of each state, an int array of shape `(N,)`."""
        return np.repeat(np.arange(self.n_obs), self.n_clones)


class CHMM(AbstractCHMM):
    """An action-conditioned cloned hidden Markov model.

    Symbol `k` (an observation id) owns `n_clones[k]` hidden states, its *clones*,
    numbered `loc[k]:loc[k + 1]` with `loc = cumsum([0] + n_clones)`; there are
    `N = sum(n_clones)` states in all. A clone emits only its own symbol, so the
    emission model is fixed and all learning happens in the action-conditioned
    transition tensor

    `T[u, i, j] = P(z[t + 1] = j | z[t] = i, a[t] = u)`,

    each row normalised over all `N` destinations (a row of zeros is allowed: a
    clone never left under that action). `Pi[i] = P(z[0] = i)` is the initial
    distribution, uniform over all `N` states unless given.

    The model is a pytree: `T` and `Pi` are its arrays, `n_clones` a static
    field. Functions of this subpackage take it as their first argument
    (`log_likelihood(model, x, a)`, `em(model, x, a, n_iter=...)`, ...).

    **Example:**

    ```python
    import jax.random as jr
    from eqx_models.chmm import CHMM, log_likelihood

    model = CHMM.random((3, 1, 2), n_actions=4, key=jr.key(0))
    model.T.shape  # (4, 6, 6)
    ```
    """

    n_clones: tuple[int, ...] = eqx.field(static=True)
    T: Float[Array, "n_actions n_states n_states"]
    Pi: Float[Array, " n_states"]

    def __init__(
        self,
        n_clones: Sequence[int] | np.ndarray | Array,
        T: Float[ArrayLike, "n_actions n_states n_states"],
        Pi: Float[ArrayLike, " n_states_pi"] | None = None,
    ):
        """**Arguments:**

        - `n_clones`: the number of clones of each symbol, a sequence of positive
            ints of length `n_obs`.
        - `T`: the transition tensor, shape `(n_actions, N, N)` with
            `N = sum(n_clones)`; every row sums to 1 or is all zeros.
        - `Pi`: the initial state distribution, shape `(N,)`; uniform if omitted.

        **Raises:**

        `ValueError` if the shapes disagree with `n_clones`, if `T` is not
        row-stochastic or `Pi` not a distribution (checked at once for concrete
        arrays and with `eqx.error_if` under `jit`); `TypeError` for a non-integer
        or traced `n_clones`.
        """
        fn = "CHMM"
        self.n_clones = _as_clone_counts(fn, n_clones)
        T = jnp.asarray(T)
        if not jnp.issubdtype(T.dtype, jnp.floating):
            raise TypeError(f"{fn}: `T` must be a floating array, got {T.dtype}.")
        n_states = sum(self.n_clones)
        if T.ndim != 3 or T.shape[1:] != (n_states, n_states):
            raise ValueError(
                f"{fn}: `T` must have shape (n_actions, {n_states}, {n_states}) for "
                f"n_clones={list(self.n_clones)} (N = {n_states}), got {T.shape}."
            )
        if T.shape[0] < 1:
            raise ValueError(f"{fn}: `T` needs at least one action, got {T.shape}.")
        Pi = initial_distribution(fn, Pi, n_states, T.dtype)
        # A row of zeros is a clone never left under that action.
        self.T = check_probabilities(fn, "T", T, allow_zero=True)
        self.Pi = check_probabilities(fn, "Pi", Pi)

    @property
    def n_actions(self) -> int:
        """The number of actions (the leading axis of `T`)."""
        return self.T.shape[0]

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of `T`."""
        return self.T.dtype

    @classmethod
    @typechecked
    def random(
        cls,
        n_clones: Sequence[int] | np.ndarray | Array,
        n_actions: int,
        *,
        key: PRNGKeyArray,
        pseudocount: float = 0.0,
        dtype=None,
    ) -> "CHMM":
        """A random model: counts drawn uniformly from `[0, 1)`, plus `pseudocount`,
        normalised over each row (the initialisation of the original CSCG code), and a
        uniform `Pi`.

        **Arguments:**

        - `n_clones`: clones per symbol, as for `CHMM`.
        - `n_actions`: the number of actions.
        - `key`: a JAX PRNG key.
        - `pseudocount`: a non-negative number added to every count.
        - `dtype`: a floating dtype; by default float32 (float64 under
            `jax_enable_x64`).

        **Returns:**

        A `CHMM`.

        **Raises:**

        As for `CHMM`; `TypeError`/`ValueError` if `n_actions` is not a positive
        integer or `pseudocount` is negative, NaN or infinite.
        """
        fn = "CHMM.random"
        counts = _as_clone_counts(fn, n_clones)
        check_size(fn, "n_actions", n_actions)
        check_in_range(fn, "pseudocount", pseudocount, low=0)
        n_states = sum(counts)
        dtype = jnp.zeros((), dtype if dtype is not None else float).dtype
        C = jr.uniform(key, (n_actions, n_states, n_states), dtype)
        T = _normalise_rows(C + jnp.asarray(pseudocount, dtype))
        return cls(counts, T)

    @classmethod
    def from_logits(
        cls,
        n_clones: Sequence[int] | np.ndarray | Array,
        logits: Float[ArrayLike, "n_actions n_states n_states"],
        Pi: Float[ArrayLike, " n_states_pi"] | None = None,
    ) -> "CHMM":
        """A model whose transition rows are `softmax(logits)`: the parameterisation
        for gradient-based training (every `T` it gives is row-stochastic, and
        gradients flow to `logits`).

        **Arguments:**

        - `n_clones`: clones per symbol, as for `CHMM`.
        - `logits`: unnormalised log-transition scores, shape `(n_actions, N, N)`;
            `-inf` entries give exact zeros.
        - `Pi`: as for `CHMM`.

        **Returns:**

        A `CHMM` with `T = jax.nn.softmax(logits, axis=-1)`.
        """
        T = jax.nn.softmax(jnp.asarray(logits), axis=-1)
        return cls(n_clones, T, Pi)
