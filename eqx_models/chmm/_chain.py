"""The internal representation every inference routine works on.

A sequence of length `T` under a `CHMM` is a product of step matrices: with
`v0 = Pi * w[0]` and `B[t] = T[a[t-1]] * w[t][None, :]` for `t >= 1`, the likelihood is
`v0 @ B[1] @ ... @ B[T-1] @ 1`, where `w[t]` weighs each state by the evidence for it
at step `t`. With hard observation ids only the clones of `x[t]` have non-zero weight,
so every `B[t]` is zero outside the `(x[t-1], x[t])` block and the chain is stored in
block-local coordinates of width `M = max(n_clones)`.

`Chain.src` holds candidate step matrices ("slabs"); step `t` takes the `S x S` window
of slab `pos[t-1, 0]` at row `pos[t-1, 1]` and column `pos[t-1, 2]`. The last slab is
an identity, used for the padded tail of a sequence shorter than its batch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from transforms.validation import (
    check_choice,
    check_ids,
    check_in_range,
    check_probabilities,
    Checks,
)

from ._model import AbstractCHMM, CHMM, clone_table
from ._sparse import check_allowed, SparseCHMM


class Chain(NamedTuple):
    # Candidate step matrices; the last one is an identity.
    src: Float[Array, "n_slabs R R"]
    # (slab, row, column) of the window used at steps 1..T-1.
    pos: Int[Array, "steps 3"]
    # Initial weights (prior only; the evidence of step 0 is `psi[0]`).
    pi0: Float[Array, " S"]
    # Per-step log evidence over the S slots, or None when all weights are one.
    psi: Float[Array, "T S"] | None
    # The slots in use at the last step (their weights when `psi` is None).
    last: Float[Array, " S"]
    # Global state id of each slot at each step (`N` for an unused slot), or None
    # when the slots are the global states themselves.
    slots: Int[Array, "T S"] | None

    @property
    def size(self) -> int:
        return self.pi0.shape[0]

    @property
    def length(self) -> int:
        return self.pos.shape[0] + 1


def _use_blocks(n_clones: tuple[int, ...]) -> bool:
    # Pre-gathering every (symbol, symbol) block costs (K * M)^2 per action against
    # (N + M)^2 for a padded copy of T; with very uneven clone counts the blocks
    # would take much more memory than T itself.
    n_obs, width, n_states = len(n_clones), max(n_clones), sum(n_clones)
    return (n_obs * width) ** 2 <= 2 * (n_states + width) ** 2


def _steps_in_use(length: Int[Array, ""] | None, n: int) -> Bool[Array, " n"] | None:
    """Whether steps 1..n (the transitions) lie inside a sequence of `length`."""
    if length is None:
        return None
    return jnp.arange(1, n + 1) < length


def _slab_chain(
    blocks: Float[Array, "n_slabs M M"],
    slab: Int[Array, " steps"],
    in_use: Bool[Array, " steps"] | None,
    pi0: Float[Array, " M"],
    last: Float[Array, " M"],
    slots: Int[Array, "T M"],
) -> Chain:
    """A chain whose step `t` is the whole block `blocks[slab[t - 1]]`; padding steps
    (outside `in_use`) take the identity slab appended last."""
    width = blocks.shape[-1]
    src = jnp.concatenate([blocks, jnp.eye(width, dtype=blocks.dtype)[None]])
    if in_use is not None:
        slab = jnp.where(in_use, slab, src.shape[0] - 1)
    zeros = jnp.zeros(slab.shape, jnp.int32)
    pos = jnp.stack([slab.astype(jnp.int32), zeros, zeros], axis=-1)
    return Chain(src, pos, pi0, None, last, slots)


def hard_chain(
    model: AbstractCHMM,
    x: Int[Array, " T"],
    a: Int[Array, " T"],
    length: Int[Array, ""] | None = None,
) -> Chain:
    """The block-sparse chain of a sequence of observation ids.

    `length`, if given, marks steps from `length` on as padding (identity steps).
    """
    n_clones = model.n_clones
    n_actions, n_states = model.n_actions, model.n_states
    n_obs, width = model.n_obs, max(n_clones)
    dtype = model.dtype
    table, used = clone_table(n_clones)
    table_j, used_j = jnp.asarray(table), jnp.asarray(used, dtype)
    steps = x.shape[0] - 1
    in_use = _steps_in_use(length, steps)
    pi_ext = jnp.concatenate([model.Pi, jnp.zeros((1,), dtype)])
    pi0 = pi_ext[table_j[x[0]]]
    last = used_j[x[-1]]
    slots = table_j[x]
    if isinstance(model, SparseCHMM):
        # A disallowed step reads an all-zero block (probability zero); the entry
        # points refuse such sequences before they get here.
        blocks = jnp.concatenate([model.blocks, jnp.zeros((1, width, width), dtype)])
        slab = model.index[a[:-1], x[:-1], x[1:]]
        slab = jnp.where(slab < 0, model.n_blocks, slab)
        return _slab_chain(blocks, slab, in_use, pi0, last, slots)
    assert isinstance(model, CHMM)
    if _use_blocks(n_clones):
        T_ext = jnp.pad(model.T, ((0, 0), (0, 1), (0, 1)))
        blocks = T_ext[:, table_j[:, None, :, None], table_j[None, :, None, :]]
        blocks = blocks.reshape(n_actions * n_obs * n_obs, width, width)
        slab = (a[:-1] * n_obs + x[:-1]) * n_obs + x[1:]
        return _slab_chain(blocks, slab, in_use, pi0, last, slots)
    # Uneven clone counts: windows of a padded copy of T, masked to the clones in use.
    # The padding keeps every window inside the array (no clamped slices).
    loc = jnp.asarray(np.concatenate([[0], np.cumsum(n_clones)])[:-1], jnp.int32)
    size = n_states + width
    T_pad = jnp.pad(model.T, ((0, 0), (0, width), (0, width)))
    src = jnp.concatenate([T_pad, jnp.eye(size, dtype=dtype)[None]])
    action = a[:-1].astype(jnp.int32)
    if in_use is not None:
        action = jnp.where(in_use, action, n_actions)
    pos = jnp.stack([action, loc[x[:-1]], loc[x[1:]]], axis=-1)
    psi = jnp.where(used_j[x] > 0, jnp.zeros((), dtype), -jnp.inf)
    return Chain(src, pos, pi0, psi, last, slots)


def dense_chain(
    model: CHMM,
    log_weights: Float[Array, "T N"],
    a: Int[Array, " T"],
    length: Int[Array, ""] | None = None,
) -> Chain:
    """The dense chain of per-state log evidence (soft observations, emissions)."""
    n_actions, n_states = model.n_actions, model.n_states
    dtype = model.T.dtype
    steps = log_weights.shape[0] - 1
    src = jnp.concatenate([model.T, jnp.eye(n_states, dtype=dtype)[None]])
    action = a[:-1].astype(jnp.int32)
    psi = log_weights.astype(dtype)
    in_use = _steps_in_use(length, steps)
    if in_use is not None:
        action = jnp.where(in_use, action, n_actions)
        psi = psi.at[1:].set(jnp.where(in_use[:, None], psi[1:], 0))
    zeros = jnp.zeros((steps,), jnp.int32)
    pos = jnp.stack([action, zeros, zeros], axis=-1)
    last = jnp.ones((n_states,), dtype)
    return Chain(src, pos, model.Pi, psi, last, None)


def state_log_weights(
    model: CHMM,
    x: Int[Array, " T"] | Float[Array, "T n_obs"],
    emissions: Float[Array, "N n_obs"] | None,
) -> Float[Array, "T N"]:
    """Per-state log evidence `[T, N]` from symbol evidence and/or emissions."""
    dtype = model.T.dtype
    symbol = jnp.asarray(model.state_symbol)
    if emissions is None:
        # Soft evidence: every clone of symbol k is weighted by the evidence for k.
        return x.astype(dtype)[:, symbol]
    emissions = emissions.astype(dtype)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.log(emissions.T[x])
    evidence = x.astype(dtype)
    top = lax.stop_gradient(jnp.max(evidence, axis=-1, keepdims=True))
    top = jnp.where(jnp.isfinite(top), top, 0)
    weights = jnp.matmul(
        jnp.exp(evidence - top), emissions.T, precision=lax.Precision.HIGHEST
    )
    return jnp.log(weights) + top


def make_chain(
    model: AbstractCHMM,
    x: Int[Array, " T"] | Float[Array, "T n_obs"],
    a: Int[Array, " T"],
    emissions: Float[Array, "N n_obs"] | None = None,
    length: Int[Array, ""] | None = None,
) -> Chain:
    if emissions is None and jnp.issubdtype(x.dtype, jnp.integer):
        return hard_chain(model, x, a, length)
    # Soft evidence and emissions: `check_inputs` admits only a dense model here.
    assert isinstance(model, CHMM)
    return dense_chain(model, state_log_weights(model, x, emissions), a, length)


def to_states(chain: Chain, values: Float[Array, "T S"], n_states: int) -> Array:
    """Block-local per-step values `[T, S]` as global `[T, N]` (zero elsewhere)."""
    if chain.slots is None:
        return values
    out = jnp.zeros((values.shape[0], n_states + 1), values.dtype)
    rows = jnp.arange(values.shape[0])[:, None]
    return out.at[rows, chain.slots].set(values)[:, :n_states]


def slot_states(chain: Chain, index: Int[Array, " T"]) -> Int[Array, " T"]:
    """Global state ids of per-step slot indices."""
    if chain.slots is None:
        return index
    return jnp.take_along_axis(chain.slots, index[:, None], axis=1)[:, 0]


def _repad(x, a, length):
    """A sequence padded past `length`: `x` repeats its last real observation and
    `a` is zero from `a[length - 1]` on (unused), so that whatever the padding held
    (even ids out of range) passes the checks and the padded steps are identities."""
    x, a = jnp.asarray(x), jnp.asarray(a)
    t = jnp.arange(x.shape[0])
    inside = t < length
    if x.ndim == 2:
        inside = inside[:, None]
    x = jnp.where(inside, x, x[jnp.asarray(length) - 1])
    return x, jnp.where(t < length - 1, a, jnp.zeros((), a.dtype))


def _is_array(v) -> bool:
    return isinstance(v, (np.ndarray, jax.Array))


def well_formed(model, x, a, *, allow_evidence: bool = True) -> bool:
    """Whether `(model, x, a)` pass the structural checks of `check_inputs` (types,
    dtypes, shapes), so that an eager precheck can read their values: a malformed
    input is left to the entry point's own checks, which report it in their order.
    """
    if not (isinstance(model, AbstractCHMM) and _is_array(x) and _is_array(a)):
        return False
    if not (jnp.issubdtype(a.dtype, jnp.integer) and a.ndim == 1):
        return False
    if a.shape[0] < 1 or x.shape[:1] != a.shape:
        return False
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.ndim == 1
    return (
        allow_evidence
        and isinstance(model, CHMM)
        and jnp.issubdtype(x.dtype, jnp.floating)
        and x.ndim == 2
        and x.shape[1] == model.n_obs
    )


def well_formed_emissions(model: AbstractCHMM, emissions) -> bool:
    """Whether `emissions` is a floating `(N, n_obs)` array (see `well_formed`)."""
    return (
        _is_array(emissions)
        and jnp.issubdtype(emissions.dtype, jnp.floating)
        and emissions.shape == (model.n_states, model.n_obs)
    )


def check_inputs(
    fn: str,
    model: AbstractCHMM,
    x,
    a,
    emissions=None,
    *,
    checks: Checks,
    allow_evidence: bool = True,
    length=None,
) -> tuple[Array, Array, Array | None]:
    """Trace-time shape/dtype checks of `(x, a, emissions)`; their value checks
    (ids and actions in range, finite evidence) are added to `checks`.

    Returns `x`, `a` and `emissions` as JAX arrays.
    """
    if not isinstance(model, AbstractCHMM):
        raise TypeError(
            f"{fn}: `model` must be a CHMM or a SparseCHMM, got {type(model).__name__}."
        )
    if isinstance(model, SparseCHMM) and (
        emissions is not None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)
    ):
        # Soft evidence and emissions spread every step over all N states: there
        # is no block structure left to exploit.
        raise TypeError(
            f"{fn}: a SparseCHMM takes integer observation ids only (no soft "
            "evidence, no `emissions`); convert it with `model.to_dense()`."
        )
    x, a = jnp.asarray(x), jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{fn}: `a` must be an integer array, got dtype {a.dtype}.")
    if a.ndim != 1:
        raise ValueError(f"{fn}: `a` must be 1-D (one sequence), got shape {a.shape}.")
    if jnp.issubdtype(x.dtype, jnp.integer):
        if x.ndim != 1:
            raise ValueError(
                f"{fn}: observation ids `x` must be 1-D (one sequence; use jax.vmap "
                f"for a batch), got shape {x.shape}."
            )
    elif jnp.issubdtype(x.dtype, jnp.floating):
        if not allow_evidence:
            raise TypeError(
                f"{fn}: `x` must be integer observation ids here, got dtype {x.dtype}."
            )
        if x.ndim != 2 or x.shape[1] != model.n_obs:
            raise ValueError(
                f"{fn}: soft evidence `x` must have shape (T, n_obs) = (T, "
                f"{model.n_obs}), got {x.shape}."
            )
    else:
        raise TypeError(
            f"{fn}: `x` must be integer ids or floating log-evidence, got {x.dtype}."
        )
    if x.shape[0] != a.shape[0]:
        raise ValueError(
            f"{fn}: `x` and `a` must have the same length (a[t] is the action taken "
            f"after x[t]); got {x.shape[0]} and {a.shape[0]}."
        )
    if x.shape[0] < 1:
        raise ValueError(f"{fn}: the sequence is empty.")
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = check_ids(fn, "x", x, model.n_obs, checks=checks, upper_name="n_obs")
    else:
        # -inf is a symbol ruled out; NaN and +inf have no meaning.
        x = check_in_range(
            fn,
            "x",
            x,
            high=jnp.inf,
            inclusive=(True, False),
            finite=False,
            checks=checks,
        )
    # a[-1] is unused: any placeholder is accepted there.
    used = jnp.arange(a.shape[0]) < a.shape[0] - 1
    a = check_ids(
        fn,
        "a[:-1]",
        a,
        model.n_actions,
        where=used,
        checks=checks,
        upper_name="n_actions",
    )
    if isinstance(model, SparseCHMM):
        # Padding steps (from `length` on) are identities, never looked up.
        steps = None if length is None else jnp.arange(x.shape[0] - 1) < length - 1
        check_allowed(fn, model, x, a, steps, checks)
    if emissions is not None:
        assert isinstance(model, CHMM)
        emissions = check_emissions(fn, model, emissions, checks)
    return x, a, emissions


def check_emissions(fn: str, model: CHMM, emissions, checks: Checks) -> Array:
    """An `(N, n_obs)` emission matrix whose rows are distributions."""
    emissions = jnp.asarray(emissions)
    if emissions.shape != (model.n_states, model.n_obs):
        raise ValueError(
            f"{fn}: `emissions` must have shape (N, n_obs) = ({model.n_states}, "
            f"{model.n_obs}), got {emissions.shape}."
        )
    return check_probabilities(fn, "emissions", emissions, checks=checks)


def check_method(fn: str, method: str) -> None:
    check_choice(fn, "method", method, ("auto", "scan", "parallel"))


def window(src: Array, p: Int[Array, " 3"], size: int) -> Array:
    return lax.dynamic_slice(src, (p[0], p[1], p[2]), (1, size, size))[0]


def evidence_weights(
    psi: Float[Array, "T S"],
) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """`w = exp(psi - o)` with the per-step offset `o = max(psi)` (0 if all -inf).

    The offset is a constant for differentiation: the likelihood is shift-invariant
    per step (`lnL(psi + c) = lnL(psi) + c`), and with the offset held fixed the
    gradient is exactly the posterior.
    """
    offset = lax.stop_gradient(jnp.max(psi, axis=-1))
    offset = jnp.where(jnp.isfinite(offset), offset, 0)
    return jnp.exp(psi - offset[:, None]), offset


def safe_log(v: Array) -> Array:
    """`log(v)` with `-inf` at zeros and no NaN in its gradient."""
    positive = v > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, v, 1)), -jnp.inf)


def safe_divide(v: Array, d: Array) -> Array:
    return v / jnp.where(d > 0, d, 1)
