import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy

from . import reference
from .helpers import random_temporal, small_model


INFERENCE = tidhy.InferenceConfig(
    lr_r=0.3, lr_r2=0.3, max_iter=40, tol=0.01, batch_mode="reference"
)
PLAIN = tidhy.TiDHyTrainConfig(grad_norm=False)
GRADNORM = tidhy.TiDHyTrainConfig(grad_norm=True)

# jax name -> reference name of every parameter of the small linear model.
NAMES = {
    ".decoder.linear_in.weight": "W",
    ".decoder.linear_in.bias": "c",
    ".temporal": "U",
    ".hypernet.linear_in.weight": "L1w",
    ".hypernet.linear_in.bias": "L1b",
    ".hypernet.norm.weight": "gamma",
    ".hypernet.norm.bias": "beta",
    ".hypernet.linear_hidden.weight": "L3w",
    ".hypernet.linear_hidden.bias": "L3b",
    ".hypernet.linear_out.weight": "L4w",
    ".hypernet.linear_out.bias": "L4b",
}
GROUPS = ({"W", "c"}, {"W", "c", "U"}, set(NAMES.values()) - {"W", "c"})


def _by_name(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]
    return {NAMES[jax.tree_util.keystr(p)]: np.asarray(v) for p, v in leaves}


def _setup(getkey, B=2, T=3):
    model = random_temporal(small_model(getkey()), getkey(), scale=0.5)
    X = jr.normal(getkey(), (B, T, 4))
    return model, X


def _numpy_latents(model, X, cfg):
    """The training forward's latents by the numpy reference: r_0 = r2_0 = 0, then
    one inference call per step."""
    p = reference.Params(model)
    X = np.asarray(X)
    B, T, _ = X.shape
    R, R2 = np.zeros((B, T, p.r_dim)), np.zeros((B, T, p.L1w.shape[1]))
    for t in range(1, T):
        R[:, t], R2[:, t], _ = reference.infer(
            p,
            X[:, t],
            R[:, t - 1],
            R2[:, t - 1],
            lr_r=cfg.lr_r,
            lr_r2=cfg.lr_r2,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
        )
    return p, R, R2


def _reference_total_gradient(p, X, R, R2, train, weights=(1.0, 1.0, 1.0)):
    tasks = reference.task_gradients(p, np.asarray(X), R, R2)
    _, _, g_U, g_L1w = reference.regularisers(p, train.cos_eta, train.orth_r2)
    total = {n: weights[0] * g for n, g in tasks["hat"].items()}
    for n in total:
        total[n] = total[n] + weights[1] * tasks["bar"][n]
        total[n] = total[n] + weights[2] * tasks["temp"][n]
    total["U"] = total["U"] + weights[2] * g_U
    total["L1w"] = total["L1w"] + weights[2] * g_L1w
    return tasks, g_U, g_L1w, total


def test_task_losses_regularisers_and_gradients_match_numpy(x64, getkey):
    model, X = _setup(getkey, B=3, T=4)
    R = jr.normal(getkey(), (3, 4, 3))
    R2 = jr.normal(getkey(), (3, 4, 2))

    def total(model):
        losses = tidhy.task_losses_from_latents(model, X, R, R2)
        regs = tidhy.regularisers(model, PLAIN)
        return sum(losses) + regs["cos_reg"] + regs["orth_r2"], (losses, regs)

    (value, (losses, regs)), grads = eqx.filter_jit(
        eqx.filter_value_and_grad(total, has_aux=True)
    )(model)
    p = reference.Params(model)
    hat, bar, temp = reference.task_losses(
        p, np.asarray(X), np.asarray(R), np.asarray(R2)
    )
    cos, orth, _, _ = reference.regularisers(p, PLAIN.cos_eta, PLAIN.orth_r2)
    np.testing.assert_allclose(losses, [hat, bar, temp], rtol=1e-12)
    np.testing.assert_allclose(
        [regs["cos_reg"], regs["orth_r2"]], [cos, orth], rtol=1e-12
    )
    _, _, _, expected = _reference_total_gradient(
        p, X, np.asarray(R), np.asarray(R2), PLAIN
    )
    got = _by_name(grads)
    for name, value in expected.items():
        np.testing.assert_allclose(
            got[name], value, rtol=1e-10, atol=1e-12, err_msg=name
        )


def test_training_gradient_against_finite_differences(x64, getkey):
    model, X = _setup(getkey, B=2, T=4)
    R = jr.normal(getkey(), (2, 4, 3))
    R2 = jr.normal(getkey(), (2, 4, 2))

    def numpy_total(model):
        p = reference.Params(model)
        losses = reference.task_losses(p, np.asarray(X), np.asarray(R), np.asarray(R2))
        cos, orth, _, _ = reference.regularisers(p, PLAIN.cos_eta, PLAIN.orth_r2)
        return sum(losses) + cos + orth

    def jax_total(model):
        regs = tidhy.regularisers(model, PLAIN)
        return sum(tidhy.task_losses_from_latents(model, X, R, R2)) + sum(regs.values())

    grads = eqx.filter_jit(eqx.filter_grad(jax_total))(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    for i in range(3):
        direction = jax.tree.map(
            lambda a: jr.normal(jr.fold_in(getkey(), i), a.shape, a.dtype), params
        )
        eps = 1e-6
        shifted = [
            eqx.combine(
                jax.tree.map(lambda a, d: a + s * eps * d, params, direction), static
            )
            for s in (1, -1)
        ]
        finite_difference = (numpy_total(shifted[0]) - numpy_total(shifted[1])) / (
            2 * eps
        )
        analytic = sum(
            float(jnp.vdot(g, d))
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
        )
        # Central differences: truncation O(eps^2) and rounding ~1e-16 |L| / eps.
        assert analytic == pytest.approx(finite_difference, rel=1e-6, abs=1e-7)


_grad = eqx.filter_jit(eqx.filter_value_and_grad(tidhy.training_loss, has_aux=True))


def test_training_loss_with_inference_matches_numpy(x64, getkey):
    model, X = _setup(getkey)
    p, R, R2 = _numpy_latents(model, X, INFERENCE)
    learner = tidhy.Learner(model=model, gradnorm=None)
    (value, aux), grads = _grad(learner, X, None, inference=INFERENCE, train=PLAIN)
    hat, bar, temp = reference.task_losses(p, np.asarray(X), R, R2)
    cos, orth, _, _ = reference.regularisers(p, PLAIN.cos_eta, PLAIN.orth_r2)
    # The latents come from tolerance-stopped inner loops (see test_inference).
    rtol = 1e-7
    np.testing.assert_allclose(
        [aux["loss_hat"], aux["loss_bar"], aux["loss_temp"]],
        [hat, bar, temp],
        rtol=rtol,
    )
    assert float(value) == pytest.approx(hat + bar + temp + cos + orth, rel=rtol)
    _, _, _, expected = _reference_total_gradient(p, X, R, R2, PLAIN)
    got = _by_name(grads.model)
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-6, atol=1e-9, err_msg=name)
    assert 1 < float(aux["inference_iters_mean"]) < INFERENCE.max_iter
    assert float(aux["inference_converged"]) == 1.0
    assert float(aux["dead_hypernet"]) == 0.0
    assert float(aux["latent_max_abs"]) == pytest.approx(
        max(np.abs(R).max(), np.abs(R2).max()), rel=rtol
    )


def test_gradnorm_gradients_and_no_leak_into_theta(x64, getkey):
    model, X = _setup(getkey)
    p, R, R2 = _numpy_latents(model, X, INFERENCE)
    weights = np.array([0.6, 1.1, 1.3])
    initial = np.array([3.0, 5.0, 2.0])
    learner = tidhy.Learner(
        model=model,
        gradnorm=tidhy.GradNormState(
            weights=jnp.asarray(weights), initial_losses=jnp.asarray(initial)
        ),
    )
    (value, aux), grads = _grad(learner, X, None, inference=INFERENCE, train=GRADNORM)
    tasks, g_U, g_L1w, expected = _reference_total_gradient(
        p, X, R, R2, GRADNORM, weights=weights
    )
    hat, bar, temp = reference.task_losses(p, np.asarray(X), R, R2)
    cos, orth, _, _ = reference.regularisers(p, GRADNORM.cos_eta, GRADNORM.orth_r2)
    L = np.array([hat, bar, temp + cos + orth])
    # The value is the weighted loss and θ's gradient is that of the weighted loss
    # alone: nothing of the GradNorm objective reaches θ.
    assert float(value) == pytest.approx(weights @ L, rel=1e-7)
    got = _by_name(grads.model)
    for name, g in expected.items():
        np.testing.assert_allclose(got[name], g, rtol=1e-6, atol=1e-9, err_msg=name)
    # The weights' gradient is that of Σ|G_i - mean(G) r_i^α| with G_i = w_i g_i,
    # g_i a sum of per-tensor gradient norms over task i's parameter group.
    per_task = [dict(tasks["hat"]), dict(tasks["bar"]), dict(tasks["temp"])]
    per_task[2]["U"] = per_task[2]["U"] + g_U
    per_task[2]["L1w"] = per_task[2]["L1w"] + g_L1w
    g = np.array(
        [sum(np.linalg.norm(per_task[i][n]) for n in GROUPS[i]) for i in range(3)]
    )
    G = weights * g
    ratio = L / initial
    target = G.mean() * (ratio / ratio.mean()) ** GRADNORM.grad_alpha
    np.testing.assert_allclose(
        grads.gradnorm.weights, np.sign(G - target) * g, rtol=1e-6
    )
    np.testing.assert_array_equal(grads.gradnorm.initial_losses, np.zeros(3))
    assert float(aux["gradnorm_loss"]) == pytest.approx(
        np.abs(G - target).sum(), rel=1e-6
    )


def test_dead_hypernetwork_is_reported(x64, getkey):
    # Same shapes and configurations as above: the compiled loss is reused.
    model, X = _setup(getkey)
    dead = eqx.tree_at(
        lambda m: m.hypernet.linear_out.bias,
        model,
        jnp.full((model.mix_dim,), -1e3),
    )
    learner = tidhy.Learner(model=dead, gradnorm=None)
    (_, aux), _ = _grad(learner, X, None, inference=INFERENCE, train=PLAIN)
    assert float(aux["dead_hypernet"]) == 1.0


# the optimiser ----------------------------------------------------------------


def _adamw_numpy(grads, params, lr, wd, n):
    """n AdamW steps (PyTorch's update) on one array, from the list of gradients."""
    m = v = np.zeros_like(params)
    p = params.copy()
    for t, g in enumerate(grads[:n], start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p = p * (1 - lr * wd) - lr * (m / (1 - 0.9**t)) / (
            np.sqrt(v / (1 - 0.999**t)) + 1e-8
        )
    return p


def test_optimizer_groups_clipping_and_gradnorm_state(x64, getkey):
    model = small_model(getkey())
    learner = tidhy.Learner(
        model=model,
        gradnorm=tidhy.GradNormState(
            weights=jnp.ones(3), initial_losses=jnp.array([1.0, 2.0, 3.0])
        ),
    )
    train = dataclasses.replace(GRADNORM, clip_grad=0.5)
    optimizer = tidhy.make_optimizer(learner, train)
    params = eqx.filter(learner, eqx.is_inexact_array)
    state = optimizer.init(params)

    def gradient(scale):
        g = jax.tree.map(lambda a: scale * jr.normal(getkey(), a.shape), params)
        return g

    grads = [gradient(1.0), gradient(3.0)]
    # The GradNorm weights' second gradient flips sign but is small: with a kept
    # Adam state the momentum keeps the first direction; a fresh state would not.
    grads[1] = eqx.tree_at(
        lambda l: l.gradnorm.weights, grads[1], -0.1 * grads[0].gradnorm.weights
    )
    update = jax.jit(optimizer.update)
    current = params
    for g in grads:
        updates, state = update(g, state, current)
        current = eqx.apply_updates(current, updates)

    def clipped(g):
        theta = [np.asarray(x) for x in jax.tree.leaves(g.model)]
        norm = np.sqrt(sum(np.sum(x**2) for x in theta))
        return min(1.0, 0.5 / norm)

    scales = [clipped(g) for g in grads]
    lrs = {"decoder": 0.01, "temporal": 0.01, "hypernet": 0.001}
    flat_p = jax.tree_util.tree_flatten_with_path(params.model)[0]
    flat_g = [jax.tree.leaves(g.model) for g in grads]
    flat_new = jax.tree.leaves(current.model)
    for i, (path, p0) in enumerate(flat_p):
        key = jax.tree_util.keystr(path)
        group = next(k for k in lrs if key.startswith(f".{k}"))
        expected = _adamw_numpy(
            [s * np.asarray(gs[i]) for s, gs in zip(scales, flat_g)],
            np.asarray(p0),
            lrs[group],
            train.weight_decay,
            2,
        )
        np.testing.assert_allclose(flat_new[i], expected, rtol=1e-10, err_msg=key)
    # GradNorm weights: their own AdamW (unclipped, state kept), then 3 softmax(·).
    w = np.ones(3)
    m = v = np.zeros(3)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g.gradnorm.weights)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w * (1 - 0.01 * train.weight_decay) - 0.01 * (m / (1 - 0.9**t)) / (
            np.sqrt(v / (1 - 0.999**t)) + 1e-8
        )
        w = 3 * np.exp(w) / np.exp(w).sum()
    np.testing.assert_allclose(current.gradnorm.weights, w, rtol=1e-10)
    assert float(jnp.sum(current.gradnorm.weights)) == pytest.approx(3.0)
    np.testing.assert_array_equal(current.gradnorm.initial_losses, [1.0, 2.0, 3.0])


def test_renormalisation_after_the_step(getkey):
    model = small_model(getkey())
    learner = tidhy.Learner(model=model, gradnorm=None)
    train = dataclasses.replace(PLAIN, normalize_decoder=True, normalize_temporal=True)
    optimizer = tidhy.make_optimizer(learner, train)
    params = eqx.filter(learner, eqx.is_inexact_array)
    grads = jax.tree.map(lambda a: jr.normal(getkey(), a.shape), params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    new = eqx.apply_updates(learner, updates).model
    np.testing.assert_allclose(
        jnp.linalg.norm(new.decoder.linear_in.weight, axis=0), 1.0, rtol=1e-6
    )
    np.testing.assert_allclose(jnp.linalg.norm(new.temporal, axis=1), 1.0, rtol=1e-6)
    # The bias is not renormalised.
    assert not np.allclose(jnp.linalg.norm(new.decoder.linear_in.bias), 1.0, rtol=1e-3)


def test_milestone_schedule_counts_epochs():
    from eqx_models.tidhy._optimizer import epoch_schedule

    train = dataclasses.replace(PLAIN, milestones=(2, 4), gamma=0.5)
    schedule = epoch_schedule(0.01, train, steps_per_epoch=3, n_epochs=10)
    got = [float(schedule(i)) for i in range(15)]
    expected = [0.01 * 0.5 ** ((i >= 6) + (i >= 12)) for i in range(15)]
    np.testing.assert_allclose(got, expected, rtol=1e-7)
    default = epoch_schedule(0.01, PLAIN, steps_per_epoch=1, n_epochs=1000)
    assert [float(default(i)) for i in (199, 200, 400, 600, 800)] == pytest.approx(
        [0.01, 0.005, 0.0025, 0.00125, 0.000625]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cos_eta=-1.0), "`cos_eta` must be a finite real number >= 0"),
        (dict(lr_decoder=0.0), "`lr_decoder` must be a finite real number > 0"),
        (dict(clip_grad=-1.0), "`clip_grad` must be a real number > 0"),
        (dict(gamma=1.5), r"`gamma` must be a finite real number in \(0, 1\]"),
        (dict(milestones=(0, 3)), r"`milestones\[0\]` must be a positive integer"),
    ],
)
def test_bad_train_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=f"TiDHyTrainConfig: {match}"):
        tidhy.TiDHyTrainConfig(**kwargs)
