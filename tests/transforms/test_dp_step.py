"""DP-SGD on the ghost engine against per-example gradients clipped one by one.

The reference below is written from the definition: per-example gradients by
`jax.vmap(jax.grad(...))`, each clipped in float64 NumPy on its own, summed over the
examples the mask keeps, plus noise drawn with the documented convention (leaf `l`
from `jax.random.split(key, L)[l]`, standard deviation `σC`), divided by the expected
batch size. Every method must match it to float64 rounding.
"""

import re
import textwrap
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from transforms import (
    clipped_grad_sum,
    GhostFallbackWarning,
    make_dp_train_step,
    MaskedBatch,
)
from transforms._privacy._clipping import resolve_method

from ..helpers import run_script
from ._ghost_models import (
    bfloat16_tied_gpt,
    elementwise_batch,
    ElementwiseScale,
    lm_loss,
    make_case,
    plain_backward_text,
    WIDE_BATCH,
    WIDE_LENGTH,
    WIDE_VOCAB,
)


def _per_example_grads(model, loss, examples) -> list[np.ndarray]:
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)

    def one(leaves, *example):
        return loss(eqx.combine(jax.tree.unflatten(treedef, leaves), static), *example)

    in_axes = (None,) + (0,) * len(examples)
    grads = jax.jit(jax.vmap(jax.grad(one), in_axes=in_axes))(leaves, *examples)
    return [np.asarray(g, np.float64) for g in grads]


def reference_clipped_sum(model, loss, examples, mask, C, per_layer=False):
    """`Σ_i m_i clip(g_i)` with each example's gradient clipped on its own."""
    grads = _per_example_grads(model, loss, examples)
    total = [np.zeros(g.shape[1:]) for g in grads]
    norms = []
    for i in range(examples[0].shape[0]):
        g = [x[i] for x in grads]
        norm = np.sqrt(sum(np.sum(x * x) for x in g))
        norms.append(norm)
        if not mask[i]:
            continue
        if per_layer:
            bound = C / np.sqrt(len(g))
            g = [x * min(1.0, bound / max(np.linalg.norm(x), 1e-300)) for x in g]
        else:
            g = [x * min(1.0, C / norm) for x in g]
        total = [t + x for t, x in zip(total, g)]
    return total, np.array(norms)


def reference_noisy_gradient(model, loss, examples, mask, expected, key, C, sigma):
    total, _ = reference_clipped_sum(model, loss, examples, mask, C)
    keys = jr.split(key, len(total))
    noise = [
        sigma * C * np.asarray(jr.normal(k, t.shape, jnp.float64))
        for k, t in zip(keys, total)
    ]
    return [(t + z) / expected for t, z in zip(total, noise)]


def _leaves(model) -> list[np.ndarray]:
    return [
        np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    ]


def _median_norm(model, loss, examples) -> float:
    # A clip norm between the examples' norms: some are clipped, some are not.
    _, norms = reference_clipped_sum(
        model, loss, examples, np.ones(len(examples[0])), 1.0
    )
    return float(np.median(norms))


# The GPTs: the head tied to the embedding, and the blocks run by `lax.scan` too.
MODELS = ["mlp", "conv", "embedding_layernorm", "gpt_tied", "gpt_tied_scan"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_clipped_sum_equals_clipping_one_by_one(name, x64):
    model, loss, train, _ = make_case(name, n_train=5)
    C = _median_norm(model, loss, train)
    mask = np.array([True, True, False, True, True])
    expected, norms = reference_clipped_sum(model, loss, train, mask, C)
    for method in ("one_pass", "two_pass", "vmap"):
        fn = eqx.filter_jit(clipped_grad_sum(loss, clip_norm=C, method=method))
        grads, got_norms, losses = fn(model, train, jnp.asarray(mask))
        for got, want in zip(_leaves(grads), expected):
            np.testing.assert_allclose(
                got, want, rtol=1e-10, atol=1e-12, err_msg=method
            )
        np.testing.assert_allclose(got_norms, np.where(mask, norms, 0), rtol=1e-10)
        assert losses[2] == 0 and np.all(np.asarray(losses)[mask] != 0)


@pytest.mark.parametrize("name", ["mlp", "embedding_layernorm"])
def test_per_layer_clipping_equals_clipping_one_by_one(name, x64):
    model, loss, train, _ = make_case(name, n_train=4)
    n_leaves = len(_leaves(model))
    C = 0.5 * _median_norm(model, loss, train) * np.sqrt(n_leaves) / 2
    mask = np.ones(4, bool)
    expected, _ = reference_clipped_sum(model, loss, train, mask, C, per_layer=True)
    for method in ("one_pass", "vmap"):
        fn = eqx.filter_jit(
            clipped_grad_sum(loss, clip_norm=C, method=method, per_layer=True)
        )
        grads = fn(model, train).grads
        for got, want in zip(_leaves(grads), expected):
            np.testing.assert_allclose(
                got, want, rtol=1e-10, atol=1e-12, err_msg=method
            )
        # The clipped gradient of every example stays within C.
        total = np.sqrt(sum(np.sum(g * g) for g in _leaves(grads)))
        assert total <= 4 * C * (1 + 1e-12)


def test_one_pass_in_bfloat16_costs_the_products_of_a_plain_backward_pass(x64):
    # A bfloat16 model: the one-pass sum's products, the size of a weight gradient,
    # take bfloat16 factors as a plain backward pass's do (float32 copies of them
    # doubled the traffic and slowed the products), and the sum stays within
    # bfloat16 rounding of clipping one by one in float64.
    model, (tokens,) = bfloat16_tied_gpt()
    C = 0.5 * _median_norm(model, lm_loss, (tokens,))
    fn = eqx.filter_jit(clipped_grad_sum(lm_loss, clip_norm=C, method="one_pass"))
    text = fn.lower(model, (tokens,)).as_text()
    pattern = r"dot_general.*: \(tensor<([0-9x]*)f32>, tensor<([0-9x]*)f32>\) -> "
    float32_products = re.findall(pattern + r"tensor<([0-9x]*)f32>", text)
    assert float32_products, "the test no longer sees the float32 products it checks"
    weights = {
        "x".join(map(str, leaf.shape)) + "x"
        for leaf in _leaves(model)
        if leaf.ndim == 2 and leaf.shape != model.pos.weight.shape
    }
    assert {out for *_, out in float32_products}.isdisjoint(weights)
    # The clip factors scale the narrower side of the head (its inputs, not its
    # vocabulary-wide output gradients): no more vocabulary-wide products than in
    # a plain backward pass.
    vocabulary_wide = (
        rf"stablehlo.multiply[^\n]*tensor<{WIDE_BATCH}x{WIDE_LENGTH - 1}x{WIDE_VOCAB}x"
    )
    assert len(re.findall(vocabulary_wide, text)) == len(
        re.findall(vocabulary_wide, plain_backward_text(model, tokens))
    )
    model64 = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
    )
    expected, _ = reference_clipped_sum(
        model64, lm_loss, (tokens,), np.ones(WIDE_BATCH, bool), C
    )
    for got, want in zip(_leaves(fn(model, (tokens,)).grads), expected):
        np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())


def _step_case(name, n=4):
    model, loss, train, _ = make_case(name, n_train=n)
    mask = np.array([True, False] + [True] * (n - 2))
    batch = MaskedBatch(train, jnp.asarray(mask), jnp.asarray(2.5))
    return model, loss, train, mask, batch


@pytest.mark.parametrize(
    "name, method, accumulation",
    [
        ("mlp", "one_pass", 1),
        ("mlp", "two_pass", 2),
        ("mlp", "vmap", 2),
        pytest.param("gpt_tied", "auto", 1, marks=pytest.mark.slow),
        pytest.param("gpt_tied", "one_pass", 2, marks=pytest.mark.slow),
    ],
)
def test_dp_step_equals_the_reference_update(name, method, accumulation, x64):
    model, loss, train, mask, batch = _step_case(name)
    C, sigma, lr = _median_norm(model, loss, train), 0.8, 0.1
    key = jr.key(7)
    optimizer = optax.sgd(lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_dp_train_step(
        loss,
        optimizer,
        clip_norm=C,
        noise_multiplier=sigma,
        method=method,
        accumulation_steps=accumulation,
        donate=False,
    )
    new_model, _, metrics = step(model, opt_state, batch, key)
    noisy = reference_noisy_gradient(model, loss, train, mask, 2.5, key, C, sigma)
    for got, before, g in zip(_leaves(new_model), _leaves(model), noisy):
        np.testing.assert_allclose(got, before - lr * g, rtol=1e-10, atol=1e-12)
    _, norms = reference_clipped_sum(model, loss, train, mask, C)
    assert float(metrics["batch_size"]) == mask.sum()
    assert float(metrics["clipped_fraction"]) == pytest.approx(np.mean(norms[mask] > C))
    assert float(metrics["grad_norm"]) == pytest.approx(
        np.sqrt(sum(np.sum(g * g) for g in noisy)), rel=1e-10
    )
    assert int(metrics["nonfinite"]) == 0


def test_a_tuple_batch_counts_every_row_and_divides_by_its_size(x64):
    model, loss, train, _ = make_case("mlp", n_train=4)
    C, lr = 0.3, 0.5
    optimizer = optax.sgd(lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_dp_train_step(
        loss, optimizer, clip_norm=C, noise_multiplier=0.0, donate=False
    )
    new_model, _, metrics = step(model, opt_state, train)  # no noise: no key needed
    clipped, _ = reference_clipped_sum(model, loss, train, np.ones(4, bool), C)
    for got, before, g in zip(_leaves(new_model), _leaves(model), clipped):
        np.testing.assert_allclose(got, before - lr * g / 4, rtol=1e-10, atol=1e-12)
    assert float(metrics["batch_size"]) == 4


def test_auto_takes_one_pass_where_a_parameter_is_ghost():
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32)
    plan = clipped_grad_sum(loss, clip_norm=1.0).plan(model, train)
    assert resolve_method("auto", plan) == "one_pass"
    assert resolve_method("two_pass", plan) == "two_pass"

    # Vector-like parameters only: per-example gradients are formed either way.
    def scaled(v, x):
        return jnp.sum(jnp.tanh(v * x))

    plan = clipped_grad_sum(scaled, clip_norm=1.0).plan(
        jnp.ones(3), (jnp.ones((2, 3)),)
    )
    assert resolve_method("auto", plan) == "vmap"


def test_a_parameter_off_the_ghost_rules_is_clipped_exactly(x64):
    model = ElementwiseScale(jr.key(0), jnp.float64)
    batch = elementwise_batch(jr.key(1), 4, jnp.float64)
    loss = lambda m, x, y: jnp.sum((m(x) - y) ** 2)
    C = _median_norm(model, loss, batch)
    expected, _ = reference_clipped_sum(model, loss, batch, np.ones(4, bool), C)
    with pytest.warns(GhostFallbackWarning, match="scale"):
        grads = clipped_grad_sum(loss, clip_norm=C, method="one_pass")(model, batch)[0]
    for got, want in zip(_leaves(grads), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" falls back silently
        clipped_grad_sum(loss, clip_norm=C)(model, batch)
    with pytest.raises(ValueError, match="fallback=False"):
        clipped_grad_sum(loss, clip_norm=C, fallback=False)(model, batch)


def test_compiles_once_per_shape():
    model, loss, train, _ = make_case("embedding_layernorm", dtype=jnp.float32)
    traces = []

    def counted(model, *example):
        traces.append(None)
        return loss(model, *example)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_dp_train_step(counted, optimizer, clip_norm=1.0, noise_multiplier=1.0)
    tokens, labels = train
    model, opt_state, _ = step(model, opt_state, train, jr.key(0))
    after_first = len(traces)
    for i in range(3):
        batch = MaskedBatch(
            ((tokens + i) % 7, labels),
            jnp.asarray([True, i > 0, True]),
            jnp.asarray(2.0 + i),
        )
        model, opt_state, _ = step(model, opt_state, batch, jr.key(i + 1))
    assert len(traces) == after_first


def test_a_nonfinite_update_is_not_applied():
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_dp_train_step(
        lambda m, x, y: loss(m, x, y) * jnp.nan,
        optimizer,
        clip_norm=1.0,
        noise_multiplier=1.0,
        donate=False,
    )
    new_model, _, metrics = step(model, opt_state, train, jr.key(0))
    assert int(metrics["nonfinite"]) != 0
    for got, before in zip(_leaves(new_model), _leaves(model)):
        np.testing.assert_array_equal(got, before)


def test_bad_arguments():
    model, loss, train, _ = make_case("mlp", dtype=jnp.float32)
    sgd = optax.sgd(0.1)
    build = lambda **kw: make_dp_train_step(
        loss, sgd, **{"clip_norm": 1.0, "noise_multiplier": 1.0, **kw}
    )
    with pytest.raises(
        ValueError, match="`clip_norm` must be a finite real number > 0"
    ):
        build(clip_norm=0.0)
    with pytest.raises(ValueError, match="`noise_multiplier` must be"):
        build(noise_multiplier=-0.5)
    with pytest.raises(ValueError, match="cannot clip per layer"):
        build(method="two_pass", per_layer=True)
    with pytest.raises(ValueError, match="`method` must be one of"):
        build(method="ghost")
    step = build(accumulation_steps=2)
    opt_state = sgd.init(eqx.filter(model, eqx.is_inexact_array))
    with pytest.raises(ValueError, match="`accumulation_steps`=2"):
        step(model, opt_state, train, jr.key(0))  # 3 examples
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        build()(model, opt_state, train, None)
    bad_mask = MaskedBatch(train, jnp.ones(2, bool), jnp.asarray(3.0))
    with pytest.raises(ValueError, match="`mask` must be a boolean array of shape"):
        build()(model, opt_state, bad_mask, jr.key(0))
    bad_size = MaskedBatch(train, jnp.ones(3, bool), jnp.asarray(0.0))
    with pytest.raises(ValueError, match="`batch.expected_size` must be a finite"):
        build()(model, opt_state, bad_size, jr.key(0))


_SHARDED = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import sys
    sys.path.insert(0, ".")
    import equinox as eqx, jax.numpy as jnp, jax.random as jr, numpy as np, optax
    from transforms import make_dp_train_step, MaskedBatch
    from tests.transforms._ghost_models import make_case
    from tests.transforms.test_dp_step import reference_noisy_gradient

    assert jax.device_count() == 8
    model, loss, train, _ = make_case("gpt_tied", n_train=16)
    mask = np.arange(16) % 5 != 3
    batch = MaskedBatch(train, jnp.asarray(mask), jnp.asarray(12.0))
    C, sigma, lr, key = 0.5, 0.9, 0.1, jr.key(3)
    optimizer = optax.sgd(lr)
    init = lambda: optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
    noisy = reference_noisy_gradient(model, loss, train, mask, 12.0, key, C, sigma)
    expected = [np.asarray(p) - lr * g for p, g in zip(leaves(model), noisy)]
    for accumulation in (1, 2):
        step = make_dp_train_step(loss, optimizer, clip_norm=C, noise_multiplier=sigma,
                                  accumulation_steps=accumulation, mesh=mesh,
                                  donate=False)
        new, _, metrics = step(model, init(), batch, key)
        for got, want in zip(leaves(new), expected):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            assert got.sharding.is_fully_replicated
            assert len(got.sharding.device_set) == 8
        assert float(metrics["batch_size"]) == mask.sum()
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_over_8_devices_adds_the_noise_once():
    # Equal to the single-device reference for the same key: noise added once to the
    # sum reduced over the devices (per device, it would be 8 draws, or 8 times one).
    run_script(_SHARDED, devices=8)
