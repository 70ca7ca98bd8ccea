"""The DP-SGD training step: clip per example, sum, add noise once, update.

`make_dp_train_step` builds a step with the contract of
[`transforms.make_train_step`][] (hashable static parts, donation, the NaN guard,
data-parallel placement over a mesh, a deterministic variant) whose gradient is
private: the per-example clipped sum from `_clipping.py`, accumulated over
micro-batches inside the compiled step, plus Gaussian noise drawn once per logical
batch from the step's key, divided by the batch's expected size.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh

from .._grad._ghost_plan import GhostPlan
from .._grad._ghost_rules import acc_dtype
from .._grad._per_sample import as_batch, setup
from .._train._determinism import compile_variants
from .._train._sharding import replicate, shard_batch
from .._train._train_step import check_step_arguments, finish_update, nonfinite_mask
from .._validation import (
    check_in_range,
    check_size,
    describe,
    fail,
    is_traced,
    typechecked,
)
from ._clipping import check_mask, check_settings, clip_and_sum
from ._sampling import MaskedBatch


_NAME = "make_dp_train_step"
_STEP = "DPTrainStep"


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """`[B, ...]` as `[k, B/k, ...]`, micro-batch `j` holding rows `j, j + k, ...`:
    a batch split over devices keeps each micro-batch split over all of them."""
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def noise_like(key, leaves: list, std, acc) -> list:
    """Gaussian noise of standard deviation `std` shaped like each leaf, in `acc`:
    leaf `l` draws from `jax.random.split(key, len(leaves))[l]`."""
    keys = jr.split(key, len(leaves))
    return [std * jr.normal(k, jnp.shape(x), acc) for k, x in zip(keys, leaves)]


def _dp_step(static, model, opt_state):
    step, batch, key = static
    examples, mask, expected_size = batch
    params = eqx.filter(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    acc = acc_dtype(*[jnp.result_type(x) for x in leaves])

    def clipped(examples, mask):
        s = setup(
            _STEP, step.loss_fn, model, examples, unroll_layers=step.unroll_layers
        )
        return clip_and_sum(
            s,
            step.method,
            step.clip_norm,
            step.per_layer,
            mask,
            fallback=step.fallback,
            name=_STEP,
        )

    k = step.accumulation_steps
    if k == 1:
        sums, norms, losses = clipped(examples, mask)
    else:

        def body(total, micro):
            sums, norms, losses = clipped(*micro)
            return [t + g for t, g in zip(total, sums)], (norms, losses)

        start = [jnp.zeros(jnp.shape(x), acc) for x in leaves]
        micro = (
            tuple(_micro_batches(x, k) for x in examples),
            _micro_batches(mask, k),
        )
        sums, (norms, losses) = lax.scan(body, start, micro)
        norms, losses = norms.reshape(-1), losses.reshape(-1)
        mask = _micro_batches(mask, k).reshape(-1)
    if step.noise_multiplier > 0:
        std = jnp.asarray(step.noise_multiplier * step.clip_norm, acc)
        sums = [g + z for g, z in zip(sums, noise_like(key, leaves, std, acc))]
    denominator = jnp.asarray(expected_size, acc)
    grads = [(g / denominator).astype(jnp.result_type(x)) for g, x in zip(sums, leaves)]
    grads = jax.tree.unflatten(treedef, grads)
    updates, new_opt_state = step.optimizer.update(grads, opt_state, params)
    new_model = eqx.apply_updates(model, updates)
    count = jnp.sum(mask.astype(acc))
    per_example = jnp.maximum(count, 1)
    loss = jnp.sum(losses) / per_example
    grad_norm = optax.tree.norm(grads)
    clipped_share = jnp.sum(mask & (norms > step.clip_norm)) / per_example
    mask_bits = nonfinite_mask(loss, grad_norm, new_model, new_opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "batch_size": count,
        "clipped_fraction": clipped_share,
        "nonfinite": mask_bits,
    }
    model, new_opt_state = finish_update(
        step, metrics, mask_bits, (model, opt_state), (new_model, new_opt_state)
    )
    return model, new_opt_state, metrics


_compiled = compile_variants(_dp_step)


class DPTrainStep(eqx.Module):
    """A compiled DP-SGD step; build it with [`transforms.make_dp_train_step`][].

    Call it as `step(model, opt_state, batch, key)`; it returns
    `(model, opt_state, metrics)` like [`transforms.TrainStep`][].
    """

    loss_fn: Callable
    optimizer: optax.GradientTransformation
    clip_norm: float
    noise_multiplier: float
    method: str = eqx.field(static=True)
    per_layer: bool = eqx.field(static=True)
    accumulation_steps: int = eqx.field(static=True)
    fallback: bool = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True)
    data_axis: str = eqx.field(static=True)
    donate: bool = eqx.field(static=True)
    deterministic: bool = eqx.field(static=True, default=False)
    unroll_layers: bool | str = eqx.field(static=True, default="auto")

    @property
    def learning_rate(self) -> None:
        # Read by the shared end of every step (`finish_update`): a DP step has no
        # deprecated `learning_rate=` argument, the optimiser state records the rate.
        return None

    def _batch(self, batch: Any) -> MaskedBatch:
        if isinstance(batch, MaskedBatch):
            examples = as_batch(_STEP, "batch.examples", batch.examples)
            mask = check_mask(_STEP, batch.mask, examples[0].shape[0])
            size = batch.expected_size
            if not isinstance(size, (jax.Array, np.ndarray, float, int)) or np.ndim(
                size
            ):
                raise fail(
                    _STEP,
                    "batch.expected_size",
                    "a positive scalar",
                    describe(size),
                    TypeError,
                )
            if not is_traced(size):
                check_in_range(
                    _STEP,
                    "batch.expected_size",
                    float(np.asarray(size)),
                    low=0,
                    inclusive=(False, True),
                )
            size = jnp.asarray(size, jnp.float32)
        else:
            examples = as_batch(_STEP, "batch", batch)
            mask = jnp.ones(examples[0].shape[0], bool)
            size = jnp.asarray(examples[0].shape[0], jnp.float32)
        B, k = examples[0].shape[0], self.accumulation_steps
        if B % k:
            raise ValueError(
                f"{_STEP}: the batch of {B} examples does not split into "
                f"`accumulation_steps`={k} micro-batches of equal size; pad it (a "
                f"sampler's `multiple_of`) to a multiple of {k}."
            )
        return MaskedBatch(examples, mask, size)

    def __call__(self, model, opt_state, batch, key=None):
        """One private optimisation step.

        **Arguments:**

        - `model`: the model; donated (do not reuse it) unless `donate=False`.
        - `opt_state`: from `optimizer.init(eqx.filter(model, eqx.is_inexact_array))`.
        - `batch`: a [`transforms.MaskedBatch`][] (from a sampler), or a tuple of
            arrays with a leading batch axis of size `B` (every row counts, and the
            sum is divided by `B`).
        - `key`: the PRNG key of this step's noise; give each step its own
            ([`transforms.fit`][] folds the step index into its key). `None` only
            without noise (`noise_multiplier=0`).

        **Returns:**

        `(model, opt_state, metrics)`; `metrics` holds `loss` (the mean loss of the
        examples that count), `grad_norm` (of the noisy gradient handed to the
        optimiser), `batch_size` (the examples that count), `clipped_fraction`
        (the share of them whose gradient norm exceeded `clip_norm`), `nonfinite`
        and `learning_rate` as in [`transforms.make_train_step`][]. These metrics
        are computed from the private data without noise: they are for
        monitoring, not for publishing.

        **Raises:**

        `TypeError` for a `key` that is neither a PRNG key nor `None`, or `None`
        with noise; `TypeError`/`ValueError` for a batch that is not a
        `MaskedBatch` or a non-empty tuple of arrays sharing their leading axis, a
        mask that is not boolean `[B]`, an `expected_size` that is not a positive
        scalar, or a `B` not divisible by `accumulation_steps`; the loss
        function's own errors.
        """
        if key is None:
            if self.noise_multiplier > 0:
                raise fail(
                    _STEP,
                    "key",
                    "a PRNG key (the noise is drawn from it)",
                    "None",
                    TypeError,
                )
            key = jr.key(0)  # unused: no noise
        elif not isinstance(key, (jax.Array, np.ndarray)):
            raise fail(_STEP, "key", "a PRNG key or None", describe(key), TypeError)
        examples, mask, size = self._batch(batch)
        if self.mesh is not None:
            examples = shard_batch(examples, self.mesh, self.data_axis)
            mask = shard_batch(mask, self.mesh, self.data_axis)
            model, opt_state, key, size = replicate(
                (model, opt_state, key, size), self.mesh
            )
        compiled = _compiled[self.donate, self.deterministic]
        return compiled(
            (self, MaskedBatch(examples, mask, size), key), model, opt_state
        )

    def plan(self, model: Any, batch: Any) -> GhostPlan:
        """How the ghost engine treats each parameter for this model and (micro-)
        batch; see [`transforms.GhostPlan`][].

        **Raises:**

        As calling the step, for `batch`.
        """
        examples = self._batch(batch).examples
        s = setup(_STEP, self.loss_fn, model, examples)
        return s.analyse("norms").plan


@typechecked
def make_dp_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: float,
    noise_multiplier: float,
    method: str = "auto",
    per_layer: bool = False,
    accumulation_steps: int = 1,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    donate: bool = True,
    deterministic: bool = False,
    fallback: bool = True,
    unroll_layers: bool | str = "auto",
) -> DPTrainStep:
    """A compiled DP-SGD step (Abadi et al. 2016) for any Equinox model and any optax
    optimiser, with exact per-example clipping on the ghost engine.

    For a batch with mask `m` (from [`transforms.poisson_sampler`][]) the step
    computes

    $$
    \\tilde g = \\frac{1}{\\bar B}\\Big(\\sum_i m_i \\min\\big(1,
    \\tfrac{C}{\\|\\nabla_\\theta l_i\\|}\\big)\\nabla_\\theta l_i
    + \\mathcal N(0, \\sigma^2 C^2 I)\\Big)
    $$

    with `B̄` the batch's expected size (`q·N` under Poisson sampling, which keeps
    the denominator independent of the data), and hands `g̃` to the optimiser in
    place of the gradient. The noise is drawn once from `key` (leaf `l` of the
    parameters from `jax.random.split(key, L)[l]`), after the clipped sums of all
    micro-batches and all devices are added: once per logical batch, not per
    device or micro-batch. The clipped sum is exact for every method (see
    [`transforms.clipped_grad_sum`][]); `"auto"` takes the one-pass method.

    The step follows the trainer contract of [`transforms.make_train_step`][]: the
    same NaN guard (`nonfinite`; a non-finite update is not applied), the learning
    rate read from the optimiser state, donation, compilation once per distinct
    static part and input shape, `mesh=` for data parallelism and
    `deterministic=`. Account for its privacy with [`transforms.dp_epsilon`][] or
    by giving [`transforms.fit`][] a [`transforms.PrivacyBudget`][].

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example (the
        ghost engine's convention; it takes no key).
    - `optimizer`: an optax `GradientTransformation`; weight decay and the like see
        the private gradient only, as post-processing.
    - `clip_norm`: `C > 0`.
    - `noise_multiplier`: `σ ≥ 0`; the noise's standard deviation is `σ·C`. 0 clips
        without noise (no privacy; for tests and baselines).
    - `method`: `"auto"`, `"one_pass"`, `"two_pass"` or `"vmap"`, as in
        [`transforms.clipped_grad_sum`][].
    - `per_layer`: clip each parameter leaf to `C / √L` instead of the whole
        gradient to `C`.
    - `accumulation_steps`: split the batch into this many micro-batches, processed
        one after the other inside the compiled step (a `lax.scan`): clipping per
        example, noise once for the logical batch. Memory follows the micro-batch.
    - `mesh`, `data_axis`: data parallelism as in [`transforms.make_train_step`][];
        models with embedding lookups need a mesh with `AxisType.Auto` axes (see
        the ghost engines' guide).
    - `donate`, `deterministic`: as in [`transforms.make_train_step`][].
    - `fallback`: with `False`, raise if a parameter is outside the ghost rules.
    - `unroll_layers`: as for [`transforms.clipped_grad_sum`][]: how the ghost
        passes run a `lax.scan` of the loss over stacked layers.

    **Returns:**

    A [`transforms.DPTrainStep`][], called as `step(model, opt_state, batch, key)`.

    **Raises:**

    `TypeError` if `loss_fn` is not callable, `optimizer` not an optax optimiser,
    `mesh` not a `Mesh` or a flag not a bool; `ValueError` if `clip_norm` is not a
    positive finite number, `noise_multiplier` negative or not finite, `method` or
    `unroll_layers` unknown, `per_layer` with `"two_pass"`, `accumulation_steps`
    not a positive integer, or `data_axis` not an axis of `mesh`.

    !!! example

        ```python
        def loss_fn(model, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y)

        optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = make_dp_train_step(loss_fn, optimizer, clip_norm=1.0,
                                  noise_multiplier=1.1)
        sampler = poisson_sampler((x, y), sampling_rate=0.01, key=data_key)
        model, opt_state, metrics = step(model, opt_state, sampler(0), noise_key)
        ```
    """
    check_step_arguments(
        _NAME,
        loss_fn=loss_fn,
        optimizer=optimizer,
        learning_rate=None,
        mesh=mesh,
        data_axis=data_axis,
        flags={"donate": donate, "deterministic": deterministic},
    )
    check_settings(
        _NAME,
        clip_norm=clip_norm,
        method=method,
        per_layer=per_layer,
        fallback=fallback,
        unroll_layers=unroll_layers,
    )
    check_in_range(_NAME, "noise_multiplier", noise_multiplier, low=0)
    accumulation_steps = check_size(_NAME, "accumulation_steps", accumulation_steps)
    return DPTrainStep(
        loss_fn=loss_fn,
        optimizer=optimizer,
        clip_norm=float(clip_norm),
        noise_multiplier=float(noise_multiplier),
        method=method,
        per_layer=per_layer,
        accumulation_steps=accumulation_steps,
        fallback=fallback,
        mesh=mesh,
        data_axis=data_axis,
        donate=donate,
        deterministic=deterministic,
        unroll_layers=unroll_layers,
    )
