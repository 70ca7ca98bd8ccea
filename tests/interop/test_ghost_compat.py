import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from transforms import grad_dot_products, make_attribution_step

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def _data(key):
    kx, kv = jr.split(key)
    x = jr.normal(kx, (6, 3))
    xv = jr.normal(kv, (3, 3))
    return (x, jnp.arange(6) % 2), (xv, jnp.arange(3) % 2)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_engine_matches_the_functional_api(getkey):
    from eqx_models.interop.torch import DotProductEngine

    model = eqx.nn.MLP(3, 2, 4, 1, key=getkey())
    (x, y), val = _data(getkey())
    engine = DotProductEngine(_loss, optax.sgd(0.1), learning_rate=0.1, n_train=8)
    engine.attach(model, val)
    step = make_attribution_step(_loss, optax.sgd(0.1), donate=False)
    opt_state = optax.sgd(0.1).init(eqx.filter(model, eqx.is_inexact_array))
    reference_model, shapley = model, np.zeros(8)
    batches = [np.arange(6), np.array([7, 1, 2, 3, 4, 5])]
    for it, idx in enumerate(batches):
        xb, yb = x[idx % 6], y[idx % 6]
        # Torch tensors from a DataLoader are accepted as they are.
        engine.attach_train_batch(
            torch.tensor(np.asarray(xb)), torch.tensor(np.asarray(yb)), indices=idx
        )
        without_update = engine.dot_products()
        dots = engine.step()
        expected = grad_dot_products(_loss)(reference_model, (xb, yb), val)
        np.testing.assert_allclose(np.asarray(without_update), expected, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(dots), expected, rtol=1e-4, atol=1e-7)
        reference_model, opt_state, _, ref_dots = step(
            reference_model, opt_state, (xb, yb), val
        )
        # The same dots from two compiled programs that may sum in another order:
        # float32 reassociation error scales with the terms, not with a dot that
        # cancels to a small value, hence the absolute part.
        ref_dots = np.asarray(ref_dots)
        np.testing.assert_allclose(
            np.asarray(dots), ref_dots, rtol=1e-6, atol=1e-6 * np.abs(ref_dots).max()
        )
        np.add.at(shapley, idx, 0.1 * np.asarray(ref_dots))
        assert engine.dot_product_log[-1]["iter"] == it
    assert bool(eqx.tree_equal(engine.model, reference_model, rtol=1e-6, atol=1e-7))
    np.testing.assert_allclose(np.asarray(engine.shapley_values()), shapley, rtol=1e-5)
    assert len(engine.dot_product_log) == 2
    assert engine.detach() is not None and engine.model is None


def test_engine_errors(getkey):
    from eqx_models.interop.torch import DotProductEngine

    with pytest.raises(ValueError, match="needs the optimiser's `learning_rate`"):
        DotProductEngine(_loss, optax.sgd(0.1), n_train=4)
    engine = DotProductEngine(_loss, optax.sgd(0.1), learning_rate=0.1, n_train=6)
    with pytest.raises(ValueError, match="call `attach\\(model, val_batch\\)` first"):
        engine.step()
    (x, y), val = _data(getkey())
    engine.attach(eqx.nn.MLP(3, 2, 4, 1, key=getkey()), val)
    with pytest.raises(ValueError, match="call `attach_train_batch\\(...\\)` first"):
        engine.dot_products()
    with pytest.raises(ValueError, match="same leading \\(batch\\) axis"):
        engine.attach_train_batch(x, y[:3])
    with pytest.raises(ValueError, match="`indices` must have shape \\(6,\\)"):
        engine.attach_train_batch(x, y, indices=np.arange(5))
    with pytest.raises(TypeError, match="must be arrays or torch tensors"):
        engine.attach_train_batch(x, "labels")
    engine.attach_train_batch(x, y)
    with pytest.raises(ValueError, match="needs the batch's `indices`"):
        engine.step()
    plain = DotProductEngine(_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match="build the engine with `n_train`"):
        plain.shapley_values()
    assert jax.tree.leaves(val)


def _finite_loss_nan_gradient(model, x, y):
    # For a marked example, sqrt at 0: a value of 0, a gradient of inf * 0 = NaN.
    marked = x[0] > 100
    zero = jnp.where(marked, jnp.sum(model(x)) * 0.0, 1.0)
    return _loss(model, x, y) + jnp.where(marked, jnp.sqrt(zero), 0.0)


@pytest.mark.parametrize("fault", ["nan_input", "nan_gradient"])
def test_engine_refuses_a_non_finite_step(getkey, fault):
    from eqx_models.interop.torch import DotProductEngine
    from transforms import NonFiniteLossError

    loss = _finite_loss_nan_gradient if fault == "nan_gradient" else _loss
    engine = DotProductEngine(loss, optax.sgd(0.1), learning_rate=0.1, n_train=6)
    (x, y), val = _data(getkey())
    engine.attach(eqx.nn.MLP(3, 2, 4, 1, key=getkey()), val)
    engine.attach_train_batch(x, y, indices=np.arange(6))
    engine.step()
    model, opt_state = engine.model, engine.opt_state
    shapley = np.asarray(engine.shapley_values())
    x = x.at[2, 0].set(jnp.nan if fault == "nan_input" else 1000.0)
    engine.attach_train_batch(x, y, indices=np.arange(6))
    with pytest.raises(
        NonFiniteLossError, match="DotProductEngine.step: non-finite"
    ) as info:
        engine.step()
    expected = "loss" if fault == "nan_input" else "gradient"
    assert expected in info.value.nonfinite and info.value.step == 1
    if fault == "nan_gradient":
        assert np.isfinite(info.value.metrics["loss"])
    assert info.value.model is model and info.value.opt_state is opt_state
    # Nothing of the failing step was adopted.
    assert engine.model is model and engine.opt_state is opt_state
    assert engine.iteration == 1 and len(engine.dot_product_log) == 1
    np.testing.assert_array_equal(np.asarray(engine.shapley_values()), shapley)
    assert np.all(np.isfinite(shapley))
    assert engine.train_batch is not None
