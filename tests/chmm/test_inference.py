import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from jaxtyping import TypeCheckError

from eqx_models.chmm import (
    backward,
    bits_per_step,
    CHMM,
    forward,
    log_likelihood,
    posteriors,
)

from . import reference as ref


# Heterogeneous counts; single clones; one symbol; a layout so uneven that the chain
# uses masked windows of a padded T instead of pre-gathered blocks; a symbol that is
# never observed. Sizes are shared between tests so that compilations are reused.
BLOCKS, UNEVEN = (2, 3, 1), (1, 4, 1, 1)
LAYOUTS = [BLOCKS, (1, 1), (3,), UNEVEN, (2, 1, 2)]
METHODS = ["scan", "parallel"]
STEPS, ACTIONS = 5, 3


def case(layout, n_steps=STEPS, seed=0, unobserved=None, zeros=0.0):
    rng = np.random.default_rng(seed)
    T, Pi = ref.random_model(rng, layout, ACTIONS, zero_fraction=zeros)
    symbols = [k for k in range(len(layout)) if k != unobserved]
    x = rng.choice(symbols, n_steps)
    a = rng.integers(0, ACTIONS, n_steps)
    return T, Pi, x, a


def as_model(layout, T, Pi=None, dtype=None):
    Pi = None if Pi is None else jnp.asarray(Pi, dtype)
    return CHMM(layout, jnp.asarray(T, dtype), Pi)


def close(actual, desired, tol=1e-12):
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol)


def _reference_messages(layout, T, Pi, x, a):
    e = ref.emission_weights(layout, x)
    logs, alphas = ref.forward(T, Pi, e, a)
    u = e * ref.backward(T, e, a)
    return e, logs, alphas, u / u.sum(-1, keepdims=True)


@pytest.mark.parametrize("layout", [BLOCKS, UNEVEN])
@pytest.mark.parametrize("method", METHODS)
def test_every_pass_matches_brute_force_and_reference(x64, layout, method):
    T, Pi, x, a = case(layout)
    model = as_model(layout, T, Pi)
    e, logs, alphas, u = _reference_messages(layout, T, Pi, x, a)
    truth = ref.brute_force(T, Pi, e, a)
    close(log_likelihood(model, x, a, method=method), truth["log_likelihood"])
    log_norms, filtered = forward(model, x, a, method=method)
    close(log_norms, logs)
    close(filtered, alphas)
    close(backward(model, x, a, method=method), u)
    post = posteriors(model, x, a, method=method)
    close(post.log_likelihood, truth["log_likelihood"])
    close(post.log_normalizers, logs)
    close(post.filtered, alphas)
    close(post.smoothed, truth["smoothed"])


@pytest.mark.parametrize("layout", LAYOUTS[1:3] + LAYOUTS[4:])
@pytest.mark.parametrize("method", METHODS)
def test_posteriors_for_other_layouts(x64, layout, method):
    unobserved = 1 if layout == (2, 1, 2) else None
    T, Pi, x, a = case(layout, unobserved=unobserved)
    e, logs, alphas, _ = _reference_messages(layout, T, Pi, x, a)
    truth = ref.brute_force(T, Pi, e, a)
    post = posteriors(as_model(layout, T, Pi), x, a, method=method)
    close(post.log_likelihood, truth["log_likelihood"])
    close(post.log_normalizers, logs)
    close(post.filtered, alphas)
    close(post.smoothed, truth["smoothed"])


def test_first_normaliser_is_clone_share_under_uniform_pi(x64):
    T, _, x, a = case(BLOCKS)
    log_norms, _ = forward(as_model(BLOCKS, T), x, a)
    close(log_norms[0], np.log(BLOCKS[x[0]] / sum(BLOCKS)))


@pytest.mark.parametrize("n_steps", [1, 2])
def test_short_sequences(x64, n_steps):
    T, Pi, x, a = case(BLOCKS, n_steps=n_steps)
    truth = ref.brute_force(T, Pi, ref.emission_weights(BLOCKS, x), a)
    for method in METHODS:
        post = posteriors(as_model(BLOCKS, T, Pi), x, a, method=method)
        close(post.log_likelihood, truth["log_likelihood"])
        close(post.smoothed, truth["smoothed"])


@pytest.mark.parametrize("method", METHODS)
def test_soft_evidence_matches_brute_force(x64, method):
    rng = np.random.default_rng(3)
    T, Pi, _, a = case(BLOCKS)
    evidence = np.asarray(jax.nn.log_softmax(rng.normal(size=(STEPS, 3))))
    model = as_model(BLOCKS, T, Pi)
    e = ref.emission_weights(BLOCKS, evidence)
    truth = ref.brute_force(T, Pi, e, a)
    post = posteriors(model, evidence, a, method=method)
    close(post.log_likelihood, truth["log_likelihood"])
    close(post.smoothed, truth["smoothed"])
    close(log_likelihood(model, evidence, a, method=method), truth["log_likelihood"])
    u = e * ref.backward(T, e, a)
    close(backward(model, evidence, a, method=method), u / u.sum(-1, keepdims=True))


@pytest.mark.parametrize("method", METHODS)
def test_one_hot_evidence_equals_ids(x64, method):
    T, Pi, x, a = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)
    evidence = jnp.log(jax.nn.one_hot(x, len(BLOCKS), dtype=jnp.float64))
    hard = posteriors(model, x, a, method=method)
    soft = posteriors(model, evidence, a, method=method)
    close(soft.log_likelihood, hard.log_likelihood)
    close(soft.smoothed, hard.smoothed)
    close(soft.filtered, hard.filtered)
    close(
        backward(model, evidence, a, method=method),
        backward(model, x, a, method=method),
    )


@pytest.mark.parametrize("method", METHODS)
def test_emission_matrix_matches_brute_force(x64, method):
    rng = np.random.default_rng(4)
    T, Pi, x, a = case(BLOCKS)
    E = rng.random((sum(BLOCKS), len(BLOCKS)))
    E /= E.sum(-1, keepdims=True)
    truth = ref.brute_force(T, Pi, E[:, x].T, a)
    model = as_model(BLOCKS, T, Pi)
    post = posteriors(model, x, a, method=method, emissions=jnp.asarray(E))
    close(post.log_likelihood, truth["log_likelihood"])
    close(post.smoothed, truth["smoothed"])
    # Evidence through an emission matrix: one-hot evidence equals ids.
    evidence = jnp.log(jax.nn.one_hot(x, len(BLOCKS), dtype=jnp.float64))
    got = log_likelihood(model, evidence, a, method=method, emissions=jnp.asarray(E))
    close(got, truth["log_likelihood"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_float32_long_sequence_is_accurate(method):
    rng = np.random.default_rng(5)
    T, Pi = ref.random_model(rng, BLOCKS, ACTIONS)
    n_steps = 20_000
    x = rng.integers(0, 3, n_steps)
    a = rng.integers(0, ACTIONS, n_steps)
    exact, _ = ref.forward(T, Pi, ref.emission_weights(BLOCKS, x), a)
    model = as_model(BLOCKS, T, Pi, jnp.float32)
    got = log_likelihood(model, x, a, method=method)
    # Each per-step term carries a few float32 ulps; summed pairwise the total stays
    # within about 1e-6 relative (a float32 running sum drifts towards 1e-4).
    np.testing.assert_allclose(got, exact.sum(), rtol=2e-6)


def test_impossible_sequence_and_zero_rows(x64):
    T = np.zeros((ACTIONS, 6, 6))
    T[:, :, 0] = 1
    T[0, 5] = 0  # a row of zeros
    model = as_model(BLOCKS, T)
    x, a = np.array([0, 0, 1, 0, 0]), np.array([0, 0, 0, 0, 0])
    possible = np.array([0, 0, 0, 0, 0])
    for method in METHODS:
        assert log_likelihood(model, x, a, method=method) == -np.inf
        post = posteriors(model, x, a, method=method)
        assert post.log_likelihood == -np.inf
        assert not np.any(np.isnan(post.smoothed))

        def f(T, method=method):
            m = eqx.tree_at(lambda m: m.T, model, T)
            return log_likelihood(m, possible, a, method=method)

        close(f(model.T), np.log(2 / 6))
        assert np.all(np.isfinite(jax.grad(f)(model.T)))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_match_finite_differences(x64, method):
    T, Pi, x, a = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)

    def f(T, Pi):
        m = eqx.tree_at(lambda m: (m.T, m.Pi), model, (T, Pi))
        return log_likelihood(m, x, a, method=method)

    gT, gPi = jax.jit(jax.grad(f, argnums=(0, 1)))(model.T, model.Pi)
    rng = np.random.default_rng(6)
    h = 1e-6
    for _ in range(3):
        d = rng.normal(size=T.shape)
        fd = f(model.T + h * d, model.Pi) - f(model.T - h * d, model.Pi)
        close(fd / (2 * h), np.sum(gT * d), 1e-6)
    d = rng.normal(size=Pi.shape)
    fd = f(model.T, model.Pi + h * d) - f(model.T, model.Pi - h * d)
    close(fd / (2 * h), np.sum(gPi * d), 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_to_evidence_is_symbol_posterior(x64, method):
    rng = np.random.default_rng(7)
    T, Pi, _, a = case(BLOCKS)
    evidence = jnp.asarray(rng.normal(size=(STEPS, 3)))
    model = as_model(BLOCKS, T, Pi)
    g = jax.grad(lambda ev: log_likelihood(model, ev, a, method=method))(evidence)
    truth = ref.brute_force(T, Pi, ref.emission_weights(BLOCKS, evidence), a)
    symbol = ref.symbols(BLOCKS)
    per_symbol = np.stack(
        [truth["smoothed"][:, symbol == k].sum(-1) for k in range(3)], -1
    )
    close(g, per_symbol)


def test_posteriors_are_differentiable(x64):
    rng = np.random.default_rng(9)
    T, Pi, _, a = case(BLOCKS)
    evidence = jnp.asarray(rng.normal(size=(STEPS, 3)))
    weights = jnp.asarray(rng.normal(size=(STEPS, 6)))

    def f(logits, ev):
        m = CHMM.from_logits(BLOCKS, logits, Pi)
        return jnp.sum(weights * posteriors(m, ev, a).smoothed)

    logits = jnp.log(jnp.asarray(T))
    grads = jax.grad(f, argnums=(0, 1))(logits, evidence)
    h = 1e-6
    for which, grad in enumerate(grads):
        args = [logits, evidence]
        d = rng.normal(size=args[which].shape)
        plus, minus = list(args), list(args)
        plus[which] = plus[which] + h * d
        minus[which] = minus[which] - h * d
        close((f(*plus) - f(*minus)) / (2 * h), np.sum(grad * d), 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_sequences_matches_single_calls(x64, method):
    T, Pi, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi)
    rng = np.random.default_rng(10)
    xs = jnp.asarray(rng.integers(0, 3, (3, STEPS)))
    as_ = jnp.asarray(rng.integers(0, ACTIONS, (3, STEPS)))
    batched = jax.vmap(lambda x, a: posteriors(model, x, a, method=method))(xs, as_)
    lnls = jax.vmap(lambda x, a: log_likelihood(model, x, a, method=method))(xs, as_)
    for i in range(3):
        single = posteriors(model, xs[i], as_[i], method=method)
        close(batched.smoothed[i], single.smoothed)
        close(batched.log_likelihood[i], single.log_likelihood)
        close(lnls[i], single.log_likelihood)


@pytest.mark.parametrize("fn", [log_likelihood, posteriors, forward, backward])
def test_compiles_once_per_shape(fn):
    T, _, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, None, jnp.float32)
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(fn, max_traces=1))
    rng = np.random.default_rng(11)
    for _ in range(3):
        x = jnp.asarray(rng.integers(0, 3, STEPS))
        a = jnp.asarray(rng.integers(0, ACTIONS, STEPS))
        counted(model, x, a)


def test_bits_per_step():
    close(bits_per_step(-np.log(2.0) * 10, 10), 1.0, 1e-6)
    close(bits_per_step(jnp.array([0.0, -4 * np.log(2.0)]), 2), [0.0, 2.0], 1e-6)


@given(
    layout=st.sampled_from([BLOCKS, UNEVEN]),
    seed=st.integers(0, 2**16),
    zeros=st.sampled_from([0.0, 0.5]),
)
def test_property_random_models(layout, seed, zeros):
    with jax.enable_x64(True):
        T, Pi, x, a = case(layout, seed=seed, zeros=zeros)
        truth = ref.brute_force(T, Pi, ref.emission_weights(layout, x), a)
        for method in METHODS:
            model = as_model(layout, T, Pi)
            post = posteriors(model, x, a, method=method)
            # On a CPU, `log_likelihood` of a block layout takes its own path (a
            # switch over the blocks), separate from the posteriors' forward pass.
            lnl = log_likelihood(model, x, a, method=method)
            if np.isfinite(truth["log_likelihood"]):
                close(post.log_likelihood, truth["log_likelihood"], 1e-10)
                close(lnl, truth["log_likelihood"], 1e-10)
                close(post.smoothed, truth["smoothed"], 1e-10)
                close(post.smoothed.sum(-1), 1)
            else:
                assert post.log_likelihood == -np.inf
                assert lnl == -np.inf


class TestErrors:
    def setup_method(self):
        self.model = CHMM((2, 1), jnp.full((2, 3, 3), 1 / 3))
        self.ids = jnp.zeros(3, jnp.int32)

    def test_mismatched_lengths(self):
        with pytest.raises(ValueError, match="log_likelihood: `x` and `a` must have"):
            log_likelihood(self.model, jnp.zeros(4, jnp.int32), self.ids)

    def test_ids_out_of_range(self):
        # Concrete ids are checked at once: the library's plain `ValueError`, which
        # names the first bad id; traced ones by the compiled check.
        message = r"`x` must be integer ids in \[0, n_obs\) = \[0, 2\)"
        with pytest.raises(ValueError, match=message + ", got 2 at index"):
            log_likelihood(self.model, jnp.array([0, 2, 1]), self.ids)
        with pytest.raises(ValueError, match=message):
            posteriors(self.model, jnp.array([0, -1, 1]), self.ids)
        with pytest.raises(eqx.EquinoxRuntimeError, match=message):
            jax.block_until_ready(
                eqx.filter_jit(lambda x: log_likelihood(self.model, x, self.ids))(
                    jnp.array([0, 2, 1])
                )
            )

    def test_actions_out_of_range(self):
        with pytest.raises(
            ValueError, match=r"`a\[:-1\]` must be integer ids in \[0, n_actions\)"
        ):
            log_likelihood(self.model, self.ids, jnp.array([0, 2, 0]))
        # a[-1] is unused, so any value is accepted there.
        log_likelihood(self.model, self.ids, jnp.array([0, 1, 7]))

    def test_evidence(self):
        with pytest.raises(ValueError, match=r"shape \(T, n_obs\) = \(T, 2\)"):
            log_likelihood(self.model, jnp.zeros((3, 3)), self.ids)
        with pytest.raises(ValueError, match="NaN"):
            log_likelihood(self.model, jnp.array([[0.0, jnp.nan]] * 3), self.ids)

    def test_method_ranks_and_dtypes(self):
        with pytest.raises(
            ValueError, match=r"`method` must be one of \('auto', 'scan', 'parallel'\)"
        ):
            log_likelihood(self.model, self.ids, self.ids, method="fast")
        with pytest.raises(TypeCheckError, match="log_likelihood: `x` must be"):
            log_likelihood(self.model, jnp.zeros((2, 3), jnp.int32), self.ids)
        with pytest.raises(ValueError, match="empty"):
            log_likelihood(self.model, self.ids[:0], self.ids[:0])
        with pytest.raises(TypeCheckError, match="log_likelihood: `a` must be"):
            log_likelihood(self.model, self.ids, jnp.zeros(3))

    def test_emissions(self):
        with pytest.raises(ValueError, match=r"`emissions` must have shape \(N, n_obs"):
            log_likelihood(self.model, self.ids, self.ids, emissions=jnp.ones((2, 2)))
        with pytest.raises(ValueError, match="`emissions` must be prob"):
            log_likelihood(self.model, self.ids, self.ids, emissions=-jnp.ones((3, 2)))
        # Rows summing to 2: accepted by `learn_emissions`' check before, now by both.
        with pytest.raises(ValueError, match="`emissions` must be prob"):
            log_likelihood(self.model, self.ids, self.ids, emissions=jnp.ones((3, 2)))
        with pytest.raises(eqx.EquinoxRuntimeError, match="`emissions` must be prob"):
            jax.block_until_ready(
                eqx.filter_jit(
                    lambda e: log_likelihood(
                        self.model, self.ids, self.ids, emissions=e
                    )
                )(jnp.ones((3, 2)))
            )
