"""Learning a `CHMM` from sequences: Baum-Welch, Viterbi EM and emission EM.

Sequences of unequal length are padded with identity steps into one batch, so each
algorithm runs all its iterations in one compiled `lax.scan`, with expected counts
from the same smoothing passes that inference uses. The batching and the
normalised-count updates are what this module adds; inference needs neither.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from transforms import pairwise_sum
from transforms.validation import (
    check_ids,
    check_in_range,
    check_size,
    checked_eagerly,
    Checks,
    typechecked,
)

from ._chain import (
    _repad,
    check_emissions,
    check_inputs,
    check_method,
    dense_chain,
    hard_chain,
    slot_states,
    to_states,
    well_formed,
    well_formed_emissions,
)
from ._decode import viterbi_scan
from ._model import _normalise_rows, AbstractCHMM, CHMM
from ._passes import chain_log_likelihood, chain_smooth
from ._sparse import (
    check_allowed,
    m_step,
    path_counts,
    SparseCHMM,
    transitions,
    with_transitions,
)


# NumPy arrays too: the trainers below check their arguments before `jit` converts
# them (so that the pseudocount can be an array, traced, not a static float).
_Ids = Array | np.ndarray
Sequences = Int[_Ids, " T"] | Int[_Ids, "batch T"] | Sequence[Int[_Ids, " _"]]
Lengths = Int[_Ids, " batch"] | None


class _Batch(eqx.Module):
    x: Int[Array, "batch T"]
    a: Int[Array, "batch T"]
    # None when every sequence has the full length T.
    lengths: Int[Array, " batch"] | None


def _as_batch(
    fn: str, model: AbstractCHMM, x, a, checks: Checks, lengths=None
) -> _Batch:
    """One sequence, an equal-length batch, or lists of sequences, as a padded batch.

    A shorter sequence is padded by repeating its last observation with identity
    steps (see `Chain`), so it contributes nothing beyond its length.
    """
    if isinstance(x, (list, tuple)) or isinstance(a, (list, tuple)):
        if lengths is not None:
            raise TypeError(
                f"{fn}: `lengths` goes with a padded array of sequences; lists carry "
                "their own lengths."
            )
        if not isinstance(x, (list, tuple)) or not isinstance(a, (list, tuple)):
            raise TypeError(
                f"{fn}: give `x` and `a` both as lists of sequences, or both as arrays."
            )
        if len(x) != len(a) or len(x) == 0:
            raise ValueError(
                f"{fn}: `x` and `a` must be non-empty lists of the same number of "
                f"sequences, got {len(x)} and {len(a)}."
            )
        xs, acts = [], []
        for i, (xi, ai) in enumerate(zip(x, a)):
            xi, ai, _ = check_inputs(
                f"{fn} (sequence {i})",
                model,
                xi,
                ai,
                checks=checks,
                allow_evidence=False,
            )
            xs.append(xi)
            acts.append(ai)
        lengths = [xi.shape[0] for xi in xs]
        width = max(lengths)
        padded_x = [
            jnp.concatenate([xi, jnp.full((width - n,), xi[-1], xi.dtype)])
            for xi, n in zip(xs, lengths)
        ]
        # a[n-1] of each sequence is unused; zero it with the padding so that a
        # placeholder there cannot trip the range check of the batch.
        padded_a = [
            jnp.concatenate([ai[: n - 1], jnp.zeros((width - n + 1,), ai.dtype)])
            for ai, n in zip(acts, lengths)
        ]
        return _Batch(
            jnp.stack(padded_x),
            jnp.stack(padded_a),
            jnp.asarray(lengths, jnp.int32),
        )
    x, a = jnp.asarray(x), jnp.asarray(a)
    if lengths is not None:
        if x.ndim != 2 or a.shape != x.shape:
            raise ValueError(
                f"{fn}: `lengths` goes with a padded `(batch, T)` array of sequences; "
                f"got `x` of shape {x.shape} and `a` of shape {a.shape}."
            )
        lengths = jnp.asarray(lengths)
        if lengths.shape != x.shape[:1]:
            raise ValueError(
                f"{fn}: `lengths` must have shape (batch,) = ({x.shape[0]},), got "
                f"{lengths.shape}."
            )
        lengths = check_ids(
            fn, "lengths", lengths, x.shape[1] + 1, low=1, checks=checks
        )
        x, a = jax.vmap(_repad)(x, a, lengths)
    if x.ndim == 1:
        x, a, _ = check_inputs(fn, model, x, a, checks=checks, allow_evidence=False)
        return _Batch(x[None], a[None], None)
    if x.ndim != 2 or a.shape != x.shape:
        raise ValueError(
            f"{fn}: `x` and `a` must both have shape (T,) or (batch, T), or be lists "
            f"of sequences; got shapes {x.shape} and {a.shape}."
        )
    for name, v in (("x", x), ("a", a)):
        if not jnp.issubdtype(v.dtype, jnp.integer):
            raise TypeError(f"{fn}: `{name}` must be integer ids, got dtype {v.dtype}.")
    if x.shape[1] < 1:
        raise ValueError(f"{fn}: the sequences are empty.")
    x = check_ids(fn, "x", x, model.n_obs, checks=checks, upper_name="n_obs")
    used = jnp.arange(a.shape[1]) < a.shape[1] - 1
    a = check_ids(
        fn,
        "a[:, :-1]",
        a,
        model.n_actions,
        where=used,
        checks=checks,
        upper_name="n_actions",
    )
    if isinstance(model, SparseCHMM):
        steps = None
        if lengths is not None:
            steps = jnp.arange(x.shape[1] - 1)[None, :] < lengths[:, None] - 1
        check_allowed(fn, model, x, a, steps, checks)
    return _Batch(x, a, None if lengths is None else lengths.astype(jnp.int32))


def _well_formed_batch(model, x, a) -> bool:
    """Whether `_as_batch` would accept the structure of `(x, a)`: one sequence,
    an equal-length batch, or equally long lists of sequences of ids."""
    if isinstance(x, (list, tuple)) and isinstance(a, (list, tuple)):
        return len(x) == len(a) > 0 and all(
            well_formed(model, xi, ai, allow_evidence=False) for xi, ai in zip(x, a)
        )
    if not (isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 2):
        return well_formed(model, x, a, allow_evidence=False)
    return (
        isinstance(model, AbstractCHMM)
        and isinstance(a, (np.ndarray, jax.Array))
        and a.shape == x.shape
        and x.shape[1] >= 1
        and all(jnp.issubdtype(v.dtype, jnp.integer) for v in (x, a))
    )


def _sequences_checked(fn: str):
    """The eager precheck of an entry point taking `(model, x, a, ...)` sequences
    (and, for `learn_emissions`, `emissions`)."""

    def precheck(model, x, a, *args, emissions=None, lengths=None, **kwargs):
        if not _well_formed_batch(model, x, a):
            return
        checks = Checks()
        _as_batch(fn, model, x, a, checks, lengths)
        if emissions is not None and well_formed_emissions(model, emissions):
            check_emissions(fn, model, emissions, checks)

    return checked_eagerly(precheck)


def _map(f, batch: _Batch):
    lengths = batch.lengths
    if batch.x.shape[0] == 1:
        # One sequence: no `vmap`, whose batch axis of size one sends the per-step
        # vector-block products down a slow path of XLA's CPU backend (several
        # times slower).
        length = None if lengths is None else lengths[0]
        return jax.tree.map(lambda v: v[None], f(batch.x[0], batch.a[0], length))
    if lengths is None:
        return jax.vmap(lambda x, a: f(x, a, None))(batch.x, batch.a)
    return jax.vmap(f)(batch.x, batch.a, lengths)


def _total_log_likelihood(T, model: AbstractCHMM, batch: _Batch, method: str):
    model = with_transitions(model, T)

    def one(x, a, length):
        chain = hard_chain(model, x, a, length)
        return chain_log_likelihood(chain, method, batch.x.shape[0])

    return pairwise_sum(_map(one, batch))


def _counts(model: AbstractCHMM, batch: _Batch, method: str):
    # The E-step by autodiff: lnL is multilinear in the entries of T, so
    # T * dlnL/dT sums, over the steps, the posterior probability of each transition
    # (for a SparseCHMM, of each entry of its blocks).
    T = transitions(model)
    lnl, grad = jax.value_and_grad(_total_log_likelihood)(T, model, batch, method)
    return T * grad, lnl


def _pseudocount(
    fn: str, n_iter: int, pseudocount: float | Float[Array, ""], dtype
) -> Float[Array, ""]:
    """Check the iteration count and the pseudocount; the pseudocount as an array.

    An array, not a static Python float, so that the compiled iterations are reused
    for every value (a sweep over pseudocounts compiles once).
    """
    check_size(fn, "n_iter", n_iter, minimum=0)
    pseudocount = check_in_range(fn, "pseudocount", pseudocount, low=0)
    return jnp.asarray(pseudocount, dtype)


@_sequences_checked("expected_counts")
@eqx.filter_jit
@typechecked
def expected_counts(
    model: AbstractCHMM,
    x: Sequences,
    a: Sequences,
    *,
    method: str = "auto",
    lengths: Lengths = None,
) -> tuple[Float[Array, "..."], Float[Array, ""]]:
    """Expected transition counts (the E-step of Baum-Welch).

    `counts[u, i, j] = sum_t p(z[t] = i, z[t+1] = j | x, a)` over the steps with
    `a[t] = u`, summed over all sequences. Computed as `T * dlnL/dT` (the
    likelihood is multilinear in the entries of `T`), where the gradient comes from
    a forward-backward pass, sequential (`method="scan"`) or over blocks of steps
    in parallel (`method="parallel"`). The counts of a sequence of length `T` sum
    to `T - 1`.

    **Arguments:**

    - `model`: the `CHMM` or `SparseCHMM`.
    - `x`: observation ids: one sequence of shape `(T,)`, a batch of equal-length
        sequences `(batch, T)`, or a list of 1-D sequences of different lengths.
    - `a`: actions, in the same form as `x`.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"`, as for
        [`eqx_models.chmm.log_likelihood`][].
    - `lengths`: with `(batch, T)` arrays, the number of real steps of each padded
        sequence, shape `(batch,)` (a mask that compiles once per padded shape):
        steps from `lengths[i]` on are ignored whatever they hold, and the results
        equal those of the list of truncated sequences. All `T` if omitted.

    **Returns:**

    A tuple `(counts, log_likelihood)`: counts of shape `(n_actions, N, N)` (for a
    `SparseCHMM`, in the layout of its blocks, `(n_blocks, M, M)`) and the total
    log-likelihood of the sequences.

    **Raises:**

    As for [`eqx_models.chmm.log_likelihood`][]; `ValueError` for lists of
    different numbers of sequences, or `lengths` of the wrong shape or outside
    `[1, T]`; `TypeError` for `lengths` with lists.
    """
    fn = "expected_counts"
    check_method(fn, method)
    checks = Checks()
    batch = _as_batch(fn, model, x, a, checks, lengths)
    return checks.guard(_counts(model, batch, method))


@_sequences_checked("em")
@typechecked
def em(
    model: AbstractCHMM,
    x: Sequences,
    a: Sequences,
    *,
    n_iter: int,
    pseudocount: float | Float[Array, ""] = 0.0,
    method: str = "auto",
    lengths: Lengths = None,
) -> tuple[AbstractCHMM, Float[Array, " n_iter_plus_1"]]:
    """Baum-Welch (soft EM) training of the transition tensor.

    Each iteration computes the expected counts `C` of all sequences (summed before
    normalising) and sets `T = (C + pseudocount) / sum_j (C + pseudocount)`; with
    `pseudocount=0` a row without counts stays zero. `Pi` is kept fixed (uniform by
    default), as in the original. The iterations run in one compiled `lax.scan`.

    With `pseudocount=0` the log-likelihood never decreases; with a pseudocount the
    update maximises `lnL + pseudocount * sum(log T)` (a Dirichlet prior), which
    never decreases.

    **Arguments:**

    - `model`: the initial `CHMM` or `SparseCHMM` (e.g. `CHMM.random(...)`).
    - `x`, `a`: the training sequences, as for
        [`eqx_models.chmm.expected_counts`][].
    - `lengths`: as for [`eqx_models.chmm.expected_counts`][].
    - `n_iter`: the number of EM iterations.
    - `pseudocount`: a non-negative count added to every transition.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"` for the E-step,
        as for [`eqx_models.chmm.log_likelihood`][].

    **Returns:**

    A tuple `(model, curve)`: the trained model and the log-likelihood (summed
    over sequences, natural log) before each update followed by the final one,
    shape `(n_iter + 1,)`. Divide by the number of steps and `-ln 2` (see
    [`eqx_models.chmm.bits_per_step`][]) for the original's convergence figure.

    **Raises:**

    As for [`eqx_models.chmm.expected_counts`][]; `ValueError` for a negative
    `n_iter` or a negative, NaN or infinite `pseudocount`; `TypeError` for an
    `n_iter` that is not an integer.

    **Example:**

    ```python
    model = CHMM.random(n_clones, n_actions=4, key=jr.key(0))
    model, curve = em(model, x, a, n_iter=100, pseudocount=1e-3)
    bits_per_step(curve[-1], x.shape[0])
    ```
    """
    fn = "em"
    check_method(fn, method)
    pseudocount = _pseudocount(fn, n_iter, pseudocount, model.dtype)
    return _em(
        model,
        x,
        a,
        n_iter=n_iter,
        pseudocount=pseudocount,
        method=method,
        lengths=lengths,
    )


@eqx.filter_jit
def _em(model, x, a, *, n_iter, pseudocount, method, lengths):
    fn = "em"
    checks = Checks()
    batch = _as_batch(fn, model, x, a, checks, lengths)

    def iteration(T, _):
        counts, lnl = _counts(with_transitions(model, T), batch, method)
        return m_step(model, counts, pseudocount), lnl

    T, curve = lax.scan(iteration, transitions(model), None, length=n_iter)
    final = _total_log_likelihood(T, model, batch, method)
    model = with_transitions(model, T)
    return checks.guard((model, jnp.concatenate([curve, final[None]])))


def _viterbi_paths(model: AbstractCHMM, batch: _Batch):
    def one(x, a, length):
        chain = hard_chain(model, x, a, length)
        path, log_prob = viterbi_scan(chain)
        return slot_states(chain, path), log_prob

    return _map(one, batch)


@_sequences_checked("viterbi_em")
@typechecked
def viterbi_em(
    model: AbstractCHMM,
    x: Sequences,
    a: Sequences,
    *,
    n_iter: int,
    pseudocount: float | Float[Array, ""] = 0.0,
    lengths: Lengths = None,
) -> tuple[AbstractCHMM, Float[Array, " n_iter_plus_1"]]:
    """Hard (Viterbi) EM training of the transition tensor.

    Each iteration decodes every sequence with [`eqx_models.chmm.viterbi`][],
    counts the transitions of the decoded paths and normalises them as in
    [`eqx_models.chmm.em`][] (the original's `learn_viterbi_T`). Typically run after
    soft EM, with `pseudocount=0`, to prune the transition graph to the transitions
    that are used. With `pseudocount=0` the objective never decreases.

    **Arguments:**

    - `model`: the initial `CHMM` or `SparseCHMM`.
    - `x`, `a`: the training sequences, as for
        [`eqx_models.chmm.expected_counts`][].
    - `lengths`: as for [`eqx_models.chmm.expected_counts`][].
    - `n_iter`: the number of iterations.
    - `pseudocount`: a non-negative count added to every transition.

    **Returns:**

    A tuple `(model, curve)`: the trained model and the summed log-probability of
    the Viterbi paths (natural log) before each update followed by the final one,
    shape `(n_iter + 1,)`.

    **Raises:**

    As for [`eqx_models.chmm.em`][].
    """
    fn = "viterbi_em"
    pseudocount = _pseudocount(fn, n_iter, pseudocount, model.dtype)
    return _viterbi_em(
        model, x, a, n_iter=n_iter, pseudocount=pseudocount, lengths=lengths
    )


@eqx.filter_jit
def _viterbi_em(model, x, a, *, n_iter, pseudocount, lengths):
    fn = "viterbi_em"
    checks = Checks()
    batch = _as_batch(fn, model, x, a, checks, lengths)
    n_actions = model.n_actions
    steps = batch.x.shape[1]
    if batch.lengths is None:
        in_use = jnp.ones((batch.x.shape[0], steps - 1), bool)
    else:
        in_use = jnp.arange(1, steps)[None, :] < batch.lengths[:, None]
    actions = jnp.where(in_use, batch.a[:, :-1], n_actions)

    def iteration(T, _):
        paths, log_probs = _viterbi_paths(with_transitions(model, T), batch)
        counts = path_counts(model, batch.x, actions, paths)
        return m_step(model, counts, pseudocount), pairwise_sum(log_probs)

    T, curve = lax.scan(iteration, transitions(model), None, length=n_iter)
    model = with_transitions(model, T)
    _, final = _viterbi_paths(model, batch)
    return checks.guard((model, jnp.concatenate([curve, pairwise_sum(final)[None]])))


def _posteriors_over(model, batch, emissions, method):
    """Smoothed marginals `[batch, T, N]` (zero on padding) and the total lnL."""
    log_emissions = jnp.log(emissions)

    def one(x, a, length):
        chain = dense_chain(model, log_emissions.T[x], a, length)
        _, log_norms, _, gammas = chain_smooth(chain, method, batch.x.shape[0])
        if length is not None:
            in_use = jnp.arange(x.shape[0]) < length
            gammas = gammas * in_use[:, None]
        return to_states(chain, gammas, model.n_states), pairwise_sum(log_norms)

    gammas, lnls = _map(one, batch)
    return gammas, pairwise_sum(lnls)


@_sequences_checked("learn_emissions")
@typechecked
def learn_emissions(
    model: CHMM,
    x: Sequences,
    a: Sequences,
    *,
    n_iter: int,
    pseudocount: float | Float[Array, ""] = 1e-20,
    emissions: Float[Array, "n_states n_obs"] | None = None,
    method: str = "auto",
    lengths: Lengths = None,
) -> tuple[Float[Array, "n_states n_obs"], Float[Array, " n_iter_plus_1"]]:
    """Learn a clone-to-symbol emission matrix by EM with the transitions fixed.

    The original's `learn_em_E`: starting from the deterministic emission (each
    clone emits its own symbol) or from `emissions`, each iteration computes the
    smoothed marginals under the emission matrix `E` (a dense forward-backward over
    all `N` states) and sets `E[i, k] ∝ sum_{t: x[t] = k} p(z[t] = i | x, a) +
    pseudocount`. Clones may so re-map to other symbols, e.g. after the environment
    changed. Decode with the result by passing `emissions=E` to
    [`eqx_models.chmm.viterbi`][], [`eqx_models.chmm.posteriors`][] or
    [`eqx_models.chmm.log_likelihood`][].

    **Arguments:**

    - `model`: a trained `CHMM` (its `T` and `Pi` are kept).
    - `x`, `a`: the sequences, as for [`eqx_models.chmm.expected_counts`][].
    - `lengths`: as for [`eqx_models.chmm.expected_counts`][].
    - `n_iter`: the number of EM iterations.
    - `pseudocount`: added to every emission count; the default, a tiny positive
        value, lets a clone take up a symbol it never emitted.
    - `emissions`: an initial `(N, n_obs)` emission matrix (rows summing to one);
        the deterministic one if omitted.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"` for the
        forward-backward passes, as for [`eqx_models.chmm.log_likelihood`][].

    **Returns:**

    A tuple `(emissions, curve)`: the `(N, n_obs)` emission matrix and the total
    log-likelihood before each update followed by the final one, shape
    `(n_iter + 1,)`.

    **Raises:**

    As for [`eqx_models.chmm.em`][]; at run time if the rows of `emissions` are not
    distributions.
    """
    fn = "learn_emissions"
    check_method(fn, method)
    pseudocount = _pseudocount(fn, n_iter, pseudocount, model.dtype)
    return _learn_emissions(
        model,
        x,
        a,
        n_iter=n_iter,
        pseudocount=pseudocount,
        emissions=emissions,
        method=method,
        lengths=lengths,
    )


@eqx.filter_jit
def _learn_emissions(model, x, a, *, n_iter, pseudocount, emissions, method, lengths):
    fn = "learn_emissions"
    checks = Checks()
    batch = _as_batch(fn, model, x, a, checks, lengths)
    dtype = model.dtype
    if emissions is None:
        emissions = jax.nn.one_hot(
            jnp.asarray(model.state_symbol), model.n_obs, dtype=dtype
        )
    else:
        emissions = check_emissions(fn, model, emissions, checks)
    symbols = jax.nn.one_hot(batch.x, model.n_obs, dtype=dtype)

    def iteration(E, _):
        gammas, lnl = _posteriors_over(model, batch, E, method)
        counts = jnp.einsum(
            "bti,btk->ik", gammas, symbols, precision=lax.Precision.HIGHEST
        )
        return _normalise_rows(counts + pseudocount), lnl

    emissions = emissions.astype(dtype)
    E, curve = lax.scan(iteration, emissions, None, length=n_iter)
    _, final = _posteriors_over(model, batch, E, method)
    return checks.guard((E, jnp.concatenate([curve, final[None]])))
