"""The hierarchical Rössler data set: a slow Rössler system modulating a fast one.

`make_rossler` integrates the coupled system with diffrax (Tsit5, adaptive steps),
drops a transient and projects noisy observed coordinates to `obs_dim` channels. It
is a data generator for examples and tests, and the only module that uses diffrax.
"""

import math
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from transforms.validation import check_in_range, check_size, describe, fail


class RosslerSample(NamedTuple):
    """A trajectory of the hierarchical Rössler system
    ([`eqx_models.tidhy.make_rossler`][]).

    - `observations`: shape `(T, obs_dim)`: the observed coordinates plus noise,
        randomly projected, each channel scaled to max |·| = 1.
    - `latents`: the full state `(x_s, y_s, z_s, x_f, y_f, z_f)` (slow then fast),
        shape `(T, 6)`.
    - `states`: a discrete label, 1 where the slow system is in its `x_s > 0`
        half-cycle, else 0, shape `(T,)`.
    - `timescales`: the nominal rotation periods of the slow and the fast system
        in steps, `2π / (rate · dt)` (Rössler oscillators turn at about one radian per
        unit of their own time), shape `(2,)`.
    """

    observations: Float[Array, "T D"]
    latents: Float[Array, "T 6"]
    states: Int[Array, " T"]
    timescales: Float[Array, " 2"]


def rossler_vector_field(t, y, args):
    """The hierarchical Rössler vector field (slow system modulating the fast one).

    The slow system `(x_s, y_s, z_s)` is a Rössler oscillator (parameters
    `a_slow, b_slow, c_slow`) running at `slow_rate` times the speed of the fast one.
    It sets the fast system's `b = clip(b_base + coupling_b x_s, 0.01, 1)` and
    `c = clip(c_base + coupling_c z_s, 2, 10)`.

    **Arguments:**

    - `t`: the time (unused: the system is autonomous).
    - `y`: the state `(x_s, y_s, z_s, x_f, y_f, z_f)`, shape `(6,)`.
    - `args`: the nine parameters `(a_slow, b_slow, c_slow, a_fast, b_base,
        c_base, coupling_b, coupling_c, slow_rate)`.

    **Returns:**

    `dy/dt`, shape `(6,)`.

    **Raises:**

    `TypeError`/`ValueError` if `y` is not an array of shape `(6,)` or `args` is
    not a sequence of nine parameters (checked at trace time).
    """
    del t
    name = "rossler_vector_field"
    expected = "a state of shape (6,): (x_s, y_s, z_s, x_f, y_f, z_f)"
    if not hasattr(y, "shape"):
        raise fail(name, "y", expected, describe(y), TypeError)
    if y.shape != (6,):
        raise fail(name, "y", expected, f"shape {y.shape}")
    expected = (
        "the 9 parameters (a_slow, b_slow, c_slow, a_fast, b_base, c_base, "
        "coupling_b, coupling_c, slow_rate)"
    )
    if not isinstance(args, (tuple, list)):
        raise fail(name, "args", expected, describe(args), TypeError)
    if len(args) != 9:
        raise fail(name, "args", expected, f"{len(args)} values")
    a_s, b_s, c_s, a_f, b_base, c_base, coupling_b, coupling_c, rate = args
    xs, ys, zs, xf, yf, zf = y
    b_f = jnp.clip(b_base + coupling_b * xs, 0.01, 1.0)
    c_f = jnp.clip(c_base + coupling_c * zs, 2.0, 10.0)
    return jnp.stack(
        [
            rate * (-ys - zs),
            rate * (xs + a_s * ys),
            rate * (b_s + zs * (xs - c_s)),
            -yf - zf,
            xf + a_f * yf,
            b_f + zf * (xf - c_f),
        ]
    )


@eqx.filter_jit
def _solve(y0, args, dt, n_steps, transient_steps, rtol, atol):
    total = n_steps + transient_steps
    ts = dt * jnp.arange(transient_steps, total, dtype=y0.dtype)
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(rossler_vector_field),
        diffrax.Tsit5(),
        t0=0.0,
        t1=dt * (total - 1),
        dt0=dt,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=16 * total + 4096,
    )
    assert solution.ys is not None
    return solution.ys


def make_rossler(
    n_steps: int,
    *,
    key: PRNGKeyArray,
    dt: float = 0.01,
    transient_steps: int = 1000,
    slow_rate: float = 0.1,
    a_slow: float = 0.1,
    b_slow: float = 0.1,
    c_slow: float = 1.0,
    a_fast: float = 0.2,
    b_base: float = 0.2,
    c_base: float = 5.7,
    coupling_b: float = 0.5,
    coupling_c: float = 1.0,
    observed: tuple[int, ...] = (2, 3, 4),
    obs_dim: int = 16,
    noise: float = 0.1,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> RosslerSample:
    """Sample the hierarchical Rössler data set, integrated with diffrax.

    Integrates [`eqx_models.tidhy.rossler_vector_field`][] with Tsit5 and an
    adaptive step (`rtol`, `atol`), from `N(0, 0.25)` around `(0, 0, 0, 1, 1, 1)`,
    discards `transient_steps` samples, and records `n_steps` samples `dt` apart. The
    `observed` coordinates (default `z_s, x_f, y_f`) get Gaussian noise of standard
    deviation `noise`, are projected to `obs_dim` by a Gaussian matrix and scaled per
    channel. Deterministic given `key`.

    The defaults follow the revision's data set with one change: the slow system
    runs at `slow_rate = 0.1` of the fast one's speed so that the two timescales are
    separated (`slow_rate = 1` gives two oscillators of similar speed). The fast `c`
    base is 5.7, the classic Rössler value (a base above 10 is always clipped to 10).

    **Arguments:**

    - `n_steps`: the number of recorded samples `T`.
    - `key`: PRNG key (initial state, noise, projection).
    - `dt`: the sampling interval.
    - `transient_steps`: samples discarded at the start.
    - the system's parameters, as in [`eqx_models.tidhy.rossler_vector_field`][].
    - `observed`: indices into `(x_s, y_s, z_s, x_f, y_f, z_f)`.
    - `obs_dim`, `noise`: projection size and observation noise.
    - `rtol`, `atol`: the solver tolerances.

    **Returns:**

    A [`eqx_models.tidhy.RosslerSample`][].

    **Raises:**

    `ValueError` for `n_steps < 2`, a negative `transient_steps`, non-positive `dt`,
    `slow_rate`, `rtol` or `atol`, a negative `noise`, a non-finite parameter, or an
    `observed` index outside 0..5; `TypeError` for a count that is not an integer.
    """
    name = "make_rossler"
    n_steps = check_size(name, "n_steps", n_steps, minimum=2)
    transient_steps = check_size(name, "transient_steps", transient_steps, minimum=0)
    obs_dim = check_size(name, "obs_dim", obs_dim)
    for arg, value in (
        ("dt", dt),
        ("slow_rate", slow_rate),
        ("rtol", rtol),
        ("atol", atol),
    ):
        check_in_range(name, arg, value, low=0, inclusive=(False, True))
    check_in_range(name, "noise", noise, low=0)
    for arg, value in (
        ("a_slow", a_slow),
        ("b_slow", b_slow),
        ("c_slow", c_slow),
        ("a_fast", a_fast),
        ("b_base", b_base),
        ("c_base", c_base),
        ("coupling_b", coupling_b),
        ("coupling_c", coupling_c),
    ):
        check_in_range(name, arg, value)
    if len(observed) == 0:
        raise fail(name, "observed", "a non-empty tuple of indices in 0..5", "()")
    for i, index in enumerate(observed):
        check_size(name, f"observed[{i}]", index, minimum=0, maximum=5)
    ikey, nkey, pkey = jr.split(key, 3)
    dtype = jnp.zeros(()).dtype
    y0 = 0.5 * jr.normal(ikey, (6,), dtype) + jnp.array([0, 0, 0, 1, 1, 1], dtype)
    args = tuple(
        jnp.asarray(v, dtype)
        for v in (
            a_slow,
            b_slow,
            c_slow,
            a_fast,
            b_base,
            c_base,
            coupling_b,
            coupling_c,
            slow_rate,
        )
    )
    latents = _solve(y0, args, float(dt), n_steps, transient_steps, rtol, atol)
    seen = latents[:, jnp.asarray(observed)]
    seen = seen + noise * jr.normal(nkey, seen.shape, dtype)
    observations = seen @ jr.normal(pkey, (len(observed), obs_dim), dtype)
    observations = observations / jnp.max(jnp.abs(observations), axis=0)
    periods = jnp.array([2 * math.pi / (slow_rate * dt), 2 * math.pi / dt], dtype)
    return RosslerSample(
        observations=observations,
        latents=latents,
        states=(latents[:, 0] > 0).astype(jnp.int32),
        timescales=periods,
    )
