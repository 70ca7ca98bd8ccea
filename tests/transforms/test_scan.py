import functools

import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from jaxtyping import TypeCheckError

from transforms import OptimizeStats, scan_optimize, soft_threshold


def _quadratic(x, A, b):
    return 0.5 * x @ A @ x - b @ x


def _spd(rng, n, condition):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.linspace(1.0, condition, n)) @ q.T


def _gd_reference(A, b, x0, lr, n_steps, tol=None):
    """Plain gradient descent in float64 numpy, with the same stopping rule."""
    x = np.array(x0, float)
    for i in range(n_steps):
        new = x - lr * (A @ x - b)
        change = np.linalg.norm(new - x) / (np.linalg.norm(x) + 1e-16)
        x = new
        if tol is not None and change < tol:
            return x, i + 1
    return x, n_steps


# soft_threshold ------------------------------------------------------------------


def test_soft_threshold_matches_numpy():
    x = jnp.array([-2.0, -0.5, -0.1, 0.0, 0.2, 0.5, 3.0])
    expected = np.sign(np.asarray(x)) * np.maximum(np.abs(np.asarray(x)) - 0.5, 0)
    np.testing.assert_array_equal(soft_threshold(x, 0.5), expected)
    np.testing.assert_array_equal(jax.jit(soft_threshold)(x, 0.5), expected)
    per_example = jax.vmap(soft_threshold)(jnp.stack([x, 2 * x]), jnp.array([0.5, 1]))
    np.testing.assert_array_equal(per_example[1], 2 * expected)
    grad = jax.grad(lambda x: jnp.sum(soft_threshold(x, 0.5)))(x)
    np.testing.assert_array_equal(grad, (np.abs(np.asarray(x)) > 0.5).astype(float))


def test_soft_threshold_rejects_a_negative_threshold():
    with pytest.raises(
        ValueError, match="soft_threshold: `threshold` must be a real number >= 0"
    ):
        soft_threshold(jnp.ones(3), -0.1)


@given(
    hnp.arrays(np.float64, 5, elements=st.floats(-10, 10)),
    st.floats(0, 5),
)
def test_soft_threshold_is_the_l1_proximal_map(x, t):
    # S(x, t) minimises 0.5 (z - x)^2 + t |z| elementwise: compare with a fine grid.
    with jax.enable_x64(True):
        z = np.asarray(soft_threshold(jnp.asarray(x), t))
    grid = np.linspace(-12, 12, 240_001)
    for xi, zi in zip(x, z):
        values = 0.5 * (grid - xi) ** 2 + t * np.abs(grid)
        assert abs(grid[np.argmin(values)] - zi) <= 1e-4
        assert abs(zi) <= abs(xi) and abs(xi - zi) <= t + 1e-12


# scan_optimize: known solutions -----------------------------------------------------


def test_quadratic_fixed_steps_match_gradient_descent(x64):
    rng = np.random.default_rng(0)
    A, b = _spd(rng, 4, 5.0), rng.normal(size=4)
    solver = scan_optimize(_quadratic, optax.sgd(0.1), max_steps=300)
    x, stats = solver(jnp.zeros(4), jnp.asarray(A), jnp.asarray(b))
    expected, _ = _gd_reference(A, b, np.zeros(4), 0.1, 300)
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)
    assert int(stats.n_steps) == 300 and not bool(stats.converged)
    assert bool(stats.finite)
    assert float(stats.objective) == pytest.approx(
        0.5 * expected @ A @ expected - b @ expected, rel=1e-12
    )


def test_tolerance_stops_at_the_first_small_relative_change(x64):
    rng = np.random.default_rng(1)
    A, b = _spd(rng, 3, 20.0), rng.normal(size=3)
    solver = scan_optimize(_quadratic, optax.sgd(0.04), max_steps=1000, tol=1e-3)
    x, stats = solver(jnp.full(3, 0.1), jnp.asarray(A), jnp.asarray(b))
    expected, n = _gd_reference(A, b, np.full(3, 0.1), 0.04, 1000, tol=1e-3)
    assert 1 < n < 1000
    assert int(stats.n_steps) == n and bool(stats.converged)
    assert float(stats.rel_change) < 1e-3
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    capped, capped_stats = scan_optimize(
        _quadratic, optax.sgd(0.04), max_steps=n - 1, tol=1e-3
    )(jnp.full(3, 0.1), jnp.asarray(A), jnp.asarray(b))
    assert int(capped_stats.n_steps) == n - 1 and not bool(capped_stats.converged)
    np.testing.assert_allclose(
        capped, _gd_reference(A, b, np.full(3, 0.1), 0.04, n - 1)[0], rtol=1e-12
    )


def _lasso_cd(A, y, lam, sweeps=20_000):
    """Coordinate descent for 0.5 ||A x - y||^2 + lam ||x||_1 (exact per coordinate)."""
    x = np.zeros(A.shape[1])
    for _ in range(sweeps):
        old = x.copy()
        for j in range(A.shape[1]):
            residual = y - A @ x + A[:, j] * x[j]
            rho = A[:, j] @ residual
            x[j] = np.sign(rho) * max(abs(rho) - lam, 0) / (A[:, j] @ A[:, j])
        if np.max(np.abs(x - old)) < 1e-15:
            break
    return x


def test_lasso_solved_to_optimality_with_the_proximal_step(x64):
    rng = np.random.default_rng(2)
    A = rng.normal(size=(12, 6))
    y = A @ np.array([1.5, 0, 0, -2.0, 0, 0.3]) + 0.05 * rng.normal(size=12)
    lam = 2.0
    lr = float(1.0 / np.linalg.norm(A, 2) ** 2)

    def smooth(x, A, y):
        return 0.5 * jnp.sum((A @ x - y) ** 2)

    solver = scan_optimize(
        smooth,
        optax.sgd(lr),
        max_steps=20_000,
        tol=1e-13,
        prox=lambda x: soft_threshold(x, lr * lam),
    )
    x, stats = jax.jit(solver)(jnp.zeros(6), jnp.asarray(A), jnp.asarray(y))
    assert bool(stats.converged)
    np.testing.assert_allclose(x, _lasso_cd(A, y, lam), atol=1e-9)
    # KKT conditions of the lasso: the active set has an exact zero pattern.
    g = A.T @ (A @ np.asarray(x) - y)
    active = np.asarray(x) != 0
    assert active.sum() < 6
    np.testing.assert_allclose(g[active], -lam * np.sign(x[active]), atol=1e-8)
    assert np.all(np.abs(g[~active]) <= lam + 1e-8)


def test_vmap_keeps_per_example_convergence(x64):
    rng = np.random.default_rng(3)
    problems = [(_spd(rng, 3, c), rng.normal(size=3)) for c in (1.5, 10.0, 40.0)]
    As = jnp.asarray(np.stack([p[0] for p in problems]))
    bs = jnp.asarray(np.stack([p[1] for p in problems]))
    solver = scan_optimize(_quadratic, optax.sgd(0.02), max_steps=5000, tol=1e-6)
    xs, stats = jax.vmap(solver)(jnp.ones((3, 3)), As, bs)
    counts = []
    for i, (A, b) in enumerate(problems):
        expected, n = _gd_reference(A, b, np.ones(3), 0.02, 5000, tol=1e-6)
        counts.append(n)
        np.testing.assert_allclose(xs[i], expected, rtol=1e-12)
        single, single_stats = solver(jnp.ones(3), As[i], bs[i])
        np.testing.assert_allclose(xs[i], single, rtol=1e-14)
    assert len(set(counts)) == 3
    np.testing.assert_array_equal(stats.n_steps, counts)
    assert bool(jnp.all(stats.converged))


def test_learning_rate_schedule_is_per_iteration(x64):
    rng = np.random.default_rng(4)
    A, b = _spd(rng, 3, 4.0), rng.normal(size=3)
    schedule = optax.piecewise_constant_schedule(0.2, {3: 0.5, 6: 0.5})
    solver = scan_optimize(_quadratic, optax.sgd(schedule), max_steps=9)
    x, _ = solver(jnp.zeros(3), jnp.asarray(A), jnp.asarray(b))
    expected = np.zeros(3)
    for i in range(9):
        lr = 0.2 * 0.5 ** ((i >= 3) + (i >= 6))
        expected = expected - lr * (A @ expected - b)
    np.testing.assert_allclose(x, expected, rtol=1e-13)


def test_history_records_every_iteration(x64):
    rng = np.random.default_rng(5)
    A, b = _spd(rng, 3, 3.0), rng.normal(size=3)
    for tol in (None, 1e-2):
        solver = scan_optimize(
            _quadratic, optax.sgd(0.1), max_steps=50, tol=tol, history=True
        )
        _, stats = solver(jnp.ones(3), jnp.asarray(A), jnp.asarray(b))
        n = int(stats.n_steps)
        assert stats.objective_history is not None
        assert stats.rel_change_history is not None
        x, objectives = np.ones(3), []
        for _ in range(n):
            objectives.append(0.5 * x @ A @ x - b @ x)
            x = x - 0.1 * (A @ x - b)
        np.testing.assert_allclose(stats.objective_history[:n], objectives, rtol=1e-12)
        assert bool(jnp.all(jnp.isnan(stats.objective_history[n:])))
        assert float(stats.rel_change_history[n - 1]) == float(stats.rel_change)


def test_a_diverging_loop_stops_and_reports_it():
    A, b = jnp.eye(2) * 10.0, jnp.ones(2)
    for tol in (None, 1e-3):
        solver = scan_optimize(_quadratic, optax.sgd(1.0), max_steps=2000, tol=tol)
        x, stats = solver(jnp.ones(2), A, b)
        assert not bool(stats.finite)
        assert not bool(jnp.all(jnp.isfinite(x)))
        assert int(stats.n_steps) < 2000


# check_every: chunks of masked iterations --------------------------------------------


def _chunk_problem(case):
    """A Nesterov solve with a per-iteration schedule, a prox and pytree latents
    that stops on `tol` (at 113 iterations, mid-chunk for 2, 3 and 7), at
    `max_steps`, or at a non-finite iterate."""
    rng = np.random.default_rng(0)
    A = jnp.asarray(_spd(rng, 4, 8.0), jnp.float32)
    b = jnp.asarray(rng.normal(size=4), jnp.float32)
    lr, max_steps = {"tol": (0.05, 200), "max_steps": (0.05, 50)}.get(case, (1.0, 200))

    def objective(latents, A, b):
        x, y = latents
        return _quadratic(x, A, b) + 0.5 * jnp.sum((y - 0.3 * x[:2]) ** 2)

    def solver(check_every):
        return scan_optimize(
            objective,
            optax.sgd(
                optax.piecewise_constant_schedule(lr, {20: 0.5}),
                momentum=0.9,
                nesterov=True,
            ),
            max_steps=max_steps,
            tol=1e-3,
            prox=lambda latents: (soft_threshold(latents[0], 0.01), latents[1]),
            history=True,
            check_every=check_every,
        )

    return solver, (jnp.zeros(4), jnp.ones(2)), A, b


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@functools.cache
def _unchunked(case):
    solver, init, A, b = _chunk_problem(case)
    return jax.jit(solver(1))(init, A, b)


@pytest.mark.parametrize("case", ["tol", "max_steps", "non_finite"])
@pytest.mark.parametrize("check_every", [2, 3, 7, 201])
def test_chunked_loop_is_bitwise_the_plain_loop(case, check_every):
    solver, init, A, b = _chunk_problem(case)
    expected = _unchunked(case)
    n = int(expected[1].n_steps)
    if case == "tol":
        assert bool(expected[1].converged) and n == 113
    elif case == "max_steps":
        assert n == 50 and not bool(expected[1].converged)
    else:
        assert not bool(expected[1].finite) and n < 200
    _assert_bitwise_equal(jax.jit(solver(check_every))(init, A, b), expected)


def test_chunked_loop_under_vmap_keeps_per_example_counts(x64):
    rng = np.random.default_rng(3)
    problems = [(_spd(rng, 3, c), rng.normal(size=3)) for c in (1.5, 10.0, 40.0)]
    As = jnp.asarray(np.stack([p[0] for p in problems]))
    bs = jnp.asarray(np.stack([p[1] for p in problems]))

    def solve(check_every):
        solver = scan_optimize(
            _quadratic,
            optax.sgd(0.02, momentum=0.5),
            max_steps=5000,
            tol=1e-6,
            check_every=check_every,
        )
        return jax.vmap(solver)(jnp.ones((3, 3)), As, bs)

    expected = solve(1)
    assert len(set(np.asarray(expected[1].n_steps).tolist())) == 3
    for check_every in (4, 16):
        _assert_bitwise_equal(solve(check_every), expected)


# differentiation ----------------------------------------------------------------------


def test_stopped_gradient_mode_gives_zero_gradient(x64):
    A = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    solver = scan_optimize(_quadratic, optax.sgd(0.1), max_steps=30, tol=1e-4)

    def loss(b):
        x, _ = solver(jnp.zeros(2), A, b)
        return jnp.sum(x**2) + jnp.sum(b)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.ones(2)), np.ones(2))


def test_unrolled_gradient_matches_the_closed_form(x64):
    rng = np.random.default_rng(6)
    A = _spd(rng, 3, 4.0)
    K, lr = 25, 0.1
    solver = scan_optimize(_quadratic, optax.sgd(lr), max_steps=K, gradient="unroll")
    c = rng.normal(size=3)

    def loss(b):
        x, _ = solver(jnp.zeros(3), jnp.asarray(A), b)
        return jnp.asarray(c) @ x

    # From x_0 = 0, gradient descent gives x_K = (I - (I - lr A)^K) A^{-1} b.
    M = (np.eye(3) - np.linalg.matrix_power(np.eye(3) - lr * A, K)) @ np.linalg.inv(A)
    grad = jax.grad(loss)(jnp.asarray(rng.normal(size=3)))
    np.testing.assert_allclose(grad, M.T @ c, rtol=1e-10)


def test_unrolled_gradient_with_a_tolerance_stops_where_the_loop_stops(x64):
    rng = np.random.default_rng(7)
    A, b0 = _spd(rng, 3, 6.0), rng.normal(size=3)
    tol, lr = 1e-3, 0.05
    stopped = scan_optimize(_quadratic, optax.sgd(lr), max_steps=500, tol=tol)
    _, stats = stopped(jnp.ones(3), jnp.asarray(A), jnp.asarray(b0))
    n = int(stats.n_steps)
    unrolled = scan_optimize(
        _quadratic, optax.sgd(lr), max_steps=500, tol=tol, gradient="unroll"
    )
    fixed = scan_optimize(_quadratic, optax.sgd(lr), max_steps=n, gradient="unroll")

    def loss(solver, b):
        return jnp.sum(solver(jnp.ones(3), jnp.asarray(A), b)[0] ** 2)

    x_u, stats_u = unrolled(jnp.ones(3), jnp.asarray(A), jnp.asarray(b0))
    assert int(stats_u.n_steps) == n
    np.testing.assert_allclose(x_u, stopped(jnp.ones(3), jnp.asarray(A), b0)[0])
    np.testing.assert_allclose(
        jax.grad(lambda b: loss(unrolled, b))(jnp.asarray(b0)),
        jax.grad(lambda b: loss(fixed, b))(jnp.asarray(b0)),
        rtol=1e-12,
    )


# compilation, types, errors --------------------------------------------------------


def test_compiles_once_per_shape():
    solver = scan_optimize(_quadratic, optax.sgd(0.1), max_steps=20, tol=1e-3)
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(solver, max_traces=1))
    A = jnp.eye(3)
    x1, _ = counted(jnp.zeros(3), A, jnp.ones(3))
    x2, _ = counted(jnp.zeros(3), 2 * A, jnp.arange(3.0))
    plain, _ = solver(jnp.zeros(3), 2 * A, jnp.arange(3.0))
    np.testing.assert_allclose(x2, plain, rtol=1e-6)
    assert not np.allclose(x1, x2)


def test_pytree_latents_and_float32_stats():
    def objective(latents, target):
        return jnp.sum((latents["a"] - target) ** 2) + jnp.sum(latents["b"] ** 2)

    solver = scan_optimize(objective, optax.adam(0.1), max_steps=300, tol=1e-6)
    init = {"a": jnp.zeros(2), "b": jnp.ones(3)}
    out, stats = solver(init, jnp.array([1.0, -1.0]))
    assert isinstance(stats, OptimizeStats)
    assert out["a"].dtype == jnp.float32 and stats.objective.dtype == jnp.float32
    np.testing.assert_allclose(out["a"], [1.0, -1.0], atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_steps=0), "`max_steps` must be a positive integer, got 0"),
        (dict(max_steps=10, tol=-1.0), "`tol` must be a real number >= 0, got -1.0"),
        (dict(max_steps=10, tol=float("nan")), "`tol` must be a real number >= 0"),
        (dict(max_steps=10, eps=-1.0), "`eps` must be a finite real number >= 0"),
        (dict(max_steps=10, check_every=0), "`check_every` must be a positive integer"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=f"scan_optimize: {match}"):
        scan_optimize(_quadratic, optax.sgd(0.1), **kwargs)


def test_unknown_gradient_mode_raises():
    # Under the test suite's type checking the `Literal` annotation catches it first;
    # without it, the function's own check does.
    with pytest.raises((ValueError, TypeCheckError), match="gradient"):
        scan_optimize(
            _quadratic,
            optax.sgd(0.1),
            max_steps=3,
            gradient="implicit",  # pyright: ignore
        )


def test_bad_callables_and_latents_raise():
    # A wrong type is caught by the annotations (TypeCheckError, a TypeError) under
    # the suite's type checking, else by the function's own check; both name it.
    with pytest.raises(TypeError, match="objective"):
        scan_optimize(3, optax.sgd(0.1), max_steps=3)  # pyright: ignore
    with pytest.raises(TypeError, match="optimizer"):
        scan_optimize(_quadratic, "sgd", max_steps=3)  # pyright: ignore
    solver = scan_optimize(_quadratic, optax.sgd(0.1), max_steps=3)
    with pytest.raises(TypeError, match="scan_optimize: `init` must be"):
        solver(jnp.zeros(3, int), jnp.eye(3), jnp.ones(3))
