"""What the causal surrogate trains on, step by step: an easy-to-hard curriculum over
task shapes and graph families, and the deterministic stream of batches it drives.

Why a module of its own: the curriculum decides what is sampled (a schedule over
data, as the optimiser's is over learning rates); the stream makes step `i`'s batch
a pure function of `i`, which is what lets a resumed run see the same data.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from transforms.validation import (
    check_in_range,
    check_size,
    check_type,
    describe,
    fail,
)

from ._batches import sample_training_batch, TrainingBatch
from ._graphs import GRAPH_FAMILIES
from ._tasks import TaskConfig


class Curriculum(eqx.Module):
    """An easy-to-hard schedule over task buckets and graph families.

    At training progress `s = step / n_steps` the probability of each bucket (a task
    shape, e.g. `(d, N)`) and the weights of the graph families are interpolated
    linearly from their start to their end values over `s ∈ [0, ramp]`, then stay
    at the end values. The sampler draws each step's bucket from these
    probabilities and passes the family weights to
    [`eqx_models.causal.sample_training_batch`][], so what is sampled really
    changes over the run.

    **Fields:**

    - `start_buckets`, `end_buckets`: bucket weights (one per bucket).
    - `start_families`, `end_families`: weights over `GRAPH_FAMILIES`.
    - `ramp`: the fraction of the run over which the weights move.

    **Raises:**

    `ValueError` if the bucket weights differ in length, the family weights are not
    one per family, a weight is negative, NaN or infinite, a set of weights sums to
    0, or `ramp` is outside `[0, 1]`.
    """

    start_buckets: tuple[float, ...] = eqx.field(static=True)
    end_buckets: tuple[float, ...] = eqx.field(static=True)
    start_families: tuple[float, ...] = eqx.field(
        static=True, default=(1.0, 1.0, 1.0, 0.0, 0.0)
    )
    end_families: tuple[float, ...] = eqx.field(
        static=True, default=(1.0, 1.0, 1.0, 1.0, 1.0)
    )
    ramp: float = eqx.field(static=True, default=0.3)

    def __check_init__(self):
        check_in_range("Curriculum", "ramp", self.ramp, low=0, high=1)
        if len(self.start_buckets) != len(self.end_buckets):
            raise ValueError(
                "Curriculum: `start_buckets` and `end_buckets` must have the same "
                f"length, got {len(self.start_buckets)} and {len(self.end_buckets)}."
            )
        n = len(GRAPH_FAMILIES)
        for name, weights in (
            ("start_buckets", self.start_buckets),
            ("end_buckets", self.end_buckets),
            ("start_families", self.start_families),
            ("end_families", self.end_families),
        ):
            for i, weight in enumerate(weights):
                check_in_range("Curriculum", f"{name}[{i}]", weight, low=0)
            if not sum(weights) > 0:
                raise ValueError(
                    f"Curriculum: `{name}` must be non-negative with a positive sum, "
                    f"got {weights}."
                )
            if "families" in name and len(weights) != n:
                raise ValueError(
                    f"Curriculum: `{name}` needs one weight per family ({n}), got "
                    f"{len(weights)}."
                )

    @classmethod
    def easy_to_hard(
        cls, costs: Sequence[int | float], ramp: float = 0.3
    ) -> "Curriculum":
        """Start on the cheapest bucket(s) and chain/fork/collider graphs; end uniform.

        **Arguments:**

        - `costs`: a difficulty per bucket (e.g. `d·N`); the buckets of the smallest
            cost get all the weight at the start.
        - `ramp`: the fraction of the run over which the weights move.

        **Raises:**

        `ValueError` if `costs` is empty or holds NaN; as `Curriculum` for `ramp`.
        """
        if len(costs) == 0:
            raise fail("Curriculum.easy_to_hard", "costs", "one cost per bucket", "[]")
        for i, cost in enumerate(costs):
            check_in_range("Curriculum.easy_to_hard", f"costs[{i}]", cost)
        low = min(costs)
        start = tuple(1.0 if c == low else 0.0 for c in costs)
        return cls(start, tuple(1.0 for _ in costs), ramp=ramp)

    def weights(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Bucket probabilities and family weights at `progress ∈ [0, 1]`."""
        t = 1.0 if self.ramp == 0 else min(max(progress / self.ramp, 0.0), 1.0)

        def mix(a, b):
            # A mixture of the two normalised distributions.
            a, b = np.asarray(a, float), np.asarray(b, float)
            return (1 - t) * a / a.sum() + t * b / b.sum()

        return mix(self.start_buckets, self.end_buckets), mix(
            self.start_families, self.end_families
        )


def check_buckets(fn: str, buckets) -> list:
    """A non-empty sequence of `(TaskConfig, batch_size)` pairs, as a list."""
    expected = "a non-empty sequence of (TaskConfig, batch_size) pairs"
    if not isinstance(buckets, Sequence) or isinstance(buckets, str):
        raise fail(fn, "buckets", expected, describe(buckets), TypeError)
    buckets = list(buckets)
    if not buckets:
        raise fail(fn, "buckets", expected, "an empty sequence")
    for i, bucket in enumerate(buckets):
        if not (isinstance(bucket, (tuple, list)) and len(bucket) == 2):
            raise fail(fn, f"buckets[{i}]", expected, describe(bucket), TypeError)
        check_type(fn, f"buckets[{i}][0]", bucket[0], TaskConfig, "a TaskConfig")
        check_size(fn, f"buckets[{i}][1]", bucket[1])
    return buckets


def check_curriculum(fn: str, curriculum, n_buckets: int) -> None:
    check_type(fn, "curriculum", curriculum, Curriculum, "a Curriculum")
    if len(curriculum.start_buckets) != n_buckets:
        raise fail(
            fn,
            "curriculum",
            f"a curriculum over the {n_buckets} buckets",
            f"one over {len(curriculum.start_buckets)}",
        )


class TaskStream:
    """Deterministic training batches as a function of the step index.

    `stream(i)` is the batch of step `i` of an `n_steps` run: the bucket is drawn
    with NumPy from a generator seeded by `(seed, i)` with the curriculum's
    probabilities at `i / n_steps`, and the tasks from `fold_in(key, i)`. Batches
    are a pure function of `i`, so a resumed run sees the same data.

    **Arguments:**

    - `buckets`: `(TaskConfig, batch_size)` pairs.
    - `max_parents`: `K` of the labels (the model's).
    - `n_steps`: the run length the curriculum is laid out over.
    - `curriculum`: a [`eqx_models.causal.Curriculum`][] over the buckets.
    - `key`: the data's PRNG key.

    **Raises:**

    `TypeError`/`ValueError` for an empty `buckets` or a bucket that is not a
    `(TaskConfig, positive int)` pair, a `max_parents` or `n_steps` that is not a
    non-negative (resp. positive) integer, a curriculum over another number of
    buckets, or a `key` that is not a JAX array.
    """

    def __init__(self, buckets, max_parents, n_steps, curriculum, key):
        name = "TaskStream"
        buckets = check_buckets(name, buckets)
        check_size(name, "max_parents", max_parents, minimum=0)
        check_size(name, "n_steps", n_steps)
        check_curriculum(name, curriculum, len(buckets))
        check_type(name, "key", key, jax.Array, "a PRNG key")
        self.buckets = list(buckets)
        self.max_parents = max_parents
        self.n_steps = n_steps
        self.curriculum = curriculum
        self.key = key
        self.seed = int(jr.randint(key, (), 0, 2**31 - 1))

    def bucket_and_families(self, i: int) -> tuple[int, np.ndarray]:
        """The bucket index and family weights of step `i`."""
        bucket_p, family_w = self.curriculum.weights(i / max(self.n_steps, 1))
        rng = np.random.default_rng([self.seed, i])
        return int(rng.choice(len(self.buckets), p=bucket_p)), family_w

    def __call__(self, i: int) -> TrainingBatch:
        b, family_w = self.bucket_and_families(i)
        config, batch_size = self.buckets[b]
        return sample_training_batch(
            jr.fold_in(self.key, i),
            config,
            batch_size,
            self.max_parents,
            jnp.asarray(family_w, jnp.float32),
        )
