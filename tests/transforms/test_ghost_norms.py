import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from transforms import (
    GhostFallbackWarning,
    grad_dot_products,
    per_sample_grad_norms,
)
from transforms._grad._ghost_rules import (
    _Matmul,
    _Rows,
    AbstractRule,
    cross_message,
    cross_value,
    Index,
    Layout,
    one_sided,
    self_norm,
)

from ._ghost_models import (
    elementwise_batch,
    ElementwiseScale,
    make_case,
    mlp,
    regression_batch,
    regression_loss,
)
from ._reference import per_example_grads, Reference


def _dense_rule(T, Pk, Pf):
    # A matrix product whose factors and gradient are already laid out as [T, Pk],
    # [T, Pf] and [Pk, Pf].
    return _Matmul(
        layout=Layout(T=T, Pk=Pk, Pf=Pf, k_leaf_dims=(0,), f_leaf_dims=(1,)),
        param=0,
        act_shape=(T, Pf),
        ct_perm=(0, 1),
        act_perm=(0, 1),
        g_perm=(0, 1),
    )


@pytest.mark.parametrize("T, Pk, Pf", [(2, 3, 4), (5, 2, 3)], ids=["gram", "formed"])
def test_dense_norm_both_branches(T, Pk, Pf, x64):
    # (2, 3, 4): 2T² = 8 <= 12 takes the Gram form; (5, 2, 3): 50 > 6 forms G.
    rng = np.random.default_rng(0)
    K, F = rng.normal(size=(T, Pk)), rng.normal(size=(T, Pf))
    g = K.T @ F
    rule = _dense_rule(T, Pk, Pf)
    got = self_norm(rule.layout, jnp.asarray(K), jnp.asarray(F))
    np.testing.assert_allclose(got, np.sum(g * g), rtol=1e-12)
    G = rng.normal(size=(Pk, Pf))
    got = one_sided(rule, jnp.asarray(K), jnp.asarray(F), jnp.asarray(G))
    np.testing.assert_allclose(got, np.sum(g * G), rtol=1e-12)


def _rows_rule(T, n, d):
    return _Rows(
        layout=Layout(T=T, Pk=d, Pf=n, k_leaf_dims=(1,), f_leaf_dims=(0,)),
        kind="gather",
        k=0,
        n=n,
        rest_shape=(d,),
        rest_perm=(0,),
        g_perm=(1, 0),
        ct_perm=(0, 1),
    )


def test_a_rule_must_implement_the_whole_interface():
    with pytest.raises(TypeError, match="abstract"):
        AbstractRule()

    @dataclasses.dataclass(frozen=True)
    class KOnly(AbstractRule):
        layout: Layout

        def K(self, ct):
            return ct

    layout = Layout(T=1, Pk=1, Pf=1, k_leaf_dims=(), f_leaf_dims=())
    # CPython's wording differs between versions (3.12 quotes the names), so the
    # pattern checks only that the three missing methods are named, in order.
    with pytest.raises(TypeError, match="abstract methods? .*F.*G.*fwd_inputs"):
        KOnly(layout=layout)
    # Rules are static arguments of a custom_vjp: equal rules hash equal.
    assert _dense_rule(2, 3, 4) == _dense_rule(2, 3, 4)
    assert hash(_dense_rule(2, 3, 4)) == hash(_dense_rule(2, 3, 4))
    assert _dense_rule(2, 3, 4) != _dense_rule(2, 3, 5)


def test_embedding_norm_adds_repeated_rows_and_drops_invalid_ones(x64):
    rng = np.random.default_rng(1)
    rows = np.array([2, 0, 2, 4, 2, 1])
    valid = np.array([True, True, True, False, True, True])
    K = rng.normal(size=(6, 3))
    g = np.zeros((5, 3))
    for t in range(6):
        if valid[t]:
            g[rows[t]] += K[t]
    rule = _rows_rule(6, 5, 3)
    F = Index(jnp.asarray(rows), jnp.asarray(valid), 5)
    np.testing.assert_allclose(self_norm(rule.layout, jnp.asarray(K), F), np.sum(g * g))
    G = rng.normal(size=(5, 3))
    np.testing.assert_allclose(
        one_sided(rule, jnp.asarray(K), F, jnp.asarray(G)), np.sum(g * G)
    )


def test_cross_terms_between_an_embedding_and_a_tied_head(x64):
    # Use i: embedding rows x_t with output gradients b_t (g_i = Σ_t onehot(x_t) b_tᵀ);
    # use j: head h_s -> logits with gradients c_s (g_j = Σ_s c_s h_sᵀ). The message
    # from j to i, contracted with b, must give <g_i, g_j>.
    rng = np.random.default_rng(2)
    V, d, T, S = 5, 3, 4, 3
    x = np.array([1, 3, 1, 0])
    b, c, h = rng.normal(size=(T, d)), rng.normal(size=(S, V)), rng.normal(size=(S, d))
    g_i = np.zeros((V, d))
    for t in range(T):
        g_i[x[t]] += b[t]
    g_j = c.T @ h
    layout_i = _rows_rule(T, V, d).layout
    # The message needs only the sizes and leaf axes of use j, not how its factors
    # are read.
    layout_j = Layout(T=S, Pk=V, Pf=d, k_leaf_dims=(0,), f_leaf_dims=(1,))
    F_i = Index(jnp.asarray(x), jnp.ones(T, bool), V)
    R = cross_message(layout_i, F_i, layout_j, jnp.asarray(c), jnp.asarray(h))
    np.testing.assert_allclose(cross_value(jnp.asarray(b), R), np.sum(g_i * g_j))
    # The formula of the design notes: Σ_{t,s} c_s[x_t] (h_s · b_t).
    formula = sum(c[s, x[t]] * h[s] @ b[t] for t in range(T) for s in range(S))
    np.testing.assert_allclose(np.sum(g_i * g_j), formula)


def test_tied_weight_decomposition(x64):
    """The tied embedding's gradient: embedding use + head use, with cross terms."""
    model, loss, (tokens,), _ = make_case("gpt_tied")
    E = model.embed.weight

    def split_loss(E_embed, E_head, tokens):
        m = eqx.tree_at(lambda m: m.embed.weight, model, E_embed)
        h = m.hidden(jax.vmap(m.embed)(tokens[:-1]))
        logits = h @ E_head.T
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, tokens[1:])
        )

    split = jax.vmap(jax.grad(split_loss, argnums=(0, 1)), in_axes=(None, None, 0))
    e, h = jax.jit(split)(E, E, tokens)
    e, h = np.asarray(e), np.asarray(h)
    full = per_example_grads(model, loss, (tokens,))[0]
    np.testing.assert_allclose(full, e + h, rtol=1e-10, atol=1e-14)
    cross = np.sum(e * h, axis=(1, 2))
    assert np.all(np.abs(cross) > 1e-6), "the test needs non-zero cross terms"
    expected = np.sum(e * e, axis=(1, 2)) + np.sum(h * h, axis=(1, 2)) + 2 * cross
    norms = per_sample_grad_norms(loss, method="ghost", per_leaf=True)
    _, leaves = eqx.filter_jit(norms)(model, (tokens,))
    np.testing.assert_allclose(
        np.asarray(leaves.embed.weight) ** 2, expected, rtol=1e-10
    )


def test_bf16_parameters_accumulate_in_float32():
    model, loss, train, val = make_case("embedding_layernorm", dtype=jnp.bfloat16)
    with jax.enable_x64(True):
        wide = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
        )
        ref = Reference(wide, loss, train, val)

    @eqx.filter_jit
    def both(model, train, val):
        norms = per_sample_grad_norms(loss, method="ghost")(model, train)
        dots = grad_dot_products(loss, method="ghost")(model, train, val)
        return norms, dots

    norms, dots = both(model, train, val)
    assert norms.dtype == jnp.float32 and dots.dtype == jnp.float32
    # bf16 activations and gradients carry ~3 significant digits.
    np.testing.assert_allclose(norms, ref.norms(), rtol=3e-2)
    scale = np.max(np.abs(ref.dots()))
    np.testing.assert_allclose(dots, ref.dots(), rtol=5e-2, atol=3e-2 * scale)


def _temp_bytes(fn, model, *args):
    params, static = eqx.partition(model, eqx.is_array)
    lowered = jax.jit(lambda p, *a: fn(eqx.combine(p, static), *a)).lower(params, *args)
    analysis = lowered.compile().memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


def test_ghost_and_jvp_allocate_no_per_example_parameter_copies():
    # Wide layers applied to a few tokens: per-example gradients (B x parameters) are
    # much larger than the activations, so they dominate memory when formed.
    model = eqx.nn.MLP(128, 4, 384, 2, key=jr.key(0))

    def loss(model, x, y):
        return jnp.sum((jnp.mean(jax.vmap(model)(x), axis=0) - y) ** 2)

    B = 32
    x, y = jr.normal(jr.key(1), (B, 4, 128)), jr.normal(jr.key(2), (B, 4))
    n_params = sum(p.size for p in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    per_example_bytes = B * n_params * 4
    val = (x[:4], y[:4])
    vmap_norms = _temp_bytes(per_sample_grad_norms(loss, method="vmap"), model, (x, y))
    vmap_dots = _temp_bytes(grad_dot_products(loss, method="vmap"), model, (x, y), val)
    assert vmap_norms > 0.5 * per_example_bytes
    assert vmap_dots > 0.5 * per_example_bytes
    ghost_norms = _temp_bytes(
        per_sample_grad_norms(loss, method="ghost"), model, (x, y)
    )
    ghost_dots = _temp_bytes(
        grad_dot_products(loss, method="ghost"), model, (x, y), val
    )
    jvp_dots = _temp_bytes(grad_dot_products(loss, method="jvp"), model, (x, y), val)

    def batch_gradient(model, batch):
        return eqx.filter_grad(
            lambda m: jnp.mean(jax.vmap(loss, in_axes=(None, 0, 0))(m, *batch))
        )(model)

    # Measured beyond an ordinary batch gradient, which already holds the
    # activations and whatever workspace the backend reserves (a GPU's matmul
    # workspace is several MB): the claim is about per-example copies only.
    baseline = _temp_bytes(batch_gradient, model, (x, y))
    for temp in (ghost_norms, ghost_dots, jvp_dots):
        extra = temp - baseline
        assert extra < 0.1 * per_example_bytes, (temp, baseline, per_example_bytes)


def test_fallback_is_reported_exact_and_can_be_refused():
    model = ElementwiseScale(jr.key(0))
    batch = elementwise_batch(jr.key(1), 3)
    expected = per_sample_grad_norms(regression_loss, method="vmap")(model, batch)
    with pytest.warns(GhostFallbackWarning, match=r"\.scale \(2, 3\): used by `mul`"):
        got = per_sample_grad_norms(regression_loss, method="ghost")(model, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = per_sample_grad_norms(regression_loss)(model, batch)
    np.testing.assert_allclose(auto, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"fallback=False.*\.scale"):
        per_sample_grad_norms(regression_loss, fallback=False)(model, batch)
    with pytest.raises(ValueError, match=r"fallback=False.*\.scale"):
        grad_dot_products(regression_loss, method="ghost", fallback=False)(
            model, batch, batch
        )
    plan = per_sample_grad_norms(regression_loss).plan(model, batch)
    assert plan.fallback == (".scale",)
    assert "fallback" in str(plan) and "used by `mul`" in str(plan)


class _Odd(eqx.Module):
    """A leaf the loss ignores, and a matrix reused across scan iterations."""

    unused: jax.Array
    shared: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.unused = jnp.ones((2, 2))
        self.shared = eqx.nn.Linear(3, 3, key=k1)
        self.head = eqx.nn.Linear(3, 2, key=k2)

    def __call__(self, x):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(self.shared(h)), None), x, None, 3)
        return self.head(h)


def test_plan_treatments_and_exactness_of_unusual_uses():
    model = _Odd(jr.key(0))
    batch = regression_batch(jr.key(1), 3)
    norms_plan = {
        leaf.path: leaf
        for leaf in per_sample_grad_norms(regression_loss).plan(model, batch).leaves
    }
    dots_plan = {
        leaf.path: leaf
        for leaf in grad_dot_products(regression_loss).plan(model, batch).leaves
    }
    assert norms_plan[".unused"].treatment == "unused"
    # Closed over by the scan body: one use per iteration. Dot products add over
    # uses; squared norms would need cross-iteration terms, so they fall back.
    assert dots_plan[".shared.weight"].treatment == "ghost"
    assert norms_plan[".shared.weight"].treatment == "fallback"
    assert "closed over" in norms_plan[".shared.weight"].reason
    assert norms_plan[".head.weight"].treatment == "ghost"
    assert norms_plan[".shared.bias"].treatment == "materialised"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GhostFallbackWarning)
        ghost = per_sample_grad_norms(regression_loss, method="ghost")(model, batch)
        dots = grad_dot_products(regression_loss, method="ghost")(model, batch, batch)
    np.testing.assert_allclose(
        ghost,
        per_sample_grad_norms(regression_loss, method="vmap")(model, batch),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        dots,
        grad_dot_products(regression_loss, method="vmap")(model, batch, batch),
        rtol=1e-5,
    )


def test_norms_under_jit_vmap_and_grad():
    model = mlp(jr.key(0))
    x, y = regression_batch(jr.key(1), 4)
    ghost = per_sample_grad_norms(regression_loss, method="ghost")
    reference = eqx.filter_jit(per_sample_grad_norms(regression_loss, method="vmap"))
    once = eqx.filter_jit(
        eqx.debug.assert_max_traces(lambda fn, m, b: fn(m, b), max_traces=1)
    )
    for shift in (0.0, 1.0):
        np.testing.assert_allclose(
            once(ghost, model, (x + shift, y)),
            reference(model, (x + shift, y)),
            rtol=1e-5,
        )
    halves = eqx.filter_jit(
        lambda m, a, b: jax.vmap(lambda a, b: ghost(m, (a, b)))(a, b)
    )
    got = halves(model, x.reshape(2, 2, 3), y.reshape(2, 2, 2))
    np.testing.assert_allclose(got.reshape(-1), reference(model, (x, y)), rtol=1e-5)

    # A gradient penalty: d/dθ Σ_i ‖∇l_i‖², through the ghost path and through vmap.
    @eqx.filter_jit
    def penalty(fn, m):
        return eqx.filter_grad(lambda m: jnp.sum(fn(m, (x, y)) ** 2))(m)

    got = penalty(ghost, model)
    expected = penalty(per_sample_grad_norms(regression_loss, method="vmap"), model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


_small = mlp(jr.key(3))
_norms = eqx.filter_jit(per_sample_grad_norms(regression_loss, per_leaf=True))
_scaled_norms = eqx.filter_jit(
    per_sample_grad_norms(lambda m, x, y, s: s**2 * regression_loss(m, x, y))
)


@given(st.integers(0, 2**16), st.permutations(range(4)), st.floats(0.1, 10.0))
def test_norm_properties(seed, perm, scale):
    x, y = regression_batch(jr.key(seed), 4)
    norms, leaves = _norms(_small, (x, y))
    # Per-leaf norms add up in squares to the total.
    squares = sum(np.asarray(leaf, np.float64) ** 2 for leaf in jax.tree.leaves(leaves))
    np.testing.assert_allclose(np.asarray(norms) ** 2, squares, rtol=1e-4)
    # Each example's norm depends on that example only.
    perm = np.asarray(perm)
    permuted, _ = _norms(_small, (x[perm], y[perm]))
    np.testing.assert_allclose(permuted, np.asarray(norms)[perm], rtol=1e-5)
    # Scaling a loss by s² scales every gradient norm by s².
    scaled = _scaled_norms(_small, (x, y, jnp.full(4, scale)))
    np.testing.assert_allclose(scaled, scale**2 * np.asarray(norms), rtol=1e-4)


class _Sequence(eqx.Module):
    """An embedding, a wide and a narrow layer applied to every position."""

    embed: eqx.nn.Embedding
    wide: eqx.nn.Linear
    narrow: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(11, 8, key=k1)
        self.wide = eqx.nn.Linear(8, 32, key=k2)
        self.narrow = eqx.nn.Linear(32, 2, key=k3)

    def __call__(self, tokens):
        h = jax.vmap(self.embed)(tokens)
        h = jax.vmap(self.wide)(h)
        return jnp.mean(jax.vmap(self.narrow)(jnp.tanh(h)), axis=0)


# The two routes are compared at 1e-5: float32 matmuls, not GPU's default TF32.
@pytest.mark.usefixtures("highest_precision")
def test_plan_states_each_norm_route():
    # T = 6 positions: the wide layer (32 x 8 = 256 >= 2T² = 72) takes the Gram
    # route, the narrow one (2 x 32 = 64 < 72) forms its per-example gradient.
    model = _Sequence(jr.key(0))
    tokens = jr.randint(jr.key(1), (3, 6), 0, 11)
    batch = (tokens, jnp.zeros((3, 2)))
    plan = per_sample_grad_norms(regression_loss).plan(model, batch)
    routes = {leaf.path: leaf.routes for leaf in plan.leaves}
    assert routes[".embed.weight"] == ("row sums",)
    assert routes[".wide.weight"] == ("Gram, T = 6",)
    assert routes[".narrow.weight"] == ("formed, 2 × 32",)
    assert routes[".wide.bias"] == ()
    text = str(plan)
    assert "ghost (matmul: Gram, T = 6)" in text
    assert "ghost (matmul: formed, 2 × 32)" in text
    # Dot products have one route, so their plan names only the uses.
    dots = grad_dot_products(regression_loss).plan(model, batch)
    assert all(leaf.routes == () for leaf in dots.leaves)
    # Both routes give the reference norms.
    expected = per_sample_grad_norms(regression_loss, method="vmap")(model, batch)
    got = per_sample_grad_norms(regression_loss, method="ghost")(model, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
