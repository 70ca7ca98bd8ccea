"""Nonlinear structural causal models: random MLP mechanisms and random additive
GP-like mechanisms (random Fourier features), with additive Gaussian or
heteroscedastic noise.

Kept apart from the linear-Gaussian model (`_scm.py`): the exact expert's
conjugate score assumes linearity, so these tasks are where it is misspecified and
where a learned surrogate can do better. Both kinds share the noise model and the
simulator (one node at a time in a topological order), which `simulate` in
`_scm.py` dispatches to.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from transforms.validation import (
    check_choice,
    check_interval,
    check_size,
    describe,
    fail,
    typechecked,
)

from ._graphs import check_acyclic, topological_order


NOISE_MODELS = ("gaussian", "heteroscedastic")
"""Noise models of the nonlinear SCMs: additive `N(0, σ_j²)`, or additive with a
scale that depends on the parents."""


class AbstractNonlinearSCM(eqx.Module):
    """A nonlinear SCM `X_j = f_j(X_pa(j)) + σ_j(X_pa(j))·ε_j`, `ε_j ~ N(0, 1)`.

    The noise scale is `σ_j(x) = noise_scale_j·exp(½·tanh(Σ_i noise_weights[i, j]·x_i))`
    over the parents `i` of `j`: constant (additive Gaussian noise) when
    `noise_weights` is zero, else heteroscedastic, within a factor `e^{±½}` of
    `noise_scale_j`. A perfect intervention `do(X_j = v)` replaces the equation of
    `X_j` by `v`. Concrete kinds: [`eqx_models.causal.MLPSCM`][] and
    [`eqx_models.causal.AdditiveFourierSCM`][].

    **Raises:**

    A concrete kind raises `TypeError`/`ValueError` on construction for fields that
    are not arrays of the stated shapes.
    """

    adjacency: eqx.AbstractVar[Bool[Array, "d d"]]
    bias: eqx.AbstractVar[Float[Array, " d"]]
    noise_scale: eqx.AbstractVar[Float[Array, " d"]]
    noise_weights: eqx.AbstractVar[Float[Array, "d d"]]

    @property
    def n_vars(self) -> int:
        """The number of variables `d`."""
        return self.adjacency.shape[0]

    @abc.abstractmethod
    def signal(self, x: Float[Array, "*rows d"], j) -> Float[Array, "*rows"]:
        """`f_j(x)` without the bias, reading only the parents of `j` in `x`."""

    def mean(self, x: Float[Array, "*rows d"], j) -> Float[Array, "*rows"]:
        """`f_j(x)`: the value of `X_j` before noise."""
        return self.signal(x, j) + self.bias[j]

    def noise_std(self, x: Float[Array, "*rows d"], j) -> Float[Array, "*rows"]:
        """`σ_j(x)`, the noise scale of `X_j` given its parents in `x`."""
        weights = jnp.where(self.adjacency[:, j], self.noise_weights[:, j], 0.0)
        return self.noise_scale[j] * jnp.exp(0.5 * jnp.tanh(x @ weights))


def _check_fields(name: str, module, shapes: dict) -> None:
    for field, suffix in shapes.items():
        value = getattr(module, field)
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise fail(name, field, "an array", describe(value), TypeError)
    if module.adjacency.ndim != 2:
        raise fail(
            name, "adjacency", "a (d, d) array", f"shape {module.adjacency.shape}"
        )
    d = module.adjacency.shape[0]
    hidden = None
    for field, suffix in shapes.items():
        got = getattr(module, field).shape
        want = tuple(d if s == "d" else s for s in suffix)
        if "H" in want:
            hidden = got[-1] if hidden is None and len(got) == len(want) else hidden
            want = tuple(hidden if s == "H" else s for s in want)
        if got != want:
            raise fail(name, field, f"an array of shape {want} for d={d}", f"{got}")


class MLPSCM(AbstractNonlinearSCM):
    """An SCM whose mechanisms are random one-hidden-layer MLPs of the parents.

    `f_j(x) = bias_j + Σ_h w_out[j, h]·tanh(Σ_i w_in[i, j, h]·x_i + b_in[j, h])`,
    the sum over the parents `i` of `j` (entries of `w_in` for non-parents are
    ignored). Non-additive: parents interact through the hidden units. Draw one with
    [`eqx_models.causal.sample_nonlinear_scm`][]; simulate it with
    [`eqx_models.causal.simulate`][].

    **Raises:**

    `TypeError` if a field is not an array; `ValueError` unless the shapes are
    `adjacency (d, d)`, `w_in (d, d, H)`, `b_in (d, H)`, `w_out (d, H)`,
    `bias (d,)`, `noise_scale (d,)`, `noise_weights (d, d)`.
    """

    adjacency: Bool[Array, "d d"]
    w_in: Float[Array, "d d H"]
    b_in: Float[Array, "d H"]
    w_out: Float[Array, "d H"]
    bias: Float[Array, " d"]
    noise_scale: Float[Array, " d"]
    noise_weights: Float[Array, "d d"]

    def __check_init__(self):
        _check_fields(
            "MLPSCM",
            self,
            {
                "adjacency": ("d", "d"),
                "w_in": ("d", "d", "H"),
                "b_in": ("d", "H"),
                "w_out": ("d", "H"),
                "bias": ("d",),
                "noise_scale": ("d",),
                "noise_weights": ("d", "d"),
            },
        )

    def signal(self, x, j):
        weights = jnp.where(self.adjacency[:, j, None], self.w_in[:, j], 0.0)
        return jnp.tanh(x @ weights + self.b_in[j]) @ self.w_out[j]


class AdditiveFourierSCM(AbstractNonlinearSCM):
    """An SCM with random additive GP-like mechanisms (random Fourier features).

    `f_j(x) = bias_j + Σ_{i ∈ pa(j)} Σ_m amplitude[i, j, m]·cos(frequency[i, j, m]·x_i
    + phase[i, j, m])`. With Gaussian frequencies `N(0, 1/ℓ²)`, uniform phases and
    Gaussian amplitudes of variance `2/M`, each `g_ij` is a draw from (the
    `M`-feature approximation of) a GP with an RBF kernel of lengthscale `ℓ`.
    Additive over the parents.

    **Raises:**

    `TypeError` if a field is not an array; `ValueError` unless the shapes are
    `adjacency (d, d)`, `frequency`, `phase`, `amplitude (d, d, M)`, `bias (d,)`,
    `noise_scale (d,)`, `noise_weights (d, d)`.
    """

    adjacency: Bool[Array, "d d"]
    frequency: Float[Array, "d d M"]
    phase: Float[Array, "d d M"]
    amplitude: Float[Array, "d d M"]
    bias: Float[Array, " d"]
    noise_scale: Float[Array, " d"]
    noise_weights: Float[Array, "d d"]

    def __check_init__(self):
        _check_fields(
            "AdditiveFourierSCM",
            self,
            {
                "adjacency": ("d", "d"),
                "frequency": ("d", "d", "H"),
                "phase": ("d", "d", "H"),
                "amplitude": ("d", "d", "H"),
                "bias": ("d",),
                "noise_scale": ("d",),
                "noise_weights": ("d", "d"),
            },
        )

    def signal(self, x, j):
        features = jnp.cos(x[..., None] * self.frequency[:, j] + self.phase[:, j])
        terms = jnp.where(self.adjacency[:, j, None], self.amplitude[:, j], 0.0)
        return jnp.sum(features * terms, axis=(-2, -1))


NONLINEAR_MECHANISMS = {"mlp": MLPSCM, "rff": AdditiveFourierSCM}


def _standardised(scm, key, explained, n_pilot: int):
    # Exact standardisation (as for the linear model) has no closed form here, so
    # it is done on a pilot sample, node by node in a topological order: the
    # parents' pilot values are final when a node is reached, so its signal is
    # rescaled to explain the fraction `explained[j]` of a unit variance and
    # centred, and its noise scaled so that its mean noise variance is
    # `1 - explained[j]`. Roots get zero mean and unit noise variance.
    d = scm.n_vars
    dtype = scm.bias.dtype
    eps = jr.normal(key, (n_pilot, d), dtype)

    def add_node(pilot, j):
        raw = scm.signal(pilot, j)
        mean = jnp.mean(raw)
        spread = jnp.std(raw)
        has_parents = jnp.any(scm.adjacency[:, j]) & (spread > 0)
        scale = jnp.where(
            has_parents,
            jnp.sqrt(explained[j]) / jnp.where(has_parents, spread, 1.0),
            0.0,
        )
        factor = scm.noise_std(pilot, j) / scm.noise_scale[j]
        rms = jnp.sqrt(jnp.mean(factor**2))
        noise = jnp.where(has_parents, jnp.sqrt(1.0 - explained[j]), 1.0) / rms
        pilot = pilot.at[:, j].set(scale * (raw - mean) + noise * factor * eps[:, j])
        return pilot, (scale, -scale * mean, noise)

    _, (scale, bias, noise) = jax.lax.scan(
        add_node,
        jnp.zeros((n_pilot, d), dtype),
        topological_order(scm.adjacency),
    )
    order = topological_order(scm.adjacency)
    # Back from the topological order to the variable order.
    scale, bias, noise = (
        jnp.zeros((d,), dtype).at[order].set(v) for v in (scale, bias, noise)
    )
    if isinstance(scm, MLPSCM):
        scm = eqx.tree_at(lambda m: m.w_out, scm, scm.w_out * scale[:, None])
    else:
        scm = eqx.tree_at(
            lambda m: m.amplitude, scm, scm.amplitude * scale[None, :, None]
        )
    return eqx.tree_at(lambda m: (m.bias, m.noise_scale), scm, (bias, noise))


@typechecked
def sample_nonlinear_scm(
    key: PRNGKeyArray,
    adjacency: Bool[Array, "d d"],
    *,
    mechanism: str = "mlp",
    noise: str = "gaussian",
    n_hidden: int = 16,
    lengthscale_range: tuple[float, float] = (0.5, 2.0),
    explained_variance: tuple[float, float] = (0.3, 0.9),
    n_pilot: int = 512,
) -> AbstractNonlinearSCM:
    """Draw nonlinear mechanisms for a DAG.

    - `mechanism="mlp"`: an [`eqx_models.causal.MLPSCM`][] with `n_hidden` tanh
        units per node; input weights `N(0, 4/|pa(j)|)` (steep enough for the
        tanh to bend), hidden biases `N(0, 1)`, output weights `N(0, 1/H)`.
    - `mechanism="rff"`: an [`eqx_models.causal.AdditiveFourierSCM`][] with
        `n_hidden` random Fourier features per edge, each edge's lengthscale
        uniform in `lengthscale_range`.

    `noise="gaussian"` gives additive noise of a constant scale;
    `"heteroscedastic"` draws `noise_weights ~ N(0, 1)` on the edges, so the noise
    scale varies with the parents (see
    [`eqx_models.causal.AbstractNonlinearSCM`][]).

    The mechanisms are then standardised like the linear sampler's
    `explained_variance` option, but **on a pilot sample** of `n_pilot`
    observational rows rather than exactly (there is no closed form): in a
    topological order, each variable with parents draws `R²_j` uniformly from
    `explained_variance`, its signal is centred and scaled so that it has variance
    `R²_j` on the pilot rows, and its noise is scaled to mean variance `1 - R²_j`;
    roots are `N(0, 1)`. Every variable then has observational mean ≈ 0 and
    variance ≈ 1 (up to the pilot sample's error, `O(1/√n_pilot)`).

    Deterministic given `key`; jittable and vmappable.

    **Arguments:**

    - `key`: a PRNG key.
    - `adjacency`: a boolean DAG adjacency matrix `(d, d)`, `A[i, j]` iff `i → j`.
    - `mechanism`: `"mlp"` or `"rff"`.
    - `noise`: `"gaussian"` or `"heteroscedastic"`.
    - `n_hidden`: hidden units (MLP) or Fourier features per edge (RFF), `H ≥ 1`.
    - `lengthscale_range`: `(low, high)`, positive, for `"rff"`.
    - `explained_variance`: `(low, high)` within `(0, 1)`.
    - `n_pilot`: rows of the pilot sample used to standardise, `≥ 2`.

    **Returns:**

    An [`eqx_models.causal.MLPSCM`][] or [`eqx_models.causal.AdditiveFourierSCM`][].

    **Raises:**

    `ValueError` for an unknown `mechanism` or `noise`, a range that is empty, not
    finite or out of its domain, `n_hidden < 1` or `n_pilot < 2`, or an
    `adjacency` with a cycle (at once when concrete, by `eqx.error_if` under
    `jit`); `TypeError` for a size that is not an integer.

    !!! example

        ```python
        adjacency = sample_dag(jr.key(0), 5, "erdos_renyi")
        scm = sample_nonlinear_scm(jr.key(1), adjacency, mechanism="rff")
        x = simulate(jr.key(2), scm, -jnp.ones(100, int), jnp.zeros(100))
        ```
    """
    name = "sample_nonlinear_scm"
    check_choice(name, "mechanism", mechanism, tuple(NONLINEAR_MECHANISMS))
    check_choice(name, "noise", noise, NOISE_MODELS)
    check_size(name, "n_hidden", n_hidden)
    check_size(name, "n_pilot", n_pilot, minimum=2)
    check_interval(
        name, "lengthscale_range", lengthscale_range, low=0, inclusive=(False, True)
    )
    check_interval(
        name,
        "explained_variance",
        explained_variance,
        low=0,
        high=1,
        inclusive=(False, False),
    )
    adjacency = check_acyclic(name, "adjacency", adjacency)
    d, h = adjacency.shape[0], n_hidden
    dtype = jnp.result_type(float)
    k_a, k_b, k_c, k_u, k_noise, k_pilot = jr.split(key, 6)
    u = jr.uniform(k_u, (2, d, d), dtype)
    low, high = explained_variance
    explained = low + (high - low) * u[0, 0]
    noise_weights = jnp.zeros((d, d), dtype)
    if noise == "heteroscedastic":
        noise_weights = jnp.where(adjacency, jr.normal(k_noise, (d, d), dtype), 0.0)
    zeros, ones = jnp.zeros((d,), dtype), jnp.ones((d,), dtype)
    if mechanism == "mlp":
        fan_in = jnp.maximum(jnp.sum(adjacency, axis=0), 1).astype(dtype)
        w_in = 2.0 * jr.normal(k_a, (d, d, h), dtype) / jnp.sqrt(fan_in)[None, :, None]
        scm = MLPSCM(
            adjacency,
            w_in,
            jr.normal(k_b, (d, h), dtype),
            jr.normal(k_c, (d, h), dtype) / math.sqrt(h),
            zeros,
            ones,
            noise_weights,
        )
    else:
        lo, hi = lengthscale_range
        lengthscale = lo + (hi - lo) * u[1]
        scm = AdditiveFourierSCM(
            adjacency,
            jr.normal(k_a, (d, d, h), dtype) / lengthscale[..., None],
            2.0 * math.pi * jr.uniform(k_b, (d, d, h), dtype),
            math.sqrt(2.0 / h) * jr.normal(k_c, (d, d, h), dtype),
            zeros,
            ones,
            noise_weights,
        )
    return _standardised(scm, k_pilot, explained, n_pilot)


def simulate_nonlinear(
    key: PRNGKeyArray,
    scm: AbstractNonlinearSCM,
    onehot: Bool[Array, "n d"],
    values: Float[Array, "n d"],
) -> Float[Array, "n d"]:
    """Rows of a nonlinear SCM (inputs checked by `simulate`): one variable at a
    time in a topological order, so each mechanism is evaluated once per row
    (`d` full sweeps would cost `d` times more)."""
    n, d = onehot.shape
    dtype = scm.bias.dtype
    eps = jr.normal(key, (n, d), dtype)

    def add_node(x, j):
        sampled = scm.mean(x, j) + scm.noise_std(x, j) * eps[:, j]
        return x.at[:, j].set(jnp.where(onehot[:, j], values[:, j], sampled)), None

    x, _ = jax.lax.scan(
        add_node, jnp.zeros((n, d), dtype), topological_order(scm.adjacency)
    )
    return x
