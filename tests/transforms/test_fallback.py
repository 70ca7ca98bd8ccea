import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

from tests.helpers import assert_tree_allclose


def _branchy_loss(model, batch, key):
    # A Python `if` on a traced value: fine eagerly, a TracerBoolConversionError
    # under jit.
    err = jax.vmap(model)(batch[0]) - batch[1]
    loss = jnp.mean(err**2)
    if loss > 1.0:
        loss = jnp.sqrt(loss)
    return loss


def _jittable_loss(model, batch, key):
    err = jax.vmap(model)(batch[0]) - batch[1]
    loss = jnp.mean(err**2)
    return jnp.where(loss > 1.0, jnp.sqrt(loss), loss)


def test_fallback_gives_the_jittable_numbers(getkey):
    from transforms import make_train_step, with_fallback

    model = eqx.nn.MLP(2, 1, 8, 1, key=getkey())
    x = jr.normal(getkey(), (16, 2))
    y = 1.5 * x[:, :1] + 1.0
    optimizer = optax.sgd(0.2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    reference = make_train_step(_jittable_loss, optimizer, donate=False)
    fallback = with_fallback(make_train_step(_branchy_loss, optimizer, donate=False))

    ref_model, ref_state = model, opt_state
    with pytest.warns(RuntimeWarning, match="TracerBoolConversionError"):
        model, opt_state, metrics = fallback(model, opt_state, (x, y), None)
    ref_model, ref_state, ref_metrics = reference(ref_model, ref_state, (x, y), None)
    assert fallback.eager
    assert isinstance(fallback.error, jax.errors.TracerBoolConversionError)
    assert_tree_allclose(metrics, ref_metrics, rtol=1e-5)
    # Only one warning, however many steps follow; the losses cross the branch.
    losses = [float(metrics["loss"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(30):
            model, opt_state, metrics = fallback(model, opt_state, (x, y), None)
            ref_model, ref_state, ref_metrics = reference(
                ref_model, ref_state, (x, y), None
            )
            losses.append(float(metrics["loss"]))
    assert max(losses) > 1.0 > min(losses)
    assert_tree_allclose(model, ref_model, rtol=1e-4, atol=1e-6)


def test_jittable_step_is_not_made_eager(getkey):
    from transforms import make_train_step, with_fallback

    model = eqx.nn.Linear(2, 1, key=getkey())
    x, y = jr.normal(getkey(), (4, 2)), jnp.zeros((4, 1))
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = with_fallback(make_train_step(_jittable_loss, optimizer))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, opt_state, (x, y), None)
    assert not step.eager


def test_other_errors_propagate(getkey):
    from transforms import make_train_step, with_fallback

    def broken(model, batch, key):
        raise KeyError("not a tracing problem")

    model = eqx.nn.Linear(2, 1, key=getkey())
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = with_fallback(make_train_step(broken, optimizer))
    with pytest.raises(KeyError, match="not a tracing problem"):
        step(model, opt_state, (jnp.zeros((1, 2)), jnp.zeros((1, 1))), None)
    assert not step.eager


def test_rejects_non_callable():
    from transforms import with_fallback

    with pytest.raises(TypeError, match="step"):
        with_fallback(None)  # pyright: ignore[reportArgumentType]
