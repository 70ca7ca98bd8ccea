import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy


# stack_windows --------------------------------------------------------------------


@pytest.mark.parametrize(
    "T, length, stride", [(10, 4, 2), (10, 4, 3), (9, 9, 1), (7, 2, 5)]
)
def test_stack_windows_matches_a_loop(T, length, stride):
    x = jnp.arange(T * 2.0).reshape(T, 2)
    expected = [
        np.asarray(x[s : s + length]) for s in range(0, T, stride) if s + length <= T
    ]
    got = tidhy.stack_windows(x, length, stride)
    np.testing.assert_array_equal(got, np.stack(expected))
    # The last exactly-fitting window is kept.
    if (T - length) % stride == 0:
        np.testing.assert_array_equal(got[-1], x[T - length :])
    # Several records: the windows of each, record by record; under jit too.
    records = jnp.stack([x, -x])
    both = jax.jit(tidhy.stack_windows, static_argnums=(1, 2))(records, length, stride)
    np.testing.assert_array_equal(both, np.concatenate([expected, -np.stack(expected)]))


@pytest.mark.parametrize(
    "length, stride, match",
    [
        (1, 1, "`length` must be an integer >= 2"),
        (4, 0, "`stride` must be a positive integer"),
        (20, 1, "fewer than `length`=20"),
    ],
)
def test_stack_windows_rejects_bad_arguments(length, stride, match):
    with pytest.raises(ValueError, match=f"stack_windows: .*{match}"):
        tidhy.stack_windows(jnp.ones((10, 3)), length, stride)


# the switching LDS -----------------------------------------------------------------


def test_slds_timescales_are_the_specified_ones(x64):
    system = tidhy.SwitchingLDS(key=jr.key(0))
    a = np.array(tidhy._slds.PAPER_LOG_DECAY).reshape(3, 2)
    f = np.array(tidhy._slds.PAPER_FREQUENCY).reshape(3, 2)
    for i in range(3):
        for k in range(2):
            eig = np.linalg.eigvals(np.asarray(system.dynamics[i, k]))
            eig = eig[np.argsort(eig.imag)]
            np.testing.assert_allclose(eig.real, np.exp(a[i, k]), rtol=1e-12)
            np.testing.assert_allclose(
                eig.imag, [-2 * np.pi * f[i, k], 2 * np.pi * f[i, k]], rtol=1e-12
            )
    # The paper's values, τ = 1 / |ln|λ||: a slow and a fast regime per system.
    np.testing.assert_allclose(
        system.timescales,
        [[41.96, 5.727], [11.74, 3.790], [77.10, 2.471]],
        rtol=1e-3,
    )


def test_slds_sample_shapes_determinism_and_labels():
    system = tidhy.SwitchingLDS(key=jr.key(1))
    sample = system.sample(3000, key=jr.key(2))
    assert sample.observations.shape == (3000, 20)
    assert sample.latents.shape == (3000, 3, 2)
    assert sample.states.shape == (3000, 3)
    assert bool(sample.occupancy_ok)
    # Within one float32 rounding: on a GPU XLA divides by multiplying with the
    # reciprocal of the channel's maximum, which can land one ulp above 1.
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(
        jnp.max(jnp.abs(sample.observations), axis=0), 1.0, rtol=eps, atol=0
    )
    np.testing.assert_array_equal(
        sample.combined_state, sample.states @ jnp.array([1, 2, 4])
    )
    fractions = np.mean(np.asarray(sample.states), axis=0)
    assert np.all((fractions >= 0.45) & (fractions <= 0.55))
    again = system.sample(3000, key=jr.key(2))
    np.testing.assert_array_equal(sample.observations, again.observations)
    other = system.sample(3000, key=jr.key(3))
    assert not np.allclose(sample.observations, other.observations)
    # Sticky switching: the stay probability is (0.975 + 0.025) / 1.025.
    s = np.asarray(sample.states)
    stay = np.mean(s[1:] == s[:-1])
    assert stay == pytest.approx(1 / 1.025, abs=0.01)


def test_slds_latents_follow_the_specified_dynamics(x64):
    # Least-squares fits of the sampled latents, per system and discrete state,
    # recover the timescales the system was built with.
    system = tidhy.SwitchingLDS(key=jr.key(4), dynamics_noise=0.01)
    sample = system.sample(20_000, key=jr.key(5))
    for i in range(3):
        for k in range(2):
            A, _ = tidhy.fit_linear_dynamics(
                sample.latents[:, i], sample.states[:, i] == k
            )
            tau = tidhy.timescales(A)
            np.testing.assert_allclose(tau, system.timescales[i, k], rtol=0.02)


def test_slds_rejects_bad_arguments():
    with pytest.raises(ValueError, match="SwitchingLDS: every regime must be stable"):
        tidhy.SwitchingLDS(key=jr.key(0), log_decay=(0.1, -0.1, -0.1, -0.1, -0.1, -0.1))
    with pytest.raises(ValueError, match="need 2 \\* n_systems"):
        tidhy.SwitchingLDS(key=jr.key(0), n_systems=2)
    system = tidhy.SwitchingLDS(key=jr.key(0))
    with pytest.raises(ValueError, match="`n_steps` must be an integer >= 2"):
        system.sample(1, key=jr.key(0))
    with pytest.raises(ValueError, match=r"`min_occupancy` must be .* in \[0, 0.5\]"):
        system.sample(100, key=jr.key(0), min_occupancy=0.7)


# the hierarchical Rössler system ------------------------------------------------


def _rk4(f, y, h, n):
    out = [y]
    for _ in range(n):
        k1 = f(y)
        k2 = f(y + h / 2 * k1)
        k3 = f(y + h / 2 * k2)
        k4 = f(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(y)
    return np.array(out)


def _rossler_numpy(
    y, a_s=0.1, b_s=0.1, c_s=1.0, a_f=0.2, b0=0.2, c0=5.7, kb=0.5, kc=1.0, rate=0.1
):
    xs, ys, zs, xf, yf, zf = y
    b_f = np.clip(b0 + kb * xs, 0.01, 1.0)
    c_f = np.clip(c0 + kc * zs, 2.0, 10.0)
    return np.array(
        [
            rate * (-ys - zs),
            rate * (xs + a_s * ys),
            rate * (b_s + zs * (xs - c_s)),
            -yf - zf,
            xf + a_f * yf,
            b_f + zf * (xf - c_f),
        ]
    )


def test_rossler_diffrax_solution_matches_a_fine_step_reference(x64):
    sample = tidhy.make_rossler(
        301, key=jr.key(0), transient_steps=0, noise=0.0, rtol=1e-10, atol=1e-12
    )
    latents = np.asarray(sample.latents)
    # Fixed-step RK4 with a step 100 times finer than the sampling interval.
    fine = _rk4(_rossler_numpy, latents[0], 1e-4, 30_000)[::100]
    np.testing.assert_allclose(latents, fine, rtol=1e-6, atol=1e-8)


def test_rossler_shapes_determinism_and_states():
    sample = tidhy.make_rossler(400, key=jr.key(1), transient_steps=100)
    assert sample.observations.shape == (400, 16) and sample.latents.shape == (400, 6)
    # Within one float32 rounding: on a GPU XLA divides by multiplying with the
    # reciprocal of the channel's maximum, which can land one ulp above 1.
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(
        jnp.max(jnp.abs(sample.observations), axis=0), 1.0, rtol=eps, atol=0
    )
    np.testing.assert_array_equal(sample.states, (sample.latents[:, 0] > 0).astype(int))
    np.testing.assert_allclose(
        sample.timescales, [2 * np.pi / (0.1 * 0.01), 2 * np.pi / 0.01], rtol=1e-6
    )
    again = tidhy.make_rossler(400, key=jr.key(1), transient_steps=100)
    np.testing.assert_array_equal(sample.observations, again.observations)
    with pytest.raises(ValueError, match=r"make_rossler: `observed\[0\]` must be an"):
        tidhy.make_rossler(10, key=jr.key(1), observed=(6,))
