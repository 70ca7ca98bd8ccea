"""Batches for private training: Poisson sampling padded to a fixed size, and
fixed-size shuffling.

DP-SGD's accounting assumes Poisson sampling: every example joins each batch
independently with probability `q`, so batches vary in size. A compiled step wants
one shape, so `PoissonSampler` pads every batch to a fixed `max_batch_size` with
copies of a real example and a mask that leaves them out; the step divides by the
expected batch size `q·N`, as the analysis does. `ShuffleSampler` is the ordinary
epoch of disjoint fixed-size batches; the privacy it can claim is weaker (no
amplification by sampling), and its accounting says so.

Both are functions of the step index (`sampler(i)`), deterministic given their key,
so [`transforms.fit`][] can use them as its `data` and a resumed run sees the same
batches. They live on the host: plain Python objects, not modules.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float

from .._validation import (
    check_in_range,
    check_size,
    describe,
    fail,
)
from ._accounting import dp_epsilon


class MaskedBatch(NamedTuple):
    """A batch padded to a fixed size, as the samplers return it and
    [`transforms.DPTrainStep`][] takes it.

    **Attributes:**

    - `examples`: a tuple of arrays with a leading axis of size `B` (the padded
        size); row `i` is example `i`, `tuple(x[i] for x in examples)`.
    - `mask`: boolean `[B]`, `True` for the examples that count. Padded rows hold
        real examples (so they compute finite values) and contribute nothing.
    - `expected_size`: a scalar, the expected number of examples of a batch (`q·N`
        under Poisson sampling): what the sum of clipped gradients is divided by.
    """

    examples: tuple
    mask: Bool[Array, " batch"]
    expected_size: Float[Array, ""]


def _as_arrays(name: str, arrays: Any) -> tuple:
    expected = "a non-empty tuple of arrays sharing their leading (example) axis"
    if not isinstance(arrays, (tuple, list)) or not arrays:
        raise fail(name, "arrays", expected, describe(arrays), TypeError)
    out = []
    for n, x in enumerate(arrays):
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or np.ndim(x) == 0:
            raise fail(
                name,
                f"arrays[{n}]",
                "an array with a leading axis",
                describe(x),
                TypeError,
            )
        out.append(x)
    sizes = [x.shape[0] for x in out]
    if len(set(sizes)) > 1 or sizes[0] == 0:
        raise fail(name, "arrays", expected, f"leading sizes {sizes}")
    return tuple(out)


def _check_key(name: str, key: Any) -> Any:
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise fail(name, "key", "a PRNG key", describe(key), TypeError)
    return key


def binomial_quantile(n: int, q: float, tail: float) -> int:
    """The smallest `m` with `P(X > m) <= tail` for `X ~ Binomial(n, q)`."""
    if q >= 1:
        return n
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    low = int(math.floor(mean))
    high = min(n, int(math.ceil(mean + 40 * sd + 50)))
    k = np.arange(low, high + 1)
    log_pmf = np.array(
        [
            math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            for j in k.tolist()
        ]
    )
    log_pmf += k * math.log(q) + (n - k) * math.log1p(-q)
    # P(X > k[j]) from the top; what lies beyond `high` is far below any tail asked.
    above = np.concatenate([np.cumsum(np.exp(log_pmf)[::-1])[::-1][1:], [0.0]])
    return int(k[np.argmax(above <= tail)])


class PoissonSampler:
    """Poisson-sampled batches padded to a fixed size; build it with
    [`transforms.poisson_sampler`][].

    `sampler(step)` is the [`transforms.MaskedBatch`][] of step `step`: each example
    is in it with probability `sampling_rate`, independently of the others and of
    the other steps, drawn from `jax.random.fold_in(key, step)`.
    """

    def __init__(
        self, arrays: tuple, sampling_rate: float, max_batch_size: int, key: Any
    ):
        self.arrays = arrays
        self.sampling_rate = float(sampling_rate)
        self.max_batch_size = max_batch_size
        self.key = key
        self.n_examples = int(arrays[0].shape[0])

    @property
    def expected_batch_size(self) -> float:
        """`q·N`, what the step divides the noisy sum by."""
        return self.sampling_rate * self.n_examples

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The rows of step `step`'s batch, padded, and its mask.

        **Returns:**

        `(rows, mask)`, NumPy arrays of length `max_batch_size`: the sampled rows in
        increasing order, then copies of the first one (row 0 if none was sampled),
        with `mask` `False` on the copies.

        **Raises:**

        `TypeError`/`ValueError` for a `step` that is not an integer `>= 0`;
        `ValueError` if more examples were drawn than `max_batch_size` (the draw
        does not depend on it: resume with a larger one).
        """
        step = check_size("PoissonSampler", "step", step, minimum=0)
        draw = jr.uniform(jr.fold_in(self.key, step), (self.n_examples,))
        chosen = np.flatnonzero(np.asarray(draw < self.sampling_rate))
        if chosen.size > self.max_batch_size:
            raise ValueError(
                f"PoissonSampler: step {step} drew {chosen.size} examples, more than "
                f"`max_batch_size`={self.max_batch_size}. The draw does not depend on "
                "it: build the sampler with a larger `max_batch_size` (or a smaller "
                "`overflow_probability`) and resume from the last checkpoint."
            )
        rows = np.full(self.max_batch_size, chosen[0] if chosen.size else 0, np.int32)
        rows[: chosen.size] = chosen
        mask = np.zeros(self.max_batch_size, bool)
        mask[: chosen.size] = True
        return rows, mask

    def __call__(self, step: int) -> MaskedBatch:
        """The batch of step `step`.

        **Returns:**

        A [`transforms.MaskedBatch`][] of `max_batch_size` rows.

        **Raises:**

        As [`transforms.PoissonSampler.indices`][].
        """
        rows, mask = self.indices(step)
        return MaskedBatch(
            tuple(x[rows] for x in self.arrays),
            jnp.asarray(mask),
            jnp.asarray(self.expected_batch_size, jnp.float32),
        )

    def epsilon(
        self,
        *,
        noise_multiplier: float,
        steps: int,
        delta: float,
        accountant: str = "rdp",
    ) -> float:
        """The ε after `steps` steps with noise multiplier `noise_multiplier`:
        [`transforms.dp_epsilon`][] at this sampling rate.

        **Raises:**

        As [`transforms.dp_epsilon`][].
        """
        return dp_epsilon(
            noise_multiplier=noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=steps,
            delta=delta,
            accountant=accountant,
        )

    def _accounting_terms(self):
        return 1.0, self.sampling_rate, lambda steps: steps


def poisson_sampler(
    arrays: Any,
    *,
    sampling_rate: float,
    key: Any,
    max_batch_size: int | None = None,
    overflow_probability: float = 1e-9,
    multiple_of: int = 1,
) -> PoissonSampler:
    """Poisson sampling of a dataset for DP-SGD, padded so that one compiled step
    serves every batch. The sampler to use with [`transforms.make_dp_train_step`][]
    and [`transforms.PrivacyBudget`][]: its accounting is
    [`transforms.dp_epsilon`][]'s.

    **Arguments:**

    - `arrays`: a tuple of arrays (NumPy or JAX) sharing a leading axis of size `N`,
        the dataset; a batch gathers their rows.
    - `sampling_rate`: `q` in `(0, 1]`; the expected batch size is `q·N`.
    - `key`: a PRNG key; step `i` draws from `jax.random.fold_in(key, i)`.
    - `max_batch_size`: the padded batch size. `None` (default): the smallest size
        that a draw exceeds with probability at most `overflow_probability` per step
        (a quantile of the binomial distribution), rounded up to `multiple_of`.
        Padded rows cost as much compute as real ones.
    - `overflow_probability`: see `max_batch_size`.
    - `multiple_of`: round the default `max_batch_size` up to a multiple of this
        (the number of devices times the accumulation steps of the step).

    **Returns:**

    A [`transforms.PoissonSampler`][]; `sampler(i)` is step `i`'s
    [`transforms.MaskedBatch`][].

    **Raises:**

    `TypeError`/`ValueError` naming the argument for arrays that are not a
    non-empty tuple of arrays with one leading size, a `sampling_rate` outside
    `(0, 1]`, a `key` that is not a PRNG key, a `max_batch_size` or `multiple_of`
    that is not a positive integer, or an `overflow_probability` outside `(0, 1)`.

    !!! example

        ```python
        sampler = poisson_sampler((x, y), sampling_rate=256 / len(x), key=key)
        step = make_dp_train_step(loss_fn, optimizer, clip_norm=1.0,
                                  noise_multiplier=1.1)
        model, opt_state, metrics = step(model, opt_state, sampler(0), step_key)
        ```
    """
    name = "poisson_sampler"
    arrays = _as_arrays(name, arrays)
    check_in_range(
        name, "sampling_rate", sampling_rate, low=0, high=1, inclusive=(False, True)
    )
    _check_key(name, key)
    check_in_range(
        name,
        "overflow_probability",
        overflow_probability,
        low=0,
        high=1,
        inclusive=(False, False),
    )
    multiple_of = check_size(name, "multiple_of", multiple_of)
    n = int(arrays[0].shape[0])
    if max_batch_size is None:
        size = binomial_quantile(n, float(sampling_rate), float(overflow_probability))
        size = max(size, 1)
        max_batch_size = -(-size // multiple_of) * multiple_of
    else:
        max_batch_size = check_size(name, "max_batch_size", max_batch_size)
    return PoissonSampler(arrays, float(sampling_rate), max_batch_size, key)


class ShuffleSampler:
    """Fixed-size batches from a new permutation each epoch; build it with
    [`transforms.shuffle_sampler`][].

    Step `i` takes the `i mod E`-th block of `batch_size` rows of epoch `i // E`'s
    permutation (`E = N // batch_size` steps an epoch; the remainder is left out of
    that epoch), drawn from `jax.random.fold_in(key, epoch)`.
    """

    def __init__(self, arrays: tuple, batch_size: int, key: Any):
        self.arrays = arrays
        self.batch_size = batch_size
        self.key = key
        self.n_examples = int(arrays[0].shape[0])
        self.steps_per_epoch = self.n_examples // batch_size
        self._epoch: tuple[int, np.ndarray] | None = None

    def indices(self, step: int) -> np.ndarray:
        """The rows of step `step`'s batch.

        **Raises:**

        `TypeError`/`ValueError` for a `step` that is not an integer `>= 0`.
        """
        step = check_size("ShuffleSampler", "step", step, minimum=0)
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = jr.permutation(jr.fold_in(self.key, epoch), self.n_examples)
            self._epoch = (epoch, np.asarray(order))
        start = position * self.batch_size
        return self._epoch[1][start : start + self.batch_size]

    def __call__(self, step: int) -> MaskedBatch:
        """The batch of step `step`: a [`transforms.MaskedBatch`][] whose mask is all
        `True` and whose `expected_size` is `batch_size`.

        **Raises:**

        As [`transforms.ShuffleSampler.indices`][].
        """
        rows = self.indices(step)
        return MaskedBatch(
            tuple(x[rows] for x in self.arrays),
            jnp.ones(self.batch_size, bool),
            jnp.asarray(self.batch_size, jnp.float32),
        )

    def epochs(self, steps: int) -> int:
        """The epochs that `steps` steps have begun (an example may have been used
        once in each)."""
        return -(-steps // self.steps_per_epoch)

    def epsilon(
        self,
        *,
        noise_multiplier: float,
        steps: int,
        delta: float,
        accountant: str = "rdp",
    ) -> float:
        """The ε after `steps` steps: one Gaussian mechanism per epoch begun, with
        no amplification by sampling, under replace-one adjacency (the dataset's
        size, hence the partition into batches, is public): replacing an example
        moves its clipped gradient by up to `2C`, so each epoch is the Gaussian
        mechanism with noise multiplier `σ/2`.

        **Raises:**

        As [`transforms.dp_epsilon`][].
        """
        check_size("ShuffleSampler.epsilon", "steps", steps, minimum=0)
        check_in_range(
            "ShuffleSampler.epsilon", "noise_multiplier", noise_multiplier, low=0
        )
        return dp_epsilon(
            noise_multiplier=noise_multiplier / 2,
            sampling_rate=1.0,
            steps=self.epochs(steps),
            delta=delta,
            accountant=accountant,
        )

    def _accounting_terms(self):
        return 2.0, 1.0, self.epochs


def shuffle_sampler(arrays: Any, *, batch_size: int, key: Any) -> ShuffleSampler:
    """Fixed-size batches from a fresh shuffle each epoch: the usual data loader, for
    comparison with [`transforms.poisson_sampler`][].

    Its privacy guarantee is weaker, and stated without amplification by
    sampling: each example is in exactly one batch per epoch, so an epoch costs one
    Gaussian mechanism, under replace-one adjacency (see
    [`transforms.ShuffleSampler.epsilon`][]). Accounting shuffled batches as if
    they were Poisson-sampled, as is often done, claims a guarantee that the
    analysis does not give.

    **Arguments:**

    - `arrays`: a tuple of arrays sharing a leading axis of size `N`.
    - `batch_size`: rows per batch, at most `N`.
    - `key`: a PRNG key; epoch `e` is shuffled with `jax.random.fold_in(key, e)`.

    **Returns:**

    A [`transforms.ShuffleSampler`][]; `sampler(i)` is step `i`'s
    [`transforms.MaskedBatch`][].

    **Raises:**

    `TypeError`/`ValueError` naming the argument for bad arrays, a `batch_size`
    that is not an integer in `[1, N]`, or a `key` that is not a PRNG key.
    """
    name = "shuffle_sampler"
    arrays = _as_arrays(name, arrays)
    n = int(arrays[0].shape[0])
    batch_size = check_size(name, "batch_size", batch_size, maximum=n)
    _check_key(name, key)
    return ShuffleSampler(arrays, batch_size, key)
