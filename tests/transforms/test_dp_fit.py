"""`fit` with a privacy budget: ε per step, and runs that would exceed it."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

from tests.helpers import import_optional
from transforms import (
    dp_epsilon,
    fit,
    make_dp_train_step,
    make_train_step,
    poisson_sampler,
    PrivacyBudget,
    PrivacyBudgetError,
)


import_optional("dp_accounting", extra="dp")

SIGMA, RATE, DELTA = 2.0, 0.1, 1e-5


def _loss(model, x, y):
    return jnp.sum((model(x) - y) ** 2)


def _setup():
    model = eqx.nn.MLP(2, 1, 4, 1, key=jr.key(0))
    x = jr.normal(jr.key(1), (64, 2))
    y = jnp.sum(x, axis=1, keepdims=True)
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_dp_train_step(
        _loss, optimizer, clip_norm=1.0, noise_multiplier=SIGMA, donate=False
    )
    sampler = poisson_sampler((x, y), sampling_rate=RATE, key=jr.key(2))
    return step, model, opt_state, sampler


def _eps(steps):
    return dp_epsilon(
        noise_multiplier=SIGMA, sampling_rate=RATE, steps=steps, delta=DELTA
    )


def test_epsilon_after_every_step_is_the_accountants():
    step, model, opt_state, sampler = _setup()
    budget = PrivacyBudget(epsilon=_eps(6) * 1.01, delta=DELTA)
    result = fit(
        step,
        model,
        opt_state,
        sampler,
        n_steps=6,
        key=jr.key(3),
        progress=False,
        privacy=budget,
    )
    assert result.step == 6
    got = [record["epsilon"] for record in result.history]
    assert got == pytest.approx([_eps(k) for k in range(1, 7)], rel=1e-12)
    assert all(
        record["batch_size"] <= sampler.max_batch_size for record in result.history
    )


def test_a_run_over_the_budget_is_refused_before_its_first_step():
    step, model, opt_state, sampler = _setup()
    calls = []

    def data(i):
        calls.append(i)
        return sampler(i)

    budget = PrivacyBudget(epsilon=_eps(4) * 1.001, delta=DELTA, sampling_rate=RATE)
    with pytest.raises(
        PrivacyBudgetError, match=r"`n_steps`=10 .* at most 4 steps"
    ) as info:
        fit(
            step,
            model,
            opt_state,
            data,
            n_steps=10,
            key=jr.key(3),
            progress=False,
            privacy=budget,
        )
    assert calls == [] and info.value.max_steps == 4
    assert info.value.epsilon == pytest.approx(_eps(10), rel=1e-12)


def test_on_exceed_stop_runs_the_steps_that_fit():
    step, model, opt_state, sampler = _setup()
    budget = PrivacyBudget(epsilon=_eps(3) * 1.001, delta=DELTA, on_exceed="stop")
    result = fit(
        step,
        model,
        opt_state,
        sampler,
        n_steps=10,
        key=jr.key(3),
        progress=False,
        privacy=budget,
    )
    assert result.step == 3 and len(result.history) == 3
    assert result.history[-1]["epsilon"] <= budget.epsilon


def test_the_pld_accountant_reports_every_few_steps():
    step, model, opt_state, sampler = _setup()
    budget = PrivacyBudget(epsilon=50.0, delta=DELTA, accountant="pld", report_every=2)
    result = fit(
        step,
        model,
        opt_state,
        sampler,
        n_steps=3,
        key=jr.key(3),
        progress=False,
        privacy=budget,
    )
    reported = ["epsilon" in record for record in result.history]
    assert reported == [False, True, True]  # every 2 steps, and the last
    want = dp_epsilon(
        noise_multiplier=SIGMA,
        sampling_rate=RATE,
        steps=2,
        delta=DELTA,
        accountant="pld",
    )
    assert result.history[1]["epsilon"] == pytest.approx(want, rel=1e-12)


def test_privacy_needs_a_private_step_and_a_known_sampling_rate():
    step, model, opt_state, sampler = _setup()
    budget = PrivacyBudget(epsilon=10.0, delta=DELTA)
    plain = make_train_step(lambda m, b, k: jnp.mean(m(b[0][0])), optax.sgd(0.1))
    with pytest.raises(TypeError, match="`step` must be a step from"):
        fit(plain, model, opt_state, sampler, n_steps=1, privacy=budget, progress=False)
    with pytest.raises(ValueError, match="`privacy.sampling_rate` must be"):
        fit(
            step,
            model,
            opt_state,
            lambda i: sampler(i),
            n_steps=1,
            key=jr.key(0),
            privacy=budget,
            progress=False,
        )
    with pytest.raises(ValueError, match="differs from the sampling rate"):
        fit(
            step,
            model,
            opt_state,
            sampler,
            n_steps=1,
            key=jr.key(0),
            privacy=PrivacyBudget(epsilon=10.0, delta=DELTA, sampling_rate=0.5 * RATE),
            progress=False,
        )
    # Under pytest jaxtyping's import hook checks the annotation first.
    with pytest.raises(TypeError, match="`privacy` must be a PrivacyBudget|'privacy'"):
        fit(step, model, opt_state, sampler, n_steps=1, privacy=3.0, progress=False)


def test_bad_budgets():
    with pytest.raises(ValueError, match="`epsilon` must be a finite real number > 0"):
        PrivacyBudget(epsilon=-1.0, delta=DELTA)
    with pytest.raises(ValueError, match="`delta`"):
        PrivacyBudget(epsilon=1.0, delta=1.0)
    with pytest.raises(ValueError, match="`on_exceed` must be one of"):
        PrivacyBudget(epsilon=1.0, delta=DELTA, on_exceed="warn")
