"""Compiled inner optimisation loops over latent variables: `scan_optimize`.

For models whose latents are solved for at every step (sparse coding, TiDHy), each
iteration is an optax update, an optional proximal map such as `soft_threshold`,
and a relative-change test, compiled as a `lax.scan` (a fixed number of steps) or a
`lax.while_loop` (with a tolerance), with diagnostics of how the solve went.
"""

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_in_range,
    check_optimizer,
    check_size,
    typechecked,
)


@typechecked
def soft_threshold(x: Float[Array, "*shape"], threshold: ArrayLike) -> Array:
    """The proximal operator of `threshold * ||x||_1`: shrink towards zero.

    Computes `sign(x) * max(|x| - threshold, 0)` elementwise, so entries with
    `|x| <= threshold` become exactly 0 and the others move `threshold` towards 0.

    **Arguments:**

    - `x`: any floating-point array.
    - `threshold`: a non-negative scalar or an array broadcastable to `x`.

    **Returns:**

    An array of the shape and dtype of `x`. Its derivative is 1 where
    `|x| > threshold` and 0 elsewhere.

    **Raises:**

    `ValueError` if `threshold` is negative (it would grow entries instead of
    shrinking them) or NaN: at once when concrete, by `eqx.error_if` when traced.

    !!! example

        ```python
        soft_threshold(jnp.array([-2.0, 0.3, 1.5]), 0.5)  # [-1.5, 0.0, 1.0]
        ```
    """
    threshold = check_in_range(
        "soft_threshold", "threshold", threshold, low=0, finite=False
    )
    threshold = jnp.asarray(threshold, x.dtype)
    # `where` rather than `maximum`: the derivative at |x| = threshold is 0 (as for a
    # ReLU), not the 1/2 that `maximum` gives at a tie.
    return jnp.where(jnp.abs(x) > threshold, x - jnp.sign(x) * threshold, 0)


class OptimizeStats(NamedTuple):
    """Diagnostics of a [`transforms.scan_optimize`][] solve.

    Every field is an array (under `vmap`, one value per example):

    - `n_steps`: iterations performed (integer).
    - `converged`: whether the relative-change test passed (always `False` in
        fixed-iteration mode, where no tolerance is given).
    - `rel_change`: the relative change of the last iteration (the largest of the
        values the relative-change function returned); `inf` before any iteration.
    - `objective`: the objective at the returned solution.
    - `finite`: whether every entry of the solution is finite. A solve whose iterate
        becomes non-finite stops at that iteration with `finite=False`.
    - `objective_history`, `rel_change_history`: with `history=True`, arrays of
        length `max_steps`: the objective at the iterate each update started from,
        and each update's relative change; NaN after the last iteration. `None`
        otherwise.
    """

    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    rel_change: Float[Array, ""]
    objective: Float[Array, ""]
    finite: Bool[Array, ""]
    objective_history: Array | None = None
    rel_change_history: Array | None = None


def _leaf_relative_change(new, old, eps):
    """One value per leaf: the Frobenius norm of the change over that of the old."""
    changes = [
        jnp.linalg.norm((n - o).ravel()) / (jnp.linalg.norm(o.ravel()) + eps)
        for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old))
    ]
    return jnp.stack(changes)


def _all_finite(tree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _stop_inexact(tree):
    return jax.tree.map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_inexact_array(a) else a, tree
    )


class _Carry(NamedTuple):
    step: Array
    latents: Any
    opt_state: Any
    converged: Array
    finite: Array
    rel_change: Array
    objective_history: Array | None
    rel_change_history: Array | None


class ScanOptimizer(eqx.Module):
    """An inner optimisation loop over latent variables; see
    [`transforms.scan_optimize`][].

    Call it as `solver(init, *args)`; it returns `(solution, stats)` with `stats` an
    [`transforms.OptimizeStats`][].
    """

    objective: Callable
    optimizer: optax.GradientTransformation
    prox: Callable | None
    relative_change: Callable | None
    max_steps: int = eqx.field(static=True)
    tol: float | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    gradient: str = eqx.field(static=True)
    history: bool = eqx.field(static=True)
    check_every: int = eqx.field(default=1, static=True)

    def _rel_change(self, new, old) -> Array:
        if self.relative_change is None:
            values = _leaf_relative_change(new, old, self.eps)
        else:
            values = jnp.asarray(self.relative_change(new, old))
        return values

    def _iterate(self, carry: _Carry, args) -> _Carry:
        value, grads = jax.value_and_grad(self.objective)(carry.latents, *args)
        updates, opt_state = self.optimizer.update(
            grads, carry.opt_state, carry.latents
        )
        new = optax.apply_updates(carry.latents, updates)
        if self.prox is not None:
            new = self.prox(new)
        values = self._rel_change(new, carry.latents)
        rel_change = jnp.max(values).astype(carry.rel_change.dtype)
        converged = (
            jnp.all(values < self.tol) if self.tol is not None else jnp.zeros((), bool)
        )
        objective_history, rel_change_history = (
            carry.objective_history,
            carry.rel_change_history,
        )
        if objective_history is not None and rel_change_history is not None:
            objective_history = objective_history.at[carry.step].set(
                value.astype(objective_history.dtype)
            )
            rel_change_history = rel_change_history.at[carry.step].set(rel_change)
        return _Carry(
            step=carry.step + 1,
            latents=new,
            opt_state=opt_state,
            converged=converged,
            finite=_all_finite(new),
            rel_change=rel_change,
            objective_history=objective_history,
            rel_change_history=rel_change_history,
        )

    def _active(self, carry: _Carry) -> Array:
        return (carry.step < self.max_steps) & ~carry.converged & carry.finite

    def _masked_iterate(self, carry: _Carry, args) -> _Carry:
        """One iteration that leaves the carry as it is once the loop has stopped
        (converged, non-finite or at `max_steps`)."""
        new = self._iterate(carry, args)
        active = self._active(carry)
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry)

    def _chunk(self, carry: _Carry, args) -> _Carry:
        """One trip of the while loop: `check_every` masked iterations.

        A rolled inner loop, not an unrolled one: XLA then compiles one iteration
        once, as a loop body, whatever `check_every` is, so every value gives the
        same bits (unrolled copies are fused with their neighbours, and a
        multiply-add fused across an iteration boundary rounds differently). Its
        trip count is static, so on a GPU it runs without reading a predicate
        back to the host.
        """
        carry, _ = jax.lax.scan(
            lambda c, _: (self._masked_iterate(c, args), None),
            carry,
            None,
            length=min(self.check_every, self.max_steps),
        )
        return carry

    def __call__(self, init, *args) -> tuple[Any, OptimizeStats]:
        """Run the loop from `init`.

        **Arguments:**

        - `init`: the starting latents, any pytree of floating-point arrays.
        - `*args`: passed to the objective after the latents (model parameters,
            data). Pass arrays here rather than closing over them in the objective,
            so that they stay inputs of a compiled function.

        **Returns:**

        `(solution, stats)`: the latents after the last iteration (same structure as
        `init`) and an [`transforms.OptimizeStats`][].

        **Raises:**

        `TypeError` if `init` is not a non-empty pytree of floating-point arrays;
        the objective's own errors.
        """
        leaves = jax.tree.leaves(init)
        if not leaves or not all(eqx.is_inexact_array(x) for x in leaves):
            raise TypeError(
                "scan_optimize: `init` must be a non-empty pytree of floating-point "
                f"arrays, got {init!r}."
            )
        if self.gradient == "stop":
            init, args = _stop_inexact((init, args))
        dtype = jnp.result_type(*leaves)
        real_dtype = jnp.finfo(dtype).dtype
        histories = (
            (
                jnp.full((self.max_steps,), jnp.nan, real_dtype),
                jnp.full((self.max_steps,), jnp.nan, real_dtype),
            )
            if self.history
            else (None, None)
        )
        carry = _Carry(
            step=jnp.zeros((), jnp.int32),
            latents=init,
            opt_state=self.optimizer.init(init),
            converged=jnp.zeros((), bool),
            finite=_all_finite(init),
            rel_change=jnp.full((), jnp.inf, real_dtype),
            objective_history=histories[0],
            rel_change_history=histories[1],
        )
        if self.tol is None:
            # Fixed iteration count: a scan, reverse-differentiable as it is. A
            # non-finite iterate freezes the loop so the diagnostics name it.
            def scan_body(carry, _):
                new = self._iterate(carry, args)
                keep = carry.finite
                return jax.tree.map(
                    lambda n, o: jnp.where(keep, n, o), new, carry
                ), None

            carry, _ = jax.lax.scan(scan_body, carry, None, length=self.max_steps)
        elif self.gradient == "unroll":
            # A while loop cannot be reverse-differentiated: run the cap as a scan in
            # which iterations after convergence leave the carry unchanged.
            carry, _ = jax.lax.scan(
                lambda c, _: (self._masked_iterate(c, args), None),
                carry,
                None,
                length=self.max_steps,
            )
        else:
            # The predicate is tested once per chunk of `check_every` iterations
            # (on a GPU, every test is a copy to the host); the iterations of a
            # chunk past the stopping point are no-ops.
            carry = jax.lax.while_loop(
                self._active, lambda c: self._chunk(c, args), carry
            )
        solution = carry.latents
        objective = self.objective(solution, *args)
        if self.gradient == "stop":
            solution = _stop_inexact(solution)
            objective = jax.lax.stop_gradient(objective)
        stats = OptimizeStats(
            n_steps=carry.step,
            converged=carry.converged,
            rel_change=carry.rel_change,
            objective=jnp.asarray(objective, real_dtype),
            finite=carry.finite,
            objective_history=carry.objective_history,
            rel_change_history=carry.rel_change_history,
        )
        return solution, stats


def scan_optimize(
    objective: Callable,
    optimizer: optax.GradientTransformation,
    *,
    max_steps: int,
    tol: float | None = None,
    prox: Callable | None = None,
    relative_change: Callable | None = None,
    eps: float = 1e-16,
    gradient: Literal["stop", "unroll"] = "stop",
    history: bool = False,
    check_every: int = 1,
) -> ScanOptimizer:
    """Minimise an objective over latent variables with a compiled optax loop.

    Each iteration takes the gradient of `objective(latents, *args)` with respect to
    the latents, applies one `optimizer` update, then the proximal map `prox` (e.g.
    [`transforms.soft_threshold`][] for an L1 penalty), and measures the relative
    change of the latents against the iterate the update started from. With
    `tol=None` it runs exactly `max_steps` iterations in a `lax.scan`; with a `tol`
    it stops at the first iteration whose relative changes are all strictly below
    `tol`, or after `max_steps` (a `lax.while_loop`). A non-finite iterate stops the
    loop and is reported in the diagnostics (`finite=False`).

    The optimiser state is initialised at every call, so optax schedules inside the
    optimiser are per-iteration learning-rate schedules: their count is the
    iteration index. Different latents can use different optimisers or schedules
    through `optax.multi_transform`.

    Under `jax.vmap` each example keeps its own iteration count and convergence: the
    loop runs until the last example stops, and examples that have stopped are left
    unchanged.

    **Arguments:**

    - `objective`: `objective(latents, *args) -> scalar` to minimise.
    - `optimizer`: an `optax.GradientTransformation` acting on the latents.
    - `max_steps`: the number of iterations (fixed mode) or the iteration cap.
    - `tol`: the relative-change tolerance, or `None` for a fixed iteration count.
    - `prox`: a function `latents -> latents` applied after each update, or `None`.
    - `relative_change`: `relative_change(new, old) -> array`, the values compared
        with `tol` (all must be below it). Default: one value per leaf,
        `||new - old||_F / (||old||_F + eps)`.
    - `eps`: added to the norm of the old iterate in the default relative change.
    - `gradient`: how the solution depends on `init` and `args` under autodiff.
        `"stop"`: not at all (the solution is treated as a constant; inputs are
        stop-gradiented before the loop, so the loop is never differentiated).
        `"unroll"`: differentiate through every iteration (reverse mode works with a
        tolerance too; the loop then always runs `max_steps` masked iterations).
    - `history`: also record the objective and relative change of every iteration.
    - `check_every`: with a `tol` (and `gradient="stop"`), how many iterations each
        trip of the `lax.while_loop` runs before the stopping rule is tested again.
        Iterations of a trip that come after the stopping point (convergence, a
        non-finite iterate or `max_steps`) leave the latents, optimiser state and
        diagnostics unchanged, so the results are bit-identical for every value;
        only the speed changes. On a GPU the loop's predicate is copied to the host
        at every trip, a fixed latency per test: a value such as 8 or 16 removes
        most of those round trips at the cost of at most `check_every - 1` wasted
        iterations per solve. On a CPU there is no such round trip and 1 (the
        default) is fastest. Unused in the other modes, which have no tests.

    **Returns:**

    A [`transforms.ScanOptimizer`][]; call it as `solver(init, *args)` to get
    `(solution, stats)` with `stats` an [`transforms.OptimizeStats`][].

    **Raises:**

    `ValueError` for `max_steps < 1` or `check_every < 1`, a negative or NaN `tol`,
    a negative or non-finite `eps`, or an unknown `gradient`; `TypeError` if
    `objective`, `prox` or `relative_change` is not callable, `optimizer` is not an
    optax transformation, `max_steps` or `check_every` is not an integer or
    `history` not a bool.

    !!! example

        ```python
        def lasso(x, A, y):
            return 0.5 * jnp.sum((A @ x - y) ** 2)

        lam, lr = 0.1, 0.01
        solver = scan_optimize(
            lasso,
            optax.sgd(lr),
            max_steps=5000,
            tol=1e-6,
            prox=lambda x: soft_threshold(x, lr * lam),
        )
        x, stats = solver(jnp.zeros(n), A, y)  # ISTA
        ```
    """
    name = "scan_optimize"
    check_callable(name, "objective", objective)
    check_optimizer(name, "optimizer", optimizer)
    for arg, fn in (("prox", prox), ("relative_change", relative_change)):
        if fn is not None:
            check_callable(name, arg, fn)
    check_size(name, "max_steps", max_steps)
    if tol is not None:
        check_in_range(name, "tol", tol, low=0, finite=False)
    check_in_range(name, "eps", eps, low=0)
    check_choice(name, "gradient", gradient, ("stop", "unroll"))
    check_bool(name, "history", history)
    check_every = check_size(name, "check_every", check_every)
    return ScanOptimizer(
        objective=objective,
        optimizer=optimizer,
        prox=prox,
        relative_change=relative_change,
        max_steps=max_steps,
        tol=None if tol is None else float(tol),
        eps=float(eps),
        gradient=gradient,
        history=history,
        check_every=check_every,
    )
