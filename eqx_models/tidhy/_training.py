"""The outer loop of TiDHy: the parameter loss of a batch of windows, with GradNorm.

The latents are inferred with gradients stopped; the three task losses and the
regularisers are then differentiated with respect to θ. With GradNorm the task
weights are trained alongside in a `Learner`, their gradient kept apart from θ's.
`training_loss` is the `loss_fn` that `transforms.make_train_step` takes.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from transforms.validation import (
    check_bool,
    check_in_range,
    check_size,
    check_type,
    describe,
    fail,
    typechecked,
)

from ._functional import l1, mean_pairwise_abs_cosine, torch_abs
from ._inference import (
    check_features,
    check_mask,
    frozen,
    InferenceConfig,
    observed_only,
)
from ._model import TiDHy
from ._sequence import infer_sequence, window_mean, window_presence


N_TASKS = 3
TASK_NAMES = ("hat", "bar", "temp")


class TiDHyTrainConfig(eqx.Module):
    """Hyperparameters of the outer (parameter) training (all static), for
    [`eqx_models.tidhy.train`][] (formerly `TrainConfig`, a name that still works,
    with a `DeprecationWarning`, until the next release).

    Loss: `L_hat + L_bar + L_temp + cos_eta cos_reg + orth_r2 orth_reg` plus the
    optional `l1_temporal Σ|U|`, `l1_hyper_out Σ|L4|` (the hypernetwork's output
    weight), `l1_decoder Σ|W|`, `orth_decoder mean((WᵀW - I)²)` and
    `nuclear Σ_k ||V_k||_*` (all 0 by default).

    - `cos_eta`, `orth_r2`: weights of the two cosine regularisers (5 and 5).
    - `lr_decoder`, `lr_temporal`, `lr_hyper`: AdamW learning rates of the three
        parameter groups (0.01, 0.01, 0.001); `weight_decay` (1e-5) for all,
        biases and LayerNorm included; betas 0.9/0.999, eps 1e-8.
    - `clip_grad`: clip the global gradient norm of θ (500).
    - `milestones`: epochs at which every learning rate is multiplied by `gamma`
        (0.5). `None`: the original's rule, `n_epochs // 5 * k` for k = 1..4.
    - `normalize_decoder`: after every step, rescale each column of `W` (one
        latent's pattern) to unit norm; `normalize_temporal`: rescale each `U_k` to
        unit norm. Off by default.
    - `grad_norm`: balance the three tasks `[L_hat, L_bar, L_temp + regularisers]`
        with GradNorm (on by default, as in the original's dataset configurations);
        `grad_alpha` (0.5) and `lr_gradnorm` (0.01, AdamW with `weight_decay`) are
        its hyperparameters.
    - `first_step_inference`: infer `r_0` with the first-step inference in the
        training forward pass (the pre-2025 original); default `False`, `r_0 = 0`
        (the paper's version).

    **Raises:**

    `ValueError` for a negative weight or penalty, a learning rate or `clip_grad`
    that is not positive, a `gamma` outside `(0, 1]`, or NaN or infinity anywhere
    (`clip_grad` may be infinite); `TypeError`/`ValueError` for milestones that
    are not positive integers or flags that are not bools.
    """

    cos_eta: float = eqx.field(default=5.0, static=True)
    orth_r2: float = eqx.field(default=5.0, static=True)
    l1_temporal: float = eqx.field(default=0.0, static=True)
    l1_hyper_out: float = eqx.field(default=0.0, static=True)
    l1_decoder: float = eqx.field(default=0.0, static=True)
    orth_decoder: float = eqx.field(default=0.0, static=True)
    nuclear: float = eqx.field(default=0.0, static=True)
    lr_decoder: float = eqx.field(default=0.01, static=True)
    lr_temporal: float = eqx.field(default=0.01, static=True)
    lr_hyper: float = eqx.field(default=0.001, static=True)
    weight_decay: float = eqx.field(default=1e-5, static=True)
    clip_grad: float = eqx.field(default=500.0, static=True)
    milestones: tuple[int, ...] | None = eqx.field(default=None, static=True)
    gamma: float = eqx.field(default=0.5, static=True)
    normalize_decoder: bool = eqx.field(default=False, static=True)
    normalize_temporal: bool = eqx.field(default=False, static=True)
    grad_norm: bool = eqx.field(default=True, static=True)
    grad_alpha: float = eqx.field(default=0.5, static=True)
    lr_gradnorm: float = eqx.field(default=0.01, static=True)
    first_step_inference: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        name = "TiDHyTrainConfig"
        for arg in (
            "cos_eta",
            "orth_r2",
            "l1_temporal",
            "l1_hyper_out",
            "l1_decoder",
            "orth_decoder",
            "nuclear",
            "weight_decay",
            "grad_alpha",
        ):
            check_in_range(name, arg, getattr(self, arg), low=0)
        for arg in ("lr_decoder", "lr_temporal", "lr_hyper", "lr_gradnorm"):
            check_in_range(
                name, arg, getattr(self, arg), low=0, inclusive=(False, True)
            )
        # An infinite threshold is a way to say "never clip".
        check_in_range(
            name,
            "clip_grad",
            self.clip_grad,
            low=0,
            inclusive=(False, True),
            finite=False,
        )
        check_in_range(
            name, "gamma", self.gamma, low=0, high=1, inclusive=(False, True)
        )
        if self.milestones is not None:
            check_type(
                name, "milestones", self.milestones, (tuple, list), "a tuple of epochs"
            )
            for i, m in enumerate(self.milestones):
                check_size(name, f"milestones[{i}]", m)
        for arg in (
            "normalize_decoder",
            "normalize_temporal",
            "grad_norm",
            "first_step_inference",
        ):
            check_bool(name, arg, getattr(self, arg))


class GradNormState(eqx.Module):
    """The trainable state of GradNorm task balancing.

    - `weights`: the task weights `w_g` (they start at 1 and are kept at
        `3 softmax(·)` after every update, so they sum to 3).
    - `initial_losses`: the task losses at the first step, `ℓ₀` (fixed).

    The weights have their own AdamW whose state lives in the optimiser state and
    persists across steps; their gradient is that of the GradNorm loss and reaches
    no model parameter.
    """

    weights: Float[Array, " 3"]
    initial_losses: Float[Array, " 3"]


class Learner(eqx.Module):
    """What the training step updates: the model and, with GradNorm, its state."""

    model: TiDHy
    gradnorm: GradNormState | None


class TaskLosses(NamedTuple):
    """The three reconstruction/dynamics losses of a batch (scalars), each summed over
    time and features and averaged over windows: `hat` = Σ_t ℓ(W r_t + b, x_t),
    `bar` = Σ_{t≥1} ℓ(W r̄_t + b, x_t), `temp` = temp_weight Σ_{t≥1} ||r_t - r̄_t||²,
    with `r̄_t = V(w(r2_t)) r_{t-1}` (the freshly inferred `r2_t`)."""

    hat: Float[Array, ""]
    bar: Float[Array, ""]
    temp: Float[Array, ""]


def _check_model(fn: str, model) -> None:
    check_type(fn, "model", model, TiDHy, "a TiDHy model")


def _check_windows(fn: str, arg: str, x, size: int, axis_name: str) -> None:
    """A `(B, T, size)` floating array (shapes only: this runs at trace time)."""
    expected = f"a floating array of shape (B, T, {axis_name}={size})"
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise fail(fn, arg, expected, describe(x), TypeError)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise fail(fn, arg, expected, describe(x), TypeError)
    if x.ndim != 3 or x.shape[-1] != size:
        raise fail(fn, arg, expected, f"shape {x.shape}")


def task_losses_from_latents(model: TiDHy, X, R, R2, mask=None) -> TaskLosses:
    """The task losses given inferred latents `R`, `R2` (treated as constants).

    With a `mask`, the spatial terms of missing entries are dropped (`hat` and
    `bar` sum over the observed entries only; `X` may hold anything there) and
    the windows with no observed entry are left out of the mean over windows; the
    temporal term, which involves no observation, is kept at every step of the
    other windows.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `X`: windows, shape `(B, T, input_dim)`.
    - `R`, `R2`: their inferred latents, shapes `(B, T, r_dim)` and
        `(B, T, r2_dim)`.
    - `mask`: optional bool array of shape `(B, T, input_dim)` (or `(B, T)`),
        True where `X` is observed.

    **Returns:**

    A [`eqx_models.tidhy.TaskLosses`][].

    **Raises:**

    `TypeError` if `model` is not a `TiDHy`, an array is not floating or `mask`
    not bool; `ValueError` for an array whose shape does not match the model or
    `X` (broadcasting would give a loss of the wrong thing).
    """
    name = "task_losses_from_latents"
    _check_model(name, model)
    _check_windows(name, "X", X, model.input_dim, "input_dim")
    _check_windows(name, "R", R, model.r_dim, "r_dim")
    _check_windows(name, "R2", R2, model.r2_dim, "r2_dim")
    for arg, value in (("R", R), ("R2", R2)):
        if value.shape[:2] != X.shape[:2]:
            raise fail(
                name,
                arg,
                f"the (B, T) = {X.shape[:2]} of `X` first",
                f"shape {value.shape}",
            )
    mask = check_mask(name, mask, X)
    if mask is not None:
        X = jnp.where(mask, X, 0)
    return _task_losses(model, X, R, R2, mask)


def _task_losses(model: TiDHy, X, R, R2, mask) -> TaskLosses:
    R, R2 = jax.lax.stop_gradient((R, R2))
    present = window_presence(mask)
    over_bt = lambda f: jax.vmap(jax.vmap(f))
    spatial_hat = over_bt(model.spatial_loss)(R, X)
    r_bar = over_bt(model.predict)(R[:, :-1], R2[:, 1:])
    spatial_bar = over_bt(model.spatial_loss)(r_bar, X[:, 1:])
    if mask is not None:
        spatial_hat = jnp.where(mask, spatial_hat, 0)
        spatial_bar = jnp.where(mask[:, 1:], spatial_bar, 0)
    temporal = jnp.sum((R[:, 1:] - r_bar) ** 2, axis=-1)
    return TaskLosses(
        hat=window_mean(spatial_hat.sum(-1), present),
        bar=window_mean(spatial_bar.sum(-1), present),
        temp=model.temp_weight * window_mean(temporal, present),
    )


def regularisers(model: TiDHy, train: TiDHyTrainConfig) -> dict[str, Array]:
    """The weighted parameter regularisers that are switched on, by name.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `train`: the [`eqx_models.tidhy.TiDHyTrainConfig`][] holding the weights.

    **Returns:**

    `{name: scalar}` for each regulariser whose weight is not 0.

    **Raises:**

    `TypeError` if `model` is not a `TiDHy` or `train` not a `TiDHyTrainConfig`.
    """
    _check_model("regularisers", model)
    check_type(
        "regularisers", "train", train, TiDHyTrainConfig, "a tidhy.TiDHyTrainConfig"
    )
    terms = {}
    if train.cos_eta:
        flat = model.transition_matrices().reshape(model.mix_dim, -1)
        terms["cos_reg"] = mean_pairwise_abs_cosine(flat, train.cos_eta / model.mix_dim)
    if train.orth_r2:
        columns = model.hypernet.linear_in.weight.T
        terms["orth_r2"] = mean_pairwise_abs_cosine(
            columns, train.orth_r2 / model.r2_dim
        )
    if train.l1_temporal:
        terms["l1_temporal"] = train.l1_temporal * l1(model.temporal)
    if train.l1_hyper_out:
        terms["l1_hyper_out"] = train.l1_hyper_out * l1(
            model.hypernet.linear_out.weight
        )
    W = model.decoder.linear_in.weight
    if train.l1_decoder:
        terms["l1_decoder"] = train.l1_decoder * l1(W)
    if train.orth_decoder:
        gram = W.T @ W - jnp.eye(W.shape[1], dtype=W.dtype)
        terms["orth_decoder"] = train.orth_decoder * jnp.mean(gram**2)
    if train.nuclear:
        terms["nuclear"] = train.nuclear * jnp.sum(
            jnp.linalg.svd(model.transition_matrices(), compute_uv=False)
        )
    return terms


def _task_vector(model: TiDHy, X, R, R2, train: TiDHyTrainConfig, mask=None):
    losses = _task_losses(model, X, R, R2, mask)
    regs = regularisers(model, train)
    reg_total = sum(regs.values(), jnp.zeros((), X.dtype))
    tasks = jnp.stack([losses.hat, losses.bar, losses.temp + reg_total])
    return tasks, (losses, regs)


def _group_of(path) -> str:
    names = [getattr(k, "name", None) for k in path]
    if "decoder" in names:
        return "decoder"
    if "hypernet" in names:
        return "hypernet"
    return "temporal"


# GradNorm measures each task's gradient on the parameters it acts on:
# L_hat on the decoder, L_bar on the decoder and the temporal matrices, the
# temporal/regulariser task on the temporal matrices and the hypernetwork.
_TASK_GROUPS = (("decoder",), ("decoder", "temporal"), ("temporal", "hypernet"))


def _task_gradient_norms(
    model: TiDHy, X, R, R2, train: TiDHyTrainConfig, mask=None
) -> Array:
    """`g_i = Σ_{p in P_i} ||∂L_i/∂p||`: a sum of per-tensor norms per task."""
    model = frozen(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    jac = jax.jacrev(
        lambda p: _task_vector(eqx.combine(p, static), X, R, R2, train, mask)[0]
    )(params)
    norms = jnp.zeros((N_TASKS,), X.dtype)
    for path, leaf in jax.tree_util.tree_flatten_with_path(jac)[0]:
        group = _group_of(path)
        per_task = jnp.sqrt(jnp.sum(leaf.reshape(N_TASKS, -1) ** 2, axis=1))
        mask = jnp.array([group in groups for groups in _TASK_GROUPS])
        norms = norms + jnp.where(mask, per_task, 0.0)
    return jax.lax.stop_gradient(norms)


def _gradnorm_loss(state: GradNormState, tasks, norms, alpha: float):
    """The GradNorm objective as a function of the weights only."""
    G = state.weights * norms
    ratio = jax.lax.stop_gradient(tasks) / state.initial_losses
    relative = ratio / jnp.mean(ratio)
    target = jax.lax.stop_gradient(jnp.mean(G) * relative**alpha)
    return jnp.sum(torch_abs(G - target))


def training_loss(
    learner: Learner,
    windows,
    key=None,
    *,
    inference: InferenceConfig,
    train: TiDHyTrainConfig,
):
    """The training loss of a batch of windows: `loss_fn` for `make_train_step`.

    Infers the latents of every step (compiled inner loops, stopped gradients), then
    evaluates the task losses and regularisers with gradients to θ. Without GradNorm
    the loss is their sum. With GradNorm (`learner.gradnorm` present) the value is
    the weighted sum `Σ w_i L_i`; the gradient with respect to θ is that of the
    weighted sum and the gradient with respect to the task weights is that of the
    GradNorm loss `Σ_i |G_i - mean(G) r_i^α|` (`G_i = w_i g_i` with `g_i` the sum of
    task i's per-tensor gradient norms, `r_i` its loss ratio to `ℓ₀` over the mean
    ratio); neither leaks into the other.

    **Arguments:**

    - `learner`: a [`eqx_models.tidhy.Learner`][].
    - `windows`: a batch of windows, shape `(B, T, D)`, or a pair
        `(windows, mask)` with `mask` a bool array of the same shape (or
        `(B, T)`), True where observed: missing entries add nothing to the
        inference energies and the losses (they may hold anything), and windows
        with nothing observed are skipped (see
        [`eqx_models.tidhy.task_losses_from_latents`][]).
    - `key`: unused (the loss is deterministic); accepted for `make_train_step`.
    - `inference`, `train`: the configurations.

    **Returns:**

    `(loss, aux)` with `aux` a dict of scalar metrics: the task losses
    (`loss_hat`, `loss_bar`, `loss_temp`), each regulariser, the GradNorm weights
    and loss, inference diagnostics (`inference_iters_mean`, `inference_iters_max`,
    `inference_converged`, the fraction of steps that converged), `latent_max_abs`
    (the largest |latent|; non-finite when an inner loop diverged) and
    `dead_hypernet` (the fraction of steps whose mixture weights are all 0).

    **Raises:**

    `TypeError` if `learner` is not a `Learner` (a bare `TiDHy` included: wrap it
    with [`eqx_models.tidhy.init_learner`][]), `inference` not an
    `InferenceConfig` or `train` not a `TiDHyTrainConfig`; `TypeError`/`ValueError` for
    `windows` that are not a floating `(B, T, D)` array with `D` the model's
    `input_dim`. These run when the loss is traced, before any compilation.
    """
    del key
    name = "training_loss"
    expected = "a tidhy.Learner (wrap a model with init_learner)"
    check_type(name, "learner", learner, Learner, expected)
    check_type(name, "inference", inference, InferenceConfig, "an InferenceConfig")
    check_type(name, "train", train, TiDHyTrainConfig, "a tidhy.TiDHyTrainConfig")
    mask = None
    if isinstance(windows, tuple):
        if len(windows) != 2:
            raise fail(
                name,
                "windows",
                "an array or a (windows, mask) pair",
                describe(windows),
                TypeError,
            )
        windows, mask = windows
    _check_windows(name, "windows", windows, learner.model.input_dim, "input_dim")
    mask = check_mask(name, mask, windows)
    if mask is not None:
        windows = jnp.where(mask, windows, 0)
    model = learner.model
    R, R2, stats = infer_sequence(
        frozen(model),
        windows,
        inference,
        first_step=train.first_step_inference,
        mask=mask,
    )
    tasks, (losses, regs) = _task_vector(model, windows, R, R2, train, mask)
    steps = (slice(None), slice(1, None))
    w_all, _ = jax.vmap(jax.vmap(frozen(model).mixture))(R2[:, 1:])
    aux = {
        "loss_hat": losses.hat,
        "loss_bar": losses.bar,
        "loss_temp": losses.temp,
        **regs,
        "inference_iters_mean": jnp.mean(stats.n_iter[steps].astype(windows.dtype)),
        "inference_iters_max": jnp.max(stats.n_iter[steps]).astype(windows.dtype),
        "inference_converged": jnp.mean(stats.converged[steps].astype(windows.dtype)),
        "latent_max_abs": jnp.maximum(jnp.max(jnp.abs(R)), jnp.max(jnp.abs(R2))),
        "dead_hypernet": jnp.mean(jnp.all(w_all == 0, axis=-1).astype(windows.dtype)),
    }
    if learner.gradnorm is None:
        return jnp.sum(tasks), aux
    state = learner.gradnorm
    norms = _task_gradient_norms(model, windows, R, R2, train, mask)
    gn_loss = _gradnorm_loss(state, tasks, norms, train.grad_alpha)
    weighted = jnp.sum(jax.lax.stop_gradient(state.weights) * tasks)
    # The value is the weighted loss; the GradNorm term contributes its gradient
    # (with respect to the task weights only) and nothing to the value.
    loss = weighted + (gn_loss - jax.lax.stop_gradient(gn_loss))
    aux["gradnorm_loss"] = jax.lax.stop_gradient(gn_loss)
    for i, name in enumerate(TASK_NAMES):
        aux[f"gradnorm_w_{name}"] = jax.lax.stop_gradient(state.weights[i])
    return loss, aux


@typechecked
def init_learner(
    model: TiDHy,
    windows: Float[Array, "B T D"],
    *,
    inference: InferenceConfig = InferenceConfig(),
    train: TiDHyTrainConfig = TiDHyTrainConfig(),
    mask: Bool[Array, "*shape"] | None = None,
) -> Learner:
    """Wrap a model for training; with GradNorm, record `ℓ₀` on the first batch.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `windows`: the first training batch, shape `(B, T, D)`.
    - `inference`, `train`: the configurations.
    - `mask`: optional bool observation mask of `windows` (see
        [`eqx_models.tidhy.training_loss`][]).

    **Returns:**

    A [`eqx_models.tidhy.Learner`][]; its `gradnorm` is `None` unless
    `train.grad_norm`, else weights of 1 and `initial_losses` the task losses of the
    first batch at the initial parameters (what the first step would measure).

    **Raises:**

    `ValueError` if the windows do not match the model or are shorter than 2
    steps, or `mask` has another shape; `TypeError` for a `mask` that is not bool.
    """
    check_features("init_learner", "windows", windows, model)
    if windows.shape[1] < 2:
        raise ValueError(
            "init_learner: `windows` must hold at least 2 time steps, got shape "
            f"{windows.shape}."
        )
    mask = check_mask("init_learner", mask, windows)
    if not train.grad_norm:
        return Learner(model=model, gradnorm=None)
    windows = observed_only("init_learner", "windows", windows, mask)
    tasks = _initial_tasks(model, windows, inference, train, mask)
    return Learner(
        model=model,
        gradnorm=GradNormState(
            weights=jnp.ones((N_TASKS,), windows.dtype), initial_losses=tasks
        ),
    )


@eqx.filter_jit
def _initial_tasks(model, windows, inference, train, mask=None):
    R, R2, _ = infer_sequence(
        frozen(model),
        windows,
        inference,
        first_step=train.first_step_inference,
        mask=mask,
    )
    return jax.lax.stop_gradient(_task_vector(model, windows, R, R2, train, mask)[0])
