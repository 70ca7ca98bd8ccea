"""The inner loop of TiDHy: latent inference at one time step, parameters fixed.

The latents `r` and `r2` minimise an energy of reconstruction, dynamics and L1 terms
by SGD with Nesterov momentum and soft thresholds, compiled with
`transforms.scan_optimize`. `InferenceConfig` chooses per-window solves or the
original's batch-mean energy. The scans over windows, training and evaluation call
the unchecked `*_impl` functions.
"""

import dataclasses
import functools
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int

from transforms import scan_optimize, soft_threshold

# `check_finite` is imported from here by `._fit`.
from transforms.validation import (
    check_bool,
    check_choice,
    check_finite as check_finite,
    check_in_range,
    check_size,
    describe,
    fail,
    typechecked,
)

from ._functional import l1, RELATIVE_CHANGE_EPS
from ._fused import default_on_this_device, fused_infer
from ._model import TiDHy


BatchMode = Literal["per_window", "reference"]
_BATCH_MODES = ("per_window", "reference")
_IMPLEMENTATIONS = ("auto", "xla", "pallas")

# The inner loop's iterations per stopping test with `check_every="auto"` in the
# per-window mode on an accelerator: at most 15 masked iterations wasted per loop
# for a round trip to the host saved on every other iteration. Measured on an H200
# (benchmarks/tidhy.py, paper size): per-window evaluation 1.63 s against 2.21 s
# with a test per iteration. In the reference mode the loop is shared by the whole
# batch and the masked chunk cost more than the round trips it saved (training
# epoch 1.71 s against 1.52 s), so there `"auto"` tests every iteration, except
# with the Pallas kernels, whose iterations after the stop only launch.
AUTO_CHECK_EVERY = 16


class InferenceConfig(eqx.Module):
    """Hyperparameters of the per-time-step latent inference (all static).

    - `lr_r`, `lr_r2`: SGD learning rates of `r` and `r2` (Nesterov momentum).
        `None` (default) picks the mode's default: 0.2 in the reference mode (the
        original's value, applied to the batch-mean energy, i.e. a per-window step
        of 0.2 / B) and 0.05 in the per-window mode, where the step applies to one
        window's energy undivided (0.2 makes the inner loop diverge for typical
        decoders with `D = 20`; a diverging loop is reported, never silent).
    - `max_iter`: the iteration cap of every inner loop.
    - `tol`: stop when the relative changes of `r` and `r2` are both `< tol`.
    - `momentum`: the SGD momentum (0.9).
    - `halve_lr_r`: halve the learning rate of `r` at every tenth of `max_iter`
        (iterations `max_iter // 10`, `2 * (max_iter // 10)`, ... below `max_iter`),
        as the original does; needs `max_iter >= 10`. `r2` keeps `lr_r2`.
    - `lmda_r`, `lmda_r2`: soft thresholds applied after every update (fixed, not
        scaled by the learning rate).
    - `l1_r`, `l1_r2`, `l1_w`: L1 penalties on `r`, `r2` and the mixture weights in
        the inference energy (summed over windows in the reference mode).
    - `batch_mode`: `"per_window"` (default): every window minimises its own energy
        with step `lr` and stops on its own (the computation is a `vmap` over
        windows). `"reference"`: the original's semantics: one energy, the **mean**
        over the batch, so each window's effective step is `lr / B`, and the loop
        stops when the relative changes measured over the whole batch (Frobenius
        norms) are below `tol`. With one window both modes are identical.
    - `batch_converge`: the stopping rule of the reference mode. `True` (default,
        the original's training setting): the relative changes are Frobenius norms
        over the whole batch. `False` (the original's `batch_converge=False`, used
        by its `run_seq_len_model`): the relative change of every window is
        measured on its own (norms over the latent dimension), and the shared loop
        stops once every window's relative changes of `r` and `r2` are below `tol`.
        The windows still share one loop and one iteration count, as in the
        original: a window that passed the test keeps being updated until all
        have. For windows that each stop on their own, use the per-window mode
        (with `lr / B` to keep the reference step). Unused in the per-window mode,
        where every window is a batch of one and both rules coincide.
    - `first_step_weight_decay`: AdamW weight decay of the first-step inference
        ([`eqx_models.tidhy.infer_first_step`][]), 0.01 as PyTorch's default.
    - `check_every`: how many iterations the compiled inner loop runs between two
        tests of the stopping rule (`check_every` of
        [`transforms.scan_optimize`][]). It changes the speed only: the
        iterations of a chunk after the loop has stopped change nothing, so the
        latents, iteration counts and diagnostics are the same for every value.
        `"auto"` (default): 16 in the per-window mode on a GPU or TPU, where
        every test is a round trip to the host; 1 on a CPU, where the test is
        free, and in the reference mode of the XLA loop, where on an H200 the
        chunk's masked iterations cost more than the round trips they save (the
        Pallas loop's cost nothing but their launches: 16 there too); decided by
        the default backend when the inference is traced. Not part of the
        configuration that training checkpoints compare on resume.
    - `implementation`: how the loop is compiled. `"xla"`: as XLA compiles it
        from the energy and `jax.grad`, about 28 small kernels per iteration on a
        GPU. `"pallas"`: as Pallas kernels with the energy's gradient written out
        (`eqx_models/tidhy/_fused.py`): in the per-window mode one kernel launch
        runs the whole loop of a block of windows, in the reference mode an
        iteration is two launches; for GPUs (Triton), on a CPU it runs in Pallas'
        interpreter, correct but slow (on a TPU it is refused), and a GPU whose
        shared memory per program cannot hold the model's weights is refused with
        the sizes. `"auto"` (default): `"pallas"` on a single CUDA GPU whose
        shared memory holds the weights (on an H100, 2-3x faster at paper size),
        `"xla"` elsewhere (CPUs, TPUs, several devices, larger models); decided
        when the inference is traced. The two agree up to rounding (both compute
        their products in full float32, also on GPUs whose default is TF32: the
        stopping rule amplifies rounding), so with the same iteration counts but
        at near-ties of the tolerance. Like `check_every`, not part of the
        configuration that training checkpoints compare on resume.

    **Raises:**

    `ValueError` for a value out of its range, NaN or infinite (a learning rate
    that is not positive, a negative tolerance or penalty, a `momentum` outside
    `[0, 1)`), a `max_iter` below 10 with the halving schedule, a `check_every`
    below 1, or an unknown `batch_mode` or `implementation`; `TypeError` for a
    `max_iter` or `check_every` that is not an integer (or `"auto"`) or a
    `halve_lr_r` or `batch_converge` that is not a bool.
    """

    lr_r: float | None = eqx.field(default=None, static=True)
    lr_r2: float | None = eqx.field(default=None, static=True)
    max_iter: int = eqx.field(default=2000, static=True)
    tol: float = eqx.field(default=0.01, static=True)
    momentum: float = eqx.field(default=0.9, static=True)
    halve_lr_r: bool = eqx.field(default=True, static=True)
    lmda_r: float = eqx.field(default=0.0, static=True)
    lmda_r2: float = eqx.field(default=0.0, static=True)
    l1_r: float = eqx.field(default=0.0, static=True)
    l1_r2: float = eqx.field(default=0.0, static=True)
    l1_w: float = eqx.field(default=0.0, static=True)
    batch_mode: str = eqx.field(default="per_window", static=True)
    first_step_weight_decay: float = eqx.field(default=0.01, static=True)
    check_every: int | str = eqx.field(default="auto", static=True)
    batch_converge: bool = eqx.field(default=True, static=True)
    implementation: str = eqx.field(default="auto", static=True)

    def __check_init__(self):
        name = "InferenceConfig"
        for arg in ("lr_r", "lr_r2"):
            value = getattr(self, arg)
            if value is not None:
                check_in_range(name, arg, value, low=0, inclusive=(False, True))
        for arg in (
            "tol",
            "lmda_r",
            "lmda_r2",
            "l1_r",
            "l1_r2",
            "l1_w",
            "first_step_weight_decay",
        ):
            check_in_range(name, arg, getattr(self, arg), low=0)
        check_in_range(
            name, "momentum", self.momentum, low=0, high=1, inclusive=(True, False)
        )
        check_size(name, "max_iter", self.max_iter)
        check_bool(name, "halve_lr_r", self.halve_lr_r)
        check_bool(name, "batch_converge", self.batch_converge)
        if self.halve_lr_r and self.max_iter < 10:
            raise ValueError(
                "InferenceConfig: `max_iter` must be >= 10 with the halving schedule "
                f"on `lr_r` (`halve_lr_r=True`), got {self.max_iter}."
            )
        check_choice(name, "batch_mode", self.batch_mode, _BATCH_MODES)
        check_choice(name, "implementation", self.implementation, _IMPLEMENTATIONS)
        if isinstance(self.check_every, str):
            if self.check_every != "auto":
                raise fail(
                    name,
                    "check_every",
                    "'auto' or a positive integer",
                    repr(self.check_every),
                )
        else:
            check_size(name, "check_every", self.check_every)

    @property
    def iterations_per_check(self) -> int:
        """The `check_every` in use (`"auto"` resolved for the default backend)."""
        if isinstance(self.check_every, str):
            # `"auto"` is the Pallas loop on one GPU (unless the model's weights
            # do not fit: `infer_impl` resolves it first, so this is then exact).
            one_gpu = jax.default_backend() == "gpu" and jax.device_count() == 1
            xla = self.implementation == "xla" or (
                self.implementation == "auto" and not one_gpu
            )
            reference_xla = self.batch_mode == "reference" and xla
            if jax.default_backend() == "cpu" or reference_xla:
                return 1
            return AUTO_CHECK_EVERY
        return int(self.check_every)

    @property
    def learning_rates(self) -> tuple[float, float]:
        """The learning rates `(lr_r, lr_r2)` in use (the mode's defaults for
        `None`)."""
        default = 0.2 if self.batch_mode == "reference" else 0.05
        lr_r = default if self.lr_r is None else self.lr_r
        lr_r2 = default if self.lr_r2 is None else self.lr_r2
        return lr_r, lr_r2

    @property
    def halvings(self) -> tuple[int, ...]:
        """The iterations at which the learning rate of `r` halves (none without
        `halve_lr_r`)."""
        if not self.halve_lr_r:
            return ()
        every = self.max_iter // 10
        return tuple(range(every, self.max_iter, every))

    def lr_r_schedule(self) -> optax.Schedule:
        """The per-iteration learning rate of `r` (an optax schedule)."""
        lr_r = self.learning_rates[0]
        if not self.halve_lr_r:
            return optax.constant_schedule(lr_r)
        return optax.piecewise_constant_schedule(lr_r, {m: 0.5 for m in self.halvings})


class InferenceStats(NamedTuple):
    """Diagnostics of one inference call, one entry per window.

    - `n_iter`: iterations used (in the reference mode the same for every window).
    - `converged`: whether the tolerance test passed before `max_iter`.
    - `rel_change`: the last iteration's relative change (the larger of `r`'s and
        `r2`'s).
    - `energy`: the energy the loop minimised, at the solution (in the reference
        mode the batch energy, repeated for every window).
    - `finite`: whether the latents are finite. A diverging loop stops at the first
        non-finite iterate with `finite=False`.
    """

    n_iter: Int[Array, " B"]
    converged: Bool[Array, " B"]
    rel_change: Float[Array, " B"]
    energy: Float[Array, " B"]
    finite: Bool[Array, " B"]


def _sgd(learning_rate, momentum: float) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=momentum > 0)


def _window_energy(
    latents, model: TiDHy, x, basis, config: InferenceConfig, mask=None, present=None
):
    """The energy of one window split into its smooth part and its L1 part.

    `mask` (shape `(D,)`, True where observed) drops the spatial terms of missing
    features; `present` (a bool scalar) zeroes the whole energy of a window with no
    observed entry at all, so that it is skipped (its latents stay where they
    start). `x` must already be 0 where it is missing: `where` would block a NaN's
    value but not its gradient.
    """
    r, r2 = latents
    per_feature = model.spatial_loss(r, x)
    if mask is not None:
        per_feature = jnp.where(mask, per_feature, 0)
    spatial = jnp.sum(per_feature)
    r_bar = model.predict_from_basis(basis, r2)
    temporal = jnp.sum((r - r_bar) ** 2)
    smooth = spatial + model.temp_weight * temporal
    penalty = jnp.zeros((), smooth.dtype)
    if config.l1_w:
        w, _ = model.mixture(r2)
        penalty = penalty + config.l1_w * l1(w)
    if config.l1_r2:
        penalty = penalty + config.l1_r2 * l1(r2)
    if config.l1_r:
        penalty = penalty + config.l1_r * l1(r)
    if present is not None:
        smooth = jnp.where(present, smooth, 0)
        penalty = jnp.where(present, penalty, 0)
    return smooth, penalty


def _per_window_energy(latents, model, x, basis, config, mask=None, present=None):
    smooth, penalty = _window_energy(latents, model, x, basis, config, mask, present)
    return smooth + penalty


def _batch_energy(latents, model, x, basis, config, mask=None, present=None):
    # The original's objective: smooth terms averaged over the batch, L1 terms
    # summed over it. A skipped window still counts in the mean's B.
    smooth, penalty = jax.vmap(
        lambda r, r2, x, b, m, p: _window_energy((r, r2), model, x, b, config, m, p)
    )(latents[0], latents[1], x, basis, mask, present)
    return jnp.mean(smooth) + jnp.sum(penalty)


def _window_relative_changes(new, old):
    """The original's `batch_converge=False` rule: the relative change of every
    window's `r` and `r2` (norms over the latent axis), all compared with `tol`."""
    return jnp.concatenate(
        [_row_relative_change(n, o) for n, o in zip(new, old)], axis=0
    )


def _step_solver(config: InferenceConfig, objective, relative_change=None):
    optimizer = optax.multi_transform(
        {
            "r": _sgd(config.lr_r_schedule(), config.momentum),
            "r2": _sgd(config.learning_rates[1], config.momentum),
        },
        ("r", "r2"),
    )

    def shrink(latents):
        r, r2 = latents
        return soft_threshold(r, config.lmda_r), soft_threshold(r2, config.lmda_r2)

    # A zero threshold is the identity: skip it rather than compute it.
    prox = shrink if config.lmda_r or config.lmda_r2 else None
    return scan_optimize(
        objective,
        optimizer,
        max_steps=config.max_iter,
        tol=config.tol,
        prox=prox,
        relative_change=relative_change,
        eps=RELATIVE_CHANGE_EPS,
        check_every=config.iterations_per_check,
    )


def _broadcast_stats(stats, n: int) -> InferenceStats:
    return InferenceStats(
        n_iter=jnp.broadcast_to(stats.n_steps, (n,)),
        converged=jnp.broadcast_to(stats.converged, (n,)),
        rel_change=jnp.broadcast_to(stats.rel_change, (n,)),
        energy=jnp.broadcast_to(stats.objective, (n,)),
        finite=jnp.broadcast_to(stats.finite, (n,)),
    )


def _in_full_float32(fn):
    """`fn` with its matrix products in full float32 on every backend (a GPU's
    default is TF32). The inner loops' stopping rule amplifies rounding: at paper
    size, on a CPU, XLA's per-window loop in float32 and in float64 differ by up
    to 4e-3 (latents below 1, rounding near 6e-8), and on an H100 the loop in TF32
    differed from the Pallas kernels' float32 by 0.41. The products are small:
    what they cost is launches, not arithmetic."""

    @functools.wraps(fn)
    def in_full_float32(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return in_full_float32


@_in_full_float32
def infer_impl(
    model: TiDHy,
    x,
    r_prev,
    r2_prev,
    config: InferenceConfig,
    mask=None,
    present=None,
):
    """`infer` without checks, on stopped-gradient inputs; used inside scans.

    `mask` `(B, D)` (True where observed; `x` already 0 elsewhere) and `present`
    `(B,)` (False for a skipped window) are optional; without them the computation
    is exactly the unmasked one.
    """
    basis = jax.vmap(model.basis_predictions)(r_prev)
    if config.implementation == "auto":
        fused = default_on_this_device(model, r2_prev.dtype)
        implementation = "pallas" if fused else "xla"
        config = dataclasses.replace(config, implementation=implementation)
    if config.implementation == "pallas":
        return _fused_impl(model, x, r2_prev, basis, config, mask, present)
    r0 = jnp.zeros_like(r_prev)
    if config.batch_mode == "reference":
        relative_change = None if config.batch_converge else _window_relative_changes
        solver = _step_solver(config, _batch_energy, relative_change)
        (r, r2), stats = solver((r0, r2_prev), model, x, basis, config, mask, present)
        return r, r2, _broadcast_stats(stats, x.shape[0])
    solver = _step_solver(config, _per_window_energy)
    (r, r2), stats = jax.vmap(
        lambda r0, r2_0, x, b, m, p: solver((r0, r2_0), model, x, b, config, m, p)
    )(r0, r2_prev, x, basis, mask, present)
    return (
        r,
        r2,
        InferenceStats(
            n_iter=stats.n_steps,
            converged=stats.converged,
            rel_change=stats.rel_change,
            energy=stats.objective,
            finite=stats.finite,
        ),
    )


def _fused_impl(model: TiDHy, x, r2_prev, basis, config, mask, present):
    out = fused_infer(model, x, r2_prev, basis, config, mask, present)
    latents = (out.r, out.r2)
    if config.batch_mode == "reference":
        energy = _batch_energy(latents, model, x, basis, config, mask, present)
        energy = jnp.broadcast_to(energy, (x.shape[0],))
    else:
        energy = jax.vmap(
            lambda r, r2, x, b, m, p: _per_window_energy(
                (r, r2), model, x, b, config, m, p
            )
        )(out.r, out.r2, x, basis, mask, present)
    energy = jax.lax.stop_gradient(energy)
    return (
        out.r,
        out.r2,
        InferenceStats(
            n_iter=out.n_iter,
            converged=out.converged,
            rel_change=out.rel_change,
            energy=energy,
            finite=out.finite,
        ),
    )


def _first_window_energy(r, model: TiDHy, x, mask=None, present=None):
    per_feature = model.spatial_loss(r, x)
    if mask is not None:
        per_feature = jnp.where(mask, per_feature, 0)
    energy = jnp.sum(per_feature)
    if present is not None:
        energy = jnp.where(present, energy, 0)
    return energy


def _first_batch_energy(r, model: TiDHy, x, mask=None, present=None):
    return jnp.mean(
        jax.vmap(lambda r, x, m, p: _first_window_energy(r, model, x, m, p))(
            r, x, mask, present
        )
    )


def _row_relative_change(new, old):
    return jnp.linalg.norm(new - old, axis=-1) / (
        jnp.linalg.norm(old, axis=-1) + RELATIVE_CHANGE_EPS
    )


@_in_full_float32
def infer_first_step_impl(
    model: TiDHy, x, config: InferenceConfig, mask=None, present=None
):
    """`infer_first_step` without checks (`mask`, `present` as in `infer_impl`)."""
    # An XLA loop whatever `implementation` says (its `check_every` follows).
    config = dataclasses.replace(config, implementation="xla")
    optimizer = optax.adamw(
        config.learning_rates[0],
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=config.first_step_weight_decay,
    )
    r0 = jnp.zeros((x.shape[0], model.r_dim), x.dtype)
    if config.batch_mode == "reference":
        solver = scan_optimize(
            _first_batch_energy,
            optimizer,
            max_steps=config.max_iter,
            tol=config.tol,
            relative_change=_row_relative_change,
            check_every=config.iterations_per_check,
        )
        r, stats = solver(r0, model, x, mask, present)
        return r, _broadcast_stats(stats, x.shape[0])
    solver = scan_optimize(
        _first_window_energy,
        optimizer,
        max_steps=config.max_iter,
        tol=config.tol,
        check_every=config.iterations_per_check,
    )
    r, stats = jax.vmap(lambda r0, x, m, p: solver(r0, model, x, m, p))(
        r0, x, mask, present
    )
    return r, InferenceStats(
        n_iter=stats.n_steps,
        converged=stats.converged,
        rel_change=stats.rel_change,
        energy=stats.objective,
        finite=stats.finite,
    )


def frozen(model: TiDHy) -> TiDHy:
    """The model with gradients stopped on every parameter (θ is fixed in inference)."""
    return jax.tree.map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_inexact_array(a) else a, model
    )


def check_features(name: str, argument: str, x: Array, model: TiDHy) -> None:
    """Raise a `ValueError` unless the last axis of `x` is the model's `input_dim`
    and `x` is not empty (no windows, no steps)."""
    if x.shape[-1] != model.input_dim:
        raise ValueError(
            f"{name}: `{argument}` must have feature dimension {model.input_dim} "
            f"(the model's input_dim), got shape {x.shape}."
        )
    if x.size == 0:
        raise fail(name, argument, "non-empty", f"shape {x.shape}")


def check_mask(name: str, mask, x: Array):
    """The observation mask of `x`, checked: `None`, or a bool array of the shape of
    `x` (True where observed). A mask of `x.shape[:-1]` (whole frames) is broadcast
    over the features. Returns `None` or the mask at `x`'s full shape."""
    if mask is None:
        return None
    expected = (
        f"a bool array of shape {tuple(x.shape)} or {tuple(x.shape[:-1])} "
        "(True where observed)"
    )
    if not (hasattr(mask, "shape") and hasattr(mask, "dtype")):
        raise fail(name, "mask", expected, describe(mask), TypeError)
    if mask.dtype != jnp.bool_:
        raise fail(name, "mask", expected, f"dtype {mask.dtype}", TypeError)
    if tuple(mask.shape) == tuple(x.shape[:-1]):
        mask = mask[..., None]
    elif tuple(mask.shape) != tuple(x.shape):
        raise fail(name, "mask", expected, f"shape {tuple(mask.shape)}")
    return jnp.broadcast_to(jnp.asarray(mask), x.shape)


def observed_only(name: str, arg: str, x: Array, mask):
    """`x` with its missing entries set to 0 (they may hold anything, NaN included),
    after checking that its observed entries are finite."""
    if mask is None:
        return check_finite(name, arg, x)
    return check_finite(name, arg, jnp.where(mask, x, 0))


@eqx.filter_jit
def _infer_jit(model, x, r_prev, r2_prev, config, mask):
    return infer_impl(frozen(model), x, r_prev, r2_prev, config, mask)


@eqx.filter_jit
def _infer_first_step_jit(model, x, config, mask):
    return infer_first_step_impl(frozen(model), x, config, mask)


@typechecked
def infer(
    model: TiDHy,
    x: Float[Array, "B D"],
    r_prev: Float[Array, "B r"],
    r2_prev: Float[Array, "B r2"],
    config: InferenceConfig = InferenceConfig(),
    *,
    mask: Bool[Array, "*shape"] | None = None,
) -> tuple[Float[Array, "B r"], Float[Array, "B r2"], InferenceStats]:
    """Infer the latents of one time step `t >= 1` for a batch of windows.

    Minimises over `(r, r2)`, with θ fixed, the energy

    `E = ℓ(W r + b, x_t) + temp_weight ||r - V(w(r2)) r_prev||² + l1_w |w|₁ +
    l1_r2 |r2|₁ + l1_r |r|₁`

    (with a `mask`, `ℓ` sums over the observed features only: a missing feature
    adds nothing, and a step with no observed feature is solved by the temporal
    prior alone)

    by SGD with Nesterov momentum on both latents (`r` restarts at 0, `r2` starts
    from `r2_prev`), the halving schedule on `lr_r`, the soft thresholds after every
    update, and the relative-change stopping rule of `config` (see
    [`eqx_models.tidhy.InferenceConfig`][] for the two batching semantics). The loop
    is compiled (`lax.while_loop`, testing the stopping rule every `check_every`
    iterations; a `vmap` of it in the per-window mode). The outputs carry no
    gradient.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `x`: the observations at time `t`, shape `(B, D)`.
    - `r_prev`: the latents at `t - 1`, shape `(B, r_dim)`.
    - `r2_prev`: the slow latents at `t - 1` (the warm start), shape `(B, r2_dim)`.
    - `config`: an [`eqx_models.tidhy.InferenceConfig`][].
    - `mask`: optional bool array of shape `(B, D)` (or `(B,)` for whole rows),
        True where `x` is observed; missing entries of `x` are ignored (they
        may be NaN).

    **Returns:**

    `(r, r2, stats)`: the latents, shapes `(B, r_dim)` and `(B, r2_dim)`, and an
    [`eqx_models.tidhy.InferenceStats`][].

    **Raises:**

    `ValueError` if a dimension does not match the model, `mask` has another
    shape than `x`, or if (the observed entries of) `x`, `r_prev` or `r2_prev` is
    not finite (at once for concrete arrays, by `eqx.error_if` under `jit`);
    `TypeError` for a `mask` that is not a bool array.
    """
    check_features("infer", "x", x, model)
    if r_prev.shape != (x.shape[0], model.r_dim):
        raise ValueError(
            f"infer: `r_prev` must have shape {(x.shape[0], model.r_dim)}, got "
            f"{r_prev.shape}."
        )
    if r2_prev.shape != (x.shape[0], model.r2_dim):
        raise ValueError(
            f"infer: `r2_prev` must have shape {(x.shape[0], model.r2_dim)}, got "
            f"{r2_prev.shape}."
        )
    mask = check_mask("infer", mask, x)
    x = observed_only("infer", "x", x, mask)
    r_prev = check_finite("infer", "r_prev", r_prev)
    r2_prev = check_finite("infer", "r2_prev", r2_prev)
    return _infer_jit(model, x, r_prev, r2_prev, config, mask)


@typechecked
def infer_first_step(
    model: TiDHy,
    x: Float[Array, "B D"],
    config: InferenceConfig = InferenceConfig(),
    *,
    mask: Bool[Array, "*shape"] | None = None,
) -> tuple[Float[Array, "B r"], InferenceStats]:
    """Infer the latent `r_0` of the first time step (no temporal prior).

    Minimises the spatial loss `ℓ(W r + b, x_0)` over `r` alone, from `r = 0`, with
    AdamW (learning rate `lr_r`, betas 0.9/0.999, eps 1e-8, weight decay
    `first_step_weight_decay`), stopping when every window's relative change is
    below `tol` (per-window norms; in the reference mode the objective is the batch
    mean and all windows stop together) or at `max_iter`.

    **Arguments:**

    - `model`: the [`eqx_models.tidhy.TiDHy`][] model.
    - `x`: the first observations, shape `(B, D)`.
    - `config`: an [`eqx_models.tidhy.InferenceConfig`][].
    - `mask`: optional bool array of shape `(B, D)` (or `(B,)` for whole rows),
        True where `x` is observed; the spatial loss sums over the observed
        features only.

    **Returns:**

    `(r, stats)`: `r` of shape `(B, r_dim)` and an
    [`eqx_models.tidhy.InferenceStats`][].

    **Raises:**

    `ValueError` if `x` does not match the model, `mask` has another shape, or
    (the observed entries of) `x` is not finite; `TypeError` for a `mask` that is
    not a bool array.
    """
    check_features("infer_first_step", "x", x, model)
    mask = check_mask("infer_first_step", mask, x)
    x = observed_only("infer_first_step", "x", x, mask)
    return _infer_first_step_jit(model, x, config, mask)
