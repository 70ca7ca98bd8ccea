import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest


_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx, jax.numpy as jnp, jax.random as jr, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from transforms import make_train_step, shard_batch

    assert jax.device_count() == 8
    def loss(model, batch, key):
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    model = eqx.nn.MLP(4, 2, 32, 2, key=jr.key(0))
    x = jr.normal(jr.key(1), (64, 4)); y = jnp.tanh(x[:, :2] * 2.0)
    optimizer = optax.adamw(1e-2)
    init = lambda: (model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)))

    single = make_train_step(loss, optimizer, donate=False)
    mesh = jax.make_mesh((8,), ("data",))
    parallel = make_train_step(loss, optimizer, mesh=mesh, donate=False)
    m1, s1 = init(); m8, s8 = init()
    for _ in range(5):
        m1, s1, met1 = single(m1, s1, (x, y), None)
        m8, s8, met8 = parallel(m8, s8, (x, y), None)
        np.testing.assert_allclose(met1["loss"], met8["loss"], rtol=1e-5)
        np.testing.assert_allclose(met1["grad_norm"], met8["grad_norm"], rtol=1e-5)
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))
    for a, b in zip(leaves(m1), leaves(m8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert b.sharding.is_fully_replicated and len(b.sharding.device_set) == 8
    sharded = shard_batch((x, y), mesh)
    assert sharded[0].sharding.spec == P("data")
    assert len(sharded[0].addressable_shards) == 8
    assert sharded[0].addressable_shards[0].data.shape == (8, 4)
    try:
        parallel(m8, s8, (x[:60], y[:60]), None)
    except ValueError as e:
        assert "divisible by the 8 devices" in str(e), e
    else:
        raise AssertionError("an indivisible batch was accepted")
    # Reductions of per-example values split over an explicit mesh axis: the
    # pairwise tree gathers them first (slicing a sharded axis is refused).
    from jax.sharding import AxisType
    from transforms import masked_mean, pairwise_sum
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    v = jr.normal(jr.key(2), (64,)); keep = v > 0
    with jax.sharding.set_mesh(explicit):
        vs = jax.device_put(v, NamedSharding(explicit, P("data")))
        ks = jax.device_put(keep, NamedSharding(explicit, P("data")))
        total = jax.jit(pairwise_sum)(vs)
        np.testing.assert_allclose(total, pairwise_sum(v), rtol=1e-6)
        np.testing.assert_allclose(
            jax.jit(masked_mean)(vs, ks), np.mean(np.asarray(v)[np.asarray(keep)]),
            rtol=1e-6,
        )
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_step_equals_single_device():
    # Fake CPU devices, also on a machine with a GPU (which JAX would pick first).
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_shard_batch_errors():
    from transforms import shard_batch

    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="axis"):
        shard_batch(jnp.zeros((4, 2)), mesh, axis="model")
    with pytest.raises(ValueError, match="leading dimension"):
        shard_batch(jnp.zeros(()), mesh)
    out = shard_batch({"x": jnp.ones((4, 2)), "n": 3}, mesh)
    assert out["n"] == 3 and out["x"].shape == (4, 2)
