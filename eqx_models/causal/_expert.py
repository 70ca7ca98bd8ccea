"""The exact posterior over a target's parent sets: the teacher of the surrogate model.

Each candidate set gets a closed-form Bayes factor (linear regression with Zellner's
g-prior, from the correlations of the rows where the target was not intervened on).
The public functions validate their input; `posterior_core` is the unchecked kernel
that the training-batch sampler calls inside compiled code.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from transforms.validation import (
    check_choice,
    check_ids,
    check_probabilities,
    check_size,
    is_concrete,
    typechecked,
)

from ._candidates import candidate_parent_sets, CandidateSets, checked_table
from ._data import Channel, check_shapes, check_values


class ParentSetPosterior(eqx.Module):
    """The exact posterior over the candidate parent sets of a target.

    **Fields:**

    - `log_probs`: `(C,)` log posterior probabilities in the canonical order of
        [`eqx_models.causal.candidate_parent_sets`][] (`-inf` for sets that contain a
        masked-out variable; NaN everywhere if `degenerate`).
    - `log_bayes_factors`: `(C,)` `log BF_S` of each set against the empty set.
    - `edge_probs`: `(d,)` marginal posterior probability that each variable is a
        parent of the target (0 for the target itself).
    - `n_rows`: the number `n` of rows used (those where the target was not
        intervened on).
    - `target`: the target variable.
    - `degenerate`: whether the posterior is undefined for these data (see
        [`eqx_models.causal.exact_parent_posterior`][]).
    """

    log_probs: Float[Array, " C"]
    log_bayes_factors: Float[Array, " C"]
    edge_probs: Float[Array, " d"]
    n_rows: Int[Array, ""]
    target: Int[Array, ""]
    degenerate: Bool[Array, ""]


def relative_to_variables(members: Int[ArrayLike, "..."], target) -> Int[Array, "..."]:
    """Map relative indices (over the non-target variables) to variable indices."""
    members = jnp.asarray(members)
    return members + (members >= target)


@typechecked
def candidate_variables(
    target: int | Int[Array, ""], n_vars: int, max_parents: int
) -> Int[Array, "C k"]:
    """The members of every canonical candidate parent set, as variable indices.

    **Arguments:**

    - `target`: the target variable.
    - `n_vars`: the number of variables `d`.
    - `max_parents`: the largest set size `K`.

    **Returns:**

    An integer array of shape `(C, min(K, d-1))`: row `c` lists the variables of
    candidate set `c` in increasing order, padded with `-1`.

    **Raises:**

    As [`eqx_models.causal.candidate_parent_sets`][]; `ValueError` if `target` is
    not a variable in `[0, d)` (at run time when traced).

    !!! example

        ```python
        candidate_variables(1, 3, 2)
        # [[-1, -1], [0, -1], [2, -1], [0, 2]]: {}, {0}, {2}, {0, 2}
        ```
    """
    table = checked_table("candidate_variables", n_vars, max_parents)
    target = check_ids("candidate_variables", "target", target, n_vars)
    return jnp.where(table.mask, relative_to_variables(table.members, target), -1)


def marginals_from_sets(
    probs: Float[Array, " C"], table: CandidateSets, target, n_vars: int
) -> Float[Array, " d"]:
    weights = jnp.where(table.mask, probs[:, None], 0.0)
    relative = jnp.zeros((n_vars - 1,), probs.dtype).at[table.members].add(weights)
    i = jnp.arange(n_vars)
    gathered = relative[jnp.clip(i - (i > target), 0, max(n_vars - 2, 0))]
    return jnp.where(i == target, 0.0, gathered)


@typechecked
def edge_marginals(
    log_probs: Float[Array, " C"],
    target: int | Int[Array, ""],
    n_vars: int,
    max_parents: int,
) -> Float[Array, " {n_vars}"]:
    """Marginal probability that each variable is a parent of the target.

    `p(i ∈ Pa) = Σ_{S ∋ i} p(S)` over the canonical candidate sets; works for the
    expert's and for a model's log-probabilities alike.

    **Arguments:**

    - `log_probs`: `(C,)` log-probabilities over the canonical candidate sets of
        `(d, K)`.
    - `target`: the target variable.
    - `n_vars`: `d`.
    - `max_parents`: `K`.

    **Returns:**

    The marginals, shape `(d,)`, 0 at the target.

    **Raises:**

    `ValueError` if `log_probs` does not have one entry per candidate set or is not
    a normalised log-distribution (its exponentials must sum to 1 within the square
    root of the dtype's epsilon), or if `target` is not in `[0, d)`: at once when
    concrete, by `eqx.error_if` under `jit`.
    """
    name = "edge_marginals"
    table = checked_table(name, n_vars, max_parents)
    if log_probs.shape != (table.n_sets,):
        raise ValueError(
            f"edge_marginals: `log_probs` must have shape ({table.n_sets},) for "
            f"(d, K) = ({n_vars}, {max_parents}), got {log_probs.shape}."
        )
    log_probs = check_probabilities(name, "log_probs", log_probs, log=True)
    target = check_ids(name, "target", target, n_vars)
    return marginals_from_sets(jnp.exp(log_probs), table, target, n_vars)


def _one_minus_r2(gram, rhs, mask):
    """`1 - rᵀA⁻¹r` and the smallest pivot for a batch of small SPD systems.

    An unrolled Cholesky factorisation `A = LLᵀ` with `z = L⁻¹r`: the systems are at
    most `K × K` (K is static and small), so the loops are over matrix entries, not
    over data, and every operation is vectorised over the batch of sets.
    """
    k = gram.shape[-1]
    big = jnp.ones(gram.shape[:-2], gram.dtype)
    low = [[None] * k for _ in range(k)]
    z = [None] * k
    min_pivot = big
    for j in range(k):
        pivot = gram[..., j, j] - sum((low[j][m] ** 2 for m in range(j)), 0.0)
        min_pivot = jnp.where(mask[..., j], jnp.minimum(min_pivot, pivot), min_pivot)
        root = jnp.sqrt(jnp.maximum(pivot, jnp.finfo(gram.dtype).tiny))
        low[j][j] = root
        for i in range(j + 1, k):
            low[i][j] = (
                gram[..., i, j] - sum((low[i][m] * low[j][m] for m in range(j)), 0.0)
            ) / root
        z[j] = (rhs[..., j] - sum((low[j][m] * z[m] for m in range(j)), 0.0)) / root
    explained = sum((zj**2 for zj in z), jnp.zeros_like(big))
    return jnp.maximum(1.0 - explained, 0.0), min_pivot


def polynomial_basis(values, mean, std, degree: int):
    """The basis of the additive model, `(..., d) -> (..., d, degree)`.

    Degree 1 is the values themselves (the linear model). Above, the probabilists'
    Hermite polynomials `He_1 … He_degree` of the values standardised by `mean`
    and `std`: `He_p(z) = z·He_{p-1}(z) - (p-1)·He_{p-2}(z)`, mutually
    uncorrelated for Gaussian `z`, so the Gram matrices stay well conditioned
    where the raw powers `z, z², z³` would be nearly collinear.
    """
    if degree == 1:
        return values[..., None]
    z = (values - mean) / std
    terms = [jnp.ones_like(z), z]
    for p in range(2, degree + 1):
        terms.append(z * terms[-1] - (p - 1) * terms[-2])
    return jnp.stack(terms[1:], axis=-1)


def basis_columns(members, mask, degree: int):
    """The basis columns of each candidate set: `(C, K) -> (C, K·degree)` column
    indices into the `(d·degree)` columns of `polynomial_basis`, and their mask."""
    columns = members[:, :, None] * degree + jnp.arange(degree)
    column_mask = jnp.broadcast_to(mask[:, :, None], columns.shape)
    c = members.shape[0]
    return columns.reshape(c, -1), column_mask.reshape(c, -1)


def standardisation(values, rows):
    """Mean and standard deviation of each column over `rows` (1 where constant)."""
    n = jnp.maximum(jnp.sum(rows), 1).astype(values.dtype)
    mean = jnp.sum(jnp.where(rows[:, None], values, 0.0), axis=0) / n
    spread = jnp.sum(jnp.where(rows[:, None], values - mean, 0.0) ** 2, axis=0)
    return mean, jnp.sqrt(jnp.where(spread > 0, spread / n, 1.0))


@eqx.filter_jit
def posterior_core(
    values: Float[Array, "N d"],
    intervened_target: Bool[Array, " N"],
    target: Int[Array, ""],
    sample_mask: Bool[Array, " N"],
    variable_mask: Bool[Array, " d"],
    max_parents: int,
    degree: int = 1,
):
    """The expert without input validation: `(log_probs, log_bf, edge_probs, n,
    degenerate)`. Used by the public function and by the training-batch sampler."""
    n_total, d = values.shape
    table = candidate_parent_sets(d, max_parents)
    dtype = values.dtype
    eps = jnp.finfo(dtype).eps
    rows = sample_mask & ~intervened_target
    n = jnp.sum(rows)
    n_float = n.astype(dtype)
    column_vars = variable_mask
    response = target
    if degree > 1:
        # Each variable's basis columns, then the response itself (the target is
        # regressed on the parents' basis, not expanded).
        mean, std = standardisation(values, rows)
        basis = polynomial_basis(values, mean, std, degree).reshape(n_total, -1)
        values = jnp.concatenate([basis, values[:, target, None]], axis=1)
        column_vars = jnp.append(jnp.repeat(variable_mask, degree), True)
        response = d * degree
    x = jnp.where(rows[:, None], values, 0.0)
    mean = jnp.sum(x, axis=0) / jnp.maximum(n_float, 1.0)
    centred = jnp.where(rows[:, None], values - mean, 0.0)
    # HIGHEST precision: on GPUs the default float32 matmul may use TF32 (10-bit
    # mantissa), far too coarse for R² near 1 multiplied by g = n.
    cov = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    variance = jnp.diagonal(cov)
    second_moment = jnp.sum(x * x, axis=0)
    varies = variance > (100 * eps) ** 2 * second_moment
    std = jnp.sqrt(jnp.where(varies & column_vars, variance, 1.0))
    corr = cov / (std[:, None] * std[None, :])
    corr = jnp.where(jnp.eye(corr.shape[0], dtype=bool), 1.0, corr)

    members = relative_to_variables(table.members, target)
    mask = jnp.asarray(table.mask)
    set_valid = jnp.all(~mask | variable_mask[members], axis=1)
    k = table.max_parents * degree
    if k > 0:
        columns, column_mask = basis_columns(members, mask, degree)
        both = column_mask[:, :, None] & column_mask[:, None, :]
        gram = jnp.where(
            both,
            corr[columns[:, :, None], columns[:, None, :]],
            jnp.eye(k, dtype=dtype),
        )
        rhs = jnp.where(column_mask, corr[columns, response], 0.0)
        residual, min_pivot = _one_minus_r2(gram, rhs, column_mask)
    else:
        residual = jnp.ones((table.n_sets,), dtype)
        min_pivot = jnp.ones((table.n_sets,), dtype)

    set_sizes = jnp.asarray(table.sizes, dtype)
    n_coefficients = degree * set_sizes
    g = n_float
    log_bf = 0.5 * (n_float - 1.0 - n_coefficients) * jnp.log1p(g) - 0.5 * (
        n_float - 1.0
    ) * jnp.log1p(g * residual)
    d_valid = jnp.sum(variable_mask).astype(dtype)
    k_eff = jnp.minimum(table.max_parents, d_valid - 1.0)
    log_binom = (
        jax.scipy.special.gammaln(d_valid)
        - jax.scipy.special.gammaln(set_sizes + 1.0)
        - jax.scipy.special.gammaln(d_valid - set_sizes)
    )
    log_prior = -jnp.log1p(k_eff) - log_binom
    logits = jnp.where(set_valid, log_bf + log_prior, -jnp.inf)
    log_probs = logits - jax.scipy.special.logsumexp(logits)

    degenerate = (
        (n_float < degree * k_eff + 2.0)
        | jnp.any(column_vars & ~varies)
        | jnp.any(set_valid & (min_pivot <= 100 * eps))
        | jnp.any(set_valid & ~jnp.isfinite(log_bf))
        | ~jnp.isfinite(column_vars @ jnp.where(column_vars, mean, 0.0))
    )
    log_probs = jnp.where(degenerate, jnp.nan, log_probs)
    edge_probs = marginals_from_sets(jnp.exp(log_probs), table, target, d)
    return log_probs, log_bf, edge_probs, n, degenerate


@typechecked
def exact_parent_posterior(
    data: Float[Array, "N d 3"],
    max_parents: int,
    *,
    sample_mask: Bool[Array, " N"] | None = None,
    variable_mask: Bool[Array, " d"] | None = None,
    on_degenerate: str = "raise",
    degree: int = 1,
) -> ParentSetPosterior:
    """The exact posterior over the parent sets of the target, size `≤ K`.

    The target `y` is the variable marked in the target channel. The rows where `y`
    was intervened on are dropped (a perfect intervention cuts `y` from its parents);
    rows with other variables intervened on are kept, since `y`'s mechanism is the
    same in them. On the remaining `n` rows, for each candidate set `S`, the linear
    model `y = α + X_S β + ε` with Zellner's g-prior (`g = n`, flat prior on the
    intercept, Jeffreys prior on the noise variance) has Bayes factor against the
    empty set

    `log BF_S = ((n - 1 - |S|)/2)·log(1 + g) - ((n - 1)/2)·log(1 + g·(1 - R²_S))`,

    with `R²_S` the coefficient of determination of the regression, computed from the
    correlation matrix over the `n` rows. The prior is uniform over sizes
    `0..K'` (`K' = min(K, d'-1)`, `d'` the number of unmasked variables), then
    uniform within a size: `log p(S) = -log(K'+1) - log C(d'-1, |S|)`. All
    `C = Σ_{k≤K'} C(d-1, k)` sets (the canonical table of
    [`eqx_models.causal.candidate_parent_sets`][]) are scored at once, with
    vectorised `K × K` Cholesky solves; no loop over sets.

    The posterior is invariant to per-variable affine rescaling of the values and to
    the values in rows where the target was intervened on.

    **Nonlinear mechanisms** (`degree > 1`): the same g-prior, over the additive
    polynomial model `y = α + Σ_{i∈S} Σ_{p≤degree} β_ip·He_p(z_i) + ε`, where `z_i`
    is variable `i` standardised over the `n` rows and `He_p` the probabilists'
    Hermite polynomials; `|S|` becomes `degree·|S|` in the Bayes factor, the prior
    over sets is unchanged. Exact for that model class (additive effects that are
    polynomials of degree `≤ degree`), an approximation for other smooth
    mechanisms: it captures each parent's main effect, not interactions between
    parents. `degree = 1` is the linear model above.

    **Arguments:**

    - `data`: AVICI data `(N, d, 3)` (see [`eqx_models.causal.Channel`][]).
    - `max_parents`: `K`, the largest parent set size.
    - `sample_mask`: optional `(N,)` boolean, rows to use (padding for batching).
    - `variable_mask`: optional `(d,)` boolean, variables that exist (padding);
        sets containing a masked variable get probability 0.
    - `on_degenerate`: `"raise"` (default) raises a runtime error if the posterior is
        degenerate; `"flag"` returns it with `degenerate=True` and NaN
        log-probabilities instead (what the training sampler does, to skip the
        task and count it).
    - `degree`: the degree of each parent's polynomial effect (1: linear).

    The posterior is **degenerate** when fewer than `degree·K' + 2` rows remain, a
    variable is constant over those rows, two basis columns of a candidate set are
    collinear (with `degree > 1` also the columns of one variable with at most
    `degree` distinct values), or a score is not finite.

    **Returns:**

    A [`eqx_models.causal.ParentSetPosterior`][].

    **Raises:**

    `ValueError` if `data` is not `(N, d, 3)`, if `N < degree·K' + 2` (too few rows
    for the largest set), if `degree < 1`, or if `(d, K)` has more than
    `MAX_CANDIDATE_SETS` sets; a `ValueError` too if values are not finite, an
    indicator is not 0/1, the target channel does not mark exactly one variable
    (the same in every row), or (with
    `on_degenerate="raise"`) the posterior is degenerate: at once for concrete
    data, else (under an outer `jit` or `vmap`) by `eqx.error_if` at run time, as
    an `EquinoxRuntimeError`.

    !!! example

        ```python
        task = sample_task(jr.key(0), TaskConfig(n_vars=5, n_samples=200))
        posterior = exact_parent_posterior(task.data, max_parents=2)
        best = candidate_variables(task.target, 5, 2)[jnp.argmax(posterior.log_probs)]
        ```
    """
    name = "exact_parent_posterior"
    check_choice(name, "on_degenerate", on_degenerate, ("raise", "flag"))
    check_size(name, "degree", degree)
    sample_mask, variable_mask = check_shapes(name, data, sample_mask, variable_mask)
    n_rows, d, _ = data.shape
    table = checked_table(name, d, max_parents)
    needed = degree * table.max_parents + 2
    if n_rows < needed:
        raise ValueError(
            f"{name}: `data` has N = {n_rows} rows, too few for parent sets of size "
            f"{table.max_parents} with degree {degree} (need N >= degree·K + 2 = "
            f"{needed})."
        )
    eager = is_concrete(data, sample_mask, variable_mask)
    if eager:
        # Concrete data: bad values and a degenerate posterior raise a plain
        # `ValueError` here rather than a run-time error from the compiled code.
        check_values(name, data, sample_mask, variable_mask)
    posterior = _checked_posterior(
        data,
        sample_mask,
        variable_mask,
        max_parents,
        on_degenerate == "raise" and not eager,
        degree,
    )
    if eager and on_degenerate == "raise" and bool(posterior.degenerate):
        raise ValueError(_DEGENERATE)
    return posterior


_DEGENERATE = (
    "exact_parent_posterior: the posterior is degenerate for these data (fewer "
    "than degree·K + 2 rows without an intervention on the target, a constant "
    "variable or basis column, collinear variables or basis columns, or a "
    "non-finite score)."
)


# Compiled as one program even when called eagerly (op-by-op dispatch of the
# many small operations would be much slower); inlined under an outer `jit`.
@eqx.filter_jit
def _checked_posterior(
    data, sample_mask, variable_mask, max_parents, raise_degenerate, degree
):
    name = "exact_parent_posterior"
    data, target = check_values(name, data, sample_mask, variable_mask)
    intervened_target = data[:, target, Channel.INTERVENED] == 1
    log_probs, log_bf, edge_probs, n, degenerate = posterior_core(
        data[..., Channel.VALUE],
        intervened_target,
        target,
        sample_mask,
        variable_mask,
        max_parents,
        degree,
    )
    if raise_degenerate:
        log_probs = eqx.error_if(log_probs, degenerate, _DEGENERATE)
    return ParentSetPosterior(log_probs, log_bf, edge_probs, n, target, degenerate)
