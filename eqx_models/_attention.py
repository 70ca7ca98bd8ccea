"""Scaled dot-product attention shared by the library's transformers, and the
automatic choice between XLA's and cuDNN's implementations.

Why a module of its own: the multimodal LM (causal attention over a sequence) and
the causal surrogate (attention over the samples and over the variables of a
dataset) need the same two things, an attention that stays exact in float64 and a
rule for when cuDNN's fused kernel may be used.
"""

from typing import Literal

import jax
import jax.numpy as jnp

from transforms.validation import fail


Implementation = Literal["xla", "cudnn"]


_HALF = (jnp.bfloat16, jnp.float16)


def attention_implementation(
    choice: str,
    dtype,
    head_dim: int,
    length: int,
    *,
    needs_even_length: bool,
    fn: str = "attention",
) -> Implementation:
    """The implementation `choice` (`"auto"`, `"xla"` or `"cudnn"`) stands for.

    `"auto"` picks cuDNN's fused flash attention on a GPU in half precision with a
    head dimension it supports (a multiple of 8, at most 128), and XLA otherwise.
    `needs_even_length`: the caller passes a mask (which cuDNN receives as a bias),
    with which its training kernels need an even sequence `length`.

    An explicit `"cudnn"` is checked against what the kernel can run at all, so
    that a model asked for it off a GPU or in single precision fails with a message
    naming `fn`'s `attention` instead of a lowering error from inside JAX.
    """
    if choice == "cudnn":
        backend = jax.default_backend()
        if backend != "gpu" or dtype not in _HALF:
            raise fail(
                fn,
                "attention",
                '"auto" or "xla" here: cuDNN\'s fused attention runs on a GPU in '
                "bfloat16 or float16 only (`cast_floating(model, jnp.bfloat16)`)",
                f'"cudnn" with {jnp.dtype(dtype).name} weights on backend {backend!r}',
            )
        return "cudnn"
    if choice == "xla":
        return "xla"
    if (
        jax.default_backend() == "gpu"
        and dtype in _HALF
        and head_dim % 8 == 0
        and head_dim <= 128
        and not (needs_even_length and length % 2)
    ):
        return "cudnn"
    return "xla"


def dot_product_attention(
    q,
    k,
    v,
    *,
    is_causal: bool = False,
    mask=None,
    lengths=None,
    implementation: Implementation,
):
    """`jax.nn.dot_product_attention` (`q`, `k`, `v` of shape `(batch, length,
    heads, head_dim)`) with a boolean `mask` and key lengths, exact in float64.

    JAX's XLA implementation rounds the scores to float32 before the softmax
    whatever the inputs' dtype; under `jax_enable_x64` with float64 inputs the
    same attention is computed here in float64 instead (the library's float64
    tests compare packed with padded batches, cached decoding with the full
    forward, and the surrogate with its reference, to 1e-10). Other dtypes go to
    JAX unchanged.
    """
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            key_value_seq_lengths=lengths,
            implementation=implementation,
        )
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1])
    n_q, n_k = q.shape[1], k.shape[1]
    allowed = jnp.ones((1, 1, n_q, n_k), bool)
    if is_causal:
        allowed = allowed & (jnp.arange(n_q)[:, None] >= jnp.arange(n_k)[None, :])
    if mask is not None:
        allowed = allowed & mask
    if lengths is not None:
        allowed = allowed & (jnp.arange(n_k) < lengths[:, None, None, None])
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
