import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from transforms import (
    calibrate_projection,
    clipped_grad_sum,
    grad_dot_products,
    make_attribution_step,
    make_dp_train_step,
    per_sample_grad_norms,
    per_sample_grads,
    projected_grads,
)

from ..helpers import assert_tree_allclose
from ._ghost_models import make_case, mlp, regression_batch, regression_loss


def test_per_sample_grads_equal_a_loop_of_grads(x64):
    model, loss, (x, y), _ = make_case("mlp")
    grads = per_sample_grads(loss)(model, (x, y))
    for i in range(x.shape[0]):
        expected = eqx.filter_grad(loss)(model, x[i], y[i])
        got = jax.tree.map(lambda g: g[i], grads)
        assert_tree_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_per_sample_grads_match_finite_differences(x64):
    model = eqx.nn.Linear(2, 1, key=jr.key(0), dtype=jnp.float64)

    def loss(model, x, y):
        return jnp.sum(jnp.tanh(model(x)) - y) ** 2

    x = np.array([[0.3, -1.2], [2.0, 0.5]])
    y = np.array([[0.1], [-0.4]])
    grads = per_sample_grads(loss)(model, (jnp.asarray(x), jnp.asarray(y)))

    def numpy_loss(w, b, x, y):
        return float((np.tanh(w @ x + b) - y).sum() ** 2)

    w, b = np.asarray(model.weight), np.asarray(model.bias)
    eps = 1e-6
    for i in range(2):
        for idx in np.ndindex(w.shape):
            dw = np.zeros_like(w)
            dw[idx] = eps
            fd = numpy_loss(w + dw, b, x[i], y[i]) - numpy_loss(w - dw, b, x[i], y[i])
            np.testing.assert_allclose(grads.weight[i][idx], fd / (2 * eps), rtol=1e-7)
        fd = numpy_loss(w, b + eps, x[i], y[i]) - numpy_loss(w, b - eps, x[i], y[i])
        np.testing.assert_allclose(grads.bias[i][0], fd / (2 * eps), rtol=1e-7)


def test_per_sample_grads_under_jit_and_vmap():
    model = mlp(jr.key(0))
    x, y = regression_batch(jr.key(1), 6)
    fn = per_sample_grads(regression_loss)
    plain = fn(model, (x, y))
    assert_tree_allclose(eqx.filter_jit(fn)(model, (x, y)), plain, rtol=1e-5, atol=1e-6)
    # vmap over two half-batches equals the two calls.
    xs, ys = x.reshape(2, 3, 3), y.reshape(2, 3, 2)
    stacked = jax.vmap(lambda a, b: fn(model, (a, b)))(xs, ys)
    halves = jax.tree.map(lambda g: g.reshape((2, 3) + g.shape[1:]), plain)
    assert_tree_allclose(stacked, halves, rtol=1e-5, atol=1e-6)
    # Under grad: d/dθ Σ_i ‖∇l_i‖², against the same through the vmap-method norms.
    squares = lambda g: sum(jnp.sum(x**2) for x in jax.tree.leaves(g))
    got = eqx.filter_grad(lambda m: squares(fn(m, (x, y))))(model)
    norms = per_sample_grad_norms(regression_loss, method="vmap")
    expected = eqx.filter_grad(lambda m: jnp.sum(norms(m, (x, y)) ** 2))(model)
    assert_tree_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _bad(name):
    model, loss, train, val = make_case("mlp", dtype=jnp.float32)
    x, y = train
    calls = {
        "not_scalar": lambda f: f(lambda m, x, y: m(x) - y)(model, train),
        "integer_loss": lambda f: f(lambda m, x, y: jnp.int32(1))(model, train),
        "ragged": lambda f: f(loss)(model, (x, y[:2])),
        "empty": lambda f: f(loss)(model, (x[:0], y[:0])),
        "no_params": lambda f: f(loss)(
            eqx.filter(model, eqx.is_array, inverse=True), train
        ),
        "not_tuple": lambda f: f(loss)(model, {"x": x, "y": y}),
        "scalar_leaf": lambda f: f(loss)(model, (x, jnp.float32(1.0))),
        "empty_tuple": lambda f: f(loss)(model, ()),
        # Written for a batch, as for Opacus: it vmaps the model over one example.
        "batched_loss": lambda f: f(
            lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)
        )(model, train),
    }
    return calls[name]


_MESSAGES = {
    "not_scalar": (
        "`loss_fn` must be a function returning a floating-point scalar "
        "for one example, got shape",
        ValueError,
    ),
    "integer_loss": (
        "must be a function returning a floating-point scalar",
        ValueError,
    ),
    "ragged": ("sharing their leading", ValueError),
    "empty": ("batch size 0", ValueError),
    "no_params": ("no inexact", ValueError),
    # The library's own batch message, not the annotation's.
    "not_tuple": ("batch` must be a tuple of arrays .*, got a dict", TypeError),
    "scalar_leaf": (
        r"batch\[1\]` must be an array with a leading batch axis",
        ValueError,
    ),
    "empty_tuple": ("got an empty tuple", ValueError),
    "batched_loss": (
        r"`loss_fn` failed on ONE example \(arrays float32\[\d+\], float32\[\d+\]\)"
        r".*is called on ONE example at a time",
        ValueError,
    ),
}


@pytest.mark.parametrize("case", sorted(_MESSAGES))
@pytest.mark.parametrize(
    "factory",
    [
        per_sample_grads,
        per_sample_grad_norms,
        lambda loss: lambda m, b: grad_dot_products(loss)(m, b, b),
    ],
    ids=["grads", "norms", "dots"],
)
def test_bad_input_raises_naming_the_argument(case, factory):
    match, error = _MESSAGES[case]
    with pytest.raises(error, match=match):
        _bad(case)(factory)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="`method` must be one of"):
        per_sample_grad_norms(regression_loss, method="jvp")
    with pytest.raises(ValueError, match="`method` must be one of"):
        grad_dot_products(regression_loss, method="fast")
    with pytest.raises(ValueError, match="`val_reduction` must be one of"):
        grad_dot_products(regression_loss, val_reduction="max")
    with pytest.raises(TypeError, match="loss_fn"):
        per_sample_grads(3)  # pyright: ignore


_GHOST_BUILDERS = {
    "per_sample_grad_norms": lambda **kw: per_sample_grad_norms(regression_loss, **kw),
    "grad_dot_products": lambda **kw: grad_dot_products(regression_loss, **kw),
    "make_attribution_step": lambda **kw: make_attribution_step(
        regression_loss, optax.sgd(0.1), **kw
    ),
    "projected_grads": lambda **kw: projected_grads(regression_loss, **kw),
    "calibrate_projection": lambda **kw: calibrate_projection(
        regression_loss, mlp(jr.key(0)), regression_batch(jr.key(1), 4), **kw
    ),
    "clipped_grad_sum": lambda **kw: clipped_grad_sum(
        regression_loss, clip_norm=1.0, **kw
    ),
    "make_dp_train_step": lambda **kw: make_dp_train_step(
        regression_loss, optax.sgd(0.1), clip_norm=1.0, noise_multiplier=1.0, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(_GHOST_BUILDERS))
@pytest.mark.parametrize(
    "value, error, expected",
    [
        ("yes", ValueError, r"one of \('auto', True, False\), got 'yes'"),
        (1, TypeError, r"bool \| str, got 1"),
        (None, TypeError, r"bool \| str, got None"),
    ],
)
def test_every_ghost_builder_checks_unroll_layers(name, value, error, expected):
    with pytest.raises(error, match=rf"{name}: `unroll_layers` must be {expected}"):
        _GHOST_BUILDERS[name](unroll_layers=value)


def test_validation_batch_must_match_the_training_examples():
    model, loss, (x, y), _ = make_case("mlp", dtype=jnp.float32)
    fn = grad_dot_products(loss)
    with pytest.raises(ValueError, match="`val_batch` must have the structure"):
        fn(model, (x, y), (x[:, :2], y))
    with pytest.raises(ValueError, match="`val_batch` must have the structure"):
        fn(model, (x, y), (x,))
    with pytest.raises(ValueError, match="`val_batch` must be a non-empty batch"):
        fn(model, (x, y), (x[:0], y[:0]))
