import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from transforms import (
    grad_dot_products,
    in_run_shapley,
    inject_learning_rate,
    make_attribution_step,
    shapley_values,
    to_original_scaling,
)

from ..helpers import run_script
from ._ghost_models import make_case, mlp, regression_batch, regression_loss


def _inexact(model):
    return eqx.filter(model, eqx.is_inexact_array)


def test_trajectory_equals_a_plain_optax_loop():
    model, loss, train, val = make_case("embedding_layernorm", dtype=jnp.float32)
    schedule = optax.linear_schedule(0.3, 0.1, 3)
    optimizer = inject_learning_rate(optax.sgd, schedule, momentum=0.9)
    traces = []

    def counted_loss(model, *example):
        traces.append(None)
        return loss(model, *example)

    step = make_attribution_step(counted_loss, optimizer, donate=False)
    reference_dots = eqx.filter_jit(grad_dot_products(loss, method="vmap"))
    axes = (None,) + (0,) * len(train)

    @eqx.filter_jit
    def plain_step(model, opt_state, train):
        def mean_loss(model):
            return jnp.mean(jax.vmap(loss, in_axes=axes)(model, *train))

        value, grads = eqx.filter_value_and_grad(mean_loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, _inexact(model))
        return eqx.apply_updates(model, updates), opt_state, value

    ours = model, optimizer.init(_inexact(model))
    plain = model, optimizer.init(_inexact(model))
    for t in range(3):
        batch = train if t % 2 == 0 else tuple(x[::-1] for x in train)
        expected_dots = reference_dots(ours[0], batch, val)
        pre_val_loss = jnp.mean(jax.vmap(loss, in_axes=axes)(ours[0], *val))
        model_t, opt_t, metrics, dots = step(*ours, batch, val)
        if t == 0:
            n_traces = len(traces)
        ours = model_t, opt_t
        plain_model, plain_opt, plain_loss = plain_step(*plain, batch)
        plain = plain_model, plain_opt
        np.testing.assert_allclose(dots, expected_dots, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"], plain_loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["learning_rate"], schedule(t), rtol=1e-6)
        np.testing.assert_allclose(metrics["val_loss"], pre_val_loss, rtol=1e-6)
        for a, b in zip(
            jax.tree.leaves(_inexact(ours[0])), jax.tree.leaves(_inexact(plain[0]))
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(traces) == n_traces, "the step was traced again for the same shapes"


def test_every_method_takes_the_same_step():
    model = mlp(jr.key(0))
    train, val = regression_batch(jr.key(1), 4), regression_batch(jr.key(2), 2)
    optimizer = optax.adam(1e-2, eps=1e-3)
    results = {}
    for method in ("ghost", "jvp", "vmap"):
        step = make_attribution_step(
            regression_loss, optimizer, method=method, val_reduction="sum", donate=False
        )
        results[method] = step(model, optimizer.init(_inexact(model)), train, val)
    expected = grad_dot_products(regression_loss, method="vmap", val_reduction="sum")(
        model, train, val
    )
    for method, (new_model, _, metrics, dots) in results.items():
        np.testing.assert_allclose(dots, expected, rtol=1e-5, atol=1e-6, err_msg=method)
        for a, b in zip(
            jax.tree.leaves(_inexact(new_model)),
            jax.tree.leaves(_inexact(results["vmap"][0])),
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=method)
        assert "learning_rate" not in metrics


def test_a_non_finite_update_is_flagged_and_not_applied():
    model = mlp(jr.key(0))
    train, val = regression_batch(jr.key(1), 4), regression_batch(jr.key(2), 2)
    before = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)
    for optimizer, expected in (
        (optax.sgd(1e-2), 0),
        # NaN updates from finite gradients: only the parameters are flagged (4).
        (optax.chain(optax.sgd(1e-2), optax.scale(jnp.nan)), 4),
    ):
        step = make_attribution_step(regression_loss, optimizer)
        new_model, _, metrics, _ = step(
            model, optimizer.init(_inexact(model)), train, val
        )
        assert int(metrics["nonfinite"]) == expected
        leaves = jax.tree.leaves(_inexact(new_model))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
        # The donated model comes back unchanged when the update is skipped.
        changed = [
            not np.array_equal(a, b)
            for a, b in zip(leaves, jax.tree.leaves(_inexact(before)))
        ]
        assert any(changed) == (expected == 0)
        model = jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, before)


def test_step_options_are_checked():
    with pytest.raises(ValueError, match="`method` must be one of"):
        make_attribution_step(regression_loss, optax.sgd(0.1), method="exact")
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="`data_axis` 'batch' is not an axis"):
        make_attribution_step(
            regression_loss, optax.sgd(0.1), mesh=mesh, data_axis="batch"
        )


def test_in_run_shapley_matches_a_loop():
    rng = np.random.default_rng(0)
    n = 6
    shapley = in_run_shapley(n)
    state = shapley.init()
    update = jax.jit(shapley.update)
    expected = np.zeros(n)
    counts = np.zeros(n, int)
    for _ in range(5):
        idx = rng.integers(0, n, size=4)  # repeats within a batch count twice
        dots = rng.normal(size=4).astype(np.float32)
        lr = float(rng.uniform(0.01, 0.1))
        state = update(state, idx, dots, lr)
        for i, d in zip(idx, dots):
            expected[i] += lr * d
            counts[i] += 1
    np.testing.assert_allclose(shapley_values(state), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(state.counts, counts)


def test_in_run_shapley_sums_are_compensated():
    # 10⁴ float32 additions of 1e-4 to 1: a plain running sum drifts by ~1e-4.
    shapley = in_run_shapley(1)

    def body(state, _):
        return shapley.update(state, jnp.zeros(1, int), jnp.full(1, 1e-4), 1.0), None

    start = shapley.update(shapley.init(), jnp.zeros(1, int), jnp.full(1, 1.0), 1.0)
    state, _ = jax.lax.scan(body, start, None, length=10_000)
    np.testing.assert_allclose(float(shapley_values(state)[0]), 2.0, rtol=1e-6)
    plain = jax.lax.scan(
        lambda v, _: (v + jnp.float32(1e-4), None),
        jnp.float32(1.0),
        None,
        length=10_000,
    )[0]
    assert abs(float(plain) - 2.0) > 1e-5, "the check needs a sum that drifts"


def test_in_run_shapley_errors():
    shapley = in_run_shapley(3)
    with pytest.raises(ValueError, match="`dots` must be of the shape of `indices`"):
        shapley.update(shapley.init(), jnp.arange(2), jnp.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"`indices` must be integer ids in \[0, 3\)"):
        shapley.update(shapley.init(), jnp.array([0, 3]), jnp.ones(2), 0.1)
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"ids in \[0, 3\)"):
        jax.block_until_ready(
            eqx.filter_jit(shapley.update)(
                shapley.init(), jnp.array([0, 3]), jnp.ones(2), 0.1
            )
        )
    with pytest.raises(ValueError, match="`learning_rate` must be a finite"):
        shapley.update(shapley.init(), jnp.array([0]), jnp.ones(1), float("nan"))
    with pytest.raises(ValueError, match="`n_train` must be a positive integer"):
        in_run_shapley(0)
    with pytest.raises(TypeError, match="`n_train` must be a positive integer"):
        in_run_shapley(True)


def test_original_scaling_matches_the_original_quantity(x64):
    # The original: one batch of train + val examples with the mean loss over all N,
    # logging <∇(l_i/N), Σ_v ∇(l_v/N)>.
    model, loss, train, val = make_case("mlp")
    n_train, n_val = train[0].shape[0], val[0].shape[0]
    N = n_train + n_val
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
    grad = jax.jit(jax.grad(lambda p, *ex: loss(eqx.combine(p, static), *ex) / N))
    val_sum = sum(flat(grad(params, *(v[j] for v in val))) for j in range(n_val))
    original = [
        flat(grad(params, *(t[i] for t in train))) @ val_sum for i in range(n_train)
    ]
    for reduction in ("mean", "sum"):
        dots = grad_dot_products(loss, method="vmap", val_reduction=reduction)(
            model, train, val
        )
        converted = to_original_scaling(
            dots, n_train=n_train, n_val=n_val, val_reduction=reduction
        )
        np.testing.assert_allclose(converted, original, rtol=1e-10)
    with pytest.raises(ValueError, match="`n_train` must be a positive integer"):
        to_original_scaling(dots, n_train=0, n_val=2)


_SHARDED = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import sys
    sys.path.insert(0, ".")
    import equinox as eqx, jax.numpy as jnp, numpy as np, optax
    from transforms import (make_attribution_step, per_sample_grad_norms, replicate,
                            shard_batch)
    from tests.transforms._ghost_models import make_case

    assert jax.device_count() == 8
    # Token inputs: the embedding gathers see sharded indices.
    model, loss, train, val = make_case("embedding_layernorm", dtype=jnp.float32,
                                        n_train=16, n_val=8)
    optimizer = optax.adam(1e-2, eps=1e-3)
    init = lambda: optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    single = make_attribution_step(loss, optimizer, donate=False)
    # Auto axes: XLA partitions the embedding gathers itself; under JAX's default
    # explicit axes a gather with sharded indices needs an explicit out_sharding.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    parallel = make_attribution_step(loss, optimizer, mesh=mesh, donate=False)
    m1, s1, met1, d1 = single(model, init(), train, val)
    m8, s8, met8, d8 = parallel(model, init(), train, val)
    np.testing.assert_allclose(d1, d8, rtol=1e-4, atol=1e-6)
    assert len(d8.sharding.device_set) == 8 and not d8.sharding.is_fully_replicated
    np.testing.assert_allclose(met1["loss"], met8["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eqx.filter(m1, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(m8, eqx.is_array))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert b.sharding.is_fully_replicated
    # Per-example norms of a batch split over the devices, as in a data-parallel step.
    norms = eqx.filter_jit(per_sample_grad_norms(loss))
    sharded = shard_batch(train, mesh)
    n8 = norms(replicate(model, mesh), sharded)
    np.testing.assert_allclose(norms(model, train), n8, rtol=1e-5)
    assert len(n8.sharding.device_set) == 8
    try:
        parallel(model, init(), train, tuple(v[:6] for v in val))
    except ValueError as e:
        assert "divisible by the 8 devices" in str(e), e
    else:
        raise AssertionError("an indivisible validation batch was accepted")
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_attribution_equals_single_device():
    run_script(_SHARDED, devices=8, timeout=600)
