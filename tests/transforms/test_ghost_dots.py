import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from transforms import grad_dot_products

from ._ghost_models import (
    bfloat16_tied_gpt,
    lm_batch,
    lm_loss,
    make_case,
    mlp,
    plain_backward_text,
    regression_batch,
    regression_loss,
    WIDE_BATCH,
    WIDE_LENGTH,
    WIDE_VOCAB,
)


def test_jvp_identity_against_finite_differences(x64):
    """`<∇l_i, G>` is the derivative of l_i along G: central differences in float64."""
    model, loss, train, val = make_case("embedding_layernorm")
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @jax.jit
    def differences(params, eps):
        def losses(params, batch):
            m = eqx.combine(params, static)
            return jax.vmap(lambda *ex: loss(m, *ex))(*batch)

        G = jax.grad(lambda p: jnp.mean(losses(p, val)))(params)
        shift = lambda sign: jax.tree.map(lambda p, g: p + sign * eps * g, params, G)
        return losses(shift(1), train), losses(shift(-1), train)

    eps = 1e-5
    plus, minus = differences(params, eps)
    expected = (np.asarray(plus) - np.asarray(minus)) / (2 * eps)

    @eqx.filter_jit
    def both(model, train, val):
        return [
            grad_dot_products(loss, method=method)(model, train, val)
            for method in ("jvp", "ghost")
        ]

    for got in both(model, train, val):
        np.testing.assert_allclose(got, expected, rtol=1e-7)


def test_a_validation_batch_is_the_mean_of_its_examples():
    # The original engine summed validation activations and output gradients over the
    # batch before the product, adding val×val cross terms: with 3 validation examples
    # the result must be the mean of the three single-example results.
    model, loss, train, val = make_case(
        "embedding_layernorm", dtype=jnp.float32, n_val=3
    )
    fn = eqx.filter_jit(grad_dot_products(loss, method="ghost"))
    whole = fn(model, train, val)
    singles = [fn(model, train, tuple(v[i : i + 1] for v in val)) for i in range(3)]
    np.testing.assert_allclose(whole, np.mean(singles, axis=0), rtol=1e-4, atol=1e-6)
    matrix = eqx.filter_jit(grad_dot_products(loss, method="ghost", full_matrix=True))(
        model, train, val
    )
    np.testing.assert_allclose(np.transpose(singles), matrix, rtol=1e-4, atol=1e-6)


def test_dots_under_jit_vmap_and_grad():
    model = mlp(jr.key(0))
    train = regression_batch(jr.key(1), 4)
    val = regression_batch(jr.key(2), 2)
    ghost = grad_dot_products(regression_loss, method="ghost")
    reference = eqx.filter_jit(grad_dot_products(regression_loss, method="vmap"))
    once = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda fn, m, t, v: fn(m, t, v), max_traces=1)
    )
    for shift in (0.0, 0.5):
        shifted = (train[0] + shift, train[1])
        np.testing.assert_allclose(
            once(ghost, model, shifted, val),
            reference(model, shifted, val),
            rtol=1e-5,
            atol=1e-6,
        )
    x, y = train

    @eqx.filter_jit
    def halves(m):
        return jax.vmap(lambda a, b: ghost(m, (a, b), val))(
            x.reshape(2, 2, 3), y.reshape(2, 2, 2)
        )

    np.testing.assert_allclose(
        halves(model).reshape(-1), reference(model, train, val), rtol=1e-5, atol=1e-6
    )

    @eqx.filter_jit
    def grad(fn, m):
        return eqx.filter_grad(lambda m: jnp.sum(fn(m, train, val)))(m)

    got = grad(ghost, model)
    expected = grad(grad_dot_products(regression_loss, method="vmap"), model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_vocabulary_wide_head_adds_no_float32_intermediate():
    # `<g_i, G>` for the tied head multiplies G against the vocabulary-wide side
    # first: the other order forms a float32 `[T, vocabulary]` array per example
    # (6.6 GB for GPT-2 small at B = 256, T = 128). So the dots, in bfloat16, form
    # no more float32 vocabulary-wide arrays than a plain backward pass does.
    model, train = bfloat16_tied_gpt()
    val = lm_batch(jr.key(2), 3, length=WIDE_LENGTH, vocab=WIDE_VOCAB)
    dots = eqx.filter_jit(grad_dot_products(lm_loss, method="ghost"))
    wide = rf"-> tensor<{WIDE_BATCH}x{WIDE_LENGTH - 1}x{WIDE_VOCAB}xf32>"
    in_dots = len(re.findall(wide, dots.lower(model, train, val).as_text()))
    in_plain = len(re.findall(wide, plain_backward_text(model, *train)))
    assert in_plain > 0, "the test no longer sees the arrays it counts"
    assert in_dots == in_plain
