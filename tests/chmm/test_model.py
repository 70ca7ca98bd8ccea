import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.chmm import CHMM


def test_construction_and_layout():
    T = jnp.full((2, 6, 6), 1 / 6)
    model = CHMM(np.array([2, 3, 1]), T)
    assert model.n_clones == (2, 3, 1)
    assert (model.n_states, model.n_obs, model.n_actions) == (6, 3, 2)
    np.testing.assert_array_equal(model.state_loc, [0, 2, 5, 6])
    np.testing.assert_array_equal(model.state_symbol, [0, 0, 1, 1, 1, 2])
    np.testing.assert_allclose(model.Pi, np.full(6, 1 / 6))
    Pi = jnp.array([0.5, 0.5, 0, 0, 0, 0])
    np.testing.assert_allclose(CHMM((2, 3, 1), T, Pi).Pi, Pi)


def test_rows_of_zeros_are_allowed():
    T = np.full((1, 3, 3), 1 / 3)
    T[0, 1] = 0
    CHMM((1, 2), jnp.asarray(T))


def test_random_initialiser(getkey):
    model = CHMM.random((2, 3, 1), 4, key=getkey())
    assert model.T.shape == (4, 6, 6) and model.T.dtype == jnp.float32
    np.testing.assert_allclose(model.T.sum(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(model.Pi, 1 / 6)
    # Deterministic from the key; a large pseudocount flattens the rows.
    key = getkey()
    again = CHMM.random((2, 3, 1), 4, key=key)
    assert eqx.tree_equal(again, CHMM.random((2, 3, 1), 4, key=key))
    flat = CHMM.random((2, 3, 1), 4, key=key, pseudocount=1e6)
    np.testing.assert_allclose(flat.T, 1 / 6, rtol=1e-5)
    # Counts are uniform in [0, 1): T is their row-normalisation.
    counts = jr.uniform(key, (4, 6, 6))
    np.testing.assert_allclose(
        again.T, counts / counts.sum(-1, keepdims=True), rtol=1e-6
    )


def test_random_initialiser_float64(x64, getkey):
    assert CHMM.random((2, 1), 2, key=getkey()).T.dtype == jnp.float64


def test_from_logits_is_softmax_and_differentiable(getkey):
    logits = jr.normal(getkey(), (2, 3, 3))
    model = CHMM.from_logits((2, 1), logits)
    np.testing.assert_allclose(model.T, jax.nn.softmax(logits, -1), rtol=1e-6)
    g = jax.jit(jax.grad(lambda l: CHMM.from_logits((2, 1), l).T[0, 0, 1]))(logits)
    p = jax.nn.softmax(logits[0, 0])
    np.testing.assert_allclose(g[0, 0], p[1] * (np.eye(3)[1] - p), rtol=1e-5, atol=1e-7)


def test_construction_under_jit_and_vmap(getkey):
    keys = jr.split(getkey(), 3)
    models = eqx.filter_vmap(lambda k: CHMM.random((2, 1), 2, key=k))(keys)
    assert models.T.shape == (3, 2, 3, 3)

    @eqx.filter_jit
    def build(T):
        return CHMM((2, 1), T)

    build(models.T[0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="`T` must be probabilities"):
        build(2 * models.T[0])
    with pytest.raises(eqx.EquinoxRuntimeError, match="`T` must be probabilities"):
        build(-models.T[0])


class TestErrors:
    def test_shapes(self):
        with pytest.raises(
            ValueError, match=r"CHMM: `T` must have shape \(n_actions, 6, 6\)"
        ):
            CHMM((2, 3, 1), jnp.full((2, 5, 5), 0.2))
        with pytest.raises(ValueError, match=r"`Pi` must have shape \(3,\)"):
            CHMM((2, 1), jnp.full((1, 3, 3), 1 / 3), jnp.ones(4) / 4)

    def test_values(self):
        with pytest.raises(
            ValueError, match=r"`T` must be .* got a sum of .* at index \(0, 1\)"
        ):
            T = np.full((1, 3, 3), 1 / 3)
            T[0, 1, 0] = 0.5
            CHMM((2, 1), jnp.asarray(T))
        with pytest.raises(ValueError, match=r"got an entry -0.5 at index \(0, 0, 1\)"):
            CHMM((1, 1), jnp.array([[[1.5, -0.5], [0.5, 0.5]]]))
        with pytest.raises(ValueError, match=r"got an entry nan at index \(0, 0, 0\)"):
            CHMM((1, 1), jnp.array([[[jnp.nan, 1.0], [0.5, 0.5]]]))
        with pytest.raises(
            ValueError, match="`Pi` must be probabilities .* sum of 1.1"
        ):
            CHMM((1, 1), jnp.full((1, 2, 2), 0.5), jnp.array([0.5, 0.6]))

    def test_clone_counts(self):
        T = jnp.full((1, 3, 3), 1 / 3)
        with pytest.raises(ValueError, match="at least one clone"):
            CHMM((3, 0), T)
        with pytest.raises(TypeError, match="must hold integers"):
            CHMM(np.array([1.5, 1.5]), T)
        with pytest.raises(ValueError, match="non-empty 1-D"):
            CHMM(np.zeros((0,), int), T)
        with pytest.raises(TypeError, match="must be concrete"):
            jax.jit(lambda n: CHMM(n, T).T)(jnp.array([2, 1]))

    def test_random(self, getkey):
        with pytest.raises(ValueError, match="`pseudocount` must be a finite real"):
            CHMM.random((2, 1), 2, key=getkey(), pseudocount=-1.0)
        with pytest.raises(ValueError, match="`pseudocount` must be a finite real"):
            CHMM.random((2, 1), 2, key=getkey(), pseudocount=float("nan"))
        with pytest.raises(ValueError, match="`n_actions` must be a positive integer"):
            CHMM.random((2, 1), 0, key=getkey())
        with pytest.raises(TypeError, match="`n_actions` must be a positive integer"):
            CHMM.random((2, 1), True, key=getkey())
