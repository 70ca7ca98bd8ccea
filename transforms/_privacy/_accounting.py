"""Privacy accounting: `(ε, δ)` of DP-SGD through Google's `dp-accounting`.

No accountant is written here: every number comes from `dp_accounting`'s RDP or
PLD accountant, for the Poisson-subsampled Gaussian mechanism composed over the
steps of a run. This module turns the library's settings into `dp_accounting`
events, calibrates the noise for a target ε (`dp_accounting.calibrate_dp_mechanism`),
holds the budget that [`transforms.fit`][] enforces, and serves ε after every step of
a run cheaply (an RDP curve is linear in the number of steps).

`dp-accounting` is the optional `dp` extra: it is imported on first use, with an
error naming the extra when it is missing.
"""

import contextlib
import dataclasses
import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from .._validation import check_choice, check_in_range, check_size, fail


ACCOUNTANTS = ("rdp", "pld")


def dp_accounting_module() -> Any:
    """`dp_accounting`, imported now; an `ImportError` naming the extra if absent."""
    try:
        return importlib.import_module("dp_accounting")
    except ImportError as error:
        raise ImportError(
            "privacy accounting needs the optional `dp` extra (the `dp-accounting` "
            'package): pip install "eqx-models[dp]", or pip install dp-accounting.'
        ) from error


@contextlib.contextmanager
def _quiet_trials():
    """Silence `dp_accounting`'s warnings (through absl's logger) about RDP orders
    it leaves out, while a calibration tries noise levels that are not answers."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(dpa, accountant: str):
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    return dpa.pld.PLDAccountant()


def _event(dpa, noise_multiplier: float, sampling_rate: float, steps: int):
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism."""
    step = dpa.PoissonSampledDpEvent(
        sampling_rate, dpa.GaussianDpEvent(noise_multiplier)
    )
    return dpa.SelfComposedDpEvent(step, steps)


def check_accounting(
    name: str,
    *,
    sampling_rate: Any = None,
    delta: Any = None,
    noise_multiplier: Any = None,
    epsilon: Any = None,
    accountant: Any = "rdp",
) -> None:
    """The range checks of the accounting arguments that are given (not `None`)."""
    if noise_multiplier is not None:
        check_in_range(name, "noise_multiplier", noise_multiplier, low=0)
    if sampling_rate is not None:
        check_in_range(
            name, "sampling_rate", sampling_rate, low=0, high=1, inclusive=(False, True)
        )
    if delta is not None:
        check_in_range(name, "delta", delta, low=0, high=1, inclusive=(False, False))
    if epsilon is not None:
        check_in_range(name, "epsilon", epsilon, low=0, inclusive=(False, True))
    check_choice(name, "accountant", accountant, ACCOUNTANTS)


def dp_epsilon(
    *,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The ε of DP-SGD with Poisson sampling, from `dp_accounting`.

    Each step samples every example independently with probability `q` and adds
    Gaussian noise of standard deviation `σ·C` to the sum of gradients clipped to
    norm `C`: the Poisson-subsampled Gaussian mechanism with noise multiplier `σ`,
    composed `steps` times, under add-or-remove-one adjacency. `q = 1` is full-batch
    training (no amplification by sampling).

    **Arguments:**

    - `noise_multiplier`: `σ ≥ 0` (0: no noise, ε infinite).
    - `sampling_rate`: `q` in `(0, 1]`, the expected batch size over the dataset size.
    - `steps`: the number of steps, `≥ 0`.
    - `delta`: `δ` in `(0, 1)`.
    - `accountant`: `"rdp"` (Rényi DP, fast, a little loose) or `"pld"` (privacy loss
        distributions, tighter, slower: about half a second a call on a CPU).

    **Returns:**

    ε as a float (`inf` without noise, 0 for no steps).

    **Raises:**

    `TypeError`/`ValueError` for an argument out of its range (naming it);
    `ImportError` naming the `dp` extra if `dp-accounting` is not installed.

    !!! example

        ```python
        dp_epsilon(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=10000,
                   delta=1e-5)
        ```
    """
    name = "dp_epsilon"
    check_accounting(
        name,
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        delta=delta,
        accountant=accountant,
    )
    steps = check_size(name, "steps", steps, minimum=0)
    dpa = dp_accounting_module()
    if steps == 0:  # `dp_accounting` composes one event at least
        return 0.0
    acc = _accountant(dpa, accountant)
    acc.compose(_event(dpa, noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


def dp_noise_multiplier(
    *,
    epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 1e-6,
) -> float:
    """The smallest noise multiplier σ whose DP-SGD run stays within `(ε, δ)`:
    the inverse of [`transforms.dp_epsilon`][], by `dp_accounting`'s
    `calibrate_dp_mechanism`.

    **Arguments:**

    - `epsilon`: the target `ε > 0`.
    - `sampling_rate`, `steps`, `delta`, `accountant`: as in
        [`transforms.dp_epsilon`][]; `steps ≥ 1`.
    - `tolerance`: how close to the smallest such σ the answer must be.

    **Returns:**

    σ as a float, with `dp_epsilon(noise_multiplier=σ, ...) <= epsilon`
    (`dp_accounting` checks the side of the boundary it returns).

    **Raises:**

    `TypeError`/`ValueError` for an argument out of its range (naming it);
    `ImportError` naming the `dp` extra if `dp-accounting` is not installed.
    """
    name = "dp_noise_multiplier"
    check_accounting(
        name,
        sampling_rate=sampling_rate,
        delta=delta,
        epsilon=epsilon,
        accountant=accountant,
    )
    steps = check_size(name, "steps", steps, minimum=1)
    check_in_range(name, "tolerance", tolerance, low=0, inclusive=(False, True))
    dpa = dp_accounting_module()
    with _quiet_trials():
        sigma = dpa.calibrate_dp_mechanism(
            lambda: _accountant(dpa, accountant),
            lambda sigma: _event(dpa, sigma, sampling_rate, steps),
            epsilon,
            delta,
            dpa.LowerEndpointAndGuess(0.0, 1.0),
            tol=tolerance,
        )
    return float(sigma)


class PrivacyBudgetError(ValueError):
    """A run would spend more privacy than its [`transforms.PrivacyBudget`][].

    **Attributes:**

    - `epsilon`: the ε the run would reach.
    - `budget`: the budget's ε.
    - `max_steps`: the most steps (from the start of the run) that stay within it.
    """

    def __init__(self, message: str, epsilon: float, budget: float, max_steps: int):
        super().__init__(message)
        self.epsilon = epsilon
        self.budget = budget
        self.max_steps = max_steps


@dataclasses.dataclass(frozen=True)
class PrivacyBudget:
    """The `(ε, δ)` a training run may spend; give it to [`transforms.fit`][].

    `fit` reads the noise multiplier from its step (one from
    [`transforms.make_dp_train_step`][]) and the sampling from its data (a
    [`transforms.PoissonSampler`][] or [`transforms.ShuffleSampler`][]; for data of
    your own, `sampling_rate` says the Poisson rate it follows), refuses a run whose
    steps would exceed `epsilon` at `delta`, and reports the ε spent after each step
    as the `epsilon` metric (in the history and the progress bar).

    **Arguments:**

    - `epsilon`: the budget's `ε > 0`.
    - `delta`: `δ` in `(0, 1)`; choose it well below one over the dataset size.
    - `accountant`: `"rdp"` (default; ε after every step) or `"pld"` (tighter; each
        ε costs about half a second, so it is reported `report_every` steps).
    - `sampling_rate`: the Poisson sampling rate `q` of data that is not a sampler of
        this library; `None` to take it from the sampler.
    - `on_exceed`: `"raise"` (default): a run whose `n_steps` would exceed the
        budget raises [`transforms.PrivacyBudgetError`][] before its first step;
        `"stop"`: it runs the steps that fit and stops there.
    - `report_every`: how often (in steps) the `epsilon` metric is computed;
        `None`: every step with `"rdp"`, twenty times over the run with `"pld"`.

    **Raises:**

    `TypeError`/`ValueError` naming the field for a value out of range.
    """

    epsilon: float
    delta: float
    accountant: str = "rdp"
    sampling_rate: float | None = None
    on_exceed: str = "raise"
    report_every: int | None = None

    def __post_init__(self):
        name = "PrivacyBudget"
        check_accounting(
            name,
            delta=self.delta,
            epsilon=self.epsilon,
            sampling_rate=self.sampling_rate,
            accountant=self.accountant,
        )
        check_choice(name, "on_exceed", self.on_exceed, ("raise", "stop"))
        if self.report_every is not None:
            check_size(name, "report_every", self.report_every)


class EpsilonCurve:
    """ε after `k` steps of one run, for any `k`, from one accountant.

    The run is described by the noise multiplier the accountant sees
    (`noise_multiplier`, already divided by the sampling's sensitivity factor), its
    sampling rate and `compositions(k)`, the number of mechanisms `k` steps amount
    to (`k` for Poisson sampling, the epochs begun for shuffling). With RDP the
    one-step RDP vector is computed once and scaled (RDP adds up over
    compositions, as `dp_accounting` composes it); with PLD each query runs a fresh
    accountant, cached.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        accountant: str,
        compositions: Callable[[int], int],
    ):
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.accountant = accountant
        self.compositions = compositions
        self._dpa = dp_accounting_module()
        self._cache: dict[int, float] = {}
        self._rdp = None
        if accountant == "rdp":
            one = _accountant(self._dpa, "rdp")
            one.compose(_event(self._dpa, noise_multiplier, sampling_rate, 1))
            self._orders, self._rdp = one.orders, one.rdp

    def __call__(self, steps: int) -> float:
        count = self.compositions(steps)
        if count == 0:
            return 0.0
        if count not in self._cache:
            if self._rdp is not None:
                rdp = self._dpa.rdp.rdp_privacy_accountant
                value = rdp.compute_epsilon(self._orders, count * self._rdp, self.delta)
                self._cache[count] = float(value[0])
            else:
                acc = _accountant(self._dpa, self.accountant)
                acc.compose(
                    _event(self._dpa, self.noise_multiplier, self.sampling_rate, count)
                )
                self._cache[count] = float(acc.get_epsilon(self.delta))
        return self._cache[count]

    def max_steps(self, budget: float, upper: int) -> int:
        """The most steps in `[0, upper]` whose ε stays within `budget` (ε grows
        with the steps)."""
        low, high = 0, upper
        if self(high) <= budget:
            return high
        while high - low > 1:
            mid = (low + high) // 2
            if self(mid) <= budget:
                low = mid
            else:
                high = mid
        return low


class FitPrivacy:
    """What [`transforms.fit`][] does with a [`transforms.PrivacyBudget`][]: check
    the run against it before the first step, then report ε after the steps."""

    def __init__(self, budget: PrivacyBudget, step: Any, data: Any, n_steps: int):
        inner = getattr(step, "step", step)  # through `with_fallback`
        sigma = getattr(inner, "noise_multiplier", None)
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
            raise fail(
                "fit",
                "step",
                "a step from `transforms.make_dp_train_step` (its noise multiplier is "
                "accounted) when `privacy` is given",
                f"an object of type {type(inner).__name__}",
                TypeError,
            )
        terms = getattr(data, "_accounting_terms", None)
        if terms is not None:
            scale, rate, compositions = terms()
            if budget.sampling_rate is not None and not math.isclose(
                budget.sampling_rate, rate, rel_tol=1e-12
            ):
                raise ValueError(
                    f"fit: `privacy.sampling_rate` {budget.sampling_rate} differs from "
                    f"the sampling rate {rate} of the sampler given as `data`; leave "
                    "it out (None) to use the sampler's."
                )
        elif budget.sampling_rate is not None:
            scale, rate, compositions = 1.0, budget.sampling_rate, lambda k: k
        else:
            raise fail(
                "fit",
                "privacy.sampling_rate",
                "the Poisson sampling rate of `data` (data that is not a "
                "`transforms.PoissonSampler` or `transforms.ShuffleSampler`)",
                "None",
            )
        self.budget = budget
        self.curve = EpsilonCurve(
            noise_multiplier=sigma / scale,
            sampling_rate=rate,
            delta=budget.delta,
            accountant=budget.accountant,
            compositions=compositions,
        )
        self.n_steps = self._check(n_steps)
        every = budget.report_every
        if every is None:
            every = 1 if budget.accountant == "rdp" else max(1, self.n_steps // 20)
        self.every = every
        self.latest: float | None = None

    def _check(self, n_steps: int) -> int:
        spent = self.curve(n_steps)
        if spent <= self.budget.epsilon:
            return n_steps
        allowed = self.curve.max_steps(self.budget.epsilon, n_steps)
        if self.budget.on_exceed == "stop":
            return allowed
        raise PrivacyBudgetError(
            f"fit: `n_steps`={n_steps} would spend ε = {spent:.4g} at δ = "
            f"{self.budget.delta:g} ({self.budget.accountant.upper()} accountant), "
            f"over the budget `privacy.epsilon` = {self.budget.epsilon:g}; at most "
            f"{allowed} steps fit it. Lower `n_steps`, raise the noise, or pass "
            "`PrivacyBudget(..., on_exceed='stop')` to stop there.",
            epsilon=spent,
            budget=self.budget.epsilon,
            max_steps=allowed,
        )

    def report(self, done: int, record: dict) -> None:
        """Add `epsilon` (after `done` steps) to a step's record when it is due."""
        if done % self.every == 0 or done == self.n_steps:
            self.latest = self.curve(done)
            record["epsilon"] = self.latest
