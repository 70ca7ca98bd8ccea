"""The trainer contract: the optimiser as the single source of the learning rate,
optimisers compared by value, configuration records and donation copies."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from transforms import (
    check_checkpoint_metadata,
    CheckpointError,
    copy_for_donation,
    describe_config,
    hashable_optimizer,
    inject_learning_rate,
    injected_learning_rate,
    make_train_step,
    save_checkpoint,
)


def _data(key, n=16):
    x = jr.normal(key, (n, 3))
    return x, x @ jnp.array([[1.0], [-2.0], [0.5]])


def _mse(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _params(model):
    return eqx.filter(model, eqx.is_inexact_array)


# The learning rate ---------------------------------------------------------------


def test_inject_learning_rate_computes_what_the_factory_computes(getkey):
    model = eqx.nn.MLP(3, 1, 8, 1, key=getkey())
    params = _params(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 8, 1e-3)
    plain = optax.adamw(schedule, b1=0.8, weight_decay=0.3)
    injected = inject_learning_rate(optax.adamw, schedule, b1=0.8, weight_decay=0.3)
    states = plain.init(params), injected.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda p: jr.normal(jr.key(i), p.shape), params)
        u_plain, s_plain = plain.update(grads, states[0], params)
        u_injected, s_injected = injected.update(grads, states[1], params)
        states = s_plain, s_injected
        # Bit for bit: only the rate is an array, the other settings stay numbers.
        for a, b in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_injected)):
            np.testing.assert_array_equal(a, b)
        assert float(injected_learning_rate(s_injected)) == float(schedule(i))
    assert injected_learning_rate(s_plain) is None


def test_injected_learning_rate_reads_the_first_injected_state():
    params = {"a": jnp.ones(2), "b": jnp.ones(2)}
    outer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    chained = optax.chain(
        optax.clip_by_global_norm(1.0),
        inject_learning_rate(optax.sgd, 0.25),
        inject_learning_rate(optax.sgd, 0.125),
    )
    assert float(injected_learning_rate(outer.init(params))) == 0.5
    assert float(injected_learning_rate(chained.init(params))) == 0.25
    groups = optax.multi_transform(
        {"x": inject_learning_rate(optax.adam, 0.1), "y": optax.adam(0.2)},
        {"a": "y", "b": "x"},
    )
    assert float(injected_learning_rate(groups.init(params))) == pytest.approx(0.1)
    # Another injected hyperparameter is not a learning rate.
    momentum = optax.inject_hyperparams(optax.sgd, static_args="learning_rate")(
        learning_rate=0.1, momentum=0.9
    )
    assert injected_learning_rate(momentum.init(params)) is None


def test_the_step_reports_the_rate_the_optimiser_state_records(getkey):
    model = eqx.nn.Linear(3, 1, key=getkey())
    schedule = optax.linear_schedule(1e-2, 1e-3, 4)
    optimizer = inject_learning_rate(optax.adam, schedule)
    opt_state = optimizer.init(_params(model))
    step = make_train_step(_mse, optimizer)
    for i in range(5):
        model, opt_state, metrics = step(model, opt_state, _data(getkey()), None)
        assert float(metrics["learning_rate"]) == float(schedule(i))


def test_the_steps_learning_rate_argument_is_deprecated():
    from transforms import make_attribution_step

    with pytest.warns(
        DeprecationWarning,
        match="make_attribution_step: `learning_rate=` is deprecated",
    ):
        make_attribution_step(_mse, optax.sgd(0.1), learning_rate=0.1)


def test_inject_learning_rate_bad_factory():
    # (The suite's type-checking hook words the error; users get the library's.)
    with pytest.raises(TypeError, match="factory"):
        inject_learning_rate(3, 0.1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`learning_rate` parameter"):
        inject_learning_rate(optax.clip_by_global_norm, 0.1)


# Optimisers as values -------------------------------------------------------------


def _sgd(learning_rate, momentum):
    return inject_learning_rate(optax.sgd, learning_rate, momentum=momentum)


def test_equal_optimisers_share_one_compiled_step(getkey):
    model = eqx.nn.Linear(3, 1, key=getkey())
    batch = _data(getkey())
    counted = eqx.debug.assert_max_traces(_mse, max_traces=1)
    results = []
    # Each optimiser and each step is built anew, as a trainer called twice does,
    # and the learning rate changes: an array, so traced.
    for rate in (1e-2, 1e-2, 3e-2):
        optimizer = hashable_optimizer(
            _sgd, learning_rate=jnp.asarray(rate), momentum=0.9
        )
        step = make_train_step(counted, optimizer, donate=False)
        opt_state = optimizer.init(_params(model))
        new_model, _, metrics = step(model, opt_state, batch, None)
        assert float(metrics["learning_rate"]) == pytest.approx(rate)
        results.append(new_model.weight)
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])
    # Editing the rate recorded in the state does not recompile either.
    # (Same dtype, not weakly typed, as the value it replaces.)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    _, _, metrics = step(model, opt_state, batch, None)
    assert float(metrics["learning_rate"]) == 0.5
    # Another static setting is another step.
    optimizer = hashable_optimizer(_sgd, learning_rate=jnp.asarray(0.1), momentum=0.5)
    step = make_train_step(counted, optimizer, donate=False)
    with pytest.raises(RuntimeError, match="traced"):
        step(model, optimizer.init(_params(model)), batch, None)


def test_hashable_optimizer_is_a_value():
    a = hashable_optimizer(_sgd, learning_rate=0.1, momentum=0.9)
    assert a == hashable_optimizer(_sgd, momentum=0.9, learning_rate=0.1)
    assert a != hashable_optimizer(_sgd, learning_rate=0.2, momentum=0.9)
    assert isinstance(a, optax.GradientTransformation)
    params = {"w": jnp.ones(3)}
    state = a.init(params)
    # Usable as optax's are, under `jax.jit` too.
    updates, _ = jax.jit(a.update)({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -0.1)
    with pytest.raises(TypeError, match="hashable_optimizer: `mask` must be"):
        hashable_optimizer(optax.adamw, learning_rate=0.1, mask={"w": True})
    with pytest.raises(TypeError, match="factory"):
        hashable_optimizer("adam")  # pyright: ignore[reportArgumentType]


# Donation copies -------------------------------------------------------------------


def test_copy_for_donation_keeps_the_callers_model(getkey):
    model = eqx.nn.Linear(3, 1, key=getkey())
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(_params(model))
    copy = copy_for_donation((model, opt_state))
    assert eqx.tree_equal(copy, (model, opt_state))
    make_train_step(_mse, optimizer)(*copy, _data(getkey()), None)
    assert copy[0].weight.is_deleted() and not model.weight.is_deleted()


# Configuration records -------------------------------------------------------------


def test_describe_config_sees_settings_inside_closures_and_modules():
    adam = describe_config(optax.adam(1e-3))
    assert adam == describe_config(optax.adam(1e-3))
    assert adam != describe_config(optax.adam(2e-3))
    assert describe_config(optax.adam(1e-3, b1=0.8)) != adam

    class Scaled(eqx.Module):
        scale: jax.Array
        table: jax.Array
        name: str = eqx.field(static=True)

    record = describe_config(Scaled(jnp.asarray(2.0), jnp.zeros((3, 4)), "x"))
    assert record["scale"] == 2.0 and record["name"] == "x"
    # Large arrays by shape and dtype only: a stated limit.
    assert record["table"] == {"shape": [3, 4], "dtype": "float32"}
    assert record["__type__"].endswith("Scaled")
    value = describe_config(hashable_optimizer(_sgd, learning_rate=0.1, momentum=0.9))
    assert value == {
        "__optimizer__": f"{__name__}._sgd",
        "learning_rate": 0.1,
        "momentum": 0.9,
    }


def test_describe_config_of_functions_keys_and_jitted_functions():
    scale = 0.5

    def loss(model, batch, key):
        return scale * jnp.tanh(model(batch))

    record = describe_config(loss)
    assert record["scale"] == 0.5
    assert record["__function__"].endswith("<locals>.loss")
    assert describe_config(jr.key(0)) == {"shape": [], "dtype": "key<fry>"}
    assert describe_config(jax.nn.relu)["__function__"].endswith("relu")
    assert describe_config(jnp.float32(2.0)) == 2.0


def test_a_changed_custom_optimiser_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "run.ckpt"
    model = {"w": jnp.ones(2)}
    save_checkpoint(
        path,
        model=model,
        step=1,
        metadata={"optimizer": describe_config(optax.adam(1e-3))},
    )
    check_checkpoint_metadata(path, {"optimizer": describe_config(optax.adam(1e-3))})
    with pytest.raises(
        CheckpointError,
        match=r"optimizer\.update_fns\[1\]\.tx\.update\.step_size: "
        r"expected -0\.002, checkpoint has -0\.001",
    ):
        check_checkpoint_metadata(
            path, {"optimizer": describe_config(optax.adam(2e-3))}
        )
