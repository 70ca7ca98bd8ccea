"""Privacy accounting against `dp_accounting` called directly, and the samplers."""

import math
import sys

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from tests.helpers import import_optional
from transforms import (
    dp_epsilon,
    dp_noise_multiplier,
    MaskedBatch,
    poisson_sampler,
    shuffle_sampler,
)
from transforms._privacy._accounting import EpsilonCurve
from transforms._privacy._sampling import binomial_quantile


def _direct(accountant, sigma, q, steps, delta):
    """ε composed by `dp_accounting` itself, event by event as its docs show."""
    dpa = import_optional("dp_accounting", extra="dp")
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


GRID = [
    (sigma, q, steps, delta)
    for sigma in (0.6, 1.1, 4.0)
    for q in (0.001, 0.05, 1.0)
    for steps in (1, 250, 10_000)
    for delta in (1e-7, 1e-5)
]


@pytest.mark.parametrize("sigma, q, steps, delta", GRID)
def test_rdp_epsilon_is_dp_accountings(sigma, q, steps, delta):
    want = _direct("rdp", sigma, q, steps, delta)
    got = dp_epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta)
    assert got == want


@pytest.mark.parametrize(
    "sigma, q, steps, delta", [(1.1, 0.01, 100, 1e-5), (2.0, 0.2, 20, 1e-6)]
)
def test_pld_epsilon_is_dp_accountings(sigma, q, steps, delta):
    want = _direct("pld", sigma, q, steps, delta)
    got = dp_epsilon(
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        delta=delta,
        accountant="pld",
    )
    assert got == pytest.approx(want, rel=1e-12)
    rdp = dp_epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta)
    assert got < rdp  # PLD is the tighter accountant


def test_no_steps_spend_nothing_and_no_noise_is_not_private():
    import_optional("dp_accounting", extra="dp")
    assert dp_epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=0, delta=1e-5) == 0
    assert math.isinf(
        dp_epsilon(noise_multiplier=0.0, sampling_rate=0.1, steps=3, delta=1e-5)
    )


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_the_inverse_round_trips(target):
    import_optional("dp_accounting", extra="dp")
    q, steps, delta = 0.02, 500, 1e-5
    sigma = dp_noise_multiplier(
        epsilon=target, sampling_rate=q, steps=steps, delta=delta
    )
    spent = dp_epsilon(
        noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=delta
    )
    assert spent <= target and spent == pytest.approx(target, rel=1e-4)
    less = dp_epsilon(
        noise_multiplier=sigma * (1 - 1e-3), sampling_rate=q, steps=steps, delta=delta
    )
    assert less > target  # the smallest such σ, within the tolerance


def test_the_pld_inverse_round_trips():
    import_optional("dp_accounting", extra="dp")
    args = dict(sampling_rate=0.1, steps=10, delta=1e-5, accountant="pld")
    sigma = dp_noise_multiplier(epsilon=2.0, tolerance=1e-3, **args)
    assert dp_epsilon(noise_multiplier=sigma, **args) <= 2.0


def test_the_epsilon_curve_of_a_run_is_dp_epsilon_after_each_step():
    import_optional("dp_accounting", extra="dp")
    curve = EpsilonCurve(
        noise_multiplier=1.1,
        sampling_rate=0.01,
        delta=1e-5,
        accountant="rdp",
        compositions=lambda k: k,
    )
    for k in (0, 1, 7, 300, 5000):
        want = dp_epsilon(noise_multiplier=1.1, sampling_rate=0.01, steps=k, delta=1e-5)
        assert curve(k) == pytest.approx(want, rel=1e-12, abs=0)
    assert curve.max_steps(curve(300), 5000) == 300


def test_bad_accounting_arguments():
    bad = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=3, delta=1e-5)
    cases = [
        ("delta", 1.0, r"`delta` must be a finite real number in \(0, 1\)"),
        ("delta", 0.0, "`delta`"),
        (
            "sampling_rate",
            0.0,
            r"`sampling_rate` must be a finite real number in \(0, 1\]",
        ),
        ("sampling_rate", 1.5, "`sampling_rate`"),
        (
            "noise_multiplier",
            -1.0,
            "`noise_multiplier` must be a finite real number >= 0",
        ),
        ("steps", -1, "`steps`"),
    ]
    for arg, value, match in cases:
        with pytest.raises(ValueError, match=match):
            dp_epsilon(**{**bad, arg: value})
    with pytest.raises(ValueError, match="`accountant` must be one of"):
        dp_epsilon(**bad, accountant="moments")
    with pytest.raises(ValueError, match="`epsilon` must be a finite real number > 0"):
        dp_noise_multiplier(epsilon=0.0, sampling_rate=0.1, steps=3, delta=1e-5)


def test_a_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match=r"`dp` extra.*eqx-models\[dp\]"):
        dp_epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=3, delta=1e-5)


# Samplers -------------------------------------------------------------------------


def test_poisson_batches_are_padded_masked_and_reproducible():
    x = jnp.arange(200.0)[:, None]
    y = jnp.arange(200)
    sampler = poisson_sampler(
        (x, y), sampling_rate=0.1, key=jr.key(0), max_batch_size=48
    )
    batch = sampler(3)
    assert isinstance(batch, MaskedBatch)
    assert batch.examples[0].shape == (48, 1) and batch.mask.shape == (48,)
    assert float(batch.expected_size) == pytest.approx(20.0)
    rows, mask = sampler.indices(3)
    n = int(mask.sum())
    assert np.all(mask[:n]) and not np.any(mask[n:])
    assert np.all(np.diff(rows[:n]) > 0) and np.all(rows[n:] == rows[0])
    np.testing.assert_array_equal(np.asarray(batch.examples[1]), rows)
    again, _ = sampler.indices(3)
    np.testing.assert_array_equal(rows, again)
    other, _ = sampler.indices(4)
    assert not np.array_equal(rows, other)


def test_poisson_sampling_includes_each_example_with_probability_q():
    n, q, steps = 100, 0.2, 400
    sampler = poisson_sampler((jnp.zeros((n, 1)),), sampling_rate=q, key=jr.key(1))
    counts = np.zeros(n)
    sizes = []
    for i in range(steps):
        rows, mask = sampler.indices(i)
        counts[rows[mask]] += 1
        sizes.append(mask.sum())
    # Each count is Binomial(400, 0.2) (mean 80, sd 8); a batch size Binomial(100, 0.2).
    assert abs(counts.mean() - q * steps) < 3 * math.sqrt(q * (1 - q) * steps / n)
    assert np.all(np.abs(counts - q * steps) < 6 * math.sqrt(q * (1 - q) * steps))
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.25)


def test_the_default_padding_is_a_binomial_quantile():
    n, q, tail = 30, 0.3, 1e-6
    m = binomial_quantile(n, q, tail)
    above = lambda m: sum(
        math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(m + 1, n + 1)
    )
    assert above(m) <= tail < above(m - 1)
    sampler = poisson_sampler(
        (jnp.zeros((n, 1)),),
        sampling_rate=q,
        key=jr.key(0),
        overflow_probability=tail,
        multiple_of=4,
    )
    assert sampler.max_batch_size == -(-m // 4) * 4
    assert binomial_quantile(10, 1.0, 1e-9) == 10


def test_a_batch_over_the_padding_is_refused_naming_max_batch_size():
    sampler = poisson_sampler(
        (jnp.zeros((100, 1)),), sampling_rate=0.5, key=jr.key(0), max_batch_size=10
    )
    with pytest.raises(ValueError, match="more than `max_batch_size`=10"):
        sampler(0)


def test_shuffled_batches_cover_each_epoch_once():
    x = jnp.arange(23)
    sampler = shuffle_sampler((x,), batch_size=5, key=jr.key(0))
    assert sampler.steps_per_epoch == 4
    for epoch in range(2):
        seen = np.concatenate([sampler.indices(4 * epoch + i) for i in range(4)])
        assert len(set(seen.tolist())) == 20
    batch = sampler(5)
    assert bool(jnp.all(batch.mask)) and float(batch.expected_size) == 5
    assert sampler.epochs(0) == 0 and sampler.epochs(4) == 1 and sampler.epochs(5) == 2


def test_shuffling_is_accounted_per_epoch_without_amplification():
    import_optional("dp_accounting", extra="dp")
    sampler = shuffle_sampler((jnp.zeros(100),), batch_size=10, key=jr.key(0))
    got = sampler.epsilon(noise_multiplier=3.0, steps=25, delta=1e-5)
    # 25 steps begin 3 epochs; each is a Gaussian mechanism of sensitivity 2C.
    assert got == _direct("rdp", 1.5, 1.0, 3, 1e-5)
    poisson = poisson_sampler((jnp.zeros(100),), sampling_rate=0.1, key=jr.key(0))
    assert poisson.epsilon(noise_multiplier=3.0, steps=25, delta=1e-5) < got


def test_bad_sampler_arguments():
    x = (jnp.zeros((10, 2)),)
    with pytest.raises(ValueError, match="`sampling_rate`"):
        poisson_sampler(x, sampling_rate=0.0, key=jr.key(0))
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        poisson_sampler(x, sampling_rate=0.5, key=0)
    with pytest.raises(TypeError, match="`arrays` must be a non-empty tuple"):
        poisson_sampler(jnp.zeros(3), sampling_rate=0.5, key=jr.key(0))
    with pytest.raises(ValueError, match="`arrays`"):
        poisson_sampler((jnp.zeros(3), jnp.zeros(4)), sampling_rate=0.5, key=jr.key(0))
    with pytest.raises(
        ValueError, match=r"`batch_size` must be an integer in \[1, 10\]"
    ):
        shuffle_sampler(x, batch_size=11, key=jr.key(0))
    with pytest.raises(ValueError, match="`step`"):
        shuffle_sampler(x, batch_size=2, key=jr.key(0))(-1)
