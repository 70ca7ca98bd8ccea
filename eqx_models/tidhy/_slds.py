"""The multi-timescale switching linear dynamical system of the TiDHy benchmarks.

Each system switches between two regimes of known timescale by a sticky Markov
chain; the systems' emissions are partly superposed and randomly projected. The
known timescales and states are what the metrics are checked against; a data
generator for examples and tests.
"""

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import check_in_range, check_size


# The paper's six (system, state) regimes: the dynamics' eigenvalues are
# exp(a) ± 2πi f; system i uses entries 2i and 2i + 1.
PAPER_LOG_DECAY = (-0.025, -0.25, -0.1, -0.5, -0.015, -0.75)
PAPER_FREQUENCY = (0.0075, 0.05, 0.025, 0.075, 0.01, 0.075)


class SLDSSample(NamedTuple):
    """A trajectory of [`eqx_models.tidhy.SwitchingLDS`][].

    - `observations`: shape `(T, obs_dim)`, each channel scaled to max |·| = 1.
    - `latents`: the continuous states, `(T, n_systems, 2)`, each coordinate scaled
        to max |·| = 1 (scaling does not change timescales).
    - `states`: the discrete state of every system, `(T, n_systems)`, in {0, 1}.
    - `combined_state`: `Σ_i states[:, i] 2^i`, one of `2^n_systems` labels, `(T,)`.
    - `occupancy_ok`: whether every discrete state of every system holds at least
        `min_occupancy` of the time (the sampler redraws the switching sequence
        until it does, up to `max_attempts` times).
    """

    observations: Float[Array, "T D"]
    latents: Float[Array, "T n 2"]
    states: Int[Array, "T n"]
    combined_state: Int[Array, " T"]
    occupancy_ok: Bool[Array, ""]


def _rotation(theta):
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.array([[c, -s], [s, c]])


# One compiled function for every random parameter: run op by op, each random draw
# would be compiled on its own (seconds on a CPU); the values are the same.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _parameters(key, a, f, stickiness, emission_dim, obs_dim, channels):
    n_systems = a.shape[0]
    skey, ckey, bkey, ekey, dkey, pkey = jr.split(key, 6)
    angles = jr.uniform(skey, (n_systems, 2), minval=0, maxval=2 * math.pi)
    stretch = jr.uniform(ckey, (n_systems, 2), minval=0.5, maxval=1.5)

    def regime(a, f, angle, stretch):
        S = _rotation(angle) @ jnp.diag(jnp.array([1.0, stretch]))
        nu = 2 * math.pi * f
        R = jnp.array([[jnp.exp(a), -nu], [nu, jnp.exp(a)]])
        return S @ R @ jnp.linalg.inv(S)

    dynamics = jax.vmap(jax.vmap(regime))(a, f, angles, stretch)
    biases = jr.uniform(bkey, (n_systems, 2, 2), minval=-1, maxval=1)
    emissions = jr.normal(ekey, (n_systems, emission_dim, 2))
    emission_offsets = jr.normal(dkey, (n_systems, emission_dim))
    projection = jr.normal(pkey, (obs_dim, channels))
    P = stickiness * jnp.eye(2) + (1 - stickiness)
    transition_matrix = P / P.sum(axis=1, keepdims=True)
    return dynamics, biases, emissions, emission_offsets, projection, transition_matrix


class SwitchingLDS(eqx.Module):
    """The multi-timescale switching linear dynamical system benchmark.

    `n_systems` independent systems, each with a 2-D latent `z` and two discrete
    states with their own dynamics `z_t = A_{s_t} z_{t-1} + b_{s_t} + noise`, where
    `A = S [[e^a, -2πf], [2πf, e^a]] S⁻¹` (`S` a random invertible matrix) has the
    eigenvalues `λ = e^a ± 2πi f`, as in the paper's generator: the timescale of
    regime `(i, k)` is `τ = 1 / |ln|λ||` steps. The discrete states switch by a
    sticky Markov chain. Each system emits `emission_dim` channels `C z + d + noise`;
    the first `overlap` channels of all systems are summed (partial superposition)
    and the rest kept per system, and the result is projected to `obs_dim` by a
    Gaussian matrix.

    Defaults reproduce the paper's benchmark: 3 systems with regimes
    `a = (-.025, -.25, -.1, -.5, -.015, -.75)`, `f = (.0075, .05, .025, .075, .01,
    .075)` (slow and fast per system; τ ≈ (41.9, 5.7), (11.7, 3.8), (77, 2.5)
    steps), stay probability 0.976 (mean dwell ≈ 41 steps), biases `U(-1, 1)`, 3
    emission channels of which 2 superposed (5 channels), projection to 20.
    """

    dynamics: Float[Array, "n 2 2 2"]
    biases: Float[Array, "n 2 2"]
    emissions: Float[Array, "n e 2"]
    emission_offsets: Float[Array, "n e"]
    projection: Float[Array, "D c"]
    transition_matrix: Float[Array, "2 2"]
    log_decay: Float[Array, "n 2"]
    frequency: Float[Array, "n 2"]
    dynamics_noise: float = eqx.field(static=True)
    emission_noise: float = eqx.field(static=True)
    overlap: int = eqx.field(static=True)

    def __init__(
        self,
        *,
        key: PRNGKeyArray,
        n_systems: int = 3,
        log_decay: tuple[float, ...] = PAPER_LOG_DECAY,
        frequency: tuple[float, ...] = PAPER_FREQUENCY,
        stickiness: float = 0.975,
        obs_dim: int = 20,
        emission_dim: int = 3,
        overlap: int = 2,
        dynamics_noise: float = 0.05,
        emission_noise: float = 0.01,
    ):
        """**Arguments:**

        - `key`: PRNG key for every random parameter.
        - `n_systems`: the number of independent systems.
        - `log_decay`, `frequency`: `2 n_systems` values each (`a` and `f`), regime
            `(i, k)` at index `2 i + k`; every `|λ|` must be below 1 (stable).
        - `stickiness`: the switching matrix is `stickiness I + (1 - stickiness)`
            with rows normalised.
        - `obs_dim`: the observation dimension after the random projection.
        - `emission_dim`, `overlap`: channels per system, and how many of them are
            summed across systems.
        - `dynamics_noise`, `emission_noise`: standard deviations of the Gaussian
            noises.

        **Raises:**

        `ValueError` for inconsistent sizes, an unstable regime (`|λ| >= 1`), or a
        non-finite parameter; `TypeError` for a size that is not an integer.
        """
        name = "SwitchingLDS"
        check_size(name, "n_systems", n_systems)
        check_size(name, "obs_dim", obs_dim)
        check_size(name, "emission_dim", emission_dim)
        check_size(name, "overlap", overlap, minimum=0, maximum=emission_dim)
        for arg, values in (("log_decay", log_decay), ("frequency", frequency)):
            for i, value in enumerate(values):
                check_in_range(name, f"{arg}[{i}]", value)
        check_in_range(
            name, "stickiness", stickiness, low=0, high=1, inclusive=(False, True)
        )
        check_in_range(name, "dynamics_noise", dynamics_noise, low=0)
        check_in_range(name, "emission_noise", emission_noise, low=0)
        if len(log_decay) != 2 * n_systems or len(frequency) != 2 * n_systems:
            raise ValueError(
                f"SwitchingLDS: `log_decay` and `frequency` need 2 * n_systems = "
                f"{2 * n_systems} values, got {len(log_decay)} and {len(frequency)}."
            )
        moduli = [
            math.hypot(math.exp(a), 2 * math.pi * f)
            for a, f in zip(log_decay, frequency)
        ]
        if any(not m < 1 for m in moduli):
            raise ValueError(
                "SwitchingLDS: every regime must be stable, |exp(a) ± 2πi f| < 1; got "
                f"moduli {[round(m, 4) for m in moduli]}."
            )
        a = jnp.asarray(log_decay, float).reshape(n_systems, 2)
        f = jnp.asarray(frequency, float).reshape(n_systems, 2)
        channels = overlap + n_systems * (emission_dim - overlap)
        (
            self.dynamics,
            self.biases,
            self.emissions,
            self.emission_offsets,
            self.projection,
            self.transition_matrix,
        ) = _parameters(key, a, f, stickiness, emission_dim, obs_dim, channels)
        self.log_decay = a
        self.frequency = f
        self.dynamics_noise = float(dynamics_noise)
        self.emission_noise = float(emission_noise)
        self.overlap = overlap

    @property
    def timescales(self) -> Float[Array, "n 2"]:
        """The true timescale `1 / |ln|λ||` (in steps) of every (system, state)
        regime, shape `(n_systems, 2)`."""
        modulus = jnp.hypot(jnp.exp(self.log_decay), 2 * math.pi * self.frequency)
        return 1.0 / jnp.abs(jnp.log(modulus))

    def sample(
        self,
        n_steps: int,
        *,
        key: PRNGKeyArray,
        min_occupancy: float = 0.45,
        max_attempts: int = 100,
    ) -> SLDSSample:
        """Draw one trajectory, deterministically from `key`.

        **Arguments:**

        - `n_steps`: the number of time steps `T`.
        - `key`: PRNG key for the switching, the initial states and the noises.
        - `min_occupancy`: redraw the switching until every discrete state of every
            system holds at least this fraction of the steps (0 disables it).
        - `max_attempts`: the most redraws; `occupancy_ok` says whether it worked.

        **Returns:**

        An [`eqx_models.tidhy.SLDSSample`][].

        **Raises:**

        `ValueError` if `n_steps < 2`, `min_occupancy` is outside `[0, 0.5]` (or
        NaN) or `max_attempts < 1`; `TypeError` for a count that is not an integer.
        """
        name = "SwitchingLDS.sample"
        n_steps = check_size(name, "n_steps", n_steps, minimum=2)
        check_in_range(name, "min_occupancy", min_occupancy, low=0, high=0.5)
        max_attempts = check_size(name, "max_attempts", max_attempts)
        return _sample(self, n_steps, key, min_occupancy, max_attempts)


def _switching(P, uniforms):
    """A two-state Markov chain per system from uniforms of shape (T, n_systems)."""
    s0 = (uniforms[0] < 0.5).astype(jnp.int32)

    def step(s, u):
        s = jnp.where(u < P[s, s], s, 1 - s)
        return s, s

    _, rest = jax.lax.scan(step, s0, uniforms[1:])
    return jnp.concatenate([s0[None], rest], axis=0)


@eqx.filter_jit
def _sample(system: SwitchingLDS, n_steps, key, min_occupancy, max_attempts):
    n_systems = system.dynamics.shape[0]
    n_emitted = system.emissions.shape[1]
    skey, gkey = jr.split(key)

    def occupancy_ok(states):
        fraction = jnp.mean(states.astype(system.dynamics.dtype), axis=0)
        return jnp.all((fraction >= min_occupancy) & (1 - fraction >= min_occupancy))

    def draw(attempt):
        uniforms = jr.uniform(jr.fold_in(skey, attempt), (n_steps, n_systems))
        return _switching(system.transition_matrix, uniforms)

    def cond(carry):
        attempt, states = carry
        return (attempt < max_attempts) & ((attempt == 0) | ~occupancy_ok(states))

    def body(carry):
        attempt, _ = carry
        return attempt + 1, draw(attempt)

    # Attempt 0 is drawn inside the loop too, so the chain is compiled once.
    empty = jnp.zeros((n_steps, n_systems), jnp.int32)
    _, states = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), empty))

    # Every Gaussian draw comes from one call (random-bit generation dominates the
    # size of the compiled function): initial states, dynamics and emission noise.
    sizes = (
        n_systems * 2,
        (n_steps - 1) * n_systems * 2,
        n_steps * n_systems * n_emitted,
    )
    gauss = jr.normal(gkey, (sum(sizes),))
    z0 = gauss[: sizes[0]].reshape(n_systems, 2)
    noise = gauss[sizes[0] : sizes[0] + sizes[1]].reshape(n_steps - 1, n_systems, 2)
    noise = system.dynamics_noise * noise
    emission_noise = gauss[sizes[0] + sizes[1] :].reshape(n_steps, n_systems, n_emitted)
    systems = jnp.arange(n_systems)

    def step(z, inputs):
        s, eps = inputs
        A = system.dynamics[systems, s]
        b = system.biases[systems, s]
        z = jnp.einsum("nij,nj->ni", A, z) + b + eps
        return z, z

    _, rest = jax.lax.scan(step, z0, (states[1:], noise))
    latents = jnp.concatenate([z0[None], rest], axis=0)

    emitted = jnp.einsum("nej,tnj->tne", system.emissions, latents)
    emitted = emitted + system.emission_offsets
    emitted = emitted + system.emission_noise * emission_noise
    shared = emitted[:, :, : system.overlap].sum(axis=1)
    private = emitted[:, :, system.overlap :].reshape(n_steps, -1)
    channels = jnp.concatenate([shared, private], axis=1)
    observations = channels @ system.projection.T
    observations = observations / jnp.max(jnp.abs(observations), axis=0)
    latents = latents / jnp.max(jnp.abs(latents), axis=0)
    combined = jnp.sum(states * (2 ** jnp.arange(n_systems)), axis=1)
    return SLDSSample(
        observations=observations,
        latents=latents,
        states=states,
        combined_state=combined,
        occupancy_ok=occupancy_ok(states),
    )
