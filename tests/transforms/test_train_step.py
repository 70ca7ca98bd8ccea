import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
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
    assert set(metrics) == {"loss", "mse", "l2", "grad_norm"}
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
    _, _, metrics = make_train_step(_mse, optimizer, learning_rate=0.05, donate=False)(
        model, opt_state, batch, None
    )
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
    step = make_train_step(counted, optimizer, learning_rate=1e-3)
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


def test_bad_arguments():
    from transforms import make_train_step

    with pytest.raises(TypeError, match="loss_fn"):
        make_train_step(3, optax.sgd(0.1))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="optimizer"):
        make_train_step(_mse, "adam")  # pyright: ignore[reportArgumentType]
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="data_axis"):
        make_train_step(_mse, optax.sgd(0.1), mesh=mesh)
