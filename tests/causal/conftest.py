import numpy as np
import pytest

from tests.causal._reference import make_data


@pytest.fixture
def linear_data():
    """A small linear-Gaussian data set with interventions, target 3 with parents
    {0, 2}, some rows intervened on the target."""

    def build(n=40, d=5, seed=0, dtype=np.float64):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, d))
        x[:, 1] += 0.8 * x[:, 0]
        x[:, 3] = 1.2 * x[:, 0] - 0.7 * x[:, 2] + 0.6 * rng.normal(size=n)
        if d > 4:
            x[:, 4] += 0.9 * x[:, 3]
        intervened = np.zeros((n, d), bool)
        intervened[: n // 5, 3] = True
        x[: n // 5, 3] = rng.normal(size=n // 5) * 3.0
        intervened[n // 5 : n // 4, 1] = True
        return make_data(x.astype(dtype), 3, intervened)

    return build
