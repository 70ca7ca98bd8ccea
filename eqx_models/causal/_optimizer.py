"""The causal surrogate's optimiser: AdamW with clipping, weight decay on the weight
matrices only, and a warmup-cosine learning rate whose run length lives in the
optimiser state.

Why a module of its own: the optimiser is a value (see the trainer contract in
`transforms`) that the trainer, the data-parallel tests and users' own loops build
alike; its schedule keeps the run length as an array so that a run on a wall-clock
budget can fix its length after measuring its speed, without recompiling.

Why not `optax.warmup_cosine_decay_schedule`: its arithmetic differs in the last
bits from this schedule's (written before), whose results the trainer's fixed-seed
runs reproduce; and its decay length is a static number, where this one's can change
between calls. The schedule is an `optax.schedules.StatefulSchedule` injected with
`optax.inject_hyperparams`, so the state records the rate like any injected one.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from transforms import hashable_optimizer, inject_learning_rate
from transforms.validation import check_in_range, check_size, describe, fail


def _is_weight(path) -> bool:
    if not path:
        return False
    last = path[-1]
    return isinstance(last, jax.tree_util.GetAttrKey) and last.name.startswith("w_")


def decayed_weights(model) -> list[Array]:
    """The weight matrices (fields named `w_*`): what weight decay applies to."""
    leaves = jax.tree_util.tree_flatten_with_path(
        eqx.filter(model, eqx.is_inexact_array)
    )[0]
    return [leaf for path, leaf in leaves if _is_weight(path)]


def _weight_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: _is_weight(path), params)


def weight_decay_mask(params):
    """`True` for the weight matrices of a model (fields named `w_*`), else `False`.

    The mask optax's `adamw` takes: biases, LayerNorm gains and embeddings of set
    sizes are not decayed.

    **Raises:**

    `ValueError` if `params` holds no weight matrix (no array in a field named
    `w_*`): its mask would be all `False`, i.e. no weight decay, without a word.
    """
    mask = _weight_mask(params)
    if not any(jax.tree.leaves(mask)):
        raise fail(
            "weight_decay_mask",
            "params",
            "a model with weight matrices (fields named `w_*`)",
            describe(params) + " with none",
        )
    return mask


class WarmupCosineState(NamedTuple):
    """State of the learning-rate schedule of [`eqx_models.causal.make_optimizer`][].

    `count` is the number of updates so far and `total_steps` the run length the
    cosine is laid out over (an array, so it can be changed without recompiling; see
    [`eqx_models.causal.set_run_length`][]). The rate of the last update is not
    here but where every injected rate is, in the enclosing
    `optax.inject_hyperparams` state (read it with
    [`transforms.injected_learning_rate`][]).
    """

    # The field name follows optax's states; it shadows `tuple.count` on purpose.
    count: Int[Array, ""]  # pyright: ignore[reportIncompatibleMethodOverride]
    total_steps: Int[Array, ""]


def _warmup_cosine(count, total, peak, warmup, end):
    count = count.astype(jnp.float32)
    total = jnp.maximum(total.astype(jnp.float32), warmup + 1.0)
    rising = peak * count / max(warmup, 1)
    progress = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
    falling = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, rising, falling)


class _WarmupCosine(eqx.Module):
    """Linear warmup from 0 to `peak`, then a cosine to `end` at the run length held
    in the state: an `optax.schedules.StatefulSchedule`."""

    peak: Any
    warmup: int = eqx.field(static=True)
    end: Any
    run_length: Any

    def init(self) -> WarmupCosineState:
        return WarmupCosineState(
            jnp.zeros((), jnp.int32), jnp.asarray(self.run_length, jnp.int32)
        )

    def update(self, state: WarmupCosineState, **extra_args) -> WarmupCosineState:
        del extra_args
        return state._replace(count=state.count + 1)

    def __call__(self, state: WarmupCosineState, **extra_args) -> Array:
        del extra_args
        return _warmup_cosine(
            state.count, state.total_steps, self.peak, self.warmup, self.end
        )


def _adamw_warmup_cosine(
    *,
    peak_learning_rate,
    warmup_steps: int,
    end_learning_rate,
    weight_decay,
    clip_norm,
    run_length,
) -> optax.GradientTransformation:
    """What [`eqx_models.causal.make_optimizer`][] builds, from its settings."""

    def adamw(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(clip_norm),
            optax.scale_by_adam(),
            # Unchecked: the optimiser also serves pytrees without weight matrices.
            optax.add_decayed_weights(weight_decay, mask=_weight_mask),
            optax.scale_by_learning_rate(learning_rate),
        )

    schedule = _WarmupCosine(
        peak_learning_rate, warmup_steps, end_learning_rate, run_length
    )
    return inject_learning_rate(adamw, schedule)


def make_optimizer(
    n_steps: int,
    *,
    peak_learning_rate: float = 1e-3,
    warmup_steps: int | None = None,
    end_learning_rate: float | None = None,
    weight_decay: float = 1e-4,
    clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, weight decay on weight matrices only.

    (Formerly `surrogate_optimizer`, a name that still works, with a
    `DeprecationWarning`, until the next release.)

    The chain is `clip_by_global_norm → scale_by_adam → add_decayed_weights (w_*
    matrices only, see [`eqx_models.causal.weight_decay_mask`][]) → learning rate`,
    i.e. optax's AdamW. The learning rate rises linearly from 0 over `warmup_steps`
    and then follows a cosine from the peak to `end_learning_rate` at `n_steps`.
    The run length lives in the optimiser state, so a run on a wall-clock budget can
    measure its speed first and then fix the length with
    [`eqx_models.causal.set_run_length`][], without recompiling the step.

    The trainer contract of `transforms`: the rate is injected
    (`optax.inject_hyperparams` with a stateful schedule), so the state records the
    rate of the last update, which [`transforms.make_train_step`][] reports; and the
    optimiser compares by value ([`transforms.hashable_optimizer`][], the run length
    an array among its hyperparameters), so equal settings share one compiled step
    whatever `n_steps`.

    **Arguments:**

    - `n_steps`: the run length (the cosine reaches its end value there).
    - `peak_learning_rate`: the learning rate after warmup.
    - `warmup_steps`: linear warmup from 0; default 5% of `n_steps` (at least 1).
    - `end_learning_rate`: the final value; default 1% of the peak.
    - `weight_decay`: AdamW's decoupled decay, applied to the `w_*` matrices only.
    - `clip_norm`: global-norm gradient clipping before Adam.

    **Returns:**

    An `optax.GradientTransformation`.

    **Raises:**

    `ValueError` if `n_steps < 1`, the warmup is not shorter than the run, a
    learning rate is not positive (the end one: negative) and finite, or
    `weight_decay` is negative or `clip_norm` not positive (or either is NaN);
    `TypeError` for a step count that is not an integer.
    """
    name = "make_optimizer"
    check_size(name, "n_steps", n_steps)
    if warmup_steps is None:
        warmup_steps = max(1, n_steps // 20)
    check_size(name, "warmup_steps", warmup_steps, minimum=0)
    if not warmup_steps < max(n_steps, 2):
        raise ValueError(
            f"make_optimizer: `warmup_steps` must be in [0, n_steps), got "
            f"{warmup_steps} with n_steps={n_steps}."
        )
    check_in_range(
        name, "peak_learning_rate", peak_learning_rate, low=0, inclusive=(False, True)
    )
    if end_learning_rate is None:
        end_learning_rate = 0.01 * peak_learning_rate
    check_in_range(name, "end_learning_rate", end_learning_rate, low=0)
    check_in_range(name, "weight_decay", weight_decay, low=0)
    check_in_range(
        name, "clip_norm", clip_norm, finite=False, low=0, inclusive=(False, True)
    )
    return hashable_optimizer(
        _adamw_warmup_cosine,
        peak_learning_rate=peak_learning_rate,
        warmup_steps=warmup_steps,
        end_learning_rate=end_learning_rate,
        weight_decay=weight_decay,
        clip_norm=clip_norm,
        run_length=jnp.asarray(n_steps, jnp.int32),
    )


def with_run_length(opt_state, n_steps: int) -> tuple[Any, bool]:
    """`opt_state` with the `total_steps` of its `WarmupCosineState`s replaced, and
    whether it held one."""
    found = False

    def replace(node):
        nonlocal found
        if isinstance(node, WarmupCosineState):
            found = True
            return node._replace(total_steps=jnp.asarray(n_steps, jnp.int32))
        return node

    new = jax.tree.map(
        replace, opt_state, is_leaf=lambda x: isinstance(x, WarmupCosineState)
    )
    return new, found


def set_run_length(opt_state, n_steps: int):
    """Change the run length of a [`eqx_models.causal.make_optimizer`][] state.

    **Arguments:**

    - `opt_state`: the optimiser state.
    - `n_steps`: the new total number of steps of the run.

    **Returns:**

    The state with its `total_steps` replaced (same shapes and dtypes, so a compiled
    step is reused).

    **Raises:**

    `ValueError` if the state has no [`eqx_models.causal.WarmupCosineState`][] or
    `n_steps` is not positive; `TypeError` if it is not an integer.
    """
    check_size("set_run_length", "n_steps", n_steps)
    new, found = with_run_length(opt_state, n_steps)
    if not found:
        raise ValueError(
            "set_run_length: `opt_state` holds no WarmupCosineState (it does not come "
            "from make_optimizer)."
        )
    return new
