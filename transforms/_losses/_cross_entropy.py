"""Cross-entropy of a linear output head without the full logits array.

`chunked_cross_entropy` scans over chunks of rows and, through a `jax.custom_vjp`,
forms the gradient in the same pass, so only one chunk's logits exist at a time in
either direction. For a large vocabulary this is where a language model's memory
would otherwise go, hence a module of its own.
"""

import functools
from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from .._train._batch_sharding import batch_shards, constrain_batch
from .._validation import check_ids, check_size, typechecked
from ._masked import pairwise_sum


_VOCAB_TILE = 128
# Pad only while the padding adds at most 1/16 of the vocabulary's rows.
_MAX_PADDING_RATIO = 16


def _chunks(x, n_chunks: int, strided: bool):
    """`x` split along its rows into `n_chunks` chunks, stacked. Strided chunks
    (chunk `j` holds rows `j, j + n_chunks, ...`) when the rows are split over
    devices: each chunk then takes its share of every device's rows, where
    consecutive rows would put a chunk on a few devices and the scan over chunks
    would gather them."""
    size = x.shape[0] // n_chunks
    if not strided:
        return x.reshape((n_chunks, size) + x.shape[1:])
    x = x.reshape((size, n_chunks) + x.shape[1:])
    return constrain_batch(jnp.swapaxes(x, 0, 1), dim=1)


def _unchunk(x, strided: bool):
    """The rows of chunks from `_chunks`, in their original order."""
    if strided:
        x = jnp.swapaxes(x, 0, 1)
    return x.reshape((-1,) + x.shape[2:])


def _chunk_logits(h, weight, bias, accumulate):
    # The matmul runs in the dtype of the hidden states (bf16 on a GPU; `weight`
    # is already cast) and accumulates in float32 or wider; only this chunk's
    # logits exist at once.
    logits = jnp.dot(h, weight.T, preferred_element_type=accumulate)
    return logits + bias.astype(accumulate)


def _prepare(hidden, targets, where, chunk_size):
    """Pad to whole chunks (padding rows are unselected) and split into chunks."""
    n = hidden.shape[0]
    size = max(1, min(chunk_size, n))
    # At least one chunk: with no rows at all, one padding row gives the promised 0.
    n_chunks = max(1, -(-n // size))
    pad = n_chunks * size - n
    if pad:
        hidden = jnp.concatenate(
            [hidden, jnp.zeros((pad,) + hidden.shape[1:], hidden.dtype)]
        )
        targets = jnp.concatenate([targets, jnp.zeros((pad,), targets.dtype)])
        where = jnp.concatenate([where, jnp.zeros((pad,), bool)])
    strided = n_chunks > 1 and batch_shards() > 1
    return (
        _chunks(hidden, n_chunks, strided),
        _chunks(targets, n_chunks, strided),
        _chunks(where, n_chunks, strided),
    ), strided


def _accumulate_dtype(hidden, weight):
    return jnp.result_type(hidden.dtype, weight.dtype, jnp.float32)


def _scale(where, accumulate):
    return 1 / jnp.maximum(jnp.sum(where, dtype=jnp.int32), 1).astype(accumulate)


def _chunk_loss(h, t, w, weight, bias, accumulate):
    logits = _chunk_logits(h, weight, bias, accumulate)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return logits, lse, jnp.sum(jnp.where(w, lse - target_logit, 0))


def _pad_vocabulary(weight, bias):
    """Pad a large vocabulary to a multiple of `_VOCAB_TILE` rows.

    Matmul kernels tile the vocabulary axis; an odd size (13 317, say) leaves a
    ragged last tile that GPU kernels handle slowly. Padding rows have zero weight
    and a bias of `-inf`, so their probability and gradient are exactly 0. A small
    vocabulary is left as it is: padding it would add more work than it saves.
    """
    v = weight.shape[0]
    pad = -v % _VOCAB_TILE
    if pad == 0 or pad * _MAX_PADDING_RATIO > v:
        return weight, bias
    weight = jnp.concatenate([weight, jnp.zeros((pad, weight.shape[1]), weight.dtype)])
    bias = jnp.concatenate([bias, jnp.full((pad,), -jnp.inf, bias.dtype)])
    return weight, bias


def _loss(chunk_size, hidden, weight, bias, targets, where):
    accumulate = _accumulate_dtype(hidden, weight)
    weight = weight.astype(hidden.dtype)  # once, outside the loop over chunks
    weight, bias = _pad_vocabulary(weight, bias)

    def body(_, xs):
        h, t, w = xs
        return None, _chunk_loss(h, t, w, weight, bias, accumulate)[2]

    xs, _ = _prepare(hidden, targets, where, chunk_size)
    _, sums = jax.lax.scan(body, None, xs)
    return pairwise_sum(sums) * _scale(where, accumulate)


def _loss_and_grads(chunk_size, hidden, weight, bias, targets, where):
    accumulate = _accumulate_dtype(hidden, weight)
    scale = _scale(where, accumulate)
    primal_weight, primal_bias = weight, bias
    weight = weight.astype(hidden.dtype)  # once, outside the loop over chunks
    weight, bias = _pad_vocabulary(weight, bias)
    padded = weight.shape[0]

    def body(carry, xs):
        h, t, w = xs
        d_weight, d_bias = carry
        logits, lse, chunk_sum = _chunk_loss(h, t, w, weight, bias, accumulate)
        probs = jnp.exp(logits - lse[:, None])
        onehot = jnp.arange(padded) == t[:, None]
        d_logits = (probs - onehot) * jnp.where(w, scale, 0)[:, None]
        d_logits_c = d_logits.astype(h.dtype)
        d_h = jnp.dot(d_logits_c, weight, preferred_element_type=accumulate).astype(
            hidden.dtype
        )
        d_weight = d_weight + jnp.dot(
            d_logits_c.T, h, preferred_element_type=accumulate
        )
        d_bias = d_bias + jnp.sum(d_logits, axis=0)
        return (d_weight, d_bias), (chunk_sum, d_h)

    init = (jnp.zeros(weight.shape, accumulate), jnp.zeros((padded,), accumulate))
    xs, strided = _prepare(hidden, targets, where, chunk_size)
    (d_weight, d_bias), (sums, d_h) = jax.lax.scan(body, init, xs)
    d_hidden = _unchunk(d_h, strided)[: hidden.shape[0]]
    # Gradients in the primal dtypes: a float32 master weight keeps a float32
    # gradient even when the matmuls ran in bfloat16.
    n_vocab = primal_weight.shape[0]
    grads = (
        d_hidden,
        d_weight[:n_vocab].astype(primal_weight.dtype),
        d_bias[:n_vocab].astype(primal_bias.dtype),
    )
    return pairwise_sum(sums) * scale, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_cross_entropy(chunk_size, hidden, weight, bias, targets, where):
    return _loss(chunk_size, hidden, weight, bias, targets, where)


def _fused_fwd(chunk_size, hidden, weight, bias, targets, where):
    return _loss_and_grads(chunk_size, hidden, weight, bias, targets, where)


def _fused_bwd(chunk_size, grads, g):
    return tuple((g * r).astype(r.dtype) for r in grads) + (None, None)


_fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd)


@typechecked
def chunked_cross_entropy(
    hidden: Float[Array, "n d"],
    weight: Float[Array, "v d"],
    bias: Float[Array, " v"] | None,
    targets: Int[Array, " n"],
    *,
    where: Bool[Array, " n"] | None = None,
    chunk_size: int = 4096,
    check_targets: bool = True,
) -> Float[Array, ""]:
    """Mean cross-entropy of a linear output head, without the full logits array.

    Computes `mean_i [logsumexp(z_i) - z_i[targets_i]]` over the positions selected
    by `where`, with `z_i = weight @ hidden_i + bias`, by scanning over chunks of
    `chunk_size` rows: only one chunk's `(chunk_size, v)` logits exist at a time, in
    float32 (or wider). The gradient is computed chunk by chunk in the same pass
    (a `jax.custom_vjp`: softmax minus one-hot, then two matmuls), so
    differentiating costs no recomputation of the logits and never builds an
    `(n, v)` array either.

    The matmuls run in the dtype of `hidden` (pass bfloat16 hidden states and the
    float32 master `weight` for mixed precision: the weight is cast per chunk and
    its gradient is accumulated in float32) with float32 accumulation.

    **Arguments:**

    - `hidden`: the inputs of the head, shape `(n, d)`.
    - `weight`: the head's weight, shape `(v, d)` (as `eqx.nn.Linear.weight`).
    - `bias`: the head's bias, shape `(v,)`, or `None`.
    - `targets`: target classes, integers in `[0, v)`, shape `(n,)`.
    - `where`: boolean mask of shape `(n,)`; `None` counts every position. The
        result is 0 (with zero gradient) when no position is selected.
    - `chunk_size`: rows per chunk; larger is faster until memory runs short.
    - `check_targets`: check at run time that selected targets lie in `[0, v)`.
        Pass `False` only when the caller has already checked them (each check is
        a device-to-host synchronisation on a GPU).

    **Returns:**

    The mean cross-entropy, a scalar in float32 (float64 under x64 with float64
    inputs).

    **Raises:**

    `TypeError` (from the annotations) for inconsistent shapes or dtypes, and for a
    `chunk_size` that is not a positive integer; `ValueError` for `chunk_size < 1`;
    with `check_targets`, `ValueError` if a selected target lies outside `[0, v)`
    (at once for concrete targets, at run time by `eqx.error_if` under `jit`).
    """
    name = "chunked_cross_entropy"
    n, d = hidden.shape
    v = weight.shape[0]
    check_size(name, "chunk_size", chunk_size)
    if where is None:
        where = jnp.ones((n,), bool)
    if bias is None:
        bias = jnp.zeros((v,), weight.dtype)
    if check_targets:
        targets = check_ids(name, "targets", targets, v, where=where)
    args = (hidden, weight, bias, jnp.clip(targets, 0, v - 1), where)
    loss = functools.partial(_fused_cross_entropy, chunk_size)
    mesh = _explicit_mesh(*args)
    if mesh is None:
        return loss(*args)
    # Explicit axes would make every reshape into chunks and every product over
    # split rows spell out its output's sharding; inside, the axes are XLA's to lay
    # out (as in a step with a mesh), and the mean comes back replicated. The
    # arrays' mesh is made the context's, which `auto_axes` reads.
    with jax.sharding.use_abstract_mesh(mesh):
        auto = jax.sharding.auto_axes(loss, axes=mesh.explicit_axes, out_sharding=P())
        return cast(Callable[..., Array], auto)(*args)


def _explicit_mesh(*arrays):
    """The (abstract) mesh of the first array whose type has `Explicit` axes, or
    `None` outside explicit sharding."""
    for x in arrays:
        mesh = getattr(jax.typeof(x).sharding, "mesh", None)
        if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
            return mesh
    return None
