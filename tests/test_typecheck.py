import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError


def test_shape_checking_is_active():
    # A canary: if the jaxtyping import hook is not instrumenting the packages,
    # this call of an undecorated internal function with an argument of the wrong
    # type would fail deep inside instead (an AttributeError).
    from eqx_models.chmm._passes import chain_log_likelihood

    with pytest.raises(TypeCheckError):
        chain_log_likelihood(3, "scan")  # pyright: ignore[reportArgumentType]


def test_x64_fixture_enables_float64(x64):
    assert jnp.zeros(()).dtype == jnp.float64


def test_x64_does_not_leak():
    assert jnp.zeros(()).dtype == jnp.float32
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100_001])
def test_pairwise_sum_is_accurate(n):
    from transforms import pairwise_sum

    x = np.random.default_rng(n).uniform(0.5, 1.5, size=n).astype(np.float32)
    exact = np.sum(x.astype(np.float64))
    got = float(jax.jit(pairwise_sum)(jnp.asarray(x)))
    # Pairwise summation: error of order log2(n) ulps of the total.
    assert abs(got - exact) <= 4 * np.log2(n + 1) * np.finfo(np.float32).eps * exact
