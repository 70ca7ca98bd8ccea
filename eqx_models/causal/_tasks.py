"""Random causal-discovery tasks: a graph, mechanisms, data and a target from one key.

`TaskConfig` fixes the static shape of a task and `sample_task` composes the graph,
SCM and simulation modules into one traceable draw, so batches of tasks come from
`jax.vmap`. The family weights are an array argument rather than part of the config,
so a curriculum can change them between steps without recompiling.
"""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms import static_fields
from transforms.validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_interval,
    check_size,
    fail,
    is_traced,
    typechecked,
)

from ._data import Channel
from ._graphs import GRAPH_FAMILIES, sample_dag
from ._nonlinear import (
    AbstractNonlinearSCM,
    NOISE_MODELS,
    NONLINEAR_MECHANISMS,
    sample_nonlinear_scm,
)
from ._scm import LinearGaussianSCM, sample_linear_gaussian_scm, simulate


MECHANISMS = ("linear", *NONLINEAR_MECHANISMS)
"""Mechanism families of the random tasks: `"linear"` (linear-Gaussian), `"mlp"`
(random MLPs) and `"rff"` (random additive GP-like functions)."""

LABELS = ("auto", "expert", "truth")


class TaskConfig(eqx.Module):
    """What a random task looks like: sizes and the distribution of everything else.

    All fields are static (they set shapes or select code paths); the distribution
    over graph families is passed to [`eqx_models.causal.sample_task`][] separately,
    as an array, so that a curriculum can change it without recompiling.

    **Fields:**

    - `n_vars`: the number of variables `d ≥ 2`.
    - `n_samples`: the number of rows `N`.
    - `target`: `"sink"` (a uniformly chosen variable without children: the
        causal-BO setting, where the local parent posterior is consistent) or `"any"`
        (uniform over all variables).
    - `interventional_fraction`: `(low, high)`; each task draws a fraction `ρ`
        uniformly from it and makes `round(ρN)` of its rows interventional.
    - `intervention_scale`: intervention values are `N(0, scale²)` (in the units of
        the standardised model).
    - `max_parents`: the in-degree cap of the random graphs.
    - `edges_per_node`: the Erdős–Rényi density.
    - `standardise`: standardise the SCM to unit observational variance (linear
        mechanisms; nonlinear ones are always standardised, on a pilot sample).
    - `weight_range`, `explained_variance`, `noise_range`: the mechanisms' ranges
        (see [`eqx_models.causal.sample_linear_gaussian_scm`][]; the nonlinear
        mechanisms use `explained_variance` too, `(0.3, 0.9)` when it is `None`).
    - `mechanism`: the mechanism family, one of `MECHANISMS`: `"linear"` (the
        default), `"mlp"` or `"rff"` (see
        [`eqx_models.causal.sample_nonlinear_scm`][]).
    - `noise`: `"gaussian"` (default) or `"heteroscedastic"` (nonlinear only).
    - `n_hidden`: hidden units / Fourier features of the nonlinear mechanisms.
    - `labels`: what the training batches are labelled with: `"expert"` (the exact
        g-prior posterior, of degree `expert_degree`), `"truth"` (the true parent
        set, see `label_smoothing`) or `"auto"` (the default: the expert for
        linear tasks, where it is the exact Bayesian answer, and the truth for
        nonlinear ones, where its linear model is misspecified).
    - `label_smoothing`: `ε ∈ [0, 1)`; truth labels are `(1 - ε)·δ_true + ε·uniform`
        over the candidate sets.
    - `expert_degree`: the `degree` of the labelling expert (1, the default: the
        linear one; e.g. 3 with `labels="expert"` clones the additive cubic
        posterior of [`eqx_models.causal.exact_parent_posterior`][] on
        nonlinear tasks, a teacher with uncertainty rather than a one-hot
        truth). Tasks with fewer than `expert_degree·K + 2` usable rows are
        degenerate, skipped and counted.

    **Raises:**

    `TypeError` for a size that is not an integer or a flag that is not a bool;
    `ValueError` for a value out of its range, NaN or infinite.
    """

    n_vars: int = eqx.field(static=True)
    n_samples: int = eqx.field(static=True)
    target: str = eqx.field(static=True, default="sink")
    interventional_fraction: tuple[float, float] = eqx.field(
        static=True, default=(0.1, 0.4)
    )
    intervention_scale: float = eqx.field(static=True, default=2.0)
    max_parents: int = eqx.field(static=True, default=3)
    edges_per_node: float = eqx.field(static=True, default=1.5)
    standardise: bool = eqx.field(static=True, default=True)
    weight_range: tuple[float, float] = eqx.field(static=True, default=(0.5, 2.0))
    explained_variance: tuple[float, float] | None = eqx.field(
        static=True, default=(0.3, 0.9)
    )
    noise_range: tuple[float, float] = eqx.field(static=True, default=(0.5, 1.5))
    mechanism: str = eqx.field(static=True, default="linear")
    noise: str = eqx.field(static=True, default="gaussian")
    n_hidden: int = eqx.field(static=True, default=16)
    labels: str = eqx.field(static=True, default="auto")
    label_smoothing: float = eqx.field(static=True, default=0.0)
    expert_degree: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        name = "TaskConfig"
        check_size(name, "n_vars", self.n_vars, minimum=2)
        check_size(name, "n_samples", self.n_samples)
        check_choice(name, "target", self.target, ("sink", "any"))
        check_interval(
            name, "interventional_fraction", self.interventional_fraction, low=0, high=1
        )
        check_in_range(name, "intervention_scale", self.intervention_scale, low=0)
        check_size(name, "max_parents", self.max_parents)
        check_in_range(name, "edges_per_node", self.edges_per_node, low=0)
        check_bool(name, "standardise", self.standardise)
        check_interval(
            name, "weight_range", self.weight_range, low=0, inclusive=(False, True)
        )
        check_interval(
            name, "noise_range", self.noise_range, low=0, inclusive=(False, True)
        )
        if self.explained_variance is not None:
            check_interval(
                name,
                "explained_variance",
                self.explained_variance,
                low=0,
                high=1,
                inclusive=(False, False),
            )
        check_choice(name, "mechanism", self.mechanism, MECHANISMS)
        check_choice(name, "noise", self.noise, NOISE_MODELS)
        if self.mechanism == "linear" and self.noise != "gaussian":
            raise fail(
                name,
                "noise",
                '"gaussian" for linear mechanisms (heteroscedastic noise needs '
                "`mechanism` 'mlp' or 'rff')",
                repr(self.noise),
            )
        check_size(name, "n_hidden", self.n_hidden)
        check_choice(name, "labels", self.labels, LABELS)
        check_in_range(
            name,
            "label_smoothing",
            self.label_smoothing,
            low=0,
            high=1,
            inclusive=(True, False),
        )
        check_size(name, "expert_degree", self.expert_degree)

    @property
    def truth_labels(self) -> bool:
        """Whether training batches of this config are labelled by the true parent
        set (rather than by the exact expert)."""
        if self.labels == "auto":
            return self.mechanism != "linear"
        return self.labels == "truth"


_NEW_FIELDS = (
    "mechanism",
    "noise",
    "n_hidden",
    "labels",
    "label_smoothing",
    "expert_degree",
)


def config_record(config: TaskConfig) -> dict:
    """The static fields of `config` as a trainer records them: the fields added
    with the nonlinear tasks are left out at their defaults, so that checkpoints
    written before them still resume."""
    record = dict(static_fields(config))
    defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig)}
    for field in _NEW_FIELDS:
        if record[field] == defaults[field]:
            del record[field]
    return record


class Task(eqx.Module):
    """One causal-discovery task: AVICI data plus the ground truth that made it.

    **Fields:**

    - `data`: AVICI data of shape `(N, d, 3)` (see
        [`eqx_models.causal.Channel`][]).
    - `adjacency`: the true DAG, boolean `(d, d)`, `A[i, j]` iff `i → j`.
    - `target`: the target variable (integer scalar).
    - `family`: the graph family's code in `GRAPH_FAMILIES` (integer scalar).
    - `scm`: the SCM that generated the data: a
        [`eqx_models.causal.LinearGaussianSCM`][], or a nonlinear one for
        `config.mechanism` `"mlp"` ([`eqx_models.causal.MLPSCM`][]) or `"rff"`
        ([`eqx_models.causal.AdditiveFourierSCM`][]).

    Tasks drawn with `jax.vmap(sample_task, ...)` carry a leading batch axis on
    every field.
    """

    data: Float[Array, "N d 3"]
    adjacency: Bool[Array, "d d"]
    target: Int[Array, ""]
    family: Int[Array, ""]
    scm: LinearGaussianSCM | AbstractNonlinearSCM

    @property
    def true_parents(self) -> Bool[Array, "*batch d"]:
        """Boolean mask of the target's true parents, shape `(d,)`."""
        column = jnp.take_along_axis(
            self.adjacency, self.target[..., None, None], axis=-1
        )
        return column[..., 0]


@typechecked
def sample_task(
    key: PRNGKeyArray,
    config: TaskConfig,
    family_weights: Float[Array, " families"] | None = None,
) -> Task:
    """Draw a task: a graph, mechanisms, data and a target, all from one key.

    The family is drawn from `family_weights` (uniform if `None`), the DAG from
    [`eqx_models.causal.sample_dag`][], the mechanisms from
    [`eqx_models.causal.sample_linear_gaussian_scm`][] (or
    [`eqx_models.causal.sample_nonlinear_scm`][] when `config.mechanism` is
    nonlinear); then `round(ρN)` rows
    (`ρ` uniform in `config.interventional_fraction`) are interventional, each on a
    uniformly chosen variable (possibly the target) with a value drawn from
    `N(0, config.intervention_scale²)`, and the other rows observational. The
    interventional rows come first (the row order carries no information for a
    model that is invariant to it). The target is a uniformly chosen sink (a
    variable without children; a DAG always has one) or a uniformly chosen variable,
    as `config.target` says.

    Deterministic given `key`; jittable and vmappable (`config` is static).

    **Arguments:**

    - `key`: a PRNG key.
    - `config`: a [`eqx_models.causal.TaskConfig`][].
    - `family_weights`: non-negative weights over `GRAPH_FAMILIES`, shape `(5,)`.

    **Returns:**

    A [`eqx_models.causal.Task`][].

    **Raises:**

    `ValueError` if `family_weights` has the wrong length, a negative or non-finite
    entry, or sums to 0 (at once when concrete, by `eqx.error_if` under `jit`).

    !!! example

        ```python
        config = TaskConfig(n_vars=10, n_samples=200)
        tasks = jax.vmap(lambda k: sample_task(k, config))(jr.split(jr.key(0), 64))
        tasks.data.shape  # (64, 200, 10, 3)
        ```
    """
    if family_weights is None:
        family_weights = jnp.ones((len(GRAPH_FAMILIES),))
    family_weights = check_family_weights("sample_task", family_weights)
    return _sample_task(key, config, family_weights)


def check_family_weights(fn: str, weights: Array) -> Array:
    """One finite, non-negative weight per graph family, with a positive sum (at
    once when concrete, by `eqx.error_if` when traced)."""
    n_families = len(GRAPH_FAMILIES)
    if weights.shape != (n_families,):
        raise ValueError(
            f"{fn}: `family_weights` must have shape ({n_families},) (one "
            f"weight per entry of GRAPH_FAMILIES), got {weights.shape}."
        )
    weights = check_in_range(fn, "family_weights", weights, low=0)
    # All-zero weights would make the cumulative distribution NaN, and every draw
    # the first family.
    expected = "weights with a positive sum"
    if is_traced(weights):
        return eqx.error_if(
            weights,
            jnp.sum(weights) <= 0,
            f"{fn}: `family_weights` must be {expected}, got all zeros.",
        )
    if not jnp.sum(weights) > 0:
        raise fail(fn, "family_weights", expected, "all zeros")
    return weights


# Compiled as one program even when called eagerly; inlined under an outer `jit`.
@eqx.filter_jit
def _sample_task(key, config, family_weights) -> Task:
    n_families = len(GRAPH_FAMILIES)
    d, n = config.n_vars, config.n_samples
    k_graph, k_scm, k_task, k_value, k_data = jr.split(key, 5)
    # Few random draws (each is a sizeable piece of compiled code), sliced below.
    u = jr.uniform(k_task, (3 + n,))
    z = jr.normal(k_value, (n,))
    cumulative = jnp.cumsum(family_weights) / jnp.sum(family_weights)
    family = jnp.minimum(jnp.sum(u[0] >= cumulative), n_families - 1).astype(jnp.int32)
    adjacency = sample_dag(
        k_graph,
        d,
        family,
        max_parents=config.max_parents,
        edges_per_node=config.edges_per_node,
    )
    if config.mechanism == "linear":
        scm = sample_linear_gaussian_scm(
            k_scm,
            adjacency,
            weight_range=config.weight_range,
            noise_range=config.noise_range,
            explained_variance=config.explained_variance,
            standardise=config.standardise,
        )
    else:
        scm = sample_nonlinear_scm(
            k_scm,
            adjacency,
            mechanism=config.mechanism,
            noise=config.noise,
            n_hidden=config.n_hidden,
            explained_variance=config.explained_variance or (0.3, 0.9),
        )
    if config.target == "sink":
        candidates = ~jnp.any(adjacency, axis=1)
    else:
        candidates = jnp.ones((d,), bool)
    # The k-th candidate with k uniform in [0, #candidates).
    pick = jnp.floor(u[1] * jnp.sum(candidates)).astype(jnp.int32)
    target = jnp.argmax(jnp.cumsum(candidates) > pick).astype(jnp.int32)
    low, high = config.interventional_fraction
    fraction = low + (high - low) * u[2]
    n_interventional = jnp.round(fraction * n).astype(jnp.int32)
    rows = jnp.arange(n)
    chosen = jnp.minimum(jnp.floor(u[3:] * d), d - 1).astype(jnp.int32)
    node = jnp.where(rows < n_interventional, chosen, -1)
    value = config.intervention_scale * z
    values = simulate(k_data, scm, node, value)
    intervened = node[:, None] == jnp.arange(d)[None, :]
    is_target = jnp.broadcast_to(jnp.arange(d) == target, (n, d))
    channels = {
        Channel.VALUE: values,
        Channel.INTERVENED: intervened.astype(values.dtype),
        Channel.TARGET: is_target.astype(values.dtype),
    }
    data = jnp.stack([channels[c] for c in Channel], axis=-1)
    return Task(data, adjacency, target, family, scm)
