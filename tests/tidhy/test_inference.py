import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models import tidhy

from . import reference
from .helpers import random_temporal, small_model, step_inputs


CONVERGED_RTOL = 1e-7

SETTINGS = {
    "plain": dict(),
    "thresholds_and_l1": dict(
        lmda_r=0.001, lmda_r2=0.002, l1_r=0.01, l1_r2=0.01, l1_w=0.01
    ),
}


def _reference_kwargs(cfg) -> dict[str, Any]:
    return dict(
        lr_r=cfg.lr_r,
        lr_r2=cfg.lr_r2,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        lmda=(cfg.lmda_r, cfg.lmda_r2),
        lam=(cfg.l1_r, cfg.l1_r2, cfg.l1_w),
        halve=cfg.halve_lr_r,
    )


# Both implementations of the loop against the same float64 NumPy equations.
IMPLEMENTATIONS = ["xla", "pallas"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reference_mode_matches_the_numpy_equations(
    x64, getkey, setting, implementation
):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    x, r_prev, r2_prev = step_inputs(getkey(), B=3)
    cfg = tidhy.InferenceConfig(
        lr_r=0.3,
        lr_r2=0.3,
        max_iter=400,
        tol=0.01,
        batch_mode="reference",
        implementation=implementation,
        **SETTINGS[setting],
    )
    r, r2, stats = tidhy.infer(model, x, r_prev, r2_prev, cfg)
    p = reference.Params(model)
    args = (p, np.asarray(x), np.asarray(r_prev), np.asarray(r2_prev))
    ref_r, ref_r2, n = reference.infer(*args, **_reference_kwargs(cfg))
    assert 1 < n < cfg.max_iter, "the tolerance must be what stops the loop"
    np.testing.assert_array_equal(stats.n_iter, [n] * 3)
    assert bool(jnp.all(stats.converged)) and bool(jnp.all(stats.finite))
    # The r2 problem is ill-conditioned (flat directions): a 1e-14 relative change of
    # x moves the solution after ~100 iterations by ~1e-10, so rounding differences
    # of summation order allow 1e-7 here; the iterates below match to 1e-12.
    np.testing.assert_allclose(r, ref_r, rtol=CONVERGED_RTOL, atol=1e-9)
    np.testing.assert_allclose(r2, ref_r2, rtol=CONVERGED_RTOL, atol=1e-9)
    # The iterates themselves, across the halving milestones (every 2 iterations
    # with max_iter = 20); tol = 0 never stops early.
    for k in (2, 20) if setting == "plain" else (2,):
        fixed = tidhy.InferenceConfig(
            lr_r=0.3,
            lr_r2=0.3,
            max_iter=k,
            tol=0.0,
            halve_lr_r=k >= 10,
            batch_mode="reference",
            implementation=implementation,
            **SETTINGS[setting],
        )
        r_k, r2_k, stats_k = tidhy.infer(model, x, r_prev, r2_prev, fixed)
        ref_k, ref2_k, n_k = reference.infer(*args, **_reference_kwargs(fixed))
        assert int(stats_k.n_iter[0]) == n_k == fixed.max_iter
        np.testing.assert_allclose(r_k, ref_k, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(r2_k, ref2_k, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_per_window_mode_solves_each_window_alone_and_equals_reference_for_one(
    x64, getkey, implementation
):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    x, r_prev, r2_prev = step_inputs(getkey(), B=4)
    cfg = tidhy.InferenceConfig(
        lr_r=0.1, lr_r2=0.1, max_iter=200, tol=0.01, implementation=implementation
    )
    assert cfg.batch_mode == "per_window"
    r, r2, stats = tidhy.infer(model, x, r_prev, r2_prev, cfg)
    p = reference.Params(model)
    counts = []
    for b in range(4):
        ref_r, ref_r2, n = reference.infer(
            p,
            np.asarray(x[b : b + 1]),
            np.asarray(r_prev[b : b + 1]),
            np.asarray(r2_prev[b : b + 1]),
            **_reference_kwargs(cfg),
        )
        counts.append(n)
        np.testing.assert_allclose(r[b], ref_r[0], rtol=CONVERGED_RTOL, atol=1e-9)
        np.testing.assert_allclose(r2[b], ref_r2[0], rtol=CONVERGED_RTOL, atol=1e-9)
    np.testing.assert_array_equal(stats.n_iter, counts)
    assert len(set(counts)) > 1, "windows should converge at different iterations"
    # With one window the two batching semantics coincide.
    one = tidhy.infer(
        model,
        x[:1],
        r_prev[:1],
        r2_prev[:1],
        dataclasses.replace(cfg, batch_mode="reference"),
    )
    np.testing.assert_allclose(one[0][0], r[0], rtol=CONVERGED_RTOL, atol=1e-9)
    np.testing.assert_allclose(one[1][0], r2[0], rtol=CONVERGED_RTOL, atol=1e-9)
    assert int(one[2].n_iter[0]) == counts[0]


@pytest.mark.parametrize("mode", ["reference", "per_window"])
def test_first_step_matches_numpy_adamw(x64, getkey, mode):
    model = small_model(getkey())
    x, _, _ = step_inputs(getkey(), B=3)
    cfg = tidhy.InferenceConfig(lr_r=0.05, max_iter=400, tol=0.005, batch_mode=mode)
    r, stats = tidhy.infer_first_step(model, x, cfg)
    p = reference.Params(model)
    if mode == "reference":
        ref, n = reference.infer_first_step(
            p, np.asarray(x), lr=0.05, max_iter=400, tol=0.005
        )
        assert 1 < n < 400
        np.testing.assert_array_equal(stats.n_iter, [n] * 3)
        np.testing.assert_allclose(r, ref, rtol=1e-10, atol=1e-12)
    else:
        for b in range(3):
            ref, n = reference.infer_first_step(
                p, np.asarray(x[b : b + 1]), lr=0.05, max_iter=400, tol=0.005
            )
            assert int(stats.n_iter[b]) == n
            np.testing.assert_allclose(r[b], ref[0], rtol=1e-10, atol=1e-12)


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# Each setting stops the inner loop another way: on the tolerance (at different
# iterations per window in the per-window mode), at `max_iter`, or at a non-finite
# iterate.
CHUNK_SETTINGS: dict[str, dict[str, Any]] = {
    "tol": dict(lr_r=0.1, lr_r2=0.1, max_iter=200, tol=0.01),
    "max_iter": dict(lr_r=0.1, lr_r2=0.1, max_iter=11, tol=1e-6),
    "diverging": dict(lr_r=50.0, lr_r2=50.0, max_iter=200, tol=0.01),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["reference", "per_window"])
@pytest.mark.parametrize("setting", list(CHUNK_SETTINGS))
def test_check_every_changes_no_result(getkey, mode, setting, implementation):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    x, r_prev, r2_prev = step_inputs(getkey(), B=4)
    cfg = tidhy.InferenceConfig(
        batch_mode=mode,
        check_every=1,
        implementation=implementation,
        **CHUNK_SETTINGS[setting],
    )
    expected = tidhy.infer(model, x, r_prev, r2_prev, cfg)
    counts = np.asarray(expected[2].n_iter)
    if setting == "tol":
        assert bool(jnp.all(expected[2].converged)) and np.all(counts % 3 != 0)
        assert mode == "reference" or len(set(counts.tolist())) > 1
    elif setting == "max_iter":
        assert np.all(counts == 11) and not bool(jnp.any(expected[2].converged))
    else:
        assert not bool(jnp.any(expected[2].finite))
    for check_every in (3, 16):
        chunked = dataclasses.replace(cfg, check_every=check_every)
        _assert_bitwise_equal(tidhy.infer(model, x, r_prev, r2_prev, chunked), expected)


def test_check_every_changes_no_training_loss(getkey):
    # Every inner loop of a window sequence, the first-step inference included.
    model = random_temporal(small_model(getkey()), getkey(), scale=0.6)
    windows = jax.random.normal(getkey(), (3, 4, 4))
    train = tidhy.TiDHyTrainConfig(grad_norm=False, first_step_inference=True)
    learner = tidhy.Learner(model, None)

    def loss(check_every):
        inference = tidhy.InferenceConfig(
            lr_r=0.1, lr_r2=0.1, max_iter=100, check_every=check_every
        )
        return eqx.filter_jit(
            lambda learner, windows: tidhy.training_loss(
                learner, windows, inference=inference, train=train
            )
        )(learner, windows)

    expected = loss(1)
    assert 1 < float(expected[1]["inference_iters_mean"]) < 100
    _assert_bitwise_equal(loss(5), expected)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_check_every_auto_chunks_per_window_loops_on_accelerators(monkeypatch, backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    per_window = tidhy.InferenceConfig().iterations_per_check
    assert per_window == (1 if backend == "cpu" else 16)
    reference = tidhy.InferenceConfig(batch_mode="reference", implementation="xla")
    assert reference.iterations_per_check == 1
    # The Pallas reference loop: a stopped loop's launches write nothing. `"auto"`
    # is that loop on a GPU.
    pallas = tidhy.InferenceConfig(batch_mode="reference", implementation="pallas")
    assert pallas.iterations_per_check == (1 if backend == "cpu" else 16)
    auto = tidhy.InferenceConfig(batch_mode="reference").iterations_per_check
    assert auto == (16 if backend == "gpu" else 1)
    named = tidhy.InferenceConfig(check_every=4, batch_mode="reference")
    assert named.iterations_per_check == 4
    # Several devices: `"auto"` is XLA's loop (a Pallas kernel is not partitioned).
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    several = tidhy.InferenceConfig(batch_mode="reference").iterations_per_check
    assert several == 1


def test_abs_has_pytorchs_zero_subgradient_at_zero():
    # r starts at 0 in every inner loop: with jnp.abs's derivative (1 at 0) an L1
    # penalty on r would act on the first step, unlike the original. The reference
    # test above (L1 setting, numpy sign(0) = 0) checks the integrated behaviour.
    from eqx_models.tidhy._functional import l1

    x = jnp.array([0.0, -2.0, 3.0])
    np.testing.assert_array_equal(jax.grad(l1)(x), [0.0, -1.0, 1.0])
    assert float(jax.grad(lambda x: jnp.abs(x).sum())(x)[0]) == 1.0


def test_diverging_inference_is_reported(getkey):
    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=2)
    cfg = tidhy.InferenceConfig(lr_r=50.0, lr_r2=50.0, max_iter=2000, tol=0.01)
    r, r2, stats = tidhy.infer(model, x, r_prev, r2_prev, cfg)
    assert not bool(jnp.any(stats.finite))
    assert bool(jnp.all(stats.n_iter < 2000))
    finite = jnp.all(jnp.isfinite(r), axis=1) & jnp.all(jnp.isfinite(r2), axis=1)
    assert not bool(jnp.any(finite))


def test_jit_vmap_and_compile_once(getkey):
    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=3)
    cfg = tidhy.InferenceConfig(lr_r=0.1, lr_r2=0.1, max_iter=30)
    counted = eqx.filter_jit(eqx.debug.assert_max_traces(tidhy.infer, max_traces=1))
    a = counted(model, x, r_prev, r2_prev, cfg)
    b = counted(model, 2 * x, r_prev, r2_prev, cfg)
    plain = tidhy.infer(model, 2 * x, r_prev, r2_prev, cfg)
    np.testing.assert_allclose(b[0], plain[0], rtol=1e-6)
    assert not np.allclose(a[0], b[0])
    # vmap over an extra leading axis equals separate calls.
    xs = jnp.stack([x, 2 * x])
    batched = jax.vmap(lambda x: tidhy.infer(model, x, r_prev, r2_prev, cfg))(xs)
    np.testing.assert_allclose(batched[0][1], plain[0], rtol=1e-6)
    counted_first = eqx.filter_jit(
        eqx.debug.assert_max_traces(tidhy.infer_first_step, max_traces=1)
    )
    counted_first(model, x, cfg)
    counted_first(model, 3 * x, cfg)


def test_outputs_carry_no_gradient(getkey):
    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=2)
    cfg = tidhy.InferenceConfig(lr_r=0.1, lr_r2=0.1, max_iter=20)

    def loss(model, x):
        r, r2, _ = tidhy.infer(model, x, r_prev, r2_prev, cfg)
        return jnp.sum(r**2) + jnp.sum(r2**2) + jnp.sum(x)

    grads = eqx.filter_grad(loss)(model, x)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads))


def test_bad_inputs_raise(getkey):
    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=2)
    with pytest.raises(ValueError, match="infer: `x` must have feature dimension 4"):
        tidhy.infer(model, jnp.ones((2, 5)), r_prev, r2_prev)
    with pytest.raises(ValueError, match="infer: `r_prev` must have shape"):
        tidhy.infer(model, x, jnp.ones((2, 4)), r2_prev)
    with pytest.raises(ValueError, match="infer: `r2_prev` must have shape"):
        tidhy.infer(model, x, r_prev, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="infer: `x` must be all finite"):
        tidhy.infer(model, x.at[0, 0].set(jnp.nan), r_prev, r2_prev)
    with pytest.raises(ValueError, match="infer_first_step: `x` must have feature"):
        tidhy.infer_first_step(model, jnp.ones((2, 3)))
    # Under the caller's own `jax.jit` the check is an `eqx.error_if`: on a GPU it
    # surfaces when the result is awaited, so the test blocks on it.
    with pytest.raises(Exception, match="infer: `x` must be all finite"):
        jax.block_until_ready(
            jax.jit(lambda x: tidhy.infer(model, x, r_prev, r2_prev)[0])(
                x.at[0, 0].set(jnp.inf)
            )
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_iter=5), "`max_iter` must be >= 10 with the halving schedule"),
        (dict(max_iter=0, halve_lr_r=False), "`max_iter` must be a positive integer"),
        (dict(lmda_r=-0.1), "`lmda_r` must be a finite real number >= 0"),
        (dict(lmda_r2=-0.1), "`lmda_r2` must be a finite real number >= 0"),
        (dict(lr_r=-0.2), "`lr_r` must be a finite real number > 0"),
        (dict(lr_r2=0.0), "`lr_r2` must be a finite real number > 0"),
        (dict(lr_r=float("nan")), "`lr_r` must be a finite real number > 0, got nan"),
        (dict(tol=-1.0), "`tol` must be a finite real number >= 0"),
        (dict(l1_w=-1.0), "`l1_w` must be a finite real number >= 0"),
        (dict(momentum=1.0), r"`momentum` must be a finite real number in \[0, 1\)"),
        (dict(batch_mode="batch"), "`batch_mode` must be one of"),
        (dict(check_every=0), "`check_every` must be a positive integer, got 0"),
        (dict(check_every="once"), "`check_every` must be 'auto' or a positive"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=f"InferenceConfig: {match}"):
        tidhy.InferenceConfig(**kwargs)


def test_max_iter_without_halving_may_be_small():
    assert tidhy.InferenceConfig(max_iter=3, halve_lr_r=False).max_iter == 3


@pytest.mark.parametrize("mode", ["per_window", "reference"])
def test_the_xla_loops_multiply_in_full_float32(getkey, mode):
    # Their stopping rule amplifies rounding (a GPU's TF32 default moved per-window
    # latents by 0.41 at paper size), so every product of both inner loops is
    # lowered with HIGHEST precision, whatever the caller's default.
    from eqx_models.tidhy._inference import infer_first_step_impl, infer_impl

    model = small_model(getkey())
    x, r_prev, r2_prev = step_inputs(getkey(), B=3)
    config = tidhy.InferenceConfig(batch_mode=mode, implementation="xla")
    with jax.default_matmul_precision("default"):
        texts = [
            jax.jit(infer_impl, static_argnums=4)
            .lower(model, x, r_prev, r2_prev, config)
            .as_text(),
            jax.jit(infer_first_step_impl, static_argnums=2)
            .lower(model, x, config)
            .as_text(),
            jax.jit(jnp.dot).lower(x, x.T).as_text(),  # the default, for contrast
        ]
    *loops, plain = [
        [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        for text in texts
    ]
    for dots in loops:
        assert len(dots) >= 3
        assert all("precision = [HIGHEST, HIGHEST]" in line for line in dots), dots
    assert plain and "HIGHEST" not in plain[0]
