import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transforms import chunked_cross_entropy


def _problem(seed, n=37, d=8, v=11, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, d)), dtype)
    weight = jnp.asarray(rng.normal(size=(v, d)) / np.sqrt(d), dtype)
    bias = jnp.asarray(rng.normal(size=(v,)), dtype)
    targets = jnp.asarray(rng.integers(0, v, n))
    where = jnp.asarray(rng.random(n) < 0.7)
    return hidden, weight, bias, targets, where


def _numpy_ce(hidden, weight, bias, targets, where):
    z = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64).T
    z = z + np.asarray(bias, np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    per = lse - z[np.arange(len(z)), np.asarray(targets)]
    w = np.asarray(where)
    return per[w].mean()


def _numpy_grads(hidden, weight, bias, targets, where):
    """d/dz of the mean cross-entropy is (softmax(z) - onehot) / count per row."""
    h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    z = h @ w.T + np.asarray(bias, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(z)), np.asarray(targets)] -= 1
    mask = np.asarray(where)
    dz = p * mask[:, None] / mask.sum()
    return dz @ w, dz.T @ h, dz.sum(0)


def _full_ce(hidden, weight, bias, targets, where):
    z = hidden @ weight.T + bias
    per = (
        jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, targets[:, None], 1)[:, 0]
    )
    return jnp.sum(jnp.where(where, per, 0)) / jnp.sum(where)


# v = 2050 is padded internally to a whole tile of the vocabulary axis (17 x 128
# rows); 128 is a whole tile, and 11 is too small to be worth padding.
@pytest.mark.parametrize("chunk_size,v", [(5, 11), (64, 11), (16, 128), (16, 2050)])
def test_chunked_equals_full_cross_entropy_value_and_gradient(x64, chunk_size, v):
    hidden, weight, bias, targets, where = _problem(0, v=v, dtype=jnp.float64)
    f = jax.jit(
        jax.value_and_grad(
            lambda h, w, b: chunked_cross_entropy(
                h, w, b, targets, where=where, chunk_size=chunk_size
            ),
            argnums=(0, 1, 2),
        )
    )
    value, grads = f(hidden, weight, bias)
    np.testing.assert_allclose(
        value, _numpy_ce(hidden, weight, bias, targets, where), rtol=1e-12
    )
    want = _numpy_grads(hidden, weight, bias, targets, where)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.usefixtures("highest_precision")
def test_chunked_cross_entropy_float32_no_bias_and_vmap():
    hidden, weight, _, targets, where = _problem(1)
    got = chunked_cross_entropy(
        hidden, weight, None, targets, where=where, chunk_size=10
    )
    zero = jnp.zeros(weight.shape[0])
    np.testing.assert_allclose(
        got, _numpy_ce(hidden, weight, zero, targets, where), rtol=1e-5
    )
    # Two independent problems under vmap; unmasked = every position.
    batched = jax.jit(
        jax.vmap(lambda h, t: chunked_cross_entropy(h, weight, None, t, chunk_size=16))
    )(jnp.stack([hidden, 2 * hidden]), jnp.stack([targets, targets]))
    everywhere = np.ones(len(targets), bool)
    np.testing.assert_allclose(
        batched[1], _numpy_ce(2 * hidden, weight, zero, targets, everywhere), rtol=1e-5
    )


@pytest.mark.slow
def test_bfloat16_hidden_with_float32_master_weight():
    hidden, weight, bias, targets, where = _problem(2, n=64, d=16, v=32)
    f = jax.jit(
        jax.grad(
            lambda h, w: chunked_cross_entropy(
                h, w, bias, targets, where=where, chunk_size=16
            ),
            argnums=(0, 1),
        )
    )
    d_hidden, d_weight = f(hidden.astype(jnp.bfloat16), weight)
    assert d_hidden.dtype == jnp.bfloat16 and d_weight.dtype == jnp.float32
    ref_h, ref_w = jax.grad(_full_ce, argnums=(0, 1))(
        hidden, weight, bias, targets, where
    )
    np.testing.assert_allclose(d_weight, ref_w, atol=2e-3)
    np.testing.assert_allclose(d_hidden.astype(jnp.float32), ref_h, atol=2e-3)


def test_nothing_selected_is_zero_with_zero_gradient():
    hidden, weight, bias, targets, _ = _problem(3)
    none = jnp.zeros(len(targets), bool)
    value, grads = jax.value_and_grad(
        lambda h, w, b: chunked_cross_entropy(h, w, b, targets, where=none),
        argnums=(0, 1, 2),
    )(hidden, weight, bias)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_no_full_logits_buffer_in_the_compiled_gradient():
    # n * v float32 logits would be 64 MiB; the chunked loss must not allocate it,
    # while the naive loss does (compiled memory analysis, nothing is run).
    n, d, v = 4096, 16, 4096
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    weight = jax.ShapeDtypeStruct((v, d), jnp.float32)
    bias = jax.ShapeDtypeStruct((v,), jnp.float32)
    targets = jax.ShapeDtypeStruct((n,), jnp.int32)
    where = jax.ShapeDtypeStruct((n,), jnp.bool_)
    logits_bytes = n * v * 4

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        compiled = grad.lower(hidden, weight, bias, targets, where).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(
        lambda h, w, b, t, m: chunked_cross_entropy(h, w, b, t, where=m, chunk_size=256)
    )
    naive = temp_bytes(_full_ce)
    assert naive >= logits_bytes
    assert chunked < logits_bytes / 4, (chunked, naive)


def test_target_errors():
    hidden, weight, bias, targets, where = _problem(4)
    bad = targets.at[3].set(weight.shape[0])
    loss = eqx.filter_jit(chunked_cross_entropy)
    v = weight.shape[0]
    with pytest.raises(
        eqx.EquinoxRuntimeError, match=rf"`targets` .*ids in \[0, {v}\)"
    ):
        loss(hidden, weight, bias, bad, where=jnp.ones(len(targets), bool))
    # Concrete targets are checked at the call, naming the offending entry.
    with pytest.raises(
        ValueError, match=rf"ids in \[0, {v}\), got {v} at index \(3,\)"
    ):
        chunked_cross_entropy(hidden, weight, bias, bad)
    # Unselected targets are not checked (they may hold padding).
    assert jnp.isfinite(loss(hidden, weight, bias, bad, where=where.at[3].set(False)))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        chunked_cross_entropy(hidden, weight, bias, targets, chunk_size=0)
    with pytest.raises(TypeError, match="`chunk_size` must be a positive integer"):
        chunked_cross_entropy(hidden, weight, bias, targets, chunk_size=True)
    with pytest.raises(TypeError, match="weight"):
        chunked_cross_entropy(hidden, weight[:, :3], bias, targets)


def test_default_precision_within_tf32_bounds():
    """What a float32 user gets by default, on any backend: on a GPU JAX runs the
    float32 matmuls in TF32 (inputs rounded to 10 mantissa bits, float32
    accumulation); a CPU computes in full float32, well inside the same bounds.

    Bounds from the rounding model, elementwise and in float64: each logit
    `z = h·w + b` is off by at most `e·(|h|·|w|)` with `e = 2u + u² + d·2⁻²⁴`
    (`u = 2⁻¹¹` per rounded input, float32 summation of `d` products); the loss of a
    row, `lse(z) − z_t`, moves by at most twice its largest logit error; a
    probability by at most `2p·max|Δz|`, and `∂ℓ/∂h = Δ·w` gets a further TF32
    product error.
    """
    hidden, weight, bias, targets, where = _problem(3, n=64, d=64, v=300)
    value, (d_hidden,) = jax.jit(
        jax.value_and_grad(
            lambda h: chunked_cross_entropy(h, weight, bias, targets, where=where),
            argnums=(0,),
        )
    )(hidden)
    u, d = 2.0**-11, hidden.shape[1]
    e = 2 * u + u**2 + d * 2.0**-24
    h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    mask = np.asarray(where)
    dz_max = e * (np.abs(h) @ np.abs(w).T).max(1) + 2.0**-24 * np.abs(bias).max()
    want = _numpy_ce(hidden, weight, bias, targets, where)
    bound = np.mean(2 * dz_max[mask]) + 16 * 2.0**-24 * abs(want)
    assert abs(float(value) - want) <= bound, (float(value) - want, bound)

    want_dh = _numpy_grads(hidden, weight, bias, targets, where)[0]
    z = h @ w.T + np.asarray(bias, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = p.copy()
    dz[np.arange(len(z)), np.asarray(targets)] -= 1
    dz *= mask[:, None] / mask.sum()
    d_dz = 2 * p * dz_max[:, None] * mask[:, None] / mask.sum()
    bound_dh = d_dz @ np.abs(w) + (e + 2.0**-20) * (np.abs(dz) @ np.abs(w))
    error = np.abs(np.asarray(d_hidden, np.float64) - want_dh)
    assert np.all(error <= bound_dh), np.max(error / bound_dh)
    # Not a vacuous check: the worst case allowed is under 0.5 % of the loss.
    assert bound < 5e-3 * abs(want)
