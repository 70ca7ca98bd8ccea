"""The inner loop as Pallas kernels (`InferenceConfig(implementation="pallas")`)
against the XLA loop: the same iterates, iteration counts and diagnostics in
float64 for every option of the inference and of the model, more windows than one
block (padding rows), training losses and gradients; the kernels lower to Triton.
The float64 NumPy equations check both loops in test_inference.py."""

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy
from eqx_models.tidhy import _fused

from .helpers import random_temporal


def _model(key, **kwargs):
    """Sizes that pad differently in every dimension (D 20 -> 32, r 10 -> 16,
    r2 5 -> 16, M 15 -> 16, H 50 -> 64), and every parameter moved off its
    initial value (the LayerNorms start at weight 1 and bias 0)."""
    model = random_temporal(tidhy.TiDHy(20, key=key, **kwargs), key, scale=0.3)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(jr.fold_in(key, 1), len(leaves))
    leaves = [a + 0.1 * jr.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def _inputs(key, B, loss="mse", missing=False):
    kx, kr, kq, km = jr.split(key, 4)
    x = jr.normal(kx, (B, 20))
    if loss == "poisson":
        x = jnp.round(jnp.exp(x))
    elif loss == "bce":
        x = (x > 0).astype(x.dtype)
    mask = present = None
    if missing:
        mask = jr.uniform(km, (B, 20)) > 0.2
        x = jnp.where(mask, x, 0)
        present = jnp.arange(B) % 7 != 3  # a few windows with nothing observed
    return x, 0.5 * jr.normal(kr, (B, 10)), 0.3 * jr.normal(kq, (B, 5)), mask, present


CASES = {
    "per-window": ("per_window", "mse", False, {}, "tol"),
    "per-window, Poisson, masks, L1 and thresholds": (
        "per_window",
        "poisson",
        True,
        dict(l1_r=0.01, l1_r2=0.02, l1_w=0.01, lmda_r=1e-3, lmda_r2=1e-3),
        "tol",
    ),
    "per-window, fixed iterations": (
        "per_window",
        "mse",
        False,
        dict(tol=0.0, max_iter=30),
        "cap",
    ),
    # The reference mode's step is `lr / B` per window: 2 / 40 = 0.05.
    "reference": ("reference", "mse", False, dict(lr_r=2.0, lr_r2=2.0), "tol"),
    "reference, per-window test": (
        "reference",
        "mse",
        False,
        dict(lr_r=2.0, lr_r2=2.0, batch_converge=False),
        "tol",
    ),
    "reference, BCE, masks, no momentum, no halving": (
        "reference",
        "bce",
        True,
        dict(
            lr_r=2.0,
            lr_r2=2.0,
            l1_r=0.01,
            l1_w=0.01,
            momentum=0.0,
            halve_lr_r=False,
            max_iter=30,
        ),
        "cap",
    ),
    "per-window, MLP decoder, gated bias, low-rank dynamics": (
        "per_window",
        "mse",
        True,
        dict(l1_w=0.01),
        "tol",
        dict(nonlinear_decoder=True, dyn_bias=True, low_rank_temporal=True),
    ),
    "reference, MLP decoder, gated bias": (
        "reference",
        "poisson",
        False,
        dict(lr_r=2.0, lr_r2=2.0),
        "tol",
        dict(nonlinear_decoder=True, dyn_bias=True),
    ),
}


# Rounding differences (the sums of the gradient run in another order) grow over
# the iterations where the energy is ill-conditioned: with the MLP decoder and the
# gated bias by 1e-7 relative after some 40 iterations, while the gradients agree
# to 1e-13 (checked before the loop, below).
RTOL = {"per-window, MLP decoder, gated bias, low-rank dynamics": 2e-6}


@pytest.mark.parametrize("case", list(CASES))
def test_pallas_loop_equals_the_xla_loop(x64, getkey, case):
    mode, loss, missing, options, stops, *model_options = CASES[case]
    model = _model(getkey(), loss_type=loss, **(model_options or [{}])[0])
    # 40 windows: three blocks of 16, the last one half padding.
    x, r_prev, r2_prev, mask, present = _inputs(getkey(), 40, loss, missing)
    xla = tidhy.InferenceConfig(batch_mode=mode, implementation="xla", **options)
    pallas = dataclasses.replace(xla, implementation="pallas")
    run = jax.jit(tidhy._inference.infer_impl, static_argnums=4)
    r, r2, stats = run(model, x, r_prev, r2_prev, xla, mask, present)
    if _fused.shared_memory_shortfall(model, jnp.float64) is not None:
        # On a GPU whose shared memory cannot hold the float64 weights of the MLP
        # decoder (an H100's, measured), the kernels are refused before compiling.
        with pytest.raises(ValueError, match="shared memory"):
            run(model, x, r_prev, r2_prev, pallas, mask, present)
        return
    r_p, r2_p, stats_p = run(model, x, r_prev, r2_prev, pallas, mask, present)
    # Each case stops its loops one way: on the tolerance (at different iterations
    # per window in the per-window mode) or at the cap.
    if stops == "tol":
        assert bool(jnp.all(stats.converged))
        assert mode == "reference" or len(set(np.asarray(stats.n_iter).tolist())) > 1
    else:
        np.testing.assert_array_equal(stats.n_iter, xla.max_iter)
    np.testing.assert_array_equal(stats_p.n_iter, stats.n_iter)
    np.testing.assert_array_equal(stats_p.converged, stats.converged)
    np.testing.assert_array_equal(stats_p.finite, stats.finite)
    # The gradient differs from `jax.grad`'s in the order of its sums only.
    rtol = RTOL.get(case, 1e-10)
    np.testing.assert_allclose(r_p, r, rtol=rtol, atol=rtol / 100)
    np.testing.assert_allclose(r2_p, r2, rtol=rtol, atol=rtol / 100)
    np.testing.assert_allclose(stats_p.rel_change, stats.rel_change, rtol=10 * rtol)
    np.testing.assert_allclose(stats_p.energy, stats.energy, rtol=rtol)
    if missing:
        # A window with nothing observed is skipped: its `r` stays at 0.
        np.testing.assert_array_equal(np.asarray(r_p)[~np.asarray(present)], 0)


MODELS = {
    "linear decoder": {},
    "MLP decoder": dict(nonlinear_decoder=True),
    "gated bias": dict(dyn_bias=True),
    "low-rank dynamics": dict(low_rank_temporal=True),
}


@pytest.mark.parametrize("loss", ["mse", "poisson", "bce"])
@pytest.mark.parametrize("model_case", list(MODELS))
def test_the_written_out_gradient_equals_jax_grad(x64, getkey, model_case, loss):
    from eqx_models.tidhy._inference import _per_window_energy

    model = _model(getkey(), loss_type=loss, **MODELS[model_case])
    B = 8
    x, r_prev, _, mask, present = _inputs(getkey(), B, loss, missing=True)
    r = jr.normal(getkey(), (B, 10))
    r2 = jr.normal(getkey(), (B, 5))
    basis = jax.vmap(model.basis_predictions)(r_prev)
    config = tidhy.InferenceConfig(l1_r=0.1, l1_r2=0.2, l1_w=0.3)
    expected = jax.vmap(
        jax.grad(
            lambda latents, x, b, m, p: _per_window_energy(
                latents, model, x, b, config, m, p
            )
        )
    )((r, r2), x, basis, mask, present)
    s = _fused._Sizes(D=32, R=16, R2=16, M=16, H=64)
    pad = _fused._pad_to
    weight = present.astype(x.dtype)[:, None]
    g_r, g_r2 = _fused._gradients(
        _fused._static(model, config, B),
        _fused._weights(model, s, x.dtype),
        pad(r, (B, 16)),
        pad(r2, (B, 16)),
        pad(x, (B, 32)),
        pad(mask.astype(x.dtype), (B, 32)),
        pad(basis, (B, 16, 16)),
        weight,
        weight,
    )
    np.testing.assert_allclose(g_r[:, :10], expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g_r2[:, :5], expected[1], rtol=1e-12, atol=1e-12)
    # The padding's gradient is 0, so the padding stays 0.
    np.testing.assert_array_equal(g_r[:, 10:], 0)
    np.testing.assert_array_equal(g_r2[:, 5:], 0)


def test_training_loss_and_gradients_equal_the_xla_loop(x64, getkey):
    model = _model(getkey())
    windows = jr.normal(getkey(), (5, 6, 20))
    learner = tidhy.Learner(model, None)
    train = tidhy.TiDHyTrainConfig(grad_norm=False)

    def loss_and_grad(implementation):
        inference = tidhy.InferenceConfig(max_iter=200, implementation=implementation)

        def loss(learner):
            return tidhy.training_loss(
                learner, windows, inference=inference, train=train
            )

        return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(learner)

    (value, metrics), grads = loss_and_grad("xla")
    (value_p, metrics_p), grads_p = loss_and_grad("pallas")
    assert 1 < float(metrics["inference_iters_mean"]) < 200
    assert float(metrics_p["inference_iters_mean"]) == float(
        metrics["inference_iters_mean"]
    )
    np.testing.assert_allclose(value_p, value, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "options", [{}, dict(nonlinear_decoder=True, dyn_bias=True)], ids=["plain", "MLP"]
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["per_window", "reference"])
def test_the_kernels_lower_to_triton(monkeypatch, getkey, mode, dtype, options):
    # Lowering for CUDA needs no GPU: it checks what Triton accepts (block shapes,
    # operations), which Pallas' interpreter does not.
    with jax.enable_x64(dtype == "float64"):
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        # Any GPU's rules, not this machine's shared memory (on an H100 the
        # float64 MLP kernels are refused before lowering: tested below).
        monkeypatch.setattr(_fused, "_compute_capability", lambda: None)
        model = _model(getkey(), loss_type="poisson", **options)
        x, r_prev, r2_prev, mask, present = _inputs(getkey(), 40, "poisson", True)
        config = tidhy.InferenceConfig(
            batch_mode=mode,
            implementation="pallas",
            check_every=3,
            l1_r=0.01,
            l1_r2=0.01,
            l1_w=0.01,
            lmda_r=1e-3,
            lmda_r2=1e-3,
        )
        lowered = (
            jax.jit(tidhy._inference.infer_impl, static_argnums=4)
            .trace(model, x, r_prev, r2_prev, config, mask, present)
            .lower(lowering_platforms=("cuda",))
        )
    calls = lowered.as_text().count("__gpu$xla.gpu.triton")
    # Per window: one launch runs the loops; reference: two launches per
    # iteration, three iterations per test (fewer than one rolled trip of four).
    assert calls == (1 if mode == "per_window" else 6)
    if mode == "reference":
        # Sixteen iterations per test: a rolled loop of four trips of four.
        config = dataclasses.replace(config, check_every=16)
        with jax.enable_x64(dtype == "float64"):
            text = (
                jax.jit(tidhy._inference.infer_impl, static_argnums=4)
                .trace(model, x, r_prev, r2_prev, config, mask, present)
                .lower(lowering_platforms=("cuda",))
                .as_text()
            )
        assert text.count("__gpu$xla.gpu.triton") == 2 * 4


def test_the_triton_deprecation_is_the_librarys_to_carry(monkeypatch, getkey):
    # JAX 0.11.2 warns at every lowering of a Pallas Triton kernel that the backend
    # is deprecated; users of these kernels cannot act on it. The suite turns
    # warnings into errors, so the warning below raises unless building the
    # kernels for a GPU installed the library's filter; other deprecations still do.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model = _model(getkey(), loss_type="poisson")
    x, r_prev, r2_prev, mask, present = _inputs(getkey(), 4, "poisson", False)
    config = tidhy.InferenceConfig(implementation="pallas")
    jax.jit(tidhy._inference.infer_impl, static_argnums=4).trace(
        model, x, r_prev, r2_prev, config, mask, present
    ).lower(lowering_platforms=("cuda",))
    warnings.warn(
        "The Pallas Triton backend is deprecated and will be removed in a future "
        "JAX version.",
        DeprecationWarning,
    )
    with pytest.raises(DeprecationWarning, match="another"):
        warnings.warn("another deprecation", DeprecationWarning)


def test_the_kernels_are_refused_on_a_tpu(monkeypatch, getkey):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    model = tidhy.TiDHy(6, key=getkey())
    config = tidhy.InferenceConfig(implementation="pallas")
    with pytest.raises(
        ValueError, match="`implementation` must be 'auto' or 'xla' on backend 'tpu'"
    ):
        tidhy.infer(
            model, jnp.zeros((2, 6)), jnp.zeros((2, 10)), jnp.zeros((2, 5)), config
        )


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="`implementation`.*'triton'"):
        tidhy.InferenceConfig(implementation="triton")


def _gpu(monkeypatch, capability, devices=1):
    """Stand in for `devices` CUDA GPUs of a compute capability (None: unknown)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_fused, "_compute_capability", lambda: capability)
    monkeypatch.setattr(jax, "device_count", lambda: devices)


def test_the_shared_memory_rule_matches_what_an_h100_asked_for(x64, getkey):
    # Measured (H100, JAX 0.11.2): the float64 kernels of the MLP decoder with the
    # gated bias asked for 237 568 bytes of shared memory per program, with 16 or
    # 32 windows per program, where 232 448 were available.
    model = _model(getkey(), nonlinear_decoder=True, dyn_bias=True)
    weights = _fused.weight_bytes(model, jnp.float64)
    assert weights <= 237_568 <= weights + _fused._SHARED_MEMORY_RESERVE
    assert _fused._SHARED_MEMORY_BYTES["9.0"] == 232_448


def test_auto_runs_the_kernels_on_one_gpu_that_holds_the_weights(
    x64, monkeypatch, getkey
):
    paper = tidhy.TiDHy(20, key=getkey())  # 54 720 bytes of float32 weights
    mlp = tidhy.TiDHy(20, key=getkey(), nonlinear_decoder=True, dyn_bias=True)
    _gpu(monkeypatch, "9.0")
    assert _fused.default_on_this_device(paper, jnp.float32)
    assert _fused.default_on_this_device(mlp, jnp.float32)  # 117 568 bytes
    assert not _fused.default_on_this_device(mlp, jnp.float64)  # 235 136 bytes
    _gpu(monkeypatch, "8.6")  # 99 kB per program
    assert _fused.default_on_this_device(paper, jnp.float32)
    assert not _fused.default_on_this_device(mlp, jnp.float32)
    _gpu(monkeypatch, None)  # a GPU whose shared memory is not known
    assert not _fused.default_on_this_device(paper, jnp.float32)
    # XLA does not partition a Pallas kernel across devices.
    _gpu(monkeypatch, "9.0", devices=2)
    assert not _fused.default_on_this_device(paper, jnp.float32)


def test_auto_is_the_implementation_chosen_for_the_device(getkey):
    # On a CPU the XLA loop; on one GPU that holds the weights the kernels.
    model = _model(getkey())
    x, r_prev, r2_prev, mask, present = _inputs(getkey(), 5, "mse", True)
    auto = tidhy.InferenceConfig()
    assert auto.implementation == "auto"
    fused = _fused.default_on_this_device(model, jnp.float32)
    assert fused == (jax.default_backend() == "gpu" and jax.device_count() == 1)
    chosen = tidhy.InferenceConfig(implementation="pallas" if fused else "xla")
    run = jax.jit(tidhy._inference.infer_impl, static_argnums=4)
    for a, b in zip(
        jax.tree.leaves(run(model, x, r_prev, r2_prev, auto, mask, present)),
        jax.tree.leaves(run(model, x, r_prev, r2_prev, chosen, mask, present)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_weights_a_gpu_cannot_hold_are_refused_with_the_sizes(x64, monkeypatch, getkey):
    _gpu(monkeypatch, "9.0")
    model = _model(getkey(), nonlinear_decoder=True, dyn_bias=True)
    x, r_prev, r2_prev, mask, present = _inputs(getkey(), 4, "mse", False)
    config = tidhy.InferenceConfig(implementation="pallas")
    with pytest.raises(
        ValueError,
        match=r"`implementation='pallas'`.*expected at most 232448 bytes.*"
        r"compute capability 9\.0\), got 243328 for its padded float64 weights",
    ):
        jax.jit(tidhy._inference.infer_impl, static_argnums=4).trace(
            model, x, r_prev, r2_prev, config, mask, present
        )
    # `"auto"` takes the XLA loop for this model instead (traced, not compiled).
    auto = dataclasses.replace(config, implementation="auto")
    jax.jit(tidhy._inference.infer_impl, static_argnums=4).trace(
        model, x, r_prev, r2_prev, auto, mask, present
    )
