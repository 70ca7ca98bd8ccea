import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ..helpers import run_script


_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import contextlib
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

    # Fully sharded data parallelism: the same arithmetic as one device, with
    # each parameter (and Adam's moments of it) split along its largest dimension.
    from transforms import ParameterSharding
    wide = eqx.nn.MLP(4, 2, 64, 2, key=jr.key(3))
    fsdp = make_train_step(
        loss, optimizer, mesh=mesh, donate=False,
        parameter_sharding=ParameterSharding(fsdp_axis="data", min_size=64),
    )
    m1 = wide; s1 = optimizer.init(eqx.filter(wide, eqx.is_inexact_array))
    m8, s8 = m1, s1
    for _ in range(5):
        m1, s1, met1 = single(m1, s1, (x, y), None)
        m8, s8, met8 = fsdp(m8, s8, (x, y), None)
        np.testing.assert_allclose(met1["loss"], met8["loss"], rtol=1e-5)
    for a, b in zip(leaves(m1), leaves(m8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    def shards(tree):
        return [b.sharding.shard_shape(b.shape) for b in leaves(tree)]

    # (in, out) weights are stored (out, in): 64x4, 64, 64x64, 64, 2x64, 2; the
    # last bias is under `min_size` and stays whole.
    expected = [(8, 4), (8,), (64, 8), (8,), (2, 8), (2,)]
    assert shards(m8) == expected, shards(m8)
    adam = s8[0]
    for moment in (adam.mu, adam.nu):
        assert shards(moment) == expected, shards(moment)
    assert adam.count.sharding.is_fully_replicated

    # Tensor parallelism by a rule, with FSDP over the other mesh axis.
    grid = jax.make_mesh((4, 2), ("data", "model"))
    def column_split(path, leaf):
        return P("model") if leaf.ndim == 2 and leaf.shape[0] == 64 else None
    both = make_train_step(
        loss, optimizer, mesh=grid, donate=False,
        parameter_sharding=ParameterSharding(
            fsdp_axis="data", tensor_parallel=column_split, min_size=64
        ),
    )
    m1 = wide; s1 = optimizer.init(eqx.filter(wide, eqx.is_inexact_array))
    mt, st = m1, s1
    for _ in range(3):
        m1, s1, met1 = single(m1, s1, (x, y), None)
        mt, st, mett = both(mt, st, (x, y), None)
        np.testing.assert_allclose(met1["loss"], mett["loss"], rtol=1e-5)
    for a, b in zip(leaves(m1), leaves(mt)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The rule splits dimension 0 of the 64-row weights over "model" (2), FSDP
    # the largest dimension left over "data" (4).
    assert shards(mt)[:3] == [(32, 1), (16,), (32, 16)], shards(mt)

    # Activations pinned to the batch split: inside `batch_sharding` an array's
    # batch dimension is constrained to the data axis, where the axis divides it;
    # values never change, and outside the context nothing happens at all.
    from transforms import batch_sharding, chunked_cross_entropy, constrain_batch
    a = jr.normal(jr.key(4), (16, 6))
    assert constrain_batch(a) is a
    def pinned(a):
        with batch_sharding(mesh, "data"):
            per_row = jax.vmap(lambda r: constrain_batch(r[None])[0])(a)
            return constrain_batch(a), constrain_batch(a[:3]), per_row
    out, odd, per_row = jax.jit(pinned)(a)
    assert out.sharding.shard_shape(out.shape) == (2, 6), out.sharding
    for value in (out, per_row):
        np.testing.assert_array_equal(value, a)
    np.testing.assert_array_equal(odd, a[:3])
    grad = jax.jit(jax.grad(lambda a: jnp.sum(pinned(a)[0] ** 2)))(a)
    np.testing.assert_allclose(grad, 2 * a, rtol=1e-6)
    # The chunked cross-entropy of split rows (strided chunks) against one device.
    h = jr.normal(jr.key(5), (64, 8)); w = jr.normal(jr.key(6), (10, 8))
    t = jr.randint(jr.key(7), (64,), 0, 10)
    ce = lambda h, w: chunked_cross_entropy(h, w, None, t, chunk_size=16)
    def ce_split(h, w):
        with batch_sharding(mesh, "data"):
            return ce(constrain_batch(h), w)
    expected = jax.value_and_grad(ce, argnums=(0, 1))(h, w)
    # (Split over `Auto` axes, as the steps split batches: with `Explicit` ones
    # the split is part of the type, which the custom VJP does not carry.)
    auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    got = jax.jit(jax.value_and_grad(ce_split, argnums=(0, 1)))(
        shard_batch(h, auto), w
    )
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert got[1][0].sharding.shard_shape((64, 8)) == (8, 8), got[1][0].sharding
    # Rows split over an `Explicit` axis (the split part of the arrays' type):
    # compiled and eager under the mesh, compiled without it (JAX itself needs the
    # mesh for an eager gradient of explicitly split arrays). The same loss and
    # gradients, the hidden states' gradient split as they are. (Before: JAX
    # refused the reshape into chunks.)
    hs = jax.device_put(h, NamedSharding(explicit, P("data")))
    ts = jax.device_put(t, NamedSharding(explicit, P("data")))
    ce_explicit = lambda h, w: chunked_cross_entropy(h, w, None, ts, chunk_size=16)
    for context in (True, False):
        with jax.sharding.set_mesh(explicit) if context else contextlib.nullcontext():
            for run in (jax.jit, lambda f: f) if context else (jax.jit,):
                got = run(jax.value_and_grad(ce_explicit, argnums=(0, 1)))(hs, w)
                for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
                    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
                assert got[1][0].sharding.spec == P("data", None), got[1][0].sharding
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_step_equals_single_device():
    run_script(_SCRIPT, timeout=600)


def test_parameter_sharding_errors():
    from transforms import make_train_step, ParameterSharding

    mesh = jax.make_mesh((1,), ("data",))
    optimizer = optax.sgd(1e-2)
    loss = lambda model, batch, key: jnp.sum(model(batch))
    with pytest.raises(ValueError, match="`fsdp_axis` must be a mesh axis name when"):
        ParameterSharding()
    with pytest.raises(ValueError, match="`min_size` must be a positive integer"):
        ParameterSharding(fsdp_axis="data", min_size=0)
    with pytest.raises(TypeError, match="tensor_parallel"):
        ParameterSharding(tensor_parallel="model")
    layout = ParameterSharding(fsdp_axis="batch")
    with pytest.raises(ValueError, match=r"`parameter_sharding` must be None when"):
        make_train_step(loss, optimizer, parameter_sharding=layout)
    with pytest.raises(
        ValueError, match=r"among the mesh axes \('data',\), got 'batch'"
    ):
        make_train_step(loss, optimizer, mesh=mesh, parameter_sharding=layout)
    with pytest.raises(TypeError, match="parameter_sharding"):
        make_train_step(loss, optimizer, mesh=mesh, parameter_sharding="fsdp")


def test_a_tensor_parallel_rule_must_fit_the_array_and_the_mesh():
    from jax.sharding import PartitionSpec as P

    from transforms import ParameterSharding

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 1), ("model",))
    leaf = jnp.zeros((3, 4))
    too_long = ParameterSharding(
        tensor_parallel=lambda path, leaf: P(None, None, "model")
    )
    with pytest.raises(ValueError, match="at most 2 entries"):
        too_long.shardings(mesh, {"w": leaf})
    # A two-device axis does not divide 3 rows (built on an abstract mesh: the
    # check reads only axis sizes).
    abstract = jax.sharding.AbstractMesh((2,), ("model",))
    rows = ParameterSharding(tensor_parallel=lambda path, leaf: P("model"))
    with pytest.raises(ValueError, match=r"over mesh axes whose size \(2\) divides it"):
        rows.spec(abstract, (), leaf)


def test_shard_batch_errors():
    from transforms import shard_batch

    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="axis"):
        shard_batch(jnp.zeros((4, 2)), mesh, axis="model")
    with pytest.raises(ValueError, match="leading dimension"):
        shard_batch(jnp.zeros(()), mesh)
    out = shard_batch({"x": jnp.ones((4, 2)), "n": 3}, mesh)
    assert out["n"] == 3 and out["x"].shape == (4, 2)
