"""Parallel-in-time inference over a `Chain`: products of step matrices, in blocks.

Every step is an `S x S` matrix kept in a row-normalised form `(A, c)`: the matrix is
`diag(exp(c)) @ A` with each row of `A` summing to one (or all zero, with `c = -inf`).
Two such elements combine as

    (A1, c1) * (A2, c2) = normalise_rows(A1 @ (exp(c2 - m)[:, None] * A2)),
                          c1 + m + log(row sums),         m = max(c2),

which is associative and keeps a separate log scale per starting state, so products
of tens of thousands of steps neither underflow nor lose a state whose continuation
is unlikely. The first element has every row equal to the initial message, so every
prefix product has identical rows: the filtered message and the log-likelihood so far.

The `T - 1` steps are cut into `K` blocks of `L` consecutive steps (`block_shape`; the
tail is padded with identity steps), and a pass has three phases:

1. `_block_products`: a `lax.scan` over the `L` positions in a block multiplies the
   running product of each of the `K` blocks by its next step matrix, all blocks at
   once (`T - 1` products of `S x S` matrices in `L` sequential steps, a body
   compiled once whatever `T` is).
2. Across the blocks, the elements `[first, P_0, ..., P_{K-1}, I]`: `_up_sweep`
   multiplies neighbouring pairs level by level up to their total (the total is
   the log-likelihood; `ceil(log2(K + 2))` levels of `(K + 2) / 2` matrix products,
   the later levels padded with identities so that every level has one shape), and
   walking the tree down gives every prefix (`_prefix_rows`) and, for smoothing,
   every suffix applied to ones (`_suffix_columns`). Because the prefixes have
   identical rows and the suffixes are applied to a vector, the walk down multiplies
   vectors by matrices only. The levels are a `lax.scan` each way, so the graph
   grows with neither `T` nor `K`.
3. `_within_blocks`: from the message entering (leaving) each block, its per-step
   messages by the sequential recursions of `_scan.py`, all blocks at once (`L`
   steps of vector-block products, forward and backward in one body).

The log-likelihood is 1 and the way up of 2; its gradient (the E-step) is the
forward-backward formula of `_scan.py` with the messages of 1 to 3. The forward pass
is 1, the prefixes of 2 and the forward half of 3; smoothing all of it.

History: two `lax.associative_scan`s over the steps unrolled their `2 log2 T` levels
each into the graph, every level with its own shapes, slices and padding: on an
H200 the posteriors of the large workload (T = 50 000) took 49.5 s to compile and
19 ms to run. A Hillis-Steele scan across the blocks then kept phase 2 in one
compiled body but ran `(K + 1) log2(K + 1)` matrix products each way, as many as
phase 1 at `T = 2 000` on a CPU and a fifth of it at `T = 50 000`; the tree runs
half that once for both directions (on a CPU at `T = 5 000`: log-likelihood 78 to
36 ms, posteriors 141 to 94 ms, one EM iteration 240 to 141 ms). Its levels, first
unrolled, are loops since (on a CPU at the large size: 1 588 to 525 instructions
and 2.9 to 1.1 s of compilation for the log-likelihood, 3 861 to 1 316 and 5.7 to
2.5 s for the posteriors, 3 980 to 1 412 and 6.8 to 2.9 s for an EM iteration).
The walks down then multiply `(K + 2) / 2` vectors at every level instead of the
level's own: at T = 5 000 on a 2-core CPU the log-likelihood runs as fast, the
posteriors in 76 instead of 63 ms and an EM iteration in 132 instead of 120 ms (a
CPU gets the scan by default); on a GPU those vector products are a small part of
a level's matrix products.
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from ._chain import Chain, evidence_weights, safe_divide, safe_log, window
from ._scan import backward_step, forward_step


# Float32 products in float32 (no TF32 rounding; see docs/gpu.md). Three TF32
# tensor-core passes (`lax.DotAlgorithmPreset.TF32_TF32_F32_X3`, about as accurate)
# ran the large log-likelihood slower on an H100: 6.6 against 5.3 ms.
HIGHEST = lax.Precision.HIGHEST


def _tree_sum(x: Array) -> Array:
    """Pairwise sum over the leading axis."""
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
        x = x[0::2] + x[1::2]
    return x[0]


def _n_chunks(n: int, src_size: int, window_size: int) -> int:
    # Accumulating the gradient of each chunk of steps separately and summing the
    # chunks pairwise bounds the float error by about (n / chunks + log2(chunks))
    # ulps instead of n; the chunk buffers are capped at the size of the gathered
    # windows themselves.
    return max(1, min(math.isqrt(n), (n * window_size) // max(src_size, 1)))


def _scatter_windows(src: Array, pos: Array, g: Array, size: int) -> Array:
    """`g[t]` added to the window of `src` at `pos[t]` for every `t`, in chunks."""
    shape, n = src.shape, pos.shape[0]
    if n == 0:
        return jnp.zeros_like(src)
    chunks = _n_chunks(n, math.prod(shape), size * size)
    per_chunk = -(-n // chunks)
    pad = chunks * per_chunk - n
    g = jnp.concatenate([g, jnp.zeros((pad, size, size), g.dtype)])
    pos = jnp.concatenate([pos, jnp.zeros((pad, 3), pos.dtype)])
    chunk = jnp.repeat(jnp.arange(chunks, dtype=pos.dtype), per_chunk)
    indices = jnp.concatenate([chunk[:, None], pos], axis=-1)
    indices = indices.reshape(chunks, per_chunk, 4)
    g = g.reshape(chunks, per_chunk, size, size)
    numbers = lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3),
        inserted_window_dims=(0, 1),
        scatter_dims_to_operand_dims=(0, 1, 2, 3),
    )
    sums = lax.scatter_add(
        jnp.zeros((chunks,) + tuple(shape), g.dtype),
        indices,
        g,
        numbers,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    return _tree_sum(sums)


def _matmul(x: Array, y: Array) -> Array:
    """`x @ y` over the last two axes. With a vector on either side (one row of `x`
    or one column of `y`) the product is multiplied and summed elementwise: on a
    GPU a matrix product is a library call tuned for its shape at compile time, and
    the walk down the product tree has a vector product of another shape at every
    level."""
    if x.shape[-2] == 1 or y.shape[-1] == 1:
        return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)
    return jnp.einsum("...ij,...jk->...ik", x, y, precision=HIGHEST)


def _combine(first, second):
    A1, c1 = first
    A2, c2 = second
    shift = lax.stop_gradient(jnp.max(c2, axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0)
    scaled = jnp.exp(c2 - shift)[..., :, None] * A2
    B = _matmul(A1, scaled)
    s = B.sum(-1)
    return safe_divide(B, s[..., None]), c1 + shift + safe_log(s)


# One sequential step (a loop iteration: a few kernel launches; a step of the
# sequential scan takes 7 µs on an H200) takes about as long as this many FLOPs of
# batched products (assuming 70 x 70 products run at about 15 TFLOP/s there).
# `block_shape` weighs the `2L + log2(K + 1)` sequential steps of a pass against its
# `T + (K + 1) log2(K + 1)` products, the cost of a Hillis-Steele scan across the
# blocks (see the module docstring) rather than of the tree that replaced it: the
# block counts it picks are the ones measured on the GPU (on the large workload,
# S = 70, T = 50 000, K = 1 021 blocks of L = 49 steps). With the tree, an H100 ran
# that workload 1 to 6 % faster at K = 2 048 (its own optimum), and a CPU much
# slower at the tree's optimum (K = 1 000 against 250 at T = 5 000: 179 against
# 36 ms), so the model stays until a GPU measurement of the padded tree decides.
STEP_FLOPS = 1e8


def _cheapest_blocks(n: int, size: int) -> int:
    flops = 2 * size**3

    def cost(k: int) -> float:
        length, levels = -(-n // k), k.bit_length()
        sequential = 2 * length + levels
        products = k * length + (k + 1) * levels
        return STEP_FLOPS * sequential + flops * products

    # Under `vmap` a batch of sequences multiplies the products, not the sequential
    # steps, so the products across blocks are kept to at most twice those within.
    candidates = [
        k
        for k in {min(2**i, n) for i in range(n.bit_length() + 1)}
        if (k + 1) * k.bit_length() <= 2 * n
    ]
    return min(candidates, key=cost)


def block_shape(n: int, size: int, blocks: int | None = None) -> tuple[int, int]:
    """`(K, L)`: `K` blocks of `L` steps for a chain of `n` steps of `size x size`
    matrices (`K * L >= n`, at least one step), with about `blocks` blocks if given."""
    n = max(n, 1)
    if blocks is None:
        blocks = _cheapest_blocks(n, size)
    length = -(-n // min(max(blocks, 1), n))
    return -(-n // length), length


def _in_blocks(x: Array, n_blocks: int) -> Array:
    """`[K * L, ...]` in step order as `[L, K, ...]`: block `k`'s `l`-th at `[l, k]`."""
    return jnp.swapaxes(x.reshape((n_blocks, -1) + x.shape[1:]), 0, 1)


def _in_steps(x: Array) -> Array:
    """`[L, K, ...]` back in step order, `[K * L, ...]` (undoes `_in_blocks`)."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


class _Blocked(NamedTuple):
    # Steps 1..K*L in block order (`_in_blocks`); past T - 1, identity steps.
    pos: Int[Array, "L K 3"]
    # The evidence weights of each step's own element and of the element before it;
    # past T - 1, ones. A hard chain's windows hold only the clones of the observed
    # symbols, so its weights are ones but at its last element, where they are the
    # slots in use (`Chain.last`, as the scan's last backward message): the suffix
    # products then agree with the scan's messages through padded steps too.
    weights: Float[Array, "L K S"]
    weights_prev: Float[Array, "L K S"]
    # The log offset of each step's evidence (see `evidence_weights`).
    offset: Float[Array, "L K"]
    # The filtered message and log normaliser of step 0, and u of step T - 1.
    alpha0: Float[Array, " S"]
    log_n0: Float[Array, ""]
    u_last: Float[Array, " S"]


def _blocked(chain: Chain, blocks: int | None) -> _Blocked:
    n, size, dtype = chain.length - 1, chain.size, chain.pi0.dtype
    n_blocks, length = block_shape(n, size, blocks)
    pad = n_blocks * length - n
    identity = jnp.zeros((pad, 3), chain.pos.dtype).at[:, 0].set(chain.src.shape[0] - 1)
    pos = _in_blocks(jnp.concatenate([chain.pos, identity]), n_blocks)
    if chain.psi is None:
        w = jnp.ones((n + 1, size), dtype).at[-1].set(chain.last)
        offset = jnp.zeros((n + 1,), dtype)
    else:
        w, offset = evidence_weights(chain.psi)
    w = jnp.concatenate([w, jnp.ones((pad, size), dtype)])
    offset = jnp.concatenate([offset, jnp.zeros((pad,), dtype)])
    v0 = chain.pi0 * w[0]
    n0 = v0.sum()
    return _Blocked(
        pos,
        _in_blocks(w[1:], n_blocks),
        _in_blocks(w[:-1], n_blocks),
        _in_blocks(offset[1:], n_blocks),
        safe_divide(v0, n0),
        safe_log(n0) + offset[0],
        safe_divide(w[n], w[n].sum()),
    )


def _windows(chain: Chain, p: Array, w: Array, w_prev: Array) -> Array:
    """The step matrices `[K, S, S]` at positions `p` (`[K, 3]`), with the evidence."""
    B = jax.vmap(lambda q: window(chain.src, q, chain.size))(p)
    # A state without evidence at t-1 cannot be left at t: zeroing its row keeps
    # rows of unrelated states (padded windows) out of the products.
    rows = lax.stop_gradient(w_prev > 0)
    return B * w[:, None, :] * rows[:, :, None]


def _block_products(chain: Chain, blocked: _Blocked):
    """Phase 1: the product `P_k` of each block's steps, `(A, c)` of shapes `[K, S, S]`
    and `[K, S]`."""
    size, dtype = chain.size, chain.pi0.dtype
    n_blocks = blocked.pos.shape[1]

    def step(product, inputs):
        A, c = product
        p, w, w_prev, offset = inputs
        # A raw step needs no shift before the product, unlike `_combine`'s second
        # element: its entries are probabilities times evidence weights of at most
        # one, as in the sequential scan.
        R = jnp.einsum(
            "kij,kjl->kil", A, _windows(chain, p, w, w_prev), precision=HIGHEST
        )
        s = R.sum(-1)
        return (safe_divide(R, s[..., None]), c + safe_log(s) + offset[:, None]), None

    eye = jnp.broadcast_to(jnp.eye(size, dtype=dtype), (n_blocks, size, size))
    start = (eye, jnp.zeros((n_blocks, size), dtype))
    xs = (blocked.pos, blocked.weights, blocked.weights_prev, blocked.offset)
    (A, c), _ = lax.scan(step, start, xs)
    return A, c


# An element `(A, c)` of a product, or a batch of them.
_Element = tuple[Array, Array]


def _elements(blocked: _Blocked, products) -> _Element:
    """`[first, P_0, ..., P_{K-1}, I]`: the block products between the initial
    message (every row of `first` is it) and the identity after the last block."""
    A, c = products
    size = A.shape[-1]
    first_A = jnp.broadcast_to(blocked.alpha0, (1, size, size))
    first_c = jnp.broadcast_to(blocked.log_n0, (1, size))
    elements = jnp.concatenate([first_A, A]), jnp.concatenate([first_c, c])
    return _pad(elements, A.shape[0] + 2)


def _pad(elements: _Element, size: int) -> _Element:
    """Identity elements appended up to `size` elements."""
    A, c = elements
    missing = size - A.shape[0]
    if missing == 0:
        return elements
    eye = jnp.broadcast_to(
        jnp.eye(A.shape[-1], dtype=A.dtype), (missing,) + A.shape[1:]
    )
    return jnp.concatenate([A, eye]), jnp.concatenate(
        [c, jnp.zeros((missing,) + c.shape[1:], c.dtype)]
    )


def _interleave(even, odd):
    """`[even[0], odd[0], even[1], odd[1], ...]`, leaf by leaf."""
    return jax.tree.map(
        lambda e, o: jnp.stack([e, o], axis=1).reshape((-1,) + e.shape[1:]), even, odd
    )


class _Tree(NamedTuple):
    """A pairwise product tree of `n` elements, `P = ceil(n / 2)` pairs a level.

    `bottom`: the elements padded with identities to `2P`. `upper[j]`: the `P`
    products of neighbouring pairs of level `j` (the bottom for `j = 0`, else
    `upper[j - 1]` padded with identities to `2P`); the last level's first
    element is the product of all. Past a level's own elements its products are
    of identities, hence identities (exactly: `_combine(I, I)` is `I` with log
    scales 0), so every level is a padded level of the tree."""

    bottom: _Element
    upper: _Element


def tree_shape(n: int) -> tuple[int, int]:
    """`(P, depth)` of the product tree of `n >= 2` elements: `P = ceil(n / 2)`
    pairs a level, `ceil(log2(n))` levels above the bottom."""
    return -(-n // 2), (n - 1).bit_length()


def _up_sweep(elements: _Element) -> _Tree:
    """The product tree of `elements`, its levels a `lax.scan`.

    Every level multiplies as many pairs as the first, padded with identities:
    on a GPU each shape of matrix product is tuned at compile time. With a shape
    per level, the large workload (K = 1 021) took 16 to 21 s to compile on an
    H100 (log-likelihood 20.7 s, posteriors 19.6 s); padded, 6.6 s and 7.8 s,
    running as fast (5.3 and 6.9 ms). With one shape the levels are one loop
    body, so the graph does not grow with the depth either (unrolled, the
    posteriors' graph had about 170 fusions of its 309 on a CPU in the levels).
    The padding costs `(K + 2) / 2` products per level instead of the level's
    own, still a fraction of phase 1's `T`."""
    pairs, depth = tree_shape(elements[0].shape[0])
    bottom = _pad(elements, 2 * pairs)

    def level(x, _):
        A, c = x
        product = _combine((A[0::2], c[0::2]), (A[1::2], c[1::2]))
        return _pad(product, 2 * pairs), product

    # n = K + 2 >= 3 elements, so at least two levels.
    _, upper = lax.scan(level, bottom, None, length=depth)
    return _Tree(bottom, upper)


def _walk_down(tree: _Tree, step, top):
    """`step(evens, odds, above)` from the level below the top down to the bottom:
    `evens` and `odds` are the level's elements at even and odd positions (`P`
    each, the level padded with identities to `2P`), `above` the result for the
    level above (`P` entries, one per pair), and the result has `2P` entries; the
    top's result is `top`. Returns the bottom's, `2P` entries of which the first
    `n` are the elements'."""
    pairs = tree.bottom[0].shape[0] // 2

    def halves(elements):
        # Only the even or only the odd positions of the padded level, so that
        # the padding copies half a level.
        evens, odds = (jax.tree.map(lambda v: v[i::2], elements) for i in (0, 1))
        return _pad(evens, pairs), _pad(odds, pairs)

    def level(above, elements):
        result = step(*halves(elements), above)
        return jax.tree.map(lambda v: v[:pairs], result), None

    # The levels between the top and the bottom, from the top down.
    middle = jax.tree.map(lambda v: v[-2::-1], tree.upper)
    above, _ = lax.scan(level, top, middle)
    return step(*halves(tree.bottom), above)


def _prefix_rows(tree: _Tree) -> _Element:
    """Inclusive prefix products of the tree's elements, whose first element has
    identical rows, so that every prefix does too: one row each, `[2P, 1, S]` and
    `[2P, 1]` (the first `n` the elements'). Walks the tree down: an odd
    position's prefix is its pair's, an even one's the previous pair's prefix times
    the element (a vector times a matrix)."""

    def step(evens, odds, rows):
        A, c = evens
        earlier = jax.tree.map(lambda v: v[:-1], rows)
        later = _combine(earlier, (A[1:], c[1:]))
        first = (A[:1, :1], c[:1, :1])
        even = jax.tree.map(lambda f, e: jnp.concatenate([f, e]), first, later)
        return _interleave(even, rows)

    A, c = jax.tree.map(lambda v: v[-1], tree.upper)
    return _walk_down(tree, step, (A[:, :1], c[:, :1]))


def _suffix_columns(tree: _Tree) -> Array:
    """`log(E_i @ ... @ E_{n-1} @ 1)` for every element `i` of the tree, `[2P, S]`:
    the tree walked down as in `_prefix_rows`, here a matrix times a vector. A
    column `v` is the element `(ones [S, 1], log v)`, so that `_combine` multiplies
    by it."""

    def step(evens, odds, columns):
        A, c = odds
        later = (jnp.ones_like(columns[1:])[..., None], columns[1:])
        odd = _combine((A[:-1], c[:-1]), later)[1]
        # The last pair's odd element has nothing after it: its own row sums.
        odd = jnp.concatenate([odd, c[-1:]])
        return _interleave(columns, odd)

    return _walk_down(tree, step, tree.upper[1][-1])


def _flip(tree):
    return jax.tree.map(lambda v: v[::-1], tree)


def _within_blocks(
    chain: Chain, blocked: _Blocked, alpha_in: Array | None, u_out: Array | None
) -> tuple[Any, Any]:
    """Phase 3: the per-step messages inside every block, forward from `alpha_in`
    (the filtered message before each block's first step, `[K, S]`) and backward
    from `u_out` (`u` after its last step), either None.

    Returns `(alphas, norms)` of steps `1..K*L` and `(us, betas)` of the elements
    before them, `0..K*L-1` (`beta[t] = B[t+1] @ u[t+1]`), in step order; None for a
    direction not asked for.
    """
    forward = jax.vmap(functools.partial(forward_step, chain.src, chain.size))
    backward = jax.vmap(functools.partial(backward_step, chain.src, chain.size))

    def step(messages, inputs):
        alpha, u = messages
        (p, w), later = inputs
        outputs = None, None
        if alpha is not None:
            alpha, n = forward(alpha, p, w)
            outputs = (alpha, n), None
        if u is not None:
            u, beta = backward(u, *later)
            outputs = outputs[0], (u, beta)
        return (alpha, u), outputs

    # The backward half walks the blocks from their ends: step L-1-l at loop step l.
    later = None if u_out is None else _flip((blocked.pos, blocked.weights_prev))
    xs = ((blocked.pos, blocked.weights), later)
    _, (forward_out, backward_out) = lax.scan(step, (alpha_in, u_out), xs)
    if backward_out is not None:
        backward_out = _flip(backward_out)
    return jax.tree.map(_in_steps, (forward_out, backward_out))


def _forward_outputs(chain: Chain, blocked: _Blocked, alphas, norms):
    n = chain.length - 1
    offset = _in_steps(blocked.offset)[:n]
    alphas = jnp.concatenate([blocked.alpha0[None], alphas[:n]])
    log_norms = jnp.concatenate([blocked.log_n0[None], safe_log(norms[:n]) + offset])
    return alphas, log_norms


def _product_tree(chain: Chain, blocked: _Blocked) -> _Tree:
    """Phases 1 and 2 up the tree: the block products and their product tree."""
    return _up_sweep(_elements(blocked, _block_products(chain, blocked)))


def _entering(blocked: _Blocked, tree: _Tree) -> Array:
    """The filtered message before each block's first step, `[K, S]`: the prefix
    through the elements before it (`first, P_0, ..., P_{k-1}`)."""
    n_blocks = blocked.pos.shape[1]
    return _prefix_rows(tree)[0][:n_blocks, 0]


def _smooth(chain: Chain, blocked: _Blocked, tree: _Tree):
    """Phases 2 (down the tree) and 3 of smoothing, given the product tree.

    Returns `(alphas, log_norms, us, gammas, betas)`: `betas[t] = B[t+1] @ u[t+1]`
    for `t < T - 1`, the rest as `parallel_smooth`.
    """
    n = chain.length - 1
    # `u` after each block's last step: that element's evidence times the products of
    # the later blocks applied to ones (the suffixes from `P_{k+1}`).
    n_blocks = blocked.pos.shape[1]
    log_u = _suffix_columns(tree)[2 : n_blocks + 2] + safe_log(blocked.weights[-1])
    forward_out, (us, betas) = _within_blocks(
        chain, blocked, _entering(blocked, tree), _normalise_log(log_u)
    )
    alphas, log_norms = _forward_outputs(chain, blocked, *forward_out)
    betas = betas[:n]
    products = alphas[:-1] * betas
    gammas = safe_divide(products, products.sum(-1, keepdims=True))
    us = jnp.concatenate([us[:n], blocked.u_last[None]])
    gammas = jnp.concatenate([gammas, alphas[-1:]])
    return alphas, log_norms, us, gammas, betas


def parallel_forward(
    chain: Chain, blocks: int | None = None
) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """Filtered messages and per-step log normalisers, as `forward_scan`.

    `blocks`: about how many blocks (default: `block_shape`'s choice).
    """
    blocked = _blocked(chain, blocks)
    alpha_in = _entering(blocked, _product_tree(chain, blocked))
    (forward_out, _) = _within_blocks(chain, blocked, alpha_in, None)
    return _forward_outputs(chain, blocked, *forward_out)


def parallel_smooth(
    chain: Chain, blocks: int | None = None
) -> tuple[
    Float[Array, "T S"], Float[Array, " T"], Float[Array, "T S"], Float[Array, "T S"]
]:
    """`(alphas, log_norms, us, gammas)`, as `forward_scan` and `backward_scan`: one
    phase 1 and one product tree for both directions, and phase 3 running them side
    by side."""
    blocked = _blocked(chain, blocks)
    return _smooth(chain, blocked, _product_tree(chain, blocked))[:4]


def _total(tree: _Tree) -> Array:
    """`lnL`: the log scale of the product of all elements (any row: the first
    element's rows are identical)."""
    return tree.upper[1][-1, 0, 0]


# The gradient is the forward-backward formula of `_scan.py`'s `_log_likelihood` (see
# there) with the messages of `_smooth`: differentiating through the block products
# instead would keep every step's `S x S` intermediates and run three products per
# step rather than one.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _log_likelihood(src, pi0, psi, pos, last, blocks):
    chain = Chain(src, pos, pi0, psi, last, None)
    return _total(_product_tree(chain, _blocked(chain, blocks)))


def _log_likelihood_fwd(src, pi0, psi, pos, last, blocks):
    chain = Chain(src, pos, pi0, psi, last, None)
    tree = _product_tree(chain, _blocked(chain, blocks))
    return _total(tree), (chain, tree)


def _log_likelihood_bwd(blocks, residuals, g):
    chain, tree = residuals
    alphas, _, us, gammas, betas = _smooth(chain, _blocked(chain, blocks), tree)
    # dlnL/dB[t] = outer(alpha[t-1], u[t]) / d[t], with d[t] = alpha[t-1] . beta[t-1].
    d = jnp.sum(alphas[:-1] * betas, axis=-1)
    grads = alphas[:-1, :, None] * safe_divide(us[1:], d[:, None])[:, None, :]
    d_src = _scatter_windows(chain.src, chain.pos, g * grads, chain.size)
    d_pi0 = safe_divide(us[0], jnp.sum(chain.pi0 * us[0]))
    d_psi = None if chain.psi is None else g * gammas
    return d_src, g * d_pi0, d_psi, None, None


_log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)


def parallel_log_likelihood(
    chain: Chain, blocks: int | None = None
) -> Float[Array, ""]:
    """`lnL` of a chain: block products (phase 1) and their product tree (phase 2), with
    a gradient by a parallel forward-backward pass.

    `blocks`: about how many blocks (default: `block_shape`'s choice).
    """
    return _log_likelihood(
        chain.src, chain.pi0, chain.psi, chain.pos, chain.last, blocks
    )


def _normalise_log(log_v: Array) -> Array:
    top = jnp.max(log_v, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0)
    v = jnp.exp(log_v - top)
    return safe_divide(v, v.sum(-1, keepdims=True))
