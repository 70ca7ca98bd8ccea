"""Layer norm and exact GELU whose backward passes keep only their inputs.

Under plain autodiff a mixed-precision layer norm keeps its float32 intermediates
(the upcast input, the centred input, the normalised output) for the backward pass,
and an exact GELU keeps its `erf` terms: in a transformer these residuals are several
times the size of the bfloat16 activations, and writing and re-reading them costs
more time than the matmuls around them. These versions (`jax.custom_vjp`) keep the
input in its own dtype plus, for the layer norm, one float32 mean and reciprocal
standard deviation per row, and recompute the rest in the backward pass, where XLA
fuses it into the gradient's elementwise kernels.
"""

import functools
import math
from typing import cast

import jax
import jax.numpy as jnp
from jaxtyping import Array


def _statistics(x, eps):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return xf, mean, jax.lax.rsqrt(var + eps)


def _normalise(x, weight, bias, eps):
    xf, mean, rstd = _statistics(x, eps)
    y = (xf - mean) * rstd
    y = (y * weight.astype(y.dtype) + bias.astype(y.dtype)).astype(x.dtype)
    return y, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, weight, bias, eps):
    return _normalise(x, weight, bias, eps)[0]


def _layer_norm_fwd(x, weight, bias, eps):
    y, mean, rstd = _normalise(x, weight, bias, eps)
    # Left to itself XLA recomputes the mean from `x` inside the backward pass;
    # that row reduction then shares a fusion with the weight gradient's product,
    # which it writes out in float32 for a second, column, reduction (on the
    # H200, 2 % of a GPT-2-sized training step). The barrier keeps the saved values.
    mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    return y, (x, mean, rstd, weight, bias)


def _layer_norm_bwd(eps, residuals, g):
    del eps
    x, mean, rstd, weight, bias = residuals
    xf = x.astype(mean.dtype)
    xhat = (xf - mean) * rstd
    gf = g.astype(mean.dtype)
    rows = tuple(range(x.ndim - 1))
    d_weight = jnp.sum(gf * xhat, axis=rows).astype(weight.dtype)
    d_bias = jnp.sum(gf, axis=rows).astype(bias.dtype)
    gxhat = gf * weight.astype(mean.dtype)
    d_x = rstd * (
        gxhat
        - jnp.mean(gxhat, axis=-1, keepdims=True)
        - xhat * jnp.mean(gxhat * xhat, axis=-1, keepdims=True)
    )
    return d_x.astype(x.dtype), d_weight, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: Array, weight: Array, bias: Array, eps: float = 1e-5) -> Array:
    """Layer norm over the last axis, statistics in float32 (or wider).

    `(x - mean) / sqrt(var + eps) * weight + bias`, returned in the dtype of `x`;
    `weight` and `bias` have the shape of the last axis. The backward pass keeps
    only `x` and the per-row statistics.
    """
    return cast(Array, _layer_norm(x, weight, bias, eps))


def _gelu_terms(x):
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    cdf = 0.5 * (1.0 + jax.lax.erf(xf * (1.0 / math.sqrt(2.0))))
    return xf, cdf


@jax.custom_vjp
def _gelu(x):
    xf, cdf = _gelu_terms(x)
    return (xf * cdf).astype(x.dtype)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, g):
    xf, cdf = _gelu_terms(x)
    pdf = jnp.exp(-0.5 * jnp.square(xf)) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(xf.dtype) * (cdf + xf * pdf)).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x: Array) -> Array:
    """Exact GELU, `x * Phi(x)` with `Phi` the standard normal CDF, evaluated in
    float32 (or wider) and returned in the dtype of `x`. The backward pass keeps
    only `x`."""
    return cast(Array, _gelu(x))
