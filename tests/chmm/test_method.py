"""`method="auto"`, the default: which strategy it picks, and that it then computes
exactly what that strategy computes.

The choice depends on the backend and the device's memory, read at trace time; the
tests stand in for a CPU or a GPU by replacing both (`_passes._backend`,
`_passes._device_memory`). Each test traces its own sequence length, so that no
compilation made under another stand-in is reused. The passes compile with XLA's
deterministic scatter-adds: on a GPU the expected counts' scatter is otherwise free
to round differently at each call, and "the same bits" could not be asked.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models import chmm
from eqx_models.chmm import _passes
from eqx_models.chmm._chain import Chain, hard_chain
from transforms._train._determinism import DETERMINISTIC_COMPILER_OPTIONS

from .test_inference import as_model, BLOCKS, case


def _accelerator(monkeypatch, memory):
    monkeypatch.setattr(_passes, "_backend", lambda: "gpu")
    monkeypatch.setattr(_passes, "_device_memory", lambda: memory)


_deterministic = functools.partial(
    jax.jit, static_argnums=3, compiler_options=DETERMINISTIC_COMPILER_OPTIONS
)


@_deterministic
def _passes_of(model, x, a, method):
    return (
        chmm.log_likelihood(model, x, a, method=method),
        chmm.posteriors(model, x, a, method=method),
        chmm.expected_counts(model, x, a, method=method),
    )


@_deterministic
def _counts(model, x, a, method):
    return chmm.expected_counts(model, x, a, method=method)


def _identical(actual, desired):
    for u, v in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        np.testing.assert_array_equal(u, v)


def _differ(one, other) -> bool:
    return any(
        not np.array_equal(u, v)
        for u, v in zip(jax.tree.leaves(one), jax.tree.leaves(other), strict=True)
    )


def _model_and_data(n_steps):
    T, Pi, x, a = case(BLOCKS, n_steps=n_steps, seed=3)
    return as_model(BLOCKS, T, Pi), jnp.asarray(x), jnp.asarray(a)


def test_auto_is_the_scan_on_a_cpu(monkeypatch):
    model, x, a = _model_and_data(61)
    monkeypatch.setattr(_passes, "_backend", lambda: "cpu")
    auto = _passes_of(model, x, a, "auto")
    _identical(auto, _passes_of(model, x, a, "scan"))
    # The check can fail: the two strategies round differently.
    assert _differ(auto, _passes_of(model, x, a, "parallel"))


def test_auto_is_parallel_on_an_accelerator_with_room(monkeypatch):
    model, x, a = _model_and_data(62)
    _accelerator(monkeypatch, memory=2**40)
    auto = _passes_of(model, x, a, "auto")
    _identical(auto, _passes_of(model, x, a, "parallel"))
    assert _differ(auto, _passes_of(model, x, a, "scan"))


def test_auto_is_the_scan_on_an_accelerator_without_room(monkeypatch):
    model, x, a = _model_and_data(63)
    _accelerator(monkeypatch, memory=1024)
    _identical(_passes_of(model, x, a, "auto"), _passes_of(model, x, a, "scan"))


def test_auto_is_the_scan_where_the_memory_is_unknown(monkeypatch):
    model, x, a = _model_and_data(64)
    _accelerator(monkeypatch, memory=None)
    _identical(_passes_of(model, x, a, "auto"), _passes_of(model, x, a, "scan"))


def test_auto_weighs_the_memory_of_a_whole_batch(monkeypatch):
    # Room for the parallel pass of one sequence, not for four at once.
    model, x, a = _model_and_data(65)
    chain = hard_chain(model, x, a)
    one = _passes.parallel_bytes(65, chain.size, np.dtype(model.dtype).itemsize)
    _accelerator(monkeypatch, memory=2 * one + 1)
    _identical(_counts(model, x, a, "auto"), _counts(model, x, a, "parallel"))
    batch_x, batch_a = jnp.stack([x] * 4), jnp.stack([a] * 4)
    batch = _counts(model, batch_x, batch_a, "auto")
    _identical(batch, _counts(model, batch_x, batch_a, "scan"))


@pytest.mark.parametrize("length", [200, 3000])
def test_the_memory_estimate_bounds_the_compiled_pass(length):
    # On a CPU (which materialises every step's gradient) the temporaries of the
    # parallel E-step stay within the estimate that `"auto"` weighs.
    rng = np.random.default_rng(0)
    layout = (5, 7, 3)
    model = chmm.CHMM.random(layout, 2, key=jax.random.key(0))
    x = jnp.asarray(rng.integers(0, len(layout), length))
    a = jnp.asarray(rng.integers(0, 2, length))

    def log_likelihood(T):
        chain = hard_chain(chmm.CHMM(layout, T, model.Pi), x, a)
        return _passes.chain_log_likelihood(chain, "parallel")

    compiled = jax.jit(jax.grad(log_likelihood)).lower(model.T).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    size = hard_chain(model, x, a).size
    estimate = _passes.parallel_bytes(length, size, 4)
    assert 0 < temp <= estimate, (temp, estimate)


def test_an_unknown_method_names_the_choices():
    model, x, a = _model_and_data(5)
    with pytest.raises(ValueError, match="auto.*scan.*parallel"):
        chmm.log_likelihood(model, x, a, method="fast")


def _chain_of(size, length=1000):
    # What `strategy` reads of a chain: its sizes and dtype (the values are unused).
    return Chain(
        src=jnp.zeros((1, 1, 1)),
        pos=jnp.zeros((length - 1, 3), jnp.int32),
        pi0=jnp.zeros(size),
        psi=None,
        last=jnp.zeros(size),
        slots=None,
    )


def test_auto_keeps_the_scan_where_a_product_costs_more_than_a_step(monkeypatch):
    # 2 S^3 against the cost model's sequential step: 368 slots is the crossover.
    _accelerator(monkeypatch, memory=2**50)
    assert _passes.strategy("auto", _chain_of(368)) == "parallel"
    assert _passes.strategy("auto", _chain_of(369)) == "scan"


def test_an_explicit_method_is_kept_everywhere(monkeypatch):
    _accelerator(monkeypatch, memory=None)
    assert _passes.strategy("parallel", _chain_of(1000)) == "parallel"
    monkeypatch.setattr(_passes, "_backend", lambda: "cpu")
    assert _passes.strategy("parallel", _chain_of(7)) == "parallel"
    assert _passes.strategy("scan", _chain_of(7)) == "scan"
