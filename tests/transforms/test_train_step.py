import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from tests.helpers import assert_tree_allclose


def _data(key, n=32):
    kx, kn = jr.split(key)
    x = jr.normal(kx, (n, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.1 * jr.normal(kn, (n, 1))
    return x, y


def _mse(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _reference_step(model, opt_state, batch, optimizer):
    """A plain optax step written without the library."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return _mse(eqx.combine(p, static), batch, None)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, value, grads


def test_matches_plain_optax(getkey):
    from transforms import make_train_step

    model = eqx.nn.MLP(3, 1, 8, 2, key=getkey())
    batch = _data(getkey())
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(_mse, optimizer, donate=False)
    ref_model, ref_state = model, opt_state
    for _ in range(3):
        ref_model, ref_state, ref_loss, ref_grads = _reference_step(
            ref_model, ref_state, batch, optimizer
        )
        model, opt_state, metrics = step(model, opt_state, batch, None)
        assert_tree_allclose(metrics["loss"], ref_loss, rtol=1e-6)
        assert_tree_allclose(
            metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=1e-6
        )
    assert_tree_allclose(model, ref_model, rtol=1e-6, atol=1e-7)
    assert_tree_allclose(opt_state, ref_state, rtol=1e-6, atol=1e-7)


def test_aux_metrics_and_reserved_names(getkey):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())

    def loss_with_aux(model, batch, key):
        pred = jax.vmap(model)(batch[0])
        mse = jnp.mean((pred - batch[1]) ** 2)
        l2 = jnp.sum(model.weight**2)
        return mse + 0.1 * l2, {"mse": mse, "l2": l2}

    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(loss_with_aux, optimizer, has_aux=True, donate=False)
    _, _, metrics = step(model, opt_state, batch, None)
    assert set(metrics) == {"loss", "mse", "l2", "grad_norm", "nonfinite"}
    assert_tree_allclose(metrics["loss"], metrics["mse"] + 0.1 * metrics["l2"])
    assert_tree_allclose(metrics["l2"], jnp.sum(model.weight**2))

    def clashing(model, batch, key):
        return _mse(model, batch, key), {"loss": jnp.zeros(())}

    step = make_train_step(clashing, optimizer, has_aux=True, donate=False)
    with pytest.raises(ValueError, match="reserved metric names"):
        step(model, opt_state, batch, None)


def test_learning_rate_from_schedule(getkey):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    # The deprecated second route of the rate to the step, kept for one release.
    with pytest.warns(DeprecationWarning, match="inject"):
        step = make_train_step(_mse, optimizer, learning_rate=schedule)
    for i in range(5):
        model, opt_state, metrics = step(model, opt_state, batch, None)
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)))


def test_learning_rate_from_inject_hyperparams(getkey):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())
    schedule = optax.linear_schedule(1e-2, 1e-3, 4)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(_mse, optimizer)
    for i in range(5):
        model, opt_state, metrics = step(model, opt_state, batch, None)
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(i)))


def test_constant_learning_rate_and_none(getkey):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    with pytest.warns(DeprecationWarning, match="`learning_rate=` is deprecated"):
        legacy = make_train_step(_mse, optimizer, learning_rate=0.05, donate=False)
    _, _, metrics = legacy(model, opt_state, batch, None)
    assert float(metrics["learning_rate"]) == pytest.approx(0.05)
    _, _, metrics = make_train_step(_mse, optimizer, donate=False)(
        model, opt_state, batch, None
    )
    assert "learning_rate" not in metrics


def test_compiles_once_per_shape(getkey):
    from transforms import make_train_step

    model = eqx.nn.MLP(3, 1, 4, 1, key=getkey())
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    counted = eqx.debug.assert_max_traces(_mse, max_traces=1)
    step = make_train_step(counted, optimizer)
    for _ in range(4):
        model, opt_state, _ = step(model, opt_state, _data(getkey()), None)
    with pytest.raises(RuntimeError, match="traced"):
        step(model, opt_state, _data(getkey(), n=16), None)


def test_keys_reach_the_loss(getkey):
    from transforms import make_train_step

    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, 16, key=getkey()),
            eqx.nn.Dropout(0.5),
            eqx.nn.Linear(16, 1, key=getkey()),
        ]
    )
    batch = _data(getkey())

    def loss(model, batch, key):
        keys = jr.split(key, batch[0].shape[0])
        pred = jax.vmap(lambda x, k: model(x, key=k))(batch[0], keys)
        return jnp.mean((pred - batch[1]) ** 2)

    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(loss, optimizer, donate=False)
    k1, k2 = getkey(), getkey()
    _, _, m1 = step(model, opt_state, batch, k1)
    _, _, m1_again = step(model, opt_state, batch, k1)
    _, _, m2 = step(model, opt_state, batch, k2)
    assert float(m1["loss"]) == float(m1_again["loss"])
    assert float(m1["loss"]) != float(m2["loss"])


def test_donation_consumes_inputs(getkey):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    kept = make_train_step(_mse, optimizer, donate=False)
    kept(model, opt_state, batch, None)
    assert not model.weight.is_deleted()
    donating = make_train_step(_mse, optimizer)
    donating(model, opt_state, batch, None)
    assert model.weight.is_deleted()
    assert not batch[0].is_deleted()


def _sqrt_at_zero(model, batch, key):
    # sqrt has an infinite derivative at 0, and 0 * inf is NaN: the value is the
    # finite MSE but every entry of the gradient is NaN.
    squares = sum(jnp.sum(p**2) for p in jax.tree.leaves(model))
    return _mse(model, batch, key) + 0.0 * jnp.sqrt(0.0 * squares)


def _nan_state() -> optax.GradientTransformation:
    """Passes updates through but keeps a NaN in its state."""
    return optax.GradientTransformation(
        lambda params: {"s": jnp.zeros(())},
        lambda updates, state, params=None: (updates, {"s": state["s"] * jnp.nan}),
    )


def _reference_mask(loss, grads, model, opt_state) -> int:
    """The `nonfinite` bits from the definition, in NumPy: 1 loss, 2 gradient
    (any entry), 4 parameters, 8 optimiser state."""

    def finite(tree):
        return all(
            np.all(np.isfinite(np.asarray(x)))
            for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
        )

    parts = (np.isfinite(np.asarray(loss)), finite(grads), finite(model))
    return sum(
        0 if ok else 1 << bit for bit, ok in enumerate(parts + (finite(opt_state),))
    )


@pytest.mark.parametrize(
    "case, expected",
    [
        ("finite", 0),
        ("nan_loss", 1 | 2 | 4 | 8),
        ("nan_gradient", 2 | 4 | 8),
        ("nan_update", 4),
        ("nan_state", 8),
    ],
)
def test_nonfinite_flags_and_the_update_is_not_applied(getkey, case, expected):
    from transforms import make_train_step

    model = eqx.nn.Linear(3, 1, key=getkey())
    x, y = _data(getkey())
    batch = (x, y.at[0].set(jnp.nan)) if case == "nan_loss" else (x, y)
    loss_fn = _sqrt_at_zero if case == "nan_gradient" else _mse
    optimizer = {
        "nan_update": optax.chain(optax.adam(1e-2), optax.scale(jnp.nan)),
        "nan_state": optax.chain(optax.adam(1e-2), _nan_state()),
    }.get(case, optax.adam(1e-2))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: loss_fn(eqx.combine(p, static), batch, None)
    )(params)
    updates, ref_state = optimizer.update(ref_grads, opt_state, params)
    ref_model = eqx.apply_updates(model, updates)
    assert _reference_mask(ref_loss, ref_grads, ref_model, ref_state) == expected

    before = jax.tree.map(jnp.copy, (model, opt_state))
    # Donated inputs: the state handed back on a skipped update must survive that.
    new_model, new_state, metrics = make_train_step(loss_fn, optimizer)(
        model, opt_state, batch, None
    )
    assert int(metrics["nonfinite"]) == expected
    assert metrics["nonfinite"].dtype == jnp.int32
    if expected:
        assert_tree_allclose((new_model, new_state), before, rtol=0, atol=0)
    else:
        assert_tree_allclose(new_model, ref_model, rtol=1e-6, atol=1e-7)
        assert_tree_allclose(new_state, ref_state, rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    from transforms import make_train_step

    with pytest.raises(TypeError, match="loss_fn"):
        make_train_step(3, optax.sgd(0.1))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="optimizer"):
        make_train_step(_mse, "adam")  # pyright: ignore[reportArgumentType]
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="data_axis"):
        make_train_step(_mse, optax.sgd(0.1), mesh=mesh)
