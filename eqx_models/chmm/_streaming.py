"""EM over long sequences in chunks: exact streaming Baum-Welch and online EM.

A sequence of `T` observations is cut into chunks of `L` steps; chunk `c` holds the
observations `c L .. c L + L` (neighbouring chunks share their boundary
observation), as a `(n_chunks, L + 1)` array built on the host. Each chunk is an
ordinary `Chain` (`hard_chain`) whose ends are replaced by the messages of the rest
of the sequence:

- its initial weights are the filtered message `alpha` of its first observation
  (carried from the previous chunk; `Pi` restricted to `x[0]` for the first);
- its final weights are the backward message `beta` of its last observation
  (carried from the next chunk; ones for the last).

`ln(alpha_0 B_1 ... B_L beta_L)` is then `ln p(x) + const` as a function of the
chunk's steps, so its gradient gives the chunk's exact posterior transition counts
(`T * dlnL/dT`, as in `_learning.py`), and its gradient with respect to the initial
weights is proportional to `beta` at the chunk's first observation: the message the
previous chunk needs. Streaming Baum-Welch therefore runs two sweeps: forward over
the chunks (keeping one `alpha` per chunk boundary, `n_chunks x M` numbers), then
backward over them (one forward-backward pass per chunk). Its counts and
log-likelihood equal batch EM's up to rounding for every chunk size (tested in
float64), the counts bit for bit with one chunk and `method="scan"`, in memory
`O(L M + n_chunks M + model)` instead of `O(T M)`; the price is one more forward
pass. Chunk counts are added in a running sum (n_chunks terms, each a pairwise or
two-level sum of its own steps).

Online EM (`online_em`) cannot look ahead: each chunk is smoothed with the forward
message carried from the previous chunk but no future evidence (`beta = 1` at its
end), and the model changes after every chunk.

By default a sequence's chunks go to the device in one array and each sweep is one
compiled scan. With `chunks_per_call=K` the sequence stays on the host (a NumPy
array, memory-mapped or not) and is read `K` chunks at a time: the sweeps become
host loops over groups of `K` chunks that carry the messages (and the counts)
between device calls, the boundary messages of the forward sweep are kept (on the
device, `n_chunks x M` numbers), and every group has the same shape (the last is
padded), so one compilation serves sequences of any length.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from transforms import pairwise_sum
from transforms.validation import (
    check_callable,
    check_ids,
    check_size,
    fail,
    is_traced,
)

from ._chain import check_method, hard_chain, safe_divide, safe_log
from ._learning import _pseudocount
from ._model import AbstractCHMM, clone_table
from ._passes import chain_forward, chain_log_likelihood
from ._sparse import check_allowed, m_step, SparseCHMM, transitions, with_transitions


class _Chunks(eqx.Module):
    x: Int[Array, "n_chunks L_plus_1"]
    a: Int[Array, "n_chunks L_plus_1"]
    # The number of real observations in each chunk (1 for a padding chunk).
    lengths: Int[Array, " n_chunks"]


def _sequences(
    fn: str, model: AbstractCHMM, x, a, group_steps: int | None = None
) -> list[tuple[np.ndarray, ...]]:
    """One sequence or a list of them, as concrete NumPy pairs, checked.

    With `group_steps`, the ids are checked in slices of that many steps (so that
    a memory-mapped sequence is never read whole; the message names the slice) and
    the arrays are returned as given, to be read group by group."""
    if not isinstance(model, AbstractCHMM):
        raise fail(
            fn, "model", "a CHMM or a SparseCHMM", type(model).__name__, TypeError
        )
    if isinstance(x, (list, tuple)) != isinstance(a, (list, tuple)):
        raise TypeError(
            f"{fn}: give `x` and `a` both as lists of sequences, or both as arrays."
        )
    if not isinstance(x, (list, tuple)):
        x, a = [x], [a]
    if len(x) != len(a) or not x:
        raise ValueError(
            f"{fn}: `x` and `a` must be non-empty lists of the same number of "
            f"sequences, got {len(x)} and {len(a)}."
        )
    pairs = []
    for i, (xi, ai) in enumerate(zip(x, a)):
        name = fn if len(x) == 1 else f"{fn} (sequence {i})"
        if is_traced(xi) or is_traced(ai):
            raise TypeError(
                f"{name}: `x` and `a` are cut into chunks on the host and must be "
                "concrete arrays, not traced."
            )
        # `np.asarray` keeps a memory-mapped array mapped (no copy).
        xi, ai = np.asarray(xi), np.asarray(ai)
        for arg, v in (("x", xi), ("a", ai)):
            if not np.issubdtype(v.dtype, np.integer):
                raise fail(name, arg, "integer ids", f"dtype {v.dtype}", TypeError)
            if v.ndim != 1 or v.shape[0] < 1:
                raise fail(name, arg, "a non-empty 1-D sequence", f"shape {v.shape}")
        if xi.shape != ai.shape:
            raise fail(name, "a", f"the length of `x`, {xi.shape[0]}", ai.shape[0])
        if group_steps is None:
            _check_ids(name, model, xi, ai)
            pairs.append((xi.astype(np.int32), ai.astype(np.int32)))
            continue
        for start in range(0, max(xi.shape[0] - 1, 1), group_steps):
            stop = start + group_steps + 1
            stop = min(stop, xi.shape[0])
            where = f"{name} (in x[{start}:{stop}]; its index 0 is x[{start}])"
            _check_ids(where, model, xi[start:stop], ai[start:stop])
        pairs.append((xi, ai))
    return pairs


def _check_ids(name: str, model: AbstractCHMM, x: np.ndarray, a: np.ndarray):
    check_ids(name, "x", x, model.n_obs, upper_name="n_obs")
    check_ids(name, "a[:-1]", a[:-1], model.n_actions, upper_name="n_actions")
    if isinstance(model, SparseCHMM):
        check_allowed(name, model, x, a, None, None)


def _bucket(n: int) -> int:
    """The number of chunks compiled for: the next power of two, so that sequences
    of many lengths share a few compilations."""
    return 1 << max(n - 1, 0).bit_length()


def _n_chunks(length: int, chunk_size: int) -> int:
    """The chunks holding a sequence of `length` observations (at least one)."""
    return max(-(-(length - 1) // chunk_size), 1)


def _chunked(
    x: np.ndarray, a: np.ndarray, chunk_size: int, n_chunks: int | None = None
) -> _Chunks:
    """The overlapping `(n_chunks, L + 1)` windows of a sequence, padded (repeating
    the last observation, identity steps) to `n_chunks` chunks (default: a bucket
    of chunks)."""
    x, a = np.asarray(x, np.int32), np.asarray(a, np.int32)
    steps = x.shape[0] - 1
    if n_chunks is None:
        n_chunks = _bucket(_n_chunks(x.shape[0], chunk_size))
    width = n_chunks * chunk_size + 1
    xp = np.concatenate([x, np.full(width - x.shape[0], x[-1], x.dtype)])
    # a[T-1] is unused: zero it with the padding.
    ap = np.concatenate([a[:-1], np.zeros(width - steps, a.dtype)])
    index = np.arange(n_chunks)[:, None] * chunk_size + np.arange(chunk_size + 1)
    lengths = np.clip(x.shape[0] - np.arange(n_chunks) * chunk_size, 1, chunk_size + 1)
    return _Chunks(
        jnp.asarray(xp[index]), jnp.asarray(ap[index]), jnp.asarray(lengths, jnp.int32)
    )


def _bounded_chain(model, x, a, length, alpha, beta):
    """The chunk's chain with initial weights `alpha` and final weights `beta`."""
    chain = hard_chain(model, x, a, length)
    if chain.psi is None:
        return chain._replace(pi0=alpha, last=chain.last * beta)
    return chain._replace(pi0=alpha, psi=chain.psi.at[-1].add(safe_log(beta)))


def _first_alpha(model, chunks: _Chunks):
    return hard_chain(model, chunks.x[0], chunks.a[0], chunks.lengths[0]).pi0


def _forward_sweep(model, chunks: _Chunks, method: str, alpha):
    """From the initial weights `alpha` of the first chunk: the initial weights of
    every chunk, the log-likelihood of each, and the message after the last."""

    def body(alpha, inputs):
        x, a, length = inputs
        chain = _bounded_chain(model, x, a, length, alpha, jnp.ones_like(alpha))
        alphas, log_norms = chain_forward(chain, method)
        return alphas[-1], (alpha, pairwise_sum(log_norms))

    inputs = (chunks.x, chunks.a, chunks.lengths)
    last, (alphas, lnls) = lax.scan(body, alpha, inputs)
    return alphas, lnls, last


def _backward_sweep(model, chunks: _Chunks, alphas, beta, counts, method: str):
    """From the backward message `beta` after the last chunk: the message before
    the first, and `counts` plus the chunks' expected counts (the layout of
    `transitions`), given each chunk's initial weights `alphas`."""
    P = transitions(model)
    _, used = clone_table(model.n_clones)
    used = jnp.asarray(used, model.dtype)

    def body(carry, inputs):
        beta, counts = carry
        x, a, length, alpha = inputs

        def chunk_lnl(P, alpha):
            m = with_transitions(model, P)
            chain = _bounded_chain(m, x, a, length, alpha, beta)
            return chain_log_likelihood(chain, method)

        grad_P, grad_alpha = jax.grad(chunk_lnl, argnums=(0, 1))(P, alpha)
        beta = grad_alpha * used[x[0]]
        return (safe_divide(beta, beta.sum()), counts + P * grad_P), None

    inputs = (chunks.x, chunks.a, chunks.lengths, alphas)
    (beta, counts), _ = lax.scan(body, (beta, counts), inputs, reverse=True)
    return beta, counts


def _end_messages(model: AbstractCHMM):
    """The backward message after a sequence's last chunk and zero counts."""
    beta = jnp.ones((max(model.n_clones),), model.dtype)
    return beta, jnp.zeros_like(transitions(model))


@eqx.filter_jit
def _stream_counts(model: AbstractCHMM, chunks: _Chunks, method: str):
    """Exact expected counts (layout of `transitions`) and the log-likelihood of a
    sequence whose chunks are all in `chunks`."""
    alphas, lnls, _ = _forward_sweep(model, chunks, method, _first_alpha(model, chunks))
    _, counts = _backward_sweep(model, chunks, alphas, *_end_messages(model), method)
    return counts, pairwise_sum(lnls)


@eqx.filter_jit
def _stream_log_likelihood(model: AbstractCHMM, chunks: _Chunks, method: str):
    _, lnls, _ = _forward_sweep(model, chunks, method, _first_alpha(model, chunks))
    return pairwise_sum(lnls)


# The sweeps over a sequence read group by group (`chunks_per_call`): one device
# call per group, the messages carried between calls.


@eqx.filter_jit
def _first_alpha_of(model: AbstractCHMM, chunks: _Chunks):
    return _first_alpha(model, chunks)


@eqx.filter_jit
def _forward_group(model: AbstractCHMM, chunks: _Chunks, method: str, alpha):
    alphas, lnls, last = _forward_sweep(model, chunks, method, alpha)
    return alphas, pairwise_sum(lnls), last


@eqx.filter_jit
def _backward_group(
    model: AbstractCHMM, chunks: _Chunks, alphas, beta, counts, method: str
):
    return _backward_sweep(model, chunks, alphas, beta, counts, method)


class _Sequence:
    """One checked sequence and how its chunks reach the device: all at once
    (`chunks_per_call=None`, built once and kept on the device) or in groups of
    `chunks_per_call` chunks read from the host arrays when needed."""

    def __init__(self, x, a, chunk_size: int, chunks_per_call: int | None):
        self.x, self.a = x, a
        self.chunk_size, self.per_call = chunk_size, chunks_per_call
        if chunks_per_call is None:
            self.n_groups = 1
            self._whole = _chunked(x, a, chunk_size)
        else:
            n = _n_chunks(x.shape[0], chunk_size)
            self.n_groups = -(-n // chunks_per_call)

    def group(self, g: int) -> _Chunks:
        if self.per_call is None:
            return self._whole
        steps = self.per_call * self.chunk_size
        window = slice(g * steps, (g + 1) * steps + 1)
        return _chunked(self.x[window], self.a[window], self.chunk_size, self.per_call)


def _sequence_counts(model: AbstractCHMM, sequence: _Sequence, method: str):
    """`_stream_counts` of a sequence, in one call or group by group."""
    if sequence.n_groups == 1:
        return _stream_counts(model, sequence.group(0), method)
    alphas, lnls = _sequence_forward(model, sequence, method)
    beta, counts = _end_messages(model)
    for g in reversed(range(sequence.n_groups)):
        beta, counts = _backward_group(
            model, sequence.group(g), alphas[g], beta, counts, method
        )
    return counts, pairwise_sum(jnp.stack(lnls))


def _sequence_forward(model: AbstractCHMM, sequence: _Sequence, method: str):
    """The forward sweep group by group: each group's initial weights per chunk,
    and each group's log-likelihood."""
    alphas, lnls = [], []
    for g in range(sequence.n_groups):
        chunks = sequence.group(g)  # read from the host once per sweep
        if g == 0:
            alpha = _first_alpha_of(model, chunks)
        group_alphas, lnl, alpha = _forward_group(model, chunks, method, alpha)
        alphas.append(group_alphas)
        lnls.append(lnl)
    return alphas, lnls


def _sequence_log_likelihood(model: AbstractCHMM, sequence: _Sequence, method: str):
    if sequence.n_groups == 1:
        return _stream_log_likelihood(model, sequence.group(0), method)
    return pairwise_sum(jnp.stack(_sequence_forward(model, sequence, method)[1]))


def _check_common(fn, model, x, a, chunk_size, method, chunks_per_call):
    check_method(fn, method)
    check_size(fn, "chunk_size", chunk_size)
    if chunks_per_call is not None:
        check_size(fn, "chunks_per_call", chunks_per_call)
    steps = None if chunks_per_call is None else chunks_per_call * chunk_size
    return [
        _Sequence(xi, ai, chunk_size, chunks_per_call)
        for xi, ai in _sequences(fn, model, x, a, steps)
    ]


_Ids = Array | np.ndarray


def streaming_expected_counts(
    model: AbstractCHMM,
    x: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    a: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    *,
    chunk_size: int,
    method: str = "auto",
    chunks_per_call: int | None = None,
) -> tuple[Float[Array, "..."], Float[Array, ""]]:
    """Expected transition counts of long sequences, computed in chunks.

    The same counts and log-likelihood as [`eqx_models.chmm.expected_counts`][] (up
    to rounding; exact, not truncated: the forward message is carried across chunk
    boundaries and the backward message is brought back by a second sweep over the
    chunks, see the module notes in the guide), in memory that grows with
    `chunk_size` and the number of chunks, not with `T` times the clone count.
    Sequences are processed one at a time; chunk counts are padded to the next power
    of two, so sequences of many lengths share a few compilations.

    **Arguments:**

    - `model`: a `CHMM` or `SparseCHMM`.
    - `x`, `a`: one sequence of ids and actions (shape `(T,)` each), or lists of
        sequences of any lengths; concrete arrays (they are cut on the host).
        With `chunks_per_call`, NumPy arrays are read a group of chunks at a time,
        so they may be memory-mapped files (`np.load(path, mmap_mode="r")`)
        larger than the host's or the device's memory.
    - `chunk_size`: the number of steps per chunk, a positive int.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"`, the pass
        within each chunk, as for [`eqx_models.chmm.log_likelihood`][].
    - `chunks_per_call`: `None` (default) sends each sequence's chunks to the
        device at once; a positive int `K` sends `K` chunks per device call, the
        messages carried between calls (the same counts up to rounding; one
        compilation for every sequence length; ids checked a group at a time, the
        message naming the slice).

    **Returns:**

    A tuple `(counts, log_likelihood)`: counts in the layout of the model's
    transitions (`(n_actions, N, N)` for a `CHMM`, `(n_blocks, M, M)` for a
    `SparseCHMM`), summed over sequences, and the total log-likelihood.

    **Raises:**

    `ValueError` for a `chunk_size` or `chunks_per_call` below 1, ids or actions
    out of range, a transition outside a `SparseCHMM`'s blocks (naming its
    position), or lists of different lengths; `TypeError` for a non-integer
    `chunk_size` or `chunks_per_call`, traced or non-integer sequences, or an
    unknown `method`.
    """
    fn = "streaming_expected_counts"
    every = _check_common(fn, model, x, a, chunk_size, method, chunks_per_call)
    results = [_sequence_counts(model, sequence, method) for sequence in every]
    counts = sum(r[0] for r in results[1:]) + results[0][0]
    return counts, pairwise_sum(jnp.stack([r[1] for r in results]))


def streaming_em(
    model: AbstractCHMM,
    x: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    a: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    *,
    n_iter: int,
    chunk_size: int,
    pseudocount: float | Float[Array, ""] = 0.0,
    method: str = "auto",
    chunks_per_call: int | None = None,
    progress: bool = False,
) -> tuple[AbstractCHMM, Float[Array, " n_iter_plus_1"]]:
    """Baum-Welch with the E-step of [`eqx_models.chmm.streaming_expected_counts`][]:
    [`eqx_models.chmm.em`][] for sequences too long to smooth at once.

    The iterations run from Python (one compiled chunked pass per sequence and
    iteration), so a progress bar can follow them. With one chunk per sequence
    (`chunk_size >= T - 1`) and `method="scan"` the expected counts of every
    iteration are bit-identical to `em`'s; the updated model and the curve agree
    up to rounding (XLA fuses the M-step and the sums differently inside `em`'s
    compiled loop). With smaller chunks everything agrees up to rounding.

    **Arguments:**

    - `model`: the initial `CHMM` or `SparseCHMM`.
    - `x`, `a`: the sequences, as for `streaming_expected_counts`.
    - `n_iter`: the number of EM iterations.
    - `chunk_size`: steps per chunk, a positive int.
    - `pseudocount`: as for `em`.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"`, as for
        [`eqx_models.chmm.log_likelihood`][].
    - `chunks_per_call`: as for `streaming_expected_counts`.
    - `progress`: show a tqdm progress bar over the iterations.

    **Returns:**

    A tuple `(model, curve)` as for `em`: the trained model and the
    log-likelihood before each update followed by the final one.

    **Raises:**

    As for `streaming_expected_counts`; `ValueError`/`TypeError` for a bad `n_iter`
    or `pseudocount`, as for `em`.
    """
    fn = "streaming_em"
    every = _check_common(fn, model, x, a, chunk_size, method, chunks_per_call)
    pseudocount = _pseudocount(fn, n_iter, pseudocount, model.dtype)
    curve = []
    for _ in tqdm(range(n_iter), desc=fn, disable=not progress):
        results = [_sequence_counts(model, sequence, method) for sequence in every]
        counts = sum(r[0] for r in results[1:]) + results[0][0]
        curve.append(pairwise_sum(jnp.stack([r[1] for r in results])))
        model = _m_step(model, counts, pseudocount)
    final = [_sequence_log_likelihood(model, sequence, method) for sequence in every]
    curve.append(pairwise_sum(jnp.stack(final)))
    return model, jnp.stack(curve)


@eqx.filter_jit
def _m_step(model, counts, pseudocount):
    return with_transitions(model, m_step(model, counts, pseudocount))


def default_step_size(k: Int[Array, ""]) -> Float[Array, ""]:
    """`(k + 2) ** -0.7`: the step size of stepwise EM after `k` updates (Liang and
    Klein, 2009: exponents in `(0.5, 1]` converge)."""
    return (k + 2.0) ** -0.7


@eqx.filter_jit
def _online(
    model, chunks: _Chunks, stats, start, step_size, pseudocount, method, alpha=None
):
    """Stepwise EM over `chunks`, from the forward message `alpha` (`None`: the
    sequence's first chunk is the first of `chunks`); also returns the message
    after the last chunk."""

    def body(carry, inputs):
        P, stats, alpha, k = carry
        x, a, length = inputs
        m = with_transitions(model, P)
        ones = jnp.ones_like(alpha)

        def chunk_lnl(P):
            chain = _bounded_chain(
                with_transitions(model, P), x, a, length, alpha, ones
            )
            return chain_log_likelihood(chain, method)

        grad = jax.grad(chunk_lnl)(P)
        chain = _bounded_chain(m, x, a, length, alpha, ones)
        alphas, log_norms = chain_forward(chain, method)
        # A padding chunk (no steps) changes nothing, not even the step counter.
        real = length > 1
        gamma = jnp.where(real, jnp.asarray(step_size(k), P.dtype), 0)
        stats = (1 - gamma) * stats + gamma * (P * grad)
        P = jnp.where(real, m_step(model, stats, pseudocount), P)
        return (P, stats, alphas[-1], k + real), pairwise_sum(log_norms)

    if alpha is None:
        alpha = _first_alpha(model, chunks)
    carry = (transitions(model), stats, alpha, start)
    inputs = (chunks.x, chunks.a, chunks.lengths)
    (P, stats, alpha, k), lnls = lax.scan(body, carry, inputs)
    return with_transitions(model, P), stats, k, lnls, alpha


def online_em(
    model: AbstractCHMM,
    x: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    a: Int[_Ids, " T"] | Sequence[Int[_Ids, " _"]],
    *,
    chunk_size: int,
    n_epochs: int = 1,
    step_size: Callable[[Int[Array, ""]], Float[Array, ""]] = default_step_size,
    pseudocount: float | Float[Array, ""] = 0.0,
    method: str = "auto",
    chunks_per_call: int | None = None,
    progress: bool = False,
) -> tuple[AbstractCHMM, Float[Array, " n_chunks"]]:
    """Online (stepwise) EM: update the model after every chunk.

    Keeps running expected counts `S` (initially the model's own transitions). For
    the `k`-th chunk (counted over all sequences and epochs) it computes the chunk's
    expected counts `C_k` under the current model, filtered from the message carried
    over from the previous chunk and smoothed within the chunk only (no future
    evidence), then sets `S = (1 - g_k) S + g_k C_k` with `g_k = step_size(k)` and
    `T = (S + pseudocount)` normalised. With `step_size` decaying like `k^-a`,
    `a` in `(0.5, 1]`, this is stochastic approximation of EM (Cappé and Moulines,
    2009; Liang and Klein, 2009). Counts are per chunk, so `pseudocount` weighs
    against `chunk_size` steps of evidence. Each sequence runs one compiled scan
    over its chunks (padded to a power of two of chunks; padding chunks hold no
    steps and change nothing but the step counter, which counts real chunks only).

    **Arguments:**

    - `model`: the initial `CHMM` or `SparseCHMM`.
    - `x`, `a`: the sequences, as for
        [`eqx_models.chmm.streaming_expected_counts`][].
    - `chunk_size`: steps per update, a positive int.
    - `n_epochs`: passes over the data.
    - `step_size`: `k -> g_k` in `(0, 1]`, a jittable function of the update
        count (an optax schedule works); `(k + 2) ** -0.7` by default.
    - `pseudocount`: a non-negative count added at every M-step.
    - `method`: `"auto"` (the default), `"scan"` or `"parallel"`, the pass
        within each chunk, as for [`eqx_models.chmm.log_likelihood`][].
    - `chunks_per_call`: as for
        [`eqx_models.chmm.streaming_expected_counts`][] (the same updates, in
        device calls of `K` chunks).
    - `progress`: show a tqdm progress bar over epochs and sequences.

    **Returns:**

    A tuple `(model, log_likelihoods)`: the model after the last update, and the
    log-likelihood of each chunk (given the past) under the model just before its
    update, in processing order (padding chunks excluded).

    **Raises:**

    As for `streaming_expected_counts`; `ValueError`/`TypeError` for an `n_epochs`
    below 1, a non-callable `step_size`, or a bad `pseudocount`.
    """
    fn = "online_em"
    every = _check_common(fn, model, x, a, chunk_size, method, chunks_per_call)
    check_size(fn, "n_epochs", n_epochs)
    check_callable(fn, "step_size", step_size)
    pseudocount = _pseudocount(fn, 0, pseudocount, model.dtype)
    stats = transitions(model)
    k = jnp.zeros((), jnp.int32)
    out = []
    work = [(e, sequence) for e in range(n_epochs) for sequence in every]
    for _, sequence in tqdm(work, desc=fn, disable=not progress):
        # Grouped, the first message is computed apart, so that every group's call
        # has the same signature (one compilation).
        alpha = None
        if sequence.per_call is not None:
            alpha = _first_alpha_of(model, sequence.group(0))
        for g in range(sequence.n_groups):
            chunks = sequence.group(g)
            model, stats, k, lnls, alpha = _online(
                model, chunks, stats, k, step_size, pseudocount, method, alpha
            )
            out.append(lnls[np.asarray(chunks.lengths) > 1])
    return model, jnp.concatenate(out)
