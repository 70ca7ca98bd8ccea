"""Inference on one sequence: likelihood, filtering, smoothing and Viterbi decoding.

Every public routine checks its arguments, builds a `Chain` from the model and the
sequence, runs one pass of `_passes.py` (or `_decode.py`), and maps the block-local
result back to the `N` states. The numerics live in the chain modules; this layer
only holds the public signatures, their checks and their return types.
"""

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from transforms import pairwise_sum
from transforms.validation import (
    check_ids,
    check_in_range,
    checked_eagerly,
    Checks,
    typechecked,
)

from ._chain import (
    _repad,
    Chain,
    check_inputs,
    check_method,
    make_chain,
    slot_states,
    to_states,
    well_formed,
    well_formed_emissions,
)
from ._decode import viterbi_scan
from ._model import AbstractCHMM
from ._passes import chain_forward, chain_log_likelihood, chain_smooth


def _inputs_checked(fn: str):
    """The eager precheck of an entry point taking `(model, x, a, ..., emissions)`."""

    def precheck(model, x, a, *args, emissions=None, length=None, **kwargs):
        if not well_formed(model, x, a):
            return
        if emissions is not None and not well_formed_emissions(model, emissions):
            emissions = None
        if length is not None:
            if not _well_formed_length(length):
                return
            check_ids(fn, "length", length, x.shape[0] + 1, low=1)
            x, a = _repad(x, a, length)
        check_inputs(fn, model, x, a, emissions, checks=Checks(), length=length)

    return checked_eagerly(precheck)


Observations = Int[Array, " T"] | Float[Array, "T n_obs"]
Actions = Int[Array, " T_actions"]
Emissions = Float[Array, "n_states n_obs"] | None
Length = int | Int[Array, ""] | None


def _well_formed_length(length) -> bool:
    return (isinstance(length, (int, np.integer)) and not isinstance(length, bool)) or (
        isinstance(length, (np.ndarray, jax.Array))
        and length.ndim == 0
        and jnp.issubdtype(length.dtype, jnp.integer)
    )


def _in_length(values: Array, length) -> Array:
    """`values[t]` for `t < length`, zero after."""
    if length is None:
        return values
    inside = jnp.arange(values.shape[0]) < length
    return jnp.where(inside.reshape((-1,) + (1,) * (values.ndim - 1)), values, 0)


class Posteriors(NamedTuple):
    """What [`eqx_models.chmm.posteriors`][] returns (all arrays of one sequence)."""

    log_likelihood: Float[Array, ""]
    """The natural-log likelihood `ln p(x | a)`."""
    log_normalizers: Float[Array, " T"]
    """`ln p(x[t] | x[:t], a)` per step; they sum to `log_likelihood`."""
    filtered: Float[Array, "T n_states"]
    """`p(z[t] | x[:t+1], a)`, shape `(T, N)`."""
    smoothed: Float[Array, "T n_states"]
    """`p(z[t] | x, a)`, shape `(T, N)`."""


def _checked_chain(
    fn: str,
    model: AbstractCHMM,
    x,
    a,
    emissions,
    method: str | None = None,
    length=None,
) -> tuple[Chain, Checks]:
    """The preamble of every public routine: check the arguments (the run-time
    checks are collected in the returned `Checks`) and build the chain."""
    if method is not None:
        check_method(fn, method)
    checks = Checks()
    if length is not None:
        length = check_ids(
            fn,
            "length",
            jnp.asarray(length),
            jnp.shape(x)[0] + 1,
            low=1,
            checks=checks,
        )
        x, a = _repad(x, a, length)
    x, a, emissions = check_inputs(
        fn, model, x, a, emissions, checks=checks, length=length
    )
    return make_chain(model, x, a, emissions, length), checks


@_inputs_checked("log_likelihood")
@eqx.filter_jit
@typechecked
def log_likelihood(
    model: AbstractCHMM,
    x: Observations,
    a: Actions,
    *,
    method: str = "auto",
    emissions: Emissions = None,
    length: Length = None,
) -> Float[Array, ""]:
    """Log-likelihood of an observation sequence given its actions.

    `ln p(x[0], ..., x[T-1] | a)` in natural log, computed block-sparsely: with hard
    observation ids only `T[a[t], clones(x[t]), clones(x[t+1])]` is read at each step.
    The per-step log normalisers (see [`eqx_models.chmm.forward`][]) are summed
    pairwise, so float32 stays accurate over long sequences. Differentiable with
    respect to `model.T`, `model.Pi`, soft evidence `x` and `emissions`.

    **Arguments:**

    - `model`: the `CHMM` or `SparseCHMM`.
    - `x`: the observations: integer ids of shape `(T,)` in `[0, n_obs)`, or soft
        evidence, a float array of shape `(T, n_obs)` of log-evidence per symbol
        (e.g. the log-softmax output of an encoder). With evidence, every clone of
        symbol `k` is weighted by `exp(x[t, k])` and the forward pass is dense over
        all `N` states; one-hot evidence (`log` of a one-hot, with `-inf`) gives
        exactly the result for ids.
    - `a`: actions, integer array of shape `(T,)`; `a[t]` is taken after observing
        `x[t]` and drives `x[t] -> x[t+1]`; `a[-1]` is unused.
    - `method`: `"scan"` (sequential `lax.scan`; the faster on a CPU),
        `"parallel"` (products of step matrices, sequential within blocks of steps
        and all blocks at once, then a product tree across the blocks; on an H100
        67 to 95 times faster at the benchmark's large size, slower to compile) or
        `"auto"` (the default): the parallel strategy on a GPU or TPU backend for
        chains of at most 368 slots whose estimated memory is at most half of the
        device's, the scan otherwise. Both give the same numbers up to rounding.
        Under your own `jax.vmap` the estimate is of one sequence: for a large
        batch, name the method.
    - `emissions`: optional `(N, n_obs)` emission matrix replacing the
        deterministic clone-to-symbol emission (see
        [`eqx_models.chmm.learn_emissions`][]); the pass is then dense.
    - `length`: the number of real steps of a sequence padded to `T` (so that a
        batch of sequences of different lengths can be padded to one shape and
        `jax.vmap`ped with their lengths): steps from `length` on are ignored
        (whatever they hold) and every per-step output is zero there (the Viterbi
        path `-1`). The results equal those of the call on `x[:length]`,
        `a[:length]`. All `T` steps if omitted.

    **Returns:**

    A scalar, `-inf` if the sequence is impossible under the model.

    **Raises:**

    `ValueError`/`TypeError` for wrong shapes, dtypes or `method`; `ValueError` for
    ids or actions out of range, log-evidence holding NaN or `+inf`, or `emissions`
    whose rows are not distributions (non-negative, summing to 1 within the square
    root of the dtype's epsilon): at once when the arrays are concrete, else (under
    an outer `jit`, `vmap` or `grad`) by `eqx.error_if` at run time, as an
    `EquinoxRuntimeError`; the same for a `length` outside `[1, T]`.

    **Example:**

    ```python
    lnL = log_likelihood(model, x, a)
    bits = bits_per_step(lnL, x.shape[0])
    ```
    """
    fn = "log_likelihood"
    chain, checks = _checked_chain(fn, model, x, a, emissions, method, length)
    return checks.guard(chain_log_likelihood(chain, method))


@_inputs_checked("forward")
@eqx.filter_jit
@typechecked
def forward(
    model: AbstractCHMM,
    x: Observations,
    a: Actions,
    *,
    method: str = "auto",
    emissions: Emissions = None,
    length: Length = None,
) -> tuple[Float[Array, " T"], Float[Array, "T n_states"]]:
    """Forward pass: per-step log normalisers and filtered state distributions.

    **Arguments:**

    As for [`eqx_models.chmm.log_likelihood`][].

    **Returns:**

    A tuple `(log_normalizers, filtered)`: `log_normalizers[t] = ln p(x[t] | x[:t],
    a)` of shape `(T,)` (its pairwise sum is the log-likelihood; `log_normalizers[0]`
    is `ln(n_clones[x[0]] / N)` for ids and a uniform `Pi`), and `filtered[t, i] =
    p(z[t] = i | x[:t+1], a)` of shape `(T, N)`, zero outside the clones of `x[t]`
    for ids.

    **Raises:**

    As for [`eqx_models.chmm.log_likelihood`][].
    """
    fn = "forward"
    chain, checks = _checked_chain(fn, model, x, a, emissions, method, length)
    alphas, log_norms = chain_forward(chain, method)
    filtered = to_states(chain, alphas, model.n_states)
    return checks.guard((_in_length(log_norms, length), _in_length(filtered, length)))


@_inputs_checked("backward")
@eqx.filter_jit
@typechecked
def backward(
    model: AbstractCHMM,
    x: Observations,
    a: Actions,
    *,
    method: str = "auto",
    emissions: Emissions = None,
    length: Length = None,
) -> Float[Array, "T n_states"]:
    """Backward pass: normalised backward messages.

    `backward[t, i] ∝ p(x[t:] | z[t] = i, a)` (the evidence of step `t` included),
    normalised to sum to one at each step; for ids it is zero outside the clones of
    `x[t]` (the convention of the original CSCG code).

    **Arguments:**

    As for [`eqx_models.chmm.log_likelihood`][].

    **Returns:**

    An array of shape `(T, N)`.

    **Raises:**

    As for [`eqx_models.chmm.log_likelihood`][].
    """
    fn = "backward"
    chain, checks = _checked_chain(fn, model, x, a, emissions, method, length)
    _, _, us, _ = chain_smooth(chain, method)
    return checks.guard(_in_length(to_states(chain, us, model.n_states), length))


@_inputs_checked("posteriors")
@eqx.filter_jit
@typechecked
def posteriors(
    model: AbstractCHMM,
    x: Observations,
    a: Actions,
    *,
    method: str = "auto",
    emissions: Emissions = None,
    length: Length = None,
) -> Posteriors:
    """Filtered and smoothed state marginals (forward-backward).

    Differentiable (by autodiff through both passes) with respect to `model.T`,
    `model.Pi`, soft evidence `x` and `emissions`.

    **Arguments:**

    As for [`eqx_models.chmm.log_likelihood`][].

    **Returns:**

    A [`eqx_models.chmm.Posteriors`][]: the log-likelihood, the per-step log
    normalisers, `filtered[t] = p(z[t] | x[:t+1], a)` and `smoothed[t] = p(z[t] | x,
    a)`, both of shape `(T, N)`.

    **Raises:**

    As for [`eqx_models.chmm.log_likelihood`][].

    **Example:**

    ```python
    post = posteriors(model, x, a, method="parallel")
    post.smoothed.sum(-1)  # all ones
    ```
    """
    fn = "posteriors"
    chain, checks = _checked_chain(fn, model, x, a, emissions, method, length)
    alphas, log_norms, _, gammas = chain_smooth(chain, method)
    log_norms = _in_length(log_norms, length)
    return checks.guard(
        Posteriors(
            log_likelihood=pairwise_sum(log_norms),
            log_normalizers=log_norms,
            filtered=_in_length(to_states(chain, alphas, model.n_states), length),
            smoothed=_in_length(to_states(chain, gammas, model.n_states), length),
        )
    )


@_inputs_checked("viterbi")
@eqx.filter_jit
@typechecked
def viterbi(
    model: AbstractCHMM,
    x: Observations,
    a: Actions,
    *,
    emissions: Emissions = None,
    length: Length = None,
) -> tuple[Int[Array, " T"], Float[Array, ""]]:
    """The most probable state path (max-product decoding with backtracking).

    Ties are broken deterministically towards the lowest state index, both for the
    final state and at every back-pointer.

    **Arguments:**

    - `model`, `x`, `a`, `emissions`, `length`: as for
        [`eqx_models.chmm.log_likelihood`][]
        (soft evidence is allowed: each clone is then weighted by its symbol's
        evidence).

    **Returns:**

    A tuple `(states, log_prob)`: the global state ids of the path, an int32 array
    of shape `(T,)`, and `ln p(x, z* | a)` of that path (for soft evidence, the
    path's log-probability weighted by the evidence). For an impossible sequence
    `log_prob` is `-inf` and the path is meaningless.

    **Raises:**

    As for [`eqx_models.chmm.log_likelihood`][].

    **Example:**

    ```python
    states, log_prob = viterbi(model, x, a)
    # states[t] is a clone of x[t]: model.state_symbol[states] == x
    ```
    """
    fn = "viterbi"
    chain, checks = _checked_chain(fn, model, x, a, emissions, length=length)
    path, log_prob = viterbi_scan(chain)
    states = slot_states(chain, path)
    if length is not None:
        states = jnp.where(jnp.arange(states.shape[0]) < length, states, -1)
    return checks.guard((states, log_prob))


def bits_per_step(
    log_likelihood: Float[ArrayLike, "*batch"], length: int | Int[ArrayLike, "*batch"]
) -> Float[Array, "*batch"]:
    """Negative log-likelihood per step in bits, `-lnL / (length ln 2)`.

    The figure the original CSCG code reports (it accumulates log2 probabilities);
    0 means the sequence is perfectly predicted.

    **Arguments:**

    - `log_likelihood`: natural-log likelihood(s), e.g. from
        [`eqx_models.chmm.log_likelihood`][].
    - `length`: the number of steps `T` (or an array of lengths).

    **Returns:**

    An array of the shape of `log_likelihood`.

    **Raises:**

    `ValueError` if a length is below 1 or NaN (a count of steps), at once when
    concrete, by `eqx.error_if` under `jit`.
    """
    length = check_in_range("bits_per_step", "length", length, low=1)
    return -jnp.asarray(log_likelihood) / (jnp.asarray(length) * math.log(2))
