"""The TiDHy examples' decoding of the 8 combined discrete states, two ways.

The paper splits single time steps at random into reference and test points (3-NN,
75/25). In a time series a test step's nearest reference points are then mostly its
own neighbours in time, which share its state, so anything that varies smoothly in
time decodes well. Holding out whole runs of steps (`block`) removes that: a feature
decodes the state only if it carries the state.
"""

import jax.numpy as jnp
import jax.random as jr
import numpy as np

from eqx_models import tidhy


def decoding_accuracies(features, labels, *, block, n_splits=5):
    """`{name: (by step, by block)}`, each the mean test accuracy of `n_splits`
    random splits; `features[name]` is `(..., F)` in time order, as `labels`."""
    labels = jnp.asarray(labels).reshape(-1)

    def mean_accuracy(values, size):
        accuracies = [
            tidhy.state_decoding_accuracy(
                values, labels, key=jr.key(42 + i), n_classes=8, block=size
            )
            for i in range(n_splits)
        ]
        return round(float(np.mean(accuracies)), 3)

    return {
        name: tuple(
            mean_accuracy(jnp.asarray(values).reshape(-1, values.shape[-1]), size)
            for size in (1, block)
        )
        for name, values in features.items()
    }
