"""Linear-Gaussian structural causal models: the mechanisms that generate task data.

The model, a sampler of mechanisms for a given DAG (weights rescaled so that each
variable's parents explain a chosen fraction of its variance) and `simulate`, which
draws rows that are observational or under one perfect intervention. The task
sampler builds on it; the expert only assumes the same linear-Gaussian form.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_interval,
    describe,
    fail,
    is_traced,
    typechecked,
)

from ._graphs import check_acyclic, topological_order
from ._nonlinear import AbstractNonlinearSCM, simulate_nonlinear


class LinearGaussianSCM(eqx.Module):
    """A linear-Gaussian structural causal model over `d` variables.

    Each variable is `X_j = bias_j + Σ_i weights[i, j]·X_i + noise_scale_j·ε_j` with
    independent `ε_j ~ N(0, 1)` and `weights[i, j] = 0` unless `adjacency[i, j]`
    (the edge `i → j`). A perfect intervention `do(X_j = v)` replaces the equation of
    `X_j` by the constant `v`.

    Build one with [`eqx_models.causal.sample_linear_gaussian_scm`][] or from your
    own arrays; sample it with [`eqx_models.causal.simulate`][].

    **Raises:**

    `TypeError` if a field is not an array; `ValueError` if the arrays do not have
    the shapes `(d, d)`, `(d, d)`, `(d,)`, `(d,)`.
    [`eqx_models.causal.simulate`][] refuses a model whose graph has a cycle.
    """

    adjacency: Bool[Array, "d d"]
    weights: Float[Array, "d d"]
    bias: Float[Array, " d"]
    noise_scale: Float[Array, " d"]

    def __check_init__(self):
        for name in ("adjacency", "weights", "bias", "noise_scale"):
            value = getattr(self, name)
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                raise fail(
                    "LinearGaussianSCM", name, "an array", describe(value), TypeError
                )
        if self.adjacency.ndim != 2:
            raise fail(
                "LinearGaussianSCM",
                "adjacency",
                "a (d, d) array",
                f"shape {self.adjacency.shape}",
            )
        d = self.adjacency.shape[0]
        shapes = {
            "adjacency": (self.adjacency.shape, (d, d)),
            "weights": (self.weights.shape, (d, d)),
            "bias": (self.bias.shape, (d,)),
            "noise_scale": (self.noise_scale.shape, (d,)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(
                    f"LinearGaussianSCM: `{name}` must have shape {want} for d={d}, "
                    f"got {got}."
                )

    @property
    def n_vars(self) -> int:
        """The number of variables `d`."""
        return self.adjacency.shape[0]


def _observational_moments(scm: LinearGaussianSCM):
    # Row-vector form x = (b + σε)(I - W)^{-1}: mean b M and covariance
    # Mᵀ diag(σ²) M with M = (I - W)^{-1} (W is nilpotent, so I - W is invertible).
    d = scm.n_vars
    m = jnp.linalg.solve(jnp.eye(d, dtype=scm.weights.dtype) - scm.weights, jnp.eye(d))
    mean = scm.bias @ m
    variance = jnp.sum((scm.noise_scale[:, None] * m) ** 2, axis=0)
    return mean, variance


def _explained_variance_mechanisms(adjacency, raw_weights, explained):
    # In a topological order, rescale each node's incoming weights so that its
    # parents explain the fraction `explained[j]` of a unit variance, and give it
    # noise variance 1 - explained[j]. The running covariance of the nodes built so
    # far gives the variance of the parents' contribution.
    d = adjacency.shape[0]
    dtype = raw_weights.dtype

    def add_node(carry, j):
        cov, weights, noise = carry
        w = raw_weights[:, j]
        signal = w @ cov @ w
        has_parents = jnp.any(adjacency[:, j])
        alpha = jnp.where(
            has_parents,
            jnp.sqrt(explained[j] / jnp.where(has_parents, signal, 1.0)),
            0.0,
        )
        w = alpha * w
        cross = w @ cov
        cov = cov.at[j, :].set(cross).at[:, j].set(cross).at[j, j].set(1.0)
        weights = weights.at[:, j].set(w)
        noise = noise.at[j].set(
            jnp.where(has_parents, jnp.sqrt(1.0 - explained[j]), 1.0)
        )
        return (cov, weights, noise), None

    init = (jnp.zeros((d, d), dtype), jnp.zeros((d, d), dtype), jnp.zeros((d,), dtype))
    (_, weights, noise), _ = jax.lax.scan(add_node, init, topological_order(adjacency))
    return weights, noise


@typechecked
def sample_linear_gaussian_scm(
    key: PRNGKeyArray,
    adjacency: Bool[Array, "d d"],
    *,
    weight_range: tuple[float, float] = (0.5, 2.0),
    noise_range: tuple[float, float] = (0.5, 1.5),
    bias_range: tuple[float, float] = (-1.0, 1.0),
    explained_variance: tuple[float, float] | None = (0.3, 0.9),
    standardise: bool = True,
) -> LinearGaussianSCM:
    """Draw linear-Gaussian mechanisms for a DAG.

    Edge weights have a uniformly random sign and magnitude uniform in
    `weight_range` (bounded away from 0, so every edge is a real dependence) and
    intercepts are uniform in `bias_range`. The noise comes in one of two ways:

    - `explained_variance=(low, high)` (the default): every variable with parents
        draws a fraction `R²_j` uniformly from the range; its incoming weights are
        rescaled (keeping their signs and ratios) so that the parents explain exactly
        `R²_j` of a unit variance, and its noise variance is `1 - R²_j`; roots have
        unit noise. Every variable then has observational variance 1 and the
        signal-to-noise ratio stays in a fixed range however deep the graph, so long
        chains never become near-deterministic (which would make regressions
        ill-conditioned and the posterior a point mass).
    - `explained_variance=None`: noise scales uniform in `noise_range`, the weights
        as drawn.

    With `standardise=True` the model is then rescaled exactly (not from samples)
    so that every variable has observational mean 0 and variance 1: with `μ_j, s_j²`
    the observational mean and variance, `weights[i, j] ← weights[i, j]·s_i/s_j`,
    `noise_scale_j ← noise_scale_j/s_j` and `bias ← 0`. This is the same causal model
    in standardised units; it removes the growth of the variance along the causal
    order, which a learner could otherwise use to guess directions.

    **Arguments:**

    - `key`: a PRNG key.
    - `adjacency`: a boolean DAG adjacency matrix of shape `(d, d)`, `A[i, j]` iff
        `i → j` (e.g. from [`eqx_models.causal.sample_dag`][]).
    - `weight_range`, `noise_range`, `bias_range`: `(low, high)` ranges.
    - `explained_variance`: `(low, high)` within `(0, 1)`, or `None`.
    - `standardise`: rescale to unit observational variance and zero mean.

    **Returns:**

    A [`eqx_models.causal.LinearGaussianSCM`][].

    **Raises:**

    `ValueError` if a range is empty, not finite or out of its domain, or if
    `adjacency` has a cycle (at once when concrete, by `eqx.error_if` under `jit`).
    """
    name = "sample_linear_gaussian_scm"
    check_interval(name, "weight_range", weight_range, low=0, inclusive=(False, True))
    check_interval(name, "noise_range", noise_range, low=0, inclusive=(False, True))
    check_interval(name, "bias_range", bias_range)
    if explained_variance is not None:
        check_interval(
            name,
            "explained_variance",
            explained_variance,
            low=0,
            high=1,
            inclusive=(False, False),
        )
    adjacency = check_acyclic(name, "adjacency", adjacency)
    d = adjacency.shape[0]
    dtype = jnp.result_type(float)
    # One random draw for everything keeps the compiled sampler small.
    u = jr.uniform(key, (2, d + 2, d), dtype)

    def scaled(x, low_high):
        return low_high[0] + (low_high[1] - low_high[0]) * x

    magnitude = scaled(u[0, :d], weight_range)
    sign = jnp.where(u[1, :d] < 0.5, 1.0, -1.0)
    weights = jnp.where(adjacency, sign * magnitude, 0.0)
    bias = scaled(u[0, d], bias_range)
    if explained_variance is None:
        noise = scaled(u[0, d + 1], noise_range)
    else:
        explained = scaled(u[0, d + 1], explained_variance)
        weights, noise = _explained_variance_mechanisms(adjacency, weights, explained)
    scm = LinearGaussianSCM(adjacency, weights, bias, noise)
    if not standardise:
        return scm
    _, variance = _observational_moments(scm)
    scale = jnp.sqrt(variance)
    return LinearGaussianSCM(
        adjacency,
        weights * scale[:, None] / scale[None, :],
        jnp.zeros_like(bias),
        noise / scale,
    )


@typechecked
def simulate(
    key: PRNGKeyArray,
    scm: LinearGaussianSCM | AbstractNonlinearSCM,
    intervened_node: Int[Array, " n"],
    intervention_value: Float[Array, " n"],
) -> Float[Array, "n d"]:
    """Sample rows from an SCM, each observational or under one perfect intervention.

    Row `r` is drawn from the observational distribution if
    `intervened_node[r] < 0`, else from the interventional distribution under
    `do(X_k = intervention_value[r])` with `k = intervened_node[r]`. Fresh noise is
    drawn for every row. For a linear model the rows are computed by `d` sweeps of
    `x ← noise + x·W` (exact, since `W` is nilpotent on a DAG), in a
    `lax.fori_loop`; for a nonlinear one
    ([`eqx_models.causal.AbstractNonlinearSCM`][]) one variable at a time in a
    topological order, `x_j ← f_j(x) + σ_j(x)·ε_j` (or `v` where intervened).

    **Arguments:**

    - `key`: a PRNG key.
    - `scm`: a [`eqx_models.causal.LinearGaussianSCM`][], or a nonlinear SCM
        ([`eqx_models.causal.MLPSCM`][], [`eqx_models.causal.AdditiveFourierSCM`][]).
    - `intervened_node`: integer array of shape `(n,)`; `-1` for an observational
        row, else the intervened variable in `[0, d)`.
    - `intervention_value`: the value `v` of each row's intervention, shape `(n,)`
        (ignored for observational rows).

    **Returns:**

    The values, shape `(n, d)`.

    **Raises:**

    `ValueError` if the two arrays differ in length, if the SCM's graph (its
    adjacency and, for a linear model, its non-zero weights) has a cycle, or if a
    node index is `>= d`: at once for concrete arrays, at run time
    (`eqx.error_if`) under `jit`.
    """
    n = intervened_node.shape[0]
    if intervention_value.shape != (n,):
        raise ValueError(
            f"simulate: `intervention_value` must have shape ({n},) like "
            f"`intervened_node`, got {intervention_value.shape}."
        )
    d = scm.n_vars
    # `d` sweeps solve the equations only on a DAG: that of the weights in use.
    # (The nonlinear mechanisms read only the parents the adjacency names.)
    if isinstance(scm, AbstractNonlinearSCM):
        support = scm.adjacency
    else:
        support = scm.adjacency | (scm.weights != 0)
    intervened_node = check_acyclic(
        "simulate", "scm.weights", support, guard=intervened_node
    )
    expected = f"-1 (no intervention) or a node index in [0, d) = [0, {d})"
    if is_traced(intervened_node):
        intervened_node = eqx.error_if(
            intervened_node,
            jnp.any(intervened_node >= d),
            f"simulate: `intervened_node` must be {expected}, got an index >= d "
            "(checked at run time).",
        )
    elif np.any(np.asarray(intervened_node) >= d):
        nodes = np.asarray(intervened_node)
        first = int(np.argmax(nodes >= d))
        raise fail(
            "simulate",
            "intervened_node",
            expected,
            f"{nodes[first].item()!r} at index {first}",
        )
    nonlinear = isinstance(scm, AbstractNonlinearSCM)
    dtype = scm.bias.dtype if nonlinear else scm.weights.dtype
    onehot = intervened_node[:, None] == jnp.arange(d)[None, :]
    values = jnp.broadcast_to(intervention_value.astype(dtype)[:, None], (n, d))
    if nonlinear:
        return simulate_nonlinear(key, scm, onehot, values)
    exogenous = scm.bias + scm.noise_scale * jr.normal(key, (n, d), dtype)

    def sweep(_, x):
        return jnp.where(onehot, values, exogenous + x @ scm.weights)

    return jax.lax.fori_loop(0, d, sweep, jnp.where(onehot, values, exogenous))
