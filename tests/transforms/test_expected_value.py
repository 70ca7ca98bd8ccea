import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from transforms import expected_value, expected_value_loss, masked_mean


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _problem(seed, batch=(3, 4), v=6, d=(2,)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=batch + (v,)) * 2
    values = rng.normal(size=(v,) + d)
    return logits, values


@pytest.mark.parametrize("d", [(), (3,), (2, 2)])
def test_expected_value_matches_numpy(d):
    logits, values = _problem(0, d=d)
    want = np.tensordot(_softmax64(logits), values, axes=1)
    lg, vs = jnp.asarray(logits, jnp.float32), jnp.asarray(values, jnp.float32)
    for fn in (expected_value, jax.jit(expected_value)):
        got = fn(lg, vs)
        assert got.shape == logits.shape[:-1] + d and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # vmap over the leading batch axis is the same as the batched call.
    np.testing.assert_allclose(
        jax.vmap(expected_value, in_axes=(0, None))(lg, vs), want, rtol=1e-5, atol=1e-6
    )


def test_expected_value_float64_and_gradient(x64):
    logits, values = _problem(1, batch=(5,), v=7, d=(3,))
    w = np.random.default_rng(2).normal(size=(5, 3))
    lg, vs = jnp.asarray(logits), jnp.asarray(values)
    got = expected_value(lg, vs)
    assert got.dtype == jnp.float64
    p = _softmax64(logits)
    np.testing.assert_allclose(got, p @ values, rtol=1e-12)
    # d/dz_j sum_i w_i . E_i = p_j (w . v_j - w . E): derived by hand from the softmax.
    e = p @ values
    want = p * (w @ values.T - np.sum(w * e, axis=1, keepdims=True))
    grad = jax.jit(jax.grad(lambda z: jnp.sum(jnp.asarray(w) * expected_value(z, vs))))(
        lg
    )
    np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12)


def test_expected_value_upcasts_half_precision_logits():
    logits, values = _problem(3)
    got = expected_value(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(values))
    assert got.dtype == jnp.float32
    want = np.tensordot(
        _softmax64(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)),
        values,
        axes=1,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_expected_value_shape_error():
    with pytest.raises(TypeError, match="values"):
        expected_value(jnp.zeros((2, 4)), jnp.zeros((5, 3)))


@given(st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=5, max_size=5))
def test_expected_value_lies_within_the_values(logits):
    values = jnp.array([-1.0, 0.5, 2.0, 3.0, -0.25])
    got = float(expected_value(jnp.asarray(logits, jnp.float32), values))
    assert -1.0 - 1e-5 <= got <= 3.0 + 1e-5


def _mse_reference(logits, values, target_values, where):
    pred = np.tensordot(_softmax64(logits), values, axes=1)
    per = np.mean((pred - target_values).reshape(len(pred), -1) ** 2, axis=1)
    return per[where].mean() if where.any() else 0.0


@pytest.mark.slow
def test_expected_value_loss_matches_numpy():
    rng = np.random.default_rng(4)
    logits, values = _problem(4, batch=(9,), v=5, d=(3,))
    targets = rng.integers(0, 5, 9)
    where = rng.random(9) < 0.6
    want = _mse_reference(logits, values, values[targets], where)
    lg, vs = jnp.asarray(logits, jnp.float32), jnp.asarray(values, jnp.float32)
    args = (lg, vs, jnp.asarray(targets))
    loss = eqx.filter_jit(expected_value_loss)
    np.testing.assert_allclose(loss(*args, where=jnp.asarray(where)), want, rtol=1e-5)
    # Float targets (any regression target, not only codebook entries).
    float_targets = rng.normal(size=(9, 3))
    got = loss(
        lg, vs, jnp.asarray(float_targets, jnp.float32), where=jnp.asarray(where)
    )
    np.testing.assert_allclose(
        got, _mse_reference(logits, values, float_targets, where), rtol=1e-5
    )
    # A user loss: mean absolute error.
    got = expected_value_loss(*args, loss_fn=lambda p, t: jnp.mean(jnp.abs(p - t)))
    pred = np.tensordot(_softmax64(logits), values, axes=1)
    np.testing.assert_allclose(got, np.mean(np.abs(pred - values[targets])), rtol=1e-5)
    # vmap over independent problems.
    batched = jax.jit(jax.vmap(expected_value_loss, in_axes=(0, None, 0)))(
        jnp.stack([lg, 2 * lg]), vs, jnp.stack([args[2], args[2]])
    )
    np.testing.assert_allclose(
        batched[1],
        _mse_reference(2 * logits, values, values[targets], np.ones(9, bool)),
        rtol=1e-5,
    )


def test_expected_value_loss_gradient_matches_finite_differences(x64):
    logits, values = _problem(5, batch=(4,), v=3, d=(2,))
    targets = np.array([0, 2, 1, 2])
    where = np.array([True, False, True, True])

    def f(z):
        return expected_value_loss(
            z, jnp.asarray(values), jnp.asarray(targets), where=jnp.asarray(where)
        )

    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(logits)))
    eps = 1e-6
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (
            _mse_reference(up, values, values[targets], where)
            - _mse_reference(down, values, values[targets], where)
        ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert np.all(grad[1] == 0)  # an unselected position gets no gradient


def test_absent_positions_give_exactly_zero_and_no_gradient():
    logits, values = _problem(6, batch=(4,), v=3, d=(2,))
    lg = jnp.asarray(logits, jnp.float32)
    none = jnp.zeros(4, bool)
    targets = jnp.array([0, 1, 2, 0])
    value, grad = jax.value_and_grad(
        lambda z: expected_value_loss(
            z, jnp.asarray(values, jnp.float32), targets, where=none
        )
    )(lg)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_expected_value_loss_errors():
    lg, vs = jnp.zeros((4, 3)), jnp.zeros((3, 2))
    with pytest.raises(TypeError, match="values"):
        expected_value_loss(lg, jnp.zeros((5, 2)), jnp.zeros(4, jnp.int32))
    with pytest.raises(TypeError, match="targets"):
        expected_value_loss(lg, vs, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="must return a scalar per position"):
        expected_value_loss(lg, vs, jnp.zeros(4, jnp.int32), loss_fn=lambda p, t: p - t)
    jitted = eqx.filter_jit(expected_value_loss)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"`targets` .*ids in \[0, 3\)"):
        jitted(lg, vs, jnp.array([0, 1, 3, 0]), where=jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"ids in \[0, 3\), got 3 at index \(2,\)"):
        expected_value_loss(lg, vs, jnp.array([0, 1, 3, 0]))
    with pytest.raises(TypeError, match="`loss_fn` must be Callable"):
        expected_value_loss(lg, vs, jnp.zeros(4, jnp.int32), loss_fn="mse")
    # An out-of-range index at an unselected position is ignored.
    where = jnp.array([True, True, False, True])
    assert jnp.isfinite(jitted(lg, vs, jnp.array([0, 1, 3, 0]), where=where))
    # A caller that guarantees the range turns the check off: no error then, and
    # the loss is the one of the clipped index (the last outcome).
    vs = jnp.arange(6.0).reshape(3, 2)
    unchecked = expected_value_loss(
        lg, vs, jnp.array([0, 1, 3, 0]), check_targets=False
    )
    clipped = expected_value_loss(lg, vs, jnp.array([0, 1, 2, 0]))
    assert unchecked == clipped


def test_masked_mean():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(5, 6))
    where = rng.random((5, 6)) < 0.5
    mean = jax.jit(masked_mean)
    got = mean(jnp.asarray(x, jnp.float32), jnp.asarray(where))
    np.testing.assert_allclose(got, x[where].mean(), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(masked_mean)(jnp.asarray(x, jnp.float32)), x.mean(), rtol=1e-6
    )
    # Non-finite values at unselected entries reach neither the value nor the gradient.
    poisoned = np.where(where, x, np.nan)
    value_and_grad = jax.jit(jax.value_and_grad(masked_mean))
    value, grad = value_and_grad(jnp.asarray(poisoned, jnp.float32), jnp.asarray(where))
    np.testing.assert_allclose(value, x[where].mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, where / where.sum(), rtol=1e-6)
    value, grad = value_and_grad(jnp.asarray(x, jnp.float32), jnp.zeros((5, 6), bool))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_masked_mean_is_accurate_over_long_float32_sums():
    x = np.random.default_rng(8).uniform(0.5, 1.5, 200_001).astype(np.float32)
    got = float(jax.jit(masked_mean)(jnp.asarray(x)))
    want = np.mean(x.astype(np.float64))
    assert abs(got - want) <= 4 * np.log2(x.size) * np.finfo(np.float32).eps * want
