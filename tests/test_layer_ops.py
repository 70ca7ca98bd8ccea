import math

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.ad_checkpoint import saved_residuals

from eqx_models._layer_ops import gelu, layer_norm


def _numpy_layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _numpy_gelu(x):
    erf = np.vectorize(math.erf)
    return x * 0.5 * (1 + erf(x / math.sqrt(2)))


def _numpy_gelu_derivative(x):
    erf = np.vectorize(math.erf)
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x**2) / math.sqrt(
        2 * math.pi
    )


def _problem(seed, shape=(3, 4, 10)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * 2 + 0.5
    w = rng.normal(size=shape[-1:])
    b = rng.normal(size=shape[-1:])
    g = rng.normal(size=shape)
    return x, w, b, g


def test_layer_norm_value_and_gradient_match_numpy(x64):
    x, w, b, g = _problem(0)
    np.testing.assert_allclose(
        layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)),
        _numpy_layer_norm(x, w, b),
        rtol=1e-12,
        atol=1e-12,
    )

    # Central differences of <g, LN(x, w, b)> in float64, one coordinate at a time.
    def objective(x, w, b):
        return np.sum(g * _numpy_layer_norm(x, w, b))

    def numeric(i, args):
        grad = np.zeros_like(args[i])
        for idx in np.ndindex(args[i].shape):
            up = [a.copy() for a in args]
            down = [a.copy() for a in args]
            up[i][idx] += 1e-6
            down[i][idx] -= 1e-6
            grad[idx] = (objective(*up) - objective(*down)) / 2e-6
        return grad

    got = jax.jit(
        jax.grad(
            lambda x, w, b: jnp.sum(jnp.asarray(g) * layer_norm(x, w, b)),
            argnums=(0, 1, 2),
        )
    )(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
    for i, grad in enumerate(got):
        np.testing.assert_allclose(grad, numeric(i, (x, w, b)), rtol=1e-6, atol=1e-7)


def test_gelu_value_and_gradient_match_numpy(x64):
    x, _, _, g = _problem(1)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), _numpy_gelu(x), rtol=1e-12)
    got = jax.grad(lambda x: jnp.sum(jnp.asarray(g) * gelu(x)))(jnp.asarray(x))
    np.testing.assert_allclose(got, g * _numpy_gelu_derivative(x), rtol=1e-12)


def test_bfloat16_inputs_keep_their_dtype_and_float32_precision():
    x, w, b, g = _problem(2, (64, 32))
    xb = jnp.asarray(x, jnp.bfloat16)
    wf, bf = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    y = layer_norm(xb, wf, bf)
    assert y.dtype == jnp.bfloat16
    # Statistics in float32: the only error is the final rounding to bfloat16.
    want = _numpy_layer_norm(np.asarray(xb, np.float64), w, b)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2**-7, atol=2**-7)
    dx, dw, db = jax.grad(
        lambda x, w, b: jnp.sum(jnp.asarray(g, jnp.bfloat16) * layer_norm(x, w, b)),
        argnums=(0, 1, 2),
    )(xb, wf, bf)
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    assert gelu(xb).dtype == jnp.bfloat16
    assert jax.grad(lambda x: jnp.sum(gelu(x).astype(jnp.float32)))(xb).dtype == (
        jnp.bfloat16
    )


def test_backward_keeps_only_the_inputs_and_row_statistics():
    # The point of the custom VJPs: no float32 copy of a bfloat16 activation (and
    # no erf term) is kept for the backward pass.
    x = jnp.ones((16, 32), jnp.bfloat16)
    w, b = jnp.ones(32), jnp.zeros(32)
    residuals = saved_residuals(lambda x, w, b: layer_norm(x, w, b), x, w, b)
    big = [r for r, _ in residuals if r.shape == x.shape]
    assert big and all(r.dtype == jnp.bfloat16 for r in big)
    rows = [r for r, _ in residuals if r.shape == (16, 1)]
    assert len(big) + len(rows) + 2 == len(residuals)  # plus weight and bias
    residuals = saved_residuals(gelu, x)
    assert [(r.shape, r.dtype) for r, _ in residuals] == [(x.shape, jnp.bfloat16)]


def test_jit_vmap_and_second_use():
    x, w, b, _ = _problem(3)
    x, w, b = (jnp.asarray(a, jnp.float32) for a in (x, w, b))
    batched = jax.jit(jax.vmap(lambda x: layer_norm(x, w, b)))(x)
    np.testing.assert_allclose(batched, layer_norm(x, w, b), rtol=1e-5, atol=1e-6)
    vg = jax.vmap(jax.grad(lambda x: jnp.sum(gelu(x) ** 2)))(x)
    np.testing.assert_allclose(
        vg, jax.grad(lambda x: jnp.sum(gelu(x) ** 2))(x), rtol=1e-6
    )
