"""Block-sparse transitions: only the allowed `(action, symbol, next symbol)` blocks.

A clone emits only its own symbol, so a transition `i -> j` under action `u` can only
be used where the data move from `symbol(i)` to `symbol(j)` under `u`. With many
symbols most of the `K^2` symbol pairs never follow each other, and the dense
`(n_actions, N, N)` tensor is mostly zeros that are never read. `SparseCHMM` stores
the allowed blocks as one stacked array `(n_blocks, M, M)`, `M = max(n_clones)`, with
their `(action, symbol, next symbol)` keys.

Heterogeneous clone counts are padded: block `b` of symbols `(k, k')` uses its top-left
`n_clones[k] x n_clones[k']` corner and holds exact zeros elsewhere. One stacked
array keeps every pass a gather of equal-sized windows, the layout the sequential and
parallel passes already use for equal clone counts (`_chain.py`); the price is
memory for the padding, `n_blocks * M^2` instead of `sum n_clones[k] n_clones[k']`,
which matters only for very uneven clone counts.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_in_range,
    check_probabilities,
    check_size,
    fail,
    is_traced,
    stochastic_tolerance,
    typechecked,
)

from ._model import (
    _as_clone_counts,
    _normalise_rows,
    AbstractCHMM,
    CHMM,
    clone_table,
    initial_distribution,
)


def _as_keys(fn: str, arg: str, keys, n_actions: int, n_obs: int) -> np.ndarray:
    """Allowed triples as a sorted, duplicate-free `(n_blocks, 3)` int32 array."""
    if is_traced(keys):
        raise TypeError(
            f"{fn}: `{arg}` sets array shapes and must be concrete (a NumPy array or "
            "a sequence of (action, symbol, next symbol) triples), not traced."
        )
    keys = np.asarray(keys)
    if keys.size == 0:
        keys = keys.reshape(0, 3)
    if keys.ndim != 2 or keys.shape[1] != 3:
        raise fail(
            fn,
            arg,
            "an array of (action, symbol, next symbol) rows, shape (n, 3)",
            f"shape {keys.shape}",
        )
    if not np.issubdtype(keys.dtype, np.integer):
        raise fail(fn, arg, "integer triples", f"dtype {keys.dtype}", TypeError)
    for column, (name, upper) in enumerate(
        (("action", n_actions), ("symbol", n_obs), ("next symbol", n_obs))
    ):
        bad = (keys[:, column] < 0) | (keys[:, column] >= upper)
        if np.any(bad):
            row = int(np.argmax(bad))
            raise fail(
                fn,
                f"{arg}[{row}, {column}]",
                f"a {name} in [0, {upper})",
                repr(int(keys[row, column])),
            )
    return np.unique(keys.astype(np.int32), axis=0).reshape(-1, 3)


def _index_table(keys: np.ndarray, n_actions: int, n_obs: int) -> np.ndarray:
    index = np.full((n_actions, n_obs, n_obs), -1, np.int32)
    index[keys[:, 0], keys[:, 1], keys[:, 2]] = np.arange(keys.shape[0])
    return index


def _block_mask(n_clones: tuple[int, ...], keys) -> Bool[Array, "n_blocks M M"]:
    """Which entries of each block are real transitions (not padding)."""
    _, used = clone_table(n_clones)
    used = jnp.asarray(used)
    keys = jnp.asarray(keys)
    return used[keys[:, 1]][:, :, None] & used[keys[:, 2]][:, None, :]


def normalise_blocks(
    blocks: Float[Array, "n_blocks M M"],
    keys: Int[Array, "n_blocks 3"],
    n_actions: int,
    n_obs: int,
) -> Float[Array, "n_blocks M M"]:
    """Divide each row by its sum over all the blocks of its `(action, symbol)`;
    rows summing to zero stay zero (the M-step of the dense `_normalise_rows`)."""
    group = keys[:, 0] * n_obs + keys[:, 1]
    totals = jax.ops.segment_sum(blocks.sum(-1), group, num_segments=n_actions * n_obs)[
        group
    ]
    return blocks / jnp.where(totals > 0, totals, 1)[:, :, None]


class SparseCHMM(AbstractCHMM):
    """A cloned HMM whose transitions are stored as the allowed blocks only.

    The same model as [`eqx_models.chmm.CHMM`][] (same conventions, same numbers
    from every routine), with `T[u, clones(k), clones(k')]` kept only for the
    allowed triples `keys[b] = (u, k, k')`, as `blocks[b]` (top-left `n_clones[k] x
    n_clones[k']` corner; the padding up to `M = max(n_clones)` is exactly zero).
    All other transitions have probability zero. A row of `T` (clone `i`, action
    `u`) is spread over the blocks with key `(u, symbol(i), .)` and sums to 1 over
    them, or is all zeros.

    Memory is `n_blocks * M^2` for the blocks plus an int32 lookup table of
    `n_actions * n_obs^2` entries (the block of each triple, `-1` if not allowed):
    for 100 symbols of 100 clones, 1 action and 2 000 allowed pairs, 80 MB in
    float32 where the dense tensor takes 400 MB.

    A sequence that uses a transition outside the allowed set has probability
    zero; the inference and learning routines refuse it with a `ValueError` that
    names the position (eagerly for concrete inputs, by `eqx.error_if` under
    `jit`).

    **Example:**

    ```python
    keys = seen_transitions(x, a)  # the triples the data use
    model = SparseCHMM.random(n_clones, n_actions=4, allowed=keys, key=jr.key(0))
    model, curve = em(model, x, a, n_iter=20)
    ```
    """

    n_clones: tuple[int, ...] = eqx.field(static=True)
    blocks: Float[Array, "n_blocks M M"]
    keys: Int[Array, "n_blocks 3"]
    index: Int[Array, "n_actions n_obs n_obs"]
    Pi: Float[Array, " n_states"]

    def __init__(
        self,
        n_clones: Sequence[int] | np.ndarray | Array,
        blocks: Float[ArrayLike, "n_blocks M M"],
        keys: Int[ArrayLike, "n_blocks 3"] | Sequence[Sequence[int]],
        n_actions: int,
        Pi: Float[ArrayLike, " n_states_pi"] | None = None,
    ):
        """**Arguments:**

        - `n_clones`: the number of clones of each symbol, as for `CHMM`.
        - `blocks`: the allowed blocks, shape `(n_blocks, M, M)` with `M =
            max(n_clones)`; entries past the clone counts of a block's symbols must
            be zero.
        - `keys`: the `(action, symbol, next symbol)` of each block, an int array of
            shape `(n_blocks, 3)` without duplicates, concrete (it sets the lookup
            table). Blocks are stored in the sorted order of their keys.
        - `n_actions`: the number of actions.
        - `Pi`: the initial state distribution, shape `(N,)`; uniform if omitted.

        **Raises:**

        `ValueError` if a shape disagrees with `n_clones`, a key is out of range or
        repeated, a padding entry is not zero, the rows over the blocks of each
        `(action, symbol)` do not sum to 1 or 0 (within `stochastic_tolerance`), or
        `Pi` is not a distribution; `TypeError` for non-integer or traced
        `n_clones`/`keys`, or non-floating `blocks`.
        """
        fn = "SparseCHMM"
        self.n_clones = _as_clone_counts(fn, n_clones)
        check_size(fn, "n_actions", n_actions)
        n_obs, width = len(self.n_clones), max(self.n_clones)
        n_states = sum(self.n_clones)
        raw_keys = np.asarray(keys) if not is_traced(keys) else keys
        sorted_keys = _as_keys(fn, "keys", raw_keys, n_actions, n_obs)
        if sorted_keys.shape[0] != np.shape(raw_keys)[0]:
            raise fail(fn, "keys", "distinct triples", "a repeated triple")
        blocks = jnp.asarray(blocks)
        if not jnp.issubdtype(blocks.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: `blocks` must be a floating array, got {blocks.dtype}."
            )
        if blocks.shape != (sorted_keys.shape[0], width, width):
            raise fail(
                fn,
                "blocks",
                f"shape (n_blocks, M, M) = ({sorted_keys.shape[0]}, {width}, {width})",
                f"shape {blocks.shape}",
            )
        order = np.lexsort(np.asarray(raw_keys).reshape(-1, 3).T[::-1])
        if sorted_keys.shape[0] and not np.array_equal(order, np.arange(len(order))):
            blocks = blocks[order]
        self.keys = jnp.asarray(sorted_keys)
        self.index = jnp.asarray(_index_table(sorted_keys, n_actions, n_obs))
        Pi = initial_distribution(fn, Pi, n_states, blocks.dtype)
        self.blocks = _check_blocks(fn, self.n_clones, blocks, sorted_keys, n_actions)
        self.Pi = check_probabilities(fn, "Pi", Pi)

    @property
    def n_actions(self) -> int:
        """The number of actions."""
        return self.index.shape[0]

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of `blocks`."""
        return self.blocks.dtype

    @property
    def n_blocks(self) -> int:
        """The number of allowed `(action, symbol, next symbol)` blocks."""
        return self.keys.shape[0]

    @property
    def mask(self) -> Bool[Array, "n_blocks M M"]:
        """Which entries of `blocks` are transitions between clones (not padding)."""
        return _block_mask(self.n_clones, self.keys)

    def to_dense(self) -> CHMM:
        """The same model as a dense [`eqx_models.chmm.CHMM`][] (zeros outside the
        allowed blocks).

        **Returns:**

        A `CHMM` with `T` of shape `(n_actions, N, N)`.

        **Raises:**

        Nothing beyond the checks of `CHMM`.
        """
        return CHMM(self.n_clones, dense_transitions(self), self.Pi)

    @classmethod
    def from_dense(
        cls,
        model: CHMM,
        allowed: str | Int[ArrayLike, "n_allowed 3"] = "nonzero",
    ) -> "SparseCHMM":
        """The blocks of a dense model.

        **Arguments:**

        - `model`: a dense [`eqx_models.chmm.CHMM`][] (concrete arrays).
        - `allowed`: which blocks to keep: `"all"` (every triple; the same model),
            `"nonzero"` (the blocks holding any probability; the same model), or
            an int array of `(action, symbol, next symbol)` triples (e.g. from
            [`eqx_models.chmm.seen_transitions`][]). Probability outside the kept
            blocks is dropped and each row renormalised over what is kept (a row
            left with nothing becomes zeros).

        **Returns:**

        A `SparseCHMM` with the same `Pi`.

        **Raises:**

        `ValueError` for an unknown `allowed` string or out-of-range triples;
        `TypeError` if `model` is not a `CHMM` or its `T` is traced.
        """
        fn = "SparseCHMM.from_dense"
        if not isinstance(model, CHMM):
            raise fail(fn, "model", "a CHMM", type(model).__name__, TypeError)
        if is_traced(model.T):
            raise TypeError(
                f"{fn}: `model.T` must be concrete (the allowed blocks set shapes)."
            )
        n_actions, n_obs = model.n_actions, model.n_obs
        table, _ = clone_table(model.n_clones)
        T_ext = np.pad(np.asarray(model.T), ((0, 0), (0, 1), (0, 1)))
        every = T_ext[:, table[:, None, :, None], table[None, :, None, :]]
        if isinstance(allowed, str):
            if allowed not in ("all", "nonzero"):
                raise fail(
                    fn,
                    "allowed",
                    '"all", "nonzero" or an array of triples',
                    repr(allowed),
                )
            nonzero = every.reshape(n_actions, n_obs, n_obs, -1).any(-1)
            chosen = np.ones_like(nonzero) if allowed == "all" else nonzero
            keys = np.argwhere(chosen).astype(np.int32).reshape(-1, 3)
        else:
            keys = _as_keys(fn, "allowed", allowed, n_actions, n_obs)
        blocks = jnp.asarray(every[keys[:, 0], keys[:, 1], keys[:, 2]])
        blocks = normalise_blocks(blocks, jnp.asarray(keys), n_actions, n_obs)
        return cls(model.n_clones, blocks, keys, n_actions, model.Pi)

    @classmethod
    @typechecked
    def random(
        cls,
        n_clones: Sequence[int] | np.ndarray | Array,
        n_actions: int,
        *,
        key: PRNGKeyArray,
        allowed: Int[ArrayLike, "n_allowed 3"] | None = None,
        pseudocount: float = 0.0,
        dtype=None,
    ) -> "SparseCHMM":
        """A random model over the allowed blocks: counts uniform in `[0, 1)` plus
        `pseudocount` on every real entry, normalised over each row (as
        `CHMM.random`).

        **Arguments:**

        - `n_clones`, `n_actions`, `key`, `pseudocount`, `dtype`: as for
            [`eqx_models.chmm.CHMM.random`][].
        - `allowed`: the `(action, symbol, next symbol)` triples to keep, an int
            array of shape `(n, 3)` (e.g. from
            [`eqx_models.chmm.seen_transitions`][]); every triple if omitted.

        **Returns:**

        A `SparseCHMM` with a uniform `Pi`.

        **Raises:**

        As for `SparseCHMM` and `CHMM.random`.
        """
        fn = "SparseCHMM.random"
        counts = _as_clone_counts(fn, n_clones)
        check_size(fn, "n_actions", n_actions)
        check_in_range(fn, "pseudocount", pseudocount, low=0)
        n_obs, width = len(counts), max(counts)
        if allowed is None:
            grid = np.indices((n_actions, n_obs, n_obs)).reshape(3, -1).T
            keys = grid.astype(np.int32)
        else:
            keys = _as_keys(fn, "allowed", allowed, n_actions, n_obs)
        dtype = jnp.zeros((), dtype if dtype is not None else float).dtype
        C = jr.uniform(key, (keys.shape[0], width, width), dtype)
        C = jnp.where(_block_mask(counts, keys), C + jnp.asarray(pseudocount, dtype), 0)
        blocks = normalise_blocks(C, jnp.asarray(keys), n_actions, n_obs)
        return cls(counts, blocks, keys, n_actions)


def _check_blocks(fn, n_clones, blocks, keys, n_actions):
    """Non-negative finite blocks, zero padding, rows summing to 1 or 0."""
    if keys.shape[0] == 0:
        return blocks
    n_obs = len(n_clones)
    mask = _block_mask(n_clones, keys)
    blocks = check_in_range(fn, "blocks", blocks, low=0)
    tol = stochastic_tolerance(blocks.dtype)
    keys_j = jnp.asarray(keys)
    group = keys_j[:, 0] * n_obs + keys_j[:, 1]
    totals = jax.ops.segment_sum(blocks.sum(-1), group, num_segments=n_actions * n_obs)
    bad_rows = (jnp.abs(totals - 1) > tol) & (totals != 0)
    padding = jnp.any(jnp.where(mask, 0, blocks) != 0)
    if not is_traced(blocks):
        if bool(padding):
            raise fail(
                fn,
                "blocks",
                "zero past the clone counts of each block's symbols",
                "a non-zero padding entry",
            )
        if bool(jnp.any(bad_rows)):
            u, k, m = np.argwhere(np.asarray(bad_rows).reshape(n_actions, n_obs, -1))[0]
            total = float(np.asarray(totals).reshape(n_actions, n_obs, -1)[u, k, m])
            raise fail(
                fn,
                "blocks",
                "rows summing to 1 or 0 over the blocks of each (action, symbol)",
                f"a sum of {total!r} for action {u}, clone {m} of symbol {k}",
            )
        return blocks
    return eqx.error_if(
        blocks,
        padding | jnp.any(bad_rows),
        f"{fn}: `blocks` must have zero padding and rows summing to 1 or 0 over the "
        "blocks of each (action, symbol) (checked at run time).",
    )


def dense_transitions(model: SparseCHMM) -> Float[Array, "n_actions N N"]:
    """The `(n_actions, N, N)` tensor of a sparse model."""
    n_states = model.n_states
    table, _ = clone_table(model.n_clones)
    table = jnp.asarray(table)
    rows = table[model.keys[:, 1]][:, :, None]
    cols = table[model.keys[:, 2]][:, None, :]
    T = jnp.zeros((model.n_actions, n_states + 1, n_states + 1), model.dtype)
    # Padding entries land in the extra row/column, dropped below.
    T = T.at[model.keys[:, 0, None, None], rows, cols].add(model.blocks)
    return T[:, :n_states, :n_states]


def seen_transitions(
    x: Int[ArrayLike, " T"] | Sequence[Int[ArrayLike, " _"]],
    a: Int[ArrayLike, " T"] | Sequence[Int[ArrayLike, " _"]],
) -> Int[np.ndarray, "n_seen 3"]:
    """The `(action, symbol, next symbol)` triples a data set uses: the blocks a
    [`eqx_models.chmm.SparseCHMM`][] needs to fit it.

    **Arguments:**

    - `x`: observation ids, one sequence of shape `(T,)`, a `(batch, T)` array, or a
        list of 1-D sequences; concrete.
    - `a`: actions, in the same form; `a[t]` drives `x[t] -> x[t+1]` and the last
        action of each sequence is unused.

    **Returns:**

    A sorted int32 NumPy array of shape `(n_seen, 3)` without duplicates.

    **Raises:**

    `ValueError` if `x` and `a` differ in shape or number of sequences, or hold
    negative ids; `TypeError` for traced or non-integer arrays.
    """
    fn = "seen_transitions"
    if isinstance(x, (list, tuple)) != isinstance(a, (list, tuple)):
        raise TypeError(
            f"{fn}: give `x` and `a` both as lists of sequences, or both as arrays."
        )
    xs: list
    acts: list
    if isinstance(x, (list, tuple)) and isinstance(a, (list, tuple)):
        xs, acts = list(x), list(a)
    else:
        xs, acts = [np.asarray(x)], [np.asarray(a)]
        if xs[0].ndim == 2:
            xs, acts = list(xs[0]), list(acts[0])
    if len(xs) != len(acts):
        raise fail(fn, "a", f"{len(xs)} sequences (as `x`)", f"{len(acts)}")
    triples = []
    for i, (xi, ai) in enumerate(zip(xs, acts)):
        if is_traced(xi) or is_traced(ai):
            raise TypeError(f"{fn}: `x` and `a` must be concrete arrays.")
        xi, ai = np.asarray(xi), np.asarray(ai)
        for name, v in (("x", xi), ("a", ai)):
            if not np.issubdtype(v.dtype, np.integer):
                raise fail(fn, name, "integer ids", f"dtype {v.dtype}", TypeError)
        if xi.shape != ai.shape or xi.ndim != 1:
            raise fail(
                fn,
                "a",
                f"the shape of `x` {xi.shape} (sequence {i})",
                f"{ai.shape}",
            )
        for name, v in (("x", xi), ("a", ai[:-1])):
            if np.any(v < 0):
                raise fail(
                    fn,
                    name,
                    "non-negative ids",
                    f"{int(v[np.argmax(v < 0)])} (sequence {i})",
                )
        triples.append(np.stack([ai[:-1], xi[:-1], xi[1:]], axis=-1))
    return np.unique(np.concatenate(triples).astype(np.int32), axis=0).reshape(-1, 3)


def check_allowed(
    fn: str,
    model: SparseCHMM,
    x: Int[ArrayLike, "*batch T"],
    a: Int[ArrayLike, "*batch T"],
    where: Bool[ArrayLike, "*batch T_minus_1"] | None,
    checks,
) -> None:
    """Refuse a step `x[t] -> x[t+1]` under `a[t]` outside the allowed blocks,
    naming its position: at once for concrete arrays, else through `checks`."""
    if np.shape(x)[-1] < 2:
        return
    if is_traced(x) or is_traced(a) or is_traced(where) or is_traced(model.index):
        x, a = jnp.asarray(x), jnp.asarray(a)
        block = model.index[a[..., :-1], x[..., :-1], x[..., 1:]]
        bad = block < 0 if where is None else (block < 0) & where
        checks.add(
            bad,
            f"{fn}: `x` uses a transition (a[t], x[t], x[t+1]) outside the allowed "
            "blocks of the SparseCHMM (checked at run time).",
        )
        return
    xv, av, index = np.asarray(x), np.asarray(a), np.asarray(model.index)
    # Out-of-range ids are reported by their own checks.
    if xv.min() < 0 or xv.max() >= model.n_obs:
        return
    actions = np.clip(av[..., :-1], 0, model.n_actions - 1)
    bad = index[actions, xv[..., :-1], xv[..., 1:]] < 0
    if where is not None:
        bad = bad & np.asarray(where)
    if np.any(bad):
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        t = pos[-1]
        at = pos[:-1] + (t,)
        step = (int(av[at]), int(xv[at]), int(xv[pos[:-1] + (t + 1,)]))
        where_text = f"t={t}" if len(pos) == 1 else f"sequence {pos[0]}, t={t}"
        raise fail(
            fn,
            "x",
            "a sequence whose transitions (a[t], x[t], x[t+1]) are allowed blocks of "
            "the SparseCHMM",
            f"{step} at {where_text}",
        )


def transitions(model):
    """The learned array of a model: `T` of a `CHMM`, `blocks` of a `SparseCHMM`.

    Unannotated: `eqx.tree_at` calls it on a model whose leaves are wrappers."""
    return model.blocks if isinstance(model, SparseCHMM) else model.T  # pyright: ignore


def with_transitions(model: AbstractCHMM, values: Array) -> AbstractCHMM:
    """`model` with its learned array (see `transitions`) replaced."""
    return eqx.tree_at(transitions, model, values)


def m_step(model: AbstractCHMM, counts: Array, pseudocount: Array) -> Array:
    """`(counts + pseudocount)` normalised over each row of `T`.

    For a `SparseCHMM` the pseudocount goes to the allowed transitions only (the
    padding stays zero): with every block allowed this is the dense M-step; with
    fewer, a transition outside the blocks keeps probability zero.
    """
    if isinstance(model, SparseCHMM):
        smoothed = jnp.where(model.mask, counts + pseudocount, 0)
        return normalise_blocks(smoothed, model.keys, model.n_actions, model.n_obs)
    assert isinstance(model, CHMM)
    return _normalise_rows(counts + pseudocount)


def path_counts(
    model: AbstractCHMM,
    x: Int[Array, "batch T"],
    actions: Int[Array, "batch T_minus_1"],
    paths: Int[Array, "batch T"],
) -> Array:
    """Transition counts of decoded state paths, in the layout of `transitions`;
    `actions` is `n_actions` at padding steps, which count nothing."""
    dtype = model.dtype
    if isinstance(model, SparseCHMM):
        width = max(model.n_clones)
        loc = jnp.asarray(model.state_loc[:-1], jnp.int32)
        local = paths - loc[x]
        padding = actions >= model.n_actions
        block = model.index[jnp.where(padding, 0, actions), x[:, :-1], x[:, 1:]]
        block = jnp.where(padding | (block < 0), model.n_blocks, block)
        counts = jnp.zeros((model.n_blocks + 1, width, width), dtype)
        counts = counts.at[block, local[:, :-1], local[:, 1:]].add(1)
        return counts[: model.n_blocks]
    n_actions, n_states = model.n_actions, model.n_states
    counts = jnp.zeros((n_actions + 1, n_states, n_states), dtype)
    counts = counts.at[actions, paths[:, :-1], paths[:, 1:]].add(1)
    return counts[:n_actions]


def transition_row(
    model: AbstractCHMM, action: Int[Array, ""], state: Int[Array, ""]
) -> Float[Array, " N"]:
    """`T[action, state, :]`, read from the blocks of a `SparseCHMM` (O(N) work)."""
    if isinstance(model, CHMM):
        return model.T[action, state]
    assert isinstance(model, SparseCHMM)
    width = max(model.n_clones)
    symbol = jnp.asarray(model.state_symbol, jnp.int32)
    local = jnp.arange(model.n_states) - jnp.asarray(model.state_loc[:-1])[symbol]
    block = model.index[action, symbol[state]]
    block = jnp.where(block < 0, model.n_blocks, block)
    padded = jnp.concatenate([model.blocks, jnp.zeros((1, width, width), model.dtype)])
    rows = padded[block, local[state]]
    return rows[symbol, local]
