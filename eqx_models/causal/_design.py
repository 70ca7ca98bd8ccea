"""Intervention design: choose each round's intervention by expected information gain
about the target's parent set, simulate it, append the rows, repeat.

The loop is one compiled `lax.scan` over rounds with a fixed-size data buffer and a
growing sample mask, so the exact expert and the model (both of which take a
sample mask) score the data as it grows without recompiling.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_choice,
    check_finite,
    check_ids,
    check_size,
    check_type,
    fail,
    is_concrete,
    typechecked,
)

from ._batches import set_membership
from ._candidates import CandidateSets, checked_table
from ._data import Channel, check_shapes, check_values
from ._evaluation import _f1
from ._expert import (
    basis_columns,
    polynomial_basis,
    posterior_core,
    relative_to_variables,
    standardisation,
)
from ._model import _forward, ParentSetPredictionModel
from ._nonlinear import AbstractNonlinearSCM
from ._scm import LinearGaussianSCM, simulate


STRATEGIES = ("designed", "random", "observational")
"""How the design loop picks interventions: by expected information gain, uniformly
at random from the same candidates, or none (observational rows)."""


class DesignResult(eqx.Module):
    """What a run of [`eqx_models.causal.design_interventions`][] did and achieved.

    **Fields:**

    - `nodes`: `(R,)` the variable intervened on in each round (`-1`: none, for
        the observational baseline).
    - `values`: `(R,)` the intervention value of each round.
    - `expected_gain`: `(R,)` the expected information gain (nats) of the chosen
        intervention (NaN for the baselines, which do not compute it).
    - `truth_mass`: `(R + 1,)` posterior probability of the true parent set before
        the first round and after each round (0 if the true set has more than `K`
        members).
    - `map_f1`: `(R + 1,)` the F1 score of the posterior's most probable set
        against the true parents, at the same times.
    - `data`: `(N₀ + R·rows, d, 3)` the initial and the acquired AVICI data.
    """

    nodes: Int[Array, " R"]
    values: Float[Array, " R"]
    expected_gain: Float[Array, " R"]
    truth_mass: Float[Array, " R1"]
    map_f1: Float[Array, " R1"]
    data: Float[Array, "N d 3"]


def _posterior_fn(posterior, target, d: int, max_parents: int, degree: int):
    """`(data, sample_mask) -> log_probs` for the exact expert or a model."""
    variables = jnp.ones((d,), bool)
    if isinstance(posterior, ParentSetPredictionModel):
        return lambda data, mask: jax.nn.log_softmax(
            _forward(posterior, data, mask, variables)
        )

    def exact(data, mask):
        log_probs, *_, degenerate = posterior_core(
            data[..., Channel.VALUE],
            data[:, target, Channel.INTERVENED] == 1,
            target,
            mask,
            variables,
            max_parents,
            degree,
        )
        # Too few rows so far: a uniform posterior rather than NaN.
        uniform = jnp.full_like(log_probs, -jnp.log(log_probs.shape[0]))
        return jnp.where(degenerate, uniform, log_probs)

    return exact


class _Regressions(eqx.Module):
    """The designer's plug-in regression of the target under every candidate set."""

    intercept: Float[Array, " C"]
    coef: Float[Array, "C k"]  # over the set's basis columns, 0 off the set
    noise: Float[Array, " C"]
    columns: Int[Array, "C k"]  # indices into the d·degree basis columns
    centre: Float[Array, " d"]  # the basis's standardisation
    scale: Float[Array, " d"]

    def select(self, sets: Int[Array, " h"]) -> "_Regressions":
        """The regressions of the candidate sets `sets` only."""
        return _Regressions(
            self.intercept[sets],
            self.coef[sets],
            self.noise[sets],
            self.columns[sets],
            self.centre,
            self.scale,
        )


def _plug_in_regressions(values, rows, target, table: CandidateSets, degree: int):
    """Per candidate set `S`: the g-prior posterior-mean regression (`g = n`) of the
    target on the basis columns of `S` (the model of the exact expert with the same
    `degree`), from the rows `rows`, with its residual noise scale."""
    n_total, d = values.shape
    n = jnp.maximum(jnp.sum(rows), 1).astype(values.dtype)
    centre, scale = standardisation(values, rows)
    features = polynomial_basis(values, centre, scale, degree).reshape(n_total, -1)
    mean = jnp.sum(jnp.where(rows[:, None], features, 0.0), axis=0) / n
    centred = jnp.where(rows[:, None], features - mean, 0.0)
    y = values[:, target]
    mean_y = jnp.sum(jnp.where(rows, y, 0.0)) / n
    centred_y = jnp.where(rows, y - mean_y, 0.0)
    highest = jax.lax.Precision.HIGHEST
    cov = jnp.matmul(centred.T, centred, precision=highest)
    cross = jnp.matmul(centred.T, centred_y, precision=highest)
    members = relative_to_variables(table.members, target)
    columns, column_mask = basis_columns(members, jnp.asarray(table.mask), degree)
    k = columns.shape[1]
    both = column_mask[:, :, None] & column_mask[:, None, :]
    gram = jnp.where(both, cov[columns[:, :, None], columns[:, None, :]], jnp.eye(k))
    # A tiny ridge keeps collinear hypotheses finite; they carry ~0 posterior mass.
    gram = gram + 1e-6 * jnp.trace(cov) / cov.shape[0] * jnp.eye(k)
    rhs = jnp.where(column_mask, cross[columns], 0.0)
    shrink = n / (1.0 + n)
    if k > 0:
        ols = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
    else:
        ols = jnp.zeros_like(rhs)
    explained = jnp.sum(ols * rhs, axis=1)
    coef = shrink * jnp.where(column_mask, ols, 0.0)
    intercept = mean_y - jnp.sum(coef * mean[columns], axis=1)
    residual = jnp.maximum(centred_y @ centred_y - shrink * explained, 0.0)
    noise = jnp.sqrt(residual / jnp.maximum(n - 1.0, 1.0))
    return _Regressions(intercept, coef, noise, columns, centre, scale)


def _usable_rows(data, sample_mask, target):
    """The rows that observe the target's mechanism: not intervened on the target."""
    return sample_mask & (data[:, target, Channel.INTERVENED] == 0)


def hypothetical_rows(
    key, data, sample_mask, target, table, node, value, rows, draws, degree
):
    """The designer's predictive draws of one round's rows under `do(X_node =
    value)`, for every hypothesis `S` and draw `m`: values `(C, M, rows, d)`.

    Non-target variables: rows resampled from the current ones with column `node`
    set to `value` (the designer does not know the graph, so the intervention's
    effect on the target's other inputs is not propagated). Target: the plug-in
    regression of hypothesis `S` (additive polynomial of `degree`) plus Gaussian
    noise. The same random numbers serve every candidate intervention (common
    random numbers), so that their gains are compared with little noise.
    """
    values = data[..., Channel.VALUE]
    usable = _usable_rows(data, sample_mask, target)
    fit = _plug_in_regressions(values, usable, target, table, degree)
    return _draw_rows(
        key, values, sample_mask, target, fit, node, value, rows, draws, degree
    )


def _draw_rows(key, values, sample_mask, target, fit, node, value, rows, draws, degree):
    """`hypothetical_rows` given the regressions `fit` of the hypotheses drawn."""
    n_total, d = values.shape
    k_rows, k_noise = jr.split(key)
    weights = sample_mask.astype(values.dtype)
    picks = jr.choice(k_rows, n_total, (draws, rows), p=weights / jnp.sum(weights))
    base = values[picks]
    base = jnp.where(jnp.arange(d) == node, value, base)
    features = polynomial_basis(base, fit.centre, fit.scale, degree)
    features = features.reshape(draws, rows, -1)
    eps = jr.normal(k_noise, (draws, rows), values.dtype)

    def under(b0, b, s, columns):
        y = b0 + jnp.sum(features[..., columns] * b, axis=-1) + s * eps
        return jnp.where(jnp.arange(d) == target, y[..., None], base)

    return jax.vmap(under)(fit.intercept, fit.coef, fit.noise, fit.columns)


def _avici_rows(values, node, target):
    n, d = values.shape
    channels = {
        Channel.VALUE: values,
        Channel.INTERVENED: jnp.broadcast_to(jnp.arange(d) == node, (n, d)),
        Channel.TARGET: jnp.broadcast_to(jnp.arange(d) == target, (n, d)),
    }
    return jnp.stack([channels[c].astype(values.dtype) for c in Channel], axis=-1)


class _Estimator(NamedTuple):
    """How the information gain is estimated; plain ints, so static under jit."""

    rows: int  # rows one intervention adds
    draws: int  # Monte Carlo draws per hypothesis
    n_hypotheses: int | None  # the most probable sets simulated (None: all)
    degree: int  # of the additive polynomial model (1: linear)
    candidate_batch: int | None  # candidates evaluated at once (None: all)


def _gains(key, data, mask, offset, target, table, posterior_fn, nodes, grid, est):
    """Expected information gain of every `(node, value)` candidate, `(k, v)`."""
    rows = est.rows
    log_prior = posterior_fn(data, mask)
    prior = jnp.exp(log_prior)
    if est.n_hypotheses is not None and est.n_hypotheses < prior.shape[0]:
        # Only the most probable sets are simulated: the work scales with
        # n_hypotheses, not with the C candidate sets.
        weights, hypotheses = jax.lax.top_k(prior, est.n_hypotheses)
    else:
        weights, hypotheses = prior, jnp.arange(prior.shape[0])
    weights = weights / jnp.sum(weights)
    new_mask = mask | (
        (jnp.arange(mask.shape[0]) >= offset)
        & (jnp.arange(mask.shape[0]) < offset + rows)
    )

    # The hypotheses' regressions do not depend on the candidate: fitted once per
    # round (for every set), and rows drawn for the simulated sets only.
    values = data[..., Channel.VALUE]
    usable = _usable_rows(data, mask, target)
    fit = _plug_in_regressions(values, usable, target, table, est.degree)
    fit = fit.select(hypotheses)

    def gain(node, value):
        draws_all = _draw_rows(
            key, values, mask, target, fit, node, value, rows, est.draws, est.degree
        )

        def one(new_values):
            block = _avici_rows(new_values, node, target)
            grown = jax.lax.dynamic_update_slice(data, block, (offset, 0, 0))
            log_post = posterior_fn(grown, new_mask)
            kl = jnp.sum(
                jnp.where(
                    log_post > -jnp.inf, jnp.exp(log_post) * (log_post - log_prior), 0.0
                )
            )
            return jnp.where(jnp.isfinite(kl), kl, 0.0)

        # One batch axis over (hypothesis, draw) and one over the candidates, not
        # four nested vmaps: a model's attention under four batch axes reaches
        # rank-8 arrays, beyond what XLA's CPU backend compiles.
        c, m = draws_all.shape[:2]
        per = jax.vmap(one)(draws_all.reshape(c * m, *draws_all.shape[2:]))
        return jnp.sum(weights * jnp.mean(per.reshape(c, m), axis=1))

    n_v = grid.shape[0]
    candidates = (jnp.repeat(nodes, n_v), jnp.tile(grid, nodes.shape[0]))
    if est.candidate_batch is None:
        flat = jax.vmap(gain)(*candidates)
    else:
        # A few candidates at a time: memory for the posteriors of
        # `candidate_batch × hypotheses × draws` grown data sets, not of all.
        flat = jax.lax.map(
            lambda c: gain(*c), candidates, batch_size=est.candidate_batch
        )
    return flat.reshape(nodes.shape[0], n_v)


def _truth_index(table, target, truth):
    d = truth.shape[0]
    is_true = jnp.all(set_membership(table, target, d) == truth, axis=1)
    return jnp.argmax(is_true), jnp.any(is_true)


def _check_common(name, data, max_parents, nodes, grid, allow_target):
    check_shapes(name, data, None, None)
    n, d, _ = data.shape
    data, target = check_values(name, data, jnp.ones((n,), bool), jnp.ones((d,), bool))
    table = checked_table(name, d, max_parents)
    if nodes is None:
        # Every variable but the target, in order (traceable: the target may be).
        others = jnp.arange(d - 1, dtype=jnp.int32)
        nodes = others + (others >= target)
    nodes = check_ids(name, "nodes", jnp.asarray(nodes), d)
    if nodes.ndim != 1 or nodes.shape[0] == 0:
        raise fail(
            name, "nodes", "a non-empty 1-D array of variables", f"shape {nodes.shape}"
        )
    if not allow_target:
        why = (
            "(interventions on the target cut it from its parents and say nothing "
            "about them; pass `allow_target=True` to allow them anyway)"
        )
        if is_concrete(nodes, target):
            if bool(jnp.any(nodes == target)):
                raise fail(
                    name,
                    "nodes",
                    f"variables other than the target {int(target)} {why}",
                    f"{[int(i) for i in nodes]}",
                )
        else:
            nodes = eqx.error_if(
                nodes,
                jnp.any(nodes == target),
                f"{name}: `nodes` must be variables other than the target {why}.",
            )
    grid = jnp.asarray(grid, data.dtype)
    if grid.ndim != 1 or grid.shape[0] == 0:
        raise fail(
            name, "values", "a non-empty 1-D array of values", f"shape {grid.shape}"
        )
    check_finite(name, "values", grid)
    return data, target, table, nodes, grid


@typechecked
def expected_information_gain(
    key: PRNGKeyArray,
    data: Float[Array, "N d 3"],
    max_parents: int,
    *,
    rows: int,
    nodes: Int[Array, " k"] | None = None,
    values: Float[Array, " v"] | tuple[float, ...] = (-2.0, 2.0),
    n_draws: int = 4,
    n_hypotheses: int | None = None,
    allow_target: bool = False,
    degree: int = 1,
    candidate_batch: int | None = None,
) -> Float[Array, "k v"]:
    """Expected information gain about the target's parent set of `rows` new rows
    under `do(X_k = v)`, for every candidate variable `k` and value `v`.

    `EIG(k, v) = Σ_S p(S | D)·E[KL(p(· | D ∪ D_new) ‖ p(· | D)) | S]`, the mutual
    information between the parent set and the new rows: the sum over the
    hypotheses `S` is exact (over all candidate sets, or the `n_hypotheses` most
    probable ones, renormalised); the expectation over `D_new` is a Monte Carlo
    mean over `n_draws` draws from the designer's predictive under `S` (the
    non-target variables resampled from the current rows with `X_k = v`, the
    target from the g-prior posterior-mean regression on `S` with its noise). The
    posteriors are the exact g-prior expert's
    ([`eqx_models.causal.exact_parent_posterior`][]), linear or, with
    `degree > 1`, additive polynomial; the predictive regression uses the same
    model.

    **Arguments:**

    - `key`: a PRNG key (the same draws serve every candidate).
    - `data`: the AVICI data so far, `(N, d, 3)`.
    - `max_parents`: `K`.
    - `rows`: the number of rows one intervention adds.
    - `nodes`: `(k,)` candidate variables (default: all but the target).
    - `values`: `(v,)` candidate intervention values.
    - `n_draws`: Monte Carlo draws per hypothesis.
    - `n_hypotheses`: simulate only the `n_hypotheses` most probable sets, their
        weights renormalised (`None`: all `C` sets, the exact sum). The work is
        proportional to it: at `d = 20`, `K = 3` (`C = 1 160`) a round of
        `design_interventions` took 22.7 s with all sets and 0.37 s with the 32
        most probable on a 2-core CPU.
    - `allow_target`: allow the target among `nodes`.
    - `degree`: the degree of the additive polynomial model (1: linear), as in
        `exact_parent_posterior`.
    - `candidate_batch`: evaluate this many candidates `(k, v)` at a time (`None`:
        all at once). The same gains; the memory of the posteriors of the grown
        data sets shrinks by `k·v / candidate_batch` (a model's posterior over
        many rows needs it), the time grows where all fitted at once.

    **Returns:**

    `(k, v)` expected gains in nats.

    **Raises:**

    `ValueError` for data that are not valid AVICI data, a `(d, K)` beyond the
    enumeration limit, `rows`, `n_draws`, `n_hypotheses`, `degree` or
    `candidate_batch` below 1, a node out of
    `[0, d)`, the target among `nodes` without `allow_target`, or non-finite or
    empty `values`; `TypeError` for a size that is not an integer.
    """
    name = "expected_information_gain"
    check_size(name, "rows", rows)
    est = _checked_estimator(name, rows, n_draws, n_hypotheses, degree, candidate_batch)
    data, target, table, nodes, grid = _check_common(
        name, data, max_parents, nodes, values, allow_target
    )
    return _eig_compiled(key, data, target, max_parents, nodes, grid, est)


def _checked_estimator(name, rows, n_draws, n_hypotheses, degree, candidate_batch):
    check_size(name, "n_draws", n_draws)
    check_size(name, "degree", degree)
    if n_hypotheses is not None:
        check_size(name, "n_hypotheses", n_hypotheses)
    if candidate_batch is not None:
        check_size(name, "candidate_batch", candidate_batch)
    return _Estimator(rows, n_draws, n_hypotheses, degree, candidate_batch)


@eqx.filter_jit
def _eig_compiled(key, data, target, max_parents, nodes, grid, est: _Estimator):
    n, d, _ = data.shape
    table = checked_table("expected_information_gain", d, max_parents)
    padded = jnp.concatenate([data, jnp.zeros((est.rows, d, 3), data.dtype)])
    mask = jnp.arange(n + est.rows) < n
    posterior_fn = _posterior_fn("exact", target, d, max_parents, est.degree)
    return _gains(key, padded, mask, n, target, table, posterior_fn, nodes, grid, est)


@typechecked
def design_interventions(
    key: PRNGKeyArray,
    scm: LinearGaussianSCM | AbstractNonlinearSCM,
    data: Float[Array, "N d 3"],
    *,
    rounds: int,
    rows_per_round: int,
    strategy: str = "designed",
    posterior: str | ParentSetPredictionModel = "exact",
    max_parents: int | None = None,
    nodes: Int[Array, " k"] | None = None,
    values: Float[Array, " v"] | tuple[float, ...] = (-2.0, 2.0),
    n_draws: int = 4,
    n_hypotheses: int | None = None,
    allow_target: bool = False,
    degree: int = 1,
    candidate_batch: int | None = None,
) -> DesignResult:
    """Acquire data for the target's parent set in `rounds` rounds of interventions.

    Each round: compute the posterior over the target's parent sets (the exact
    g-prior expert, linear or additive polynomial of `degree`, or a trained
    model's), choose an intervention
    `do(X_k = v)` among the candidates `nodes × values`, simulate `rows_per_round`
    rows of it from `scm`, append them, repeat. `strategy`:

    - `"designed"`: the candidate of largest expected information gain (see
        [`eqx_models.causal.expected_information_gain`][]; with a model as the
        posterior, the same estimator with the model's posteriors);
    - `"random"`: a uniformly random candidate (the baseline);
    - `"observational"`: observational rows only, the same number.

    The whole loop is one compiled program, a `lax.scan` over rounds (a
    fixed-size buffer of `N₀ + R·rows` rows and a growing sample mask), compiled
    once per shape and configuration; repeated runs (seeds, strategies) reuse the
    compilation. It also runs under `jax.jit` and `jax.vmap`: `jax.vmap` over
    `(key, scm, data)` designs for a batch of tasks in one program. Concrete
    inputs are checked at once; traced ones at run time (`eqx.error_if`, which
    reports its message under `eqx.filter_jit`).

    **Arguments:**

    - `key`: a PRNG key.
    - `scm`: the true SCM the rows are simulated from (linear or nonlinear).
    - `data`: the initial (e.g. observational) AVICI data `(N₀, d, 3)`; its target
        channel names the target.
    - `rounds`: `R ≥ 1`, the budget of rounds.
    - `rows_per_round`: rows each intervention adds.
    - `strategy`: one of `STRATEGIES`.
    - `posterior`: `"exact"` or a [`eqx_models.causal.ParentSetPredictionModel`][].
    - `max_parents`: `K` (required for `"exact"`; a model's own `K` otherwise).
    - `nodes`, `values`, `n_draws`, `n_hypotheses`, `allow_target`, `degree`,
        `candidate_batch`: as in `expected_information_gain` (with a model as the
        posterior, `degree` sets only the designer's predictive regression).

    **Returns:**

    A [`eqx_models.causal.DesignResult`][].

    **Raises:**

    `ValueError` for `rounds`, `rows_per_round`, `n_draws`, `degree` or
    `candidate_batch` below 1 (a budget of no rounds), an unknown `strategy`, a
    `posterior` that is neither `"exact"` nor a model, a missing `max_parents`
    with `"exact"` or one that differs from the model's, an `scm` over another
    number of variables than `data`, the target among `nodes` without
    `allow_target`, and as `expected_information_gain`; `TypeError` for a size
    that is not an integer.

    !!! example

        ```python
        result = design_interventions(
            jr.key(0), task.scm, task.data, rounds=5, rows_per_round=10,
            max_parents=2,
        )
        result.truth_mass  # rises round by round
        ```
    """
    name = "design_interventions"
    check_size(name, "rounds", rounds)
    check_size(name, "rows_per_round", rows_per_round)
    est = _checked_estimator(
        name, rows_per_round, n_draws, n_hypotheses, degree, candidate_batch
    )
    check_choice(name, "strategy", strategy, STRATEGIES)
    if isinstance(posterior, str):
        check_choice(name, "posterior", posterior, ("exact",))
        if max_parents is None:
            raise fail(name, "max_parents", 'an int with posterior="exact"', "None")
    else:
        check_type(
            name,
            "posterior",
            posterior,
            ParentSetPredictionModel,
            '"exact" or a ParentSetPredictionModel',
        )
        if max_parents is None:
            max_parents = posterior.max_parents
        elif max_parents != posterior.max_parents:
            raise fail(
                name,
                "max_parents",
                f"the model's {posterior.max_parents}",
                f"{max_parents}",
            )
    check_size(name, "max_parents", max_parents, minimum=0)
    data, target, table, nodes, grid = _check_common(
        name, data, max_parents, nodes, values, allow_target
    )
    if scm.n_vars != data.shape[1]:
        raise fail(
            name,
            "scm",
            f"an SCM over the d = {data.shape[1]} variables of `data`",
            f"one over {scm.n_vars}",
        )
    return _design(
        key,
        scm,
        data,
        target,
        posterior,
        max_parents,
        nodes,
        grid,
        rounds,
        strategy,
        est,
    )


@eqx.filter_jit
def _design(
    key,
    scm,
    data,
    target,
    posterior,
    max_parents,
    nodes,
    grid,
    rounds,
    strategy,
    est: _Estimator,
):
    n0, d, _ = data.shape
    rows = est.rows
    table = checked_table("design_interventions", d, max_parents)
    total = n0 + rounds * rows
    buffer = jnp.concatenate([data, jnp.zeros((total - n0, d, 3), data.dtype)])
    buffer = buffer.at[n0:, target, Channel.TARGET].set(1.0)
    mask = jnp.arange(total) < n0
    posterior_fn = _posterior_fn(posterior, target, d, max_parents, est.degree)
    truth = scm.adjacency[:, target]
    true_index, representable = _truth_index(table, target, truth)

    def measure(buffer, mask):
        log_probs = posterior_fn(buffer, mask)
        best = jnp.argmax(log_probs)
        chosen = jnp.any(
            (
                relative_to_variables(jnp.asarray(table.members)[best], target)[:, None]
                == jnp.arange(d)
            )
            & jnp.asarray(table.mask)[best][:, None],
            axis=0,
        )
        mass = jnp.where(representable, jnp.exp(log_probs[true_index]), 0.0)
        return mass, _f1(chosen, truth)

    def round_(carry, r):
        buffer, mask = carry
        k_choice, k_gain, k_sim = jr.split(jr.fold_in(key, r), 3)
        offset = n0 + r * rows
        mass, f1 = measure(buffer, mask)
        n_v = grid.shape[0]
        if strategy == "designed":
            gains = _gains(
                k_gain,
                buffer,
                mask,
                offset,
                target,
                table,
                posterior_fn,
                nodes,
                grid,
                est,
            )
            flat = jnp.argmax(gains)
            gain = gains.reshape(-1)[flat]
        else:
            flat = jr.randint(k_choice, (), 0, nodes.shape[0] * n_v)
            gain = jnp.full((), jnp.nan, data.dtype)
        node = nodes[flat // n_v]
        value = grid[flat % n_v]
        if strategy == "observational":
            node = jnp.full((), -1, nodes.dtype)
        new = simulate(k_sim, scm, jnp.full((rows,), node), jnp.full((rows,), value))
        block = _avici_rows(new.astype(data.dtype), node, target)
        buffer = jax.lax.dynamic_update_slice(buffer, block, (offset, 0, 0))
        mask = mask | (
            (jnp.arange(total) >= offset) & (jnp.arange(total) < offset + rows)
        )
        return (buffer, mask), (node, value, gain, mass, f1)

    (buffer, mask), (nodes_, values_, gains, masses, f1s) = jax.lax.scan(
        round_, (buffer, mask), jnp.arange(rounds)
    )
    last_mass, last_f1 = measure(buffer, mask)
    return DesignResult(
        nodes_,
        values_,
        gains,
        jnp.append(masses, last_mass),
        jnp.append(f1s, last_f1),
        buffer,
    )
