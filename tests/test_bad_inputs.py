"""No silent wrong answers: bad inputs to the public entry points raise an error that
names the argument.

Each case below feeds one argument of one public entry point values drawn by
hypothesis from a family of bad values (NaN, ±inf, negative or zero sizes, wrong
Python types, out-of-range ids, unnormalised distributions); every other argument is
valid. The call, eager on concrete values, must raise a `ValueError` or a
`TypeError` whose message names the argument: a result, even a NaN, is a failure, and
so is Equinox's run-time error (the checks of traced values), which a concrete bad
input must never reach. Shapes stay fixed and tiny so that compiled entry points
compile once.

Under pytest, jaxtyping's import hook checks annotated functions before the
library does; `test_the_library_names_the_argument_without_the_import_hook` runs
every case again in a process without the hook, as a user calls them.

`test_every_public_name_is_accounted_for` enumerates the public names of
`eqx_models` and `transforms`: each has a bad-input case here, or a stated reason
that it takes no user values.
"""

import collections
import functools
import importlib
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st


NAN, INF = float("nan"), float("inf")


class Case(NamedTuple):
    name: str  # "<family>.<public name>"
    arg: str  # the argument the bad values go to, as the message writes it
    values: st.SearchStrategy
    call: Callable[[Any], Any]


# Bad values --------------------------------------------------------------------

NON_FINITE = st.sampled_from([NAN, INF, -INF])
# No `None`: several of these arguments are optional.
NOT_A_NUMBER = st.sampled_from(["0.5", True, [0.5], {"x": 1.0}])
NOT_AN_INT = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["3", [3], (3,)]),
)


def bad_real(low=None, high=None, inclusive=(True, True), finite=True):
    """NaN (and ±inf when `finite`), values beyond the bounds, non-numbers."""
    options = [NON_FINITE if finite else st.just(NAN), NOT_A_NUMBER]
    if low is not None:
        below = st.floats(max_value=low, allow_nan=False, allow_infinity=False)
        options.append(below.filter(lambda x: x < low or not inclusive[0]))
    if high is not None:
        above = st.floats(min_value=high, allow_nan=False, allow_infinity=False)
        options.append(above.filter(lambda x: x > high or not inclusive[1]))
    return st.one_of(*options)


def bad_size(minimum=1, maximum=None):
    """Integers out of `[minimum, maximum]`, bools, floats (even `3.0`), strings."""
    options = [NOT_AN_INT, st.integers(-(10**6), minimum - 1)]
    if maximum is not None:
        options.append(st.integers(maximum + 1, maximum + 10**6))
    return st.one_of(*options)


def bad_ids(valid: np.ndarray, upper: int, low: int = 0):
    """`valid` with one entry replaced by an id below `low` or at/above `upper`."""
    position = st.integers(0, valid.size - 1)
    outside = st.integers(low - 100, low - 1) | st.integers(upper, upper + 100)

    def put(pair):
        bad = np.array(valid).reshape(-1)
        bad[pair[0]] = pair[1]
        return jnp.asarray(bad.reshape(valid.shape).astype(valid.dtype))

    return st.tuples(position, outside).map(put)


def bad_entries(valid: np.ndarray, values=NON_FINITE):
    """`valid` with one entry replaced by a bad value (NaN, ±inf by default)."""
    position = st.integers(0, valid.size - 1)

    def put(pair):
        bad = np.array(valid, np.float64).reshape(-1)
        bad[pair[0]] = pair[1]
        return jnp.asarray(bad.reshape(valid.shape).astype(valid.dtype))

    return st.tuples(position, values).map(put)


def unnormalised(p: np.ndarray, log: bool = False):
    """Distributions (rows along the last axis) scaled away from a sum of 1, or with
    a negative entry."""
    # Not 0: a row of zeros is allowed where a state may never be left.
    scale = st.floats(1.01, 10.0) | st.floats(0.01, 0.99)

    def scaled(c):
        q = np.asarray(p, np.float64) * c
        with np.errstate(divide="ignore"):
            return jnp.asarray(np.log(q) if log else q, jnp.float32)

    def negative(i):
        q = np.array(p, np.float64).reshape(-1)
        q[i] = -abs(q[i]) - 0.1
        return jnp.asarray(q.reshape(np.shape(p)), jnp.float32)

    options = [scale.map(scaled)]
    if not log:
        options.append(st.integers(0, np.size(p) - 1).map(negative))
    return st.one_of(*options)


def cached(fn):
    """A fixture-like value built once per process (never at collection)."""
    return functools.cache(fn)


# transforms ---------------------------------------------------------------------


@cached
def mlp():
    return eqx.nn.MLP(3, 2, 4, 1, key=jr.key(0))


def _mlp_loss(model, x, y):
    return jnp.sum((model(x) - y) ** 2)


_X, _Y = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)


def _batch_loss(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _idle_step(model, opt_state, batch, key):
    """A step that would return at once: a bad argument it reaches goes unnoticed."""
    return model, opt_state, {"loss": 0.0}


_P = np.array([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])


def _transforms_cases():
    import transforms as T

    h, w = jnp.ones((3, 4)), jnp.ones((5, 4))
    targets = np.array([0, 1, 4], np.int32)
    centres, edges = jnp.array([0.0, 1.0, 2.0]), jnp.array([0.0, 1.0, 2.0, 3.0])
    shapley = T.in_run_shapley(4)
    solver = T.scan_optimize(lambda x: jnp.sum(x**2), optax.sgd(0.1), max_steps=2)
    weighted = T.uncertainty_weighted(T.kl_divergence, 0.5)
    not_a_batch = st.sampled_from(
        [{"x": _X, "y": _Y}, _X, None, "xy", (), (_X, _Y[:2]), (_X, 1.0)]
    )
    batched = lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)
    bad_loss = st.sampled_from([3, None, "loss", batched, lambda m, x, y: m(x) - y])
    return [
        Case(
            "transforms.cast_floating",
            "dtype",
            st.sampled_from([jnp.int32, "int8", bool, "float17", None, 3]),
            lambda d: T.cast_floating({"w": jnp.ones(2)}, d),
        ),
        Case(
            "transforms.inject_learning_rate",
            "factory",
            st.sampled_from([3, "adam", None, optax.adam(0.1)]),
            lambda f: T.inject_learning_rate(f, 0.1),
        ),
        Case(
            "transforms.inject_learning_rate",
            "learning_rate",  # a factory that takes no learning rate
            st.sampled_from([optax.clip_by_global_norm, optax.identity]),
            lambda f: T.inject_learning_rate(f, 0.1),
        ),
        Case(
            "transforms.inject_learning_rate",
            "learning_rate",
            st.one_of(NON_FINITE, st.floats(max_value=-1e-12, allow_nan=False)),
            lambda lr: T.inject_learning_rate(optax.sgd, lr),
        ),
        Case(
            "transforms.pairwise_sum",
            "x",
            st.sampled_from(
                [jnp.ones((2, 3)), jnp.arange(4), [1.0, 2.0], 3.0, "x", None]
            ),
            T.pairwise_sum,
        ),
        Case(
            "transforms.static_fields",
            "module",
            st.sampled_from([3, "model", None, {"a": 1}, eqx.nn.Linear]),
            T.static_fields,
        ),
        Case(
            "transforms.check_resumed_config",
            "checkpoint_path",
            st.sampled_from([3, 2.5, [b"x"], {"path": "x"}]),
            lambda p: T.check_resumed_config(
                "trainer", p, {}, resume=True, allow_config_change=False
            ),
        ),
        Case(
            "transforms.hashable_optimizer",
            "factory",
            st.sampled_from([3, "adam", None]),
            lambda f: T.hashable_optimizer(f, learning_rate=0.1),
        ),
        Case(
            "transforms.hashable_optimizer",
            "mask",  # an unhashable, non-array hyperparameter
            st.sampled_from([{"w": True}, [True, False], {1, 2}]),
            lambda m: T.hashable_optimizer(optax.adamw, learning_rate=0.1, mask=m),
        ),
        Case(
            "transforms.chunked_cross_entropy",
            "targets",
            bad_ids(targets, 5),
            lambda t: T.chunked_cross_entropy(h, w, None, t),
        ),
        Case(
            "transforms.chunked_cross_entropy",
            "chunk_size",
            bad_size(),
            lambda c: T.chunked_cross_entropy(
                h, w, None, jnp.asarray(targets), chunk_size=c
            ),
        ),
        Case(
            "transforms.two_hot",
            "centres",
            st.sampled_from([[0.0, 2.0, 1.0], [1.0, 0.0], [0.0, NAN], [-INF, 0.0]]),
            lambda c: T.two_hot(jnp.array([0.5]), jnp.asarray(c)),
        ),
        Case(
            "transforms.two_hot",
            "x",
            st.just(NAN),
            lambda x: T.two_hot(jnp.array([0.5, x]), centres),
        ),
        Case(
            "transforms.hl_gauss",
            "sigma",
            bad_real(low=0, inclusive=(False, True)),
            lambda s: T.hl_gauss(jnp.array([0.5]), edges, s),
        ),
        Case(
            "transforms.hl_gauss",
            "edges",
            st.sampled_from([[0.0, 2.0, 1.0], [0.0, NAN], [0.0, INF]]),
            lambda e: T.hl_gauss(jnp.array([0.5]), jnp.asarray(e), 0.5),
        ),
        Case(
            "transforms.soft_cross_entropy",
            "target_probs",
            unnormalised(_P),
            lambda p: T.soft_cross_entropy(jnp.zeros((2, 3)), p),
        ),
        Case(
            "transforms.kl_divergence",
            "log_p",
            unnormalised(_P, log=True),
            lambda lp: T.kl_divergence(lp, jnp.log(jnp.full((2, 3), 1 / 3))),
        ),
        Case(
            "transforms.kl_divergence",
            "log_q",
            unnormalised(_P, log=True),
            lambda lq: T.kl_divergence(jnp.log(jnp.full((2, 3), 1 / 3)), lq),
        ),
        Case(
            "transforms.entropy",
            "log_p",
            unnormalised(_P, log=True),
            lambda lp: T.entropy(lp),
        ),
        Case(
            "transforms.total_variation",
            "log_q",
            unnormalised(_P, log=True),
            lambda lq: T.total_variation(jnp.log(jnp.full((2, 3), 1 / 3)), lq),
        ),
        Case(
            "transforms.uncertainty_weighted",
            "scale",
            bad_real(low=0),
            lambda s: T.uncertainty_weighted(T.kl_divergence, s),
        ),
        Case(
            "transforms.UncertaintyWeighted",
            "log_p",
            unnormalised(_P, log=True),
            lambda lp: weighted(lp, jnp.log(jnp.full((2, 3), 1 / 3))),
        ),
        Case(
            "transforms.expected_value_loss",
            "targets",
            bad_ids(np.array([0, 1], np.int32), 3),
            lambda t: T.expected_value_loss(jnp.zeros((2, 3)), jnp.ones(3), t),
        ),
        Case(
            "transforms.expected_value",
            "logits",
            st.sampled_from(["logits", None, [0.0, 1.0], np.int32(1)]),
            lambda lg: T.expected_value(lg, jnp.ones(2)),
        ),
        Case(
            "transforms.masked_mean",
            "where",
            st.sampled_from([jnp.ones(3, bool), jnp.ones(4), "all", [True] * 4]),
            lambda m: T.masked_mean(jnp.ones(4), m),
        ),
        Case(
            "transforms.sample_positions",
            "k",
            bad_size(),
            lambda k: T.sample_positions(jr.key(0), jnp.ones(3, bool), k),
        ),
        Case(
            "transforms.soft_threshold",
            "threshold",
            bad_real(low=0, finite=False),
            lambda t: T.soft_threshold(jnp.ones(3), t),
        ),
        Case(
            "transforms.scan_optimize",
            "max_steps",
            bad_size(),
            lambda n: T.scan_optimize(lambda x: x @ x, optax.sgd(0.1), max_steps=n),
        ),
        Case(
            "transforms.scan_optimize",
            "tol",
            bad_real(low=0, finite=False),
            lambda t: T.scan_optimize(
                lambda x: x @ x, optax.sgd(0.1), max_steps=2, tol=t
            ),
        ),
        Case(
            "transforms.scan_optimize",
            "check_every",
            bad_size(),
            lambda k: T.scan_optimize(
                lambda x: x @ x, optax.sgd(0.1), max_steps=2, tol=0.1, check_every=k
            ),
        ),
        Case(
            "transforms.ScanOptimizer",
            "init",
            st.sampled_from([jnp.zeros(3, int), {}, "x", None]),
            lambda x0: solver(x0),
        ),
        Case(
            "transforms.in_run_shapley",
            "n_train",
            bad_size(),
            lambda n: T.in_run_shapley(n),
        ),
        Case(
            "transforms.InRunShapley",
            "indices",
            bad_ids(np.array([0, 3], np.int32), 4),
            lambda i: shapley.update(shapley.init(), i, jnp.ones(2), 0.1),
        ),
        Case(
            "transforms.InRunShapley",
            "learning_rate",
            NON_FINITE,
            lambda lr: shapley.update(shapley.init(), jnp.array([0]), jnp.ones(1), lr),
        ),
        Case(
            "transforms.to_original_scaling",
            "n_val",
            bad_size(),
            lambda n: T.to_original_scaling(jnp.ones(3), n_train=4, n_val=n),
        ),
        Case(
            "transforms.per_sample_grads",
            "loss_fn",
            bad_loss,
            lambda f: T.per_sample_grads(f)(mlp(), (_X, _Y)),
        ),
        Case(
            "transforms.PerSampleGrads",
            "batch",
            not_a_batch,
            lambda b: T.per_sample_grads(_mlp_loss)(mlp(), b),
        ),
        Case(
            "transforms.per_sample_grad_norms",
            "method",
            st.sampled_from(["jvp", "Ghost", "", None, 1]),
            lambda m: T.per_sample_grad_norms(_mlp_loss, method=m),
        ),
        Case(
            "transforms.PerSampleGradNorms",
            "batch",
            not_a_batch,
            lambda b: T.per_sample_grad_norms(_mlp_loss)(mlp(), b),
        ),
        Case(
            "transforms.grad_dot_products",
            "val_reduction",
            st.sampled_from(["max", "Mean", None]),
            lambda r: T.grad_dot_products(_mlp_loss, val_reduction=r),
        ),
        Case(
            "transforms.GradDotProducts",
            "train_batch",
            not_a_batch,
            lambda b: T.grad_dot_products(_mlp_loss)(mlp(), b, (_X, _Y)),
        ),
        Case(
            "transforms.make_attribution_step",
            "method",
            st.sampled_from(["fast", None, 0]),
            lambda m: T.make_attribution_step(_mlp_loss, optax.sgd(0.1), method=m),
        ),
        Case(
            "transforms.make_attribution_step",
            "optimizer",
            st.sampled_from([optax.sgd, "adam", None, 0.1]),
            lambda o: T.make_attribution_step(_mlp_loss, o),
        ),
        Case(
            "transforms.AttributionStep",
            "train_batch",
            not_a_batch,
            lambda b: T.make_attribution_step(_mlp_loss, optax.sgd(0.1)).plan(mlp(), b),
        ),
        Case(
            "transforms.with_fallback",
            "step",
            st.sampled_from([3, None, "step"]),
            lambda s: T.with_fallback(s),
        ),
        Case(
            "transforms.save_checkpoint",
            "step",
            bad_size(minimum=0),
            lambda s: T.save_checkpoint("unused.eqx", model=jnp.ones(2), step=s),
        ),
        Case(
            "transforms.save_checkpoint",
            "path",
            st.sampled_from(["", b"ckpt", 3, None]),
            lambda p: T.save_checkpoint(p, model=jnp.ones(2)),
        ),
        Case(
            "transforms.load_checkpoint",
            "path",
            st.sampled_from(["", b"ckpt", 3, None]),
            lambda p: T.load_checkpoint(p, model=jnp.ones(2)),
        ),
        Case(
            "transforms.read_checkpoint_metadata",
            "path",
            st.sampled_from(["", b"ckpt", 3, None]),
            lambda p: T.read_checkpoint_metadata(p),
        ),
        Case(
            "transforms.check_checkpoint_metadata",
            "path",
            st.sampled_from(["", b"ckpt", 3, None]),
            lambda p: T.check_checkpoint_metadata(p, {}),
        ),
        Case(
            "transforms.shard_batch",
            "axis",
            st.sampled_from(["batch", "model", ""]),
            lambda a: T.shard_batch((_X,), jax.make_mesh((1,), ("data",)), a),
        ),
        Case(
            "transforms.batch_sharding",
            "mesh",
            st.sampled_from(["data", jax.devices()[:1], ("data",), 8]),
            lambda m: T.batch_sharding(m).__enter__(),
        ),
        Case(
            "transforms.batch_sharding",
            "axis",
            st.sampled_from(["batch", "", 0, ("data",)]),
            lambda a: T.batch_sharding(jax.make_mesh((1,), ("data",)), a).__enter__(),
        ),
        Case(
            "transforms.constrain_batch",
            "dim",
            st.one_of(NOT_AN_INT, st.integers(max_value=-1)),
            lambda d: T.constrain_batch(jnp.ones((2, 2)), d),
        ),
        Case(
            "transforms.ParameterSharding",
            "fsdp_axis",
            st.sampled_from([None, 3, ("data",), b"data"]),
            lambda a: T.ParameterSharding(fsdp_axis=a),
        ),
        Case(
            "transforms.ParameterSharding",
            "min_size",
            bad_size(minimum=1),
            lambda n: T.ParameterSharding(fsdp_axis="data", min_size=n),
        ),
        Case(
            "transforms.ParameterSharding",
            "tensor_parallel",
            st.sampled_from(["model", 3, ("model",)]),
            lambda r: T.ParameterSharding(tensor_parallel=r),
        ),
        Case(
            "transforms.make_train_step",
            "parameter_sharding",
            st.sampled_from(["fsdp", True, T.ParameterSharding(fsdp_axis="model")]),
            lambda p: T.make_train_step(
                lambda m, b, k: 0.0,
                optax.sgd(0.1),
                mesh=jax.make_mesh((1,), ("data",)),
                parameter_sharding=p,
            ),
        ),
        Case(
            "transforms.replicate",
            "mesh",
            st.sampled_from([None, "data", jax.devices()[:1], ("data",)]),
            lambda m: T.replicate(jnp.ones(2), m),
        ),
        Case(
            "transforms.fit",
            "n_steps",
            bad_size(minimum=0),
            lambda n: T.fit(
                _idle_step, 0, 0, lambda i: None, n_steps=n, progress=False
            ),
        ),
        Case(
            "transforms.fit",
            "checkpoint_format",
            st.sampled_from(["orbax", "", None, 1]),
            lambda f: T.fit(
                _idle_step, 0, 0, lambda i: None, n_steps=1, checkpoint_format=f
            ),
        ),
        Case(
            "transforms.ShardedCheckpoints",
            "max_to_keep",
            bad_size(minimum=1),
            lambda n: T.ShardedCheckpoints("unused-directory", max_to_keep=n),
        ),
        Case(
            "transforms.fit",
            "step",
            st.sampled_from([3, None, "step", (_idle_step,)]),
            lambda s: T.fit(s, 0, 0, lambda i: None, n_steps=1, progress=False),
        ),
        Case(
            "transforms.make_train_step",
            "optimizer",
            st.sampled_from([3, None, "adam", optax.sgd, (optax.sgd(0.1),)]),
            lambda o: T.make_train_step(_batch_loss, o),
        ),
        Case(
            "transforms.make_train_step",
            "learning_rate",
            bad_real(low=0, inclusive=(False, True)),
            lambda lr: T.make_train_step(_batch_loss, optax.sgd(0.1), learning_rate=lr),
        ),
        Case(
            "transforms.TrainStep",
            "key",
            st.sampled_from(["key", 3, 0.5, [0, 1], (0, 1)]),
            lambda k: T.make_train_step(_batch_loss, optax.sgd(0.1), donate=False)(
                mlp(),
                optax.sgd(0.1).init(eqx.filter(mlp(), eqx.is_inexact_array)),
                (_X, _Y),
                k,
            ),
        ),
        *_privacy_cases(T, not_a_batch),
    ]


def _dp_step(**options):
    import transforms as T

    settings = {"clip_norm": 1.0, "noise_multiplier": 0.5, "donate": False, **options}
    return T.make_dp_train_step(_mlp_loss, optax.sgd(0.1), **settings)


@cached
def _samplers():
    import transforms as T

    data = (np.ones((8, 3), np.float32), np.ones((8, 2), np.float32))
    return (
        T.poisson_sampler(data, sampling_rate=0.1, key=jr.key(0)),
        T.shuffle_sampler(data, batch_size=4, key=jr.key(0)),
    )


def _over_budget(epsilon):
    """`fit` with a budget that 20 steps exceed: refused before any step."""
    import transforms as T

    from .helpers import import_optional

    import_optional("dp_accounting", extra="dp")
    poisson, _ = _samplers()
    opt_state = optax.sgd(0.1).init(eqx.filter(mlp(), eqx.is_inexact_array))
    budget = T.PrivacyBudget(epsilon=epsilon, delta=1e-5)
    return T.fit(
        _dp_step(noise_multiplier=2.0),
        mlp(),
        opt_state,
        poisson,
        n_steps=20,
        key=jr.key(0),
        privacy=budget,
        progress=False,
    )


def _privacy_cases(T, not_a_batch):
    opt_state = lambda: optax.sgd(0.1).init(eqx.filter(mlp(), eqx.is_inexact_array))
    rate = bad_real(low=0, high=1, inclusive=(False, True))
    probability = bad_real(low=0, high=1, inclusive=(False, False))
    positive = bad_real(low=0, inclusive=(False, True))
    accounting = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=3, delta=1e-5)
    return [
        Case(
            "transforms.make_dp_train_step",
            "clip_norm",
            positive,
            lambda c: _dp_step(clip_norm=c),
        ),
        Case(
            "transforms.make_dp_train_step",
            "noise_multiplier",
            bad_real(low=0),
            lambda s: _dp_step(noise_multiplier=s),
        ),
        Case(
            "transforms.make_dp_train_step",
            "accumulation_steps",
            bad_size(),
            lambda k: _dp_step(accumulation_steps=k),
        ),
        Case(
            "transforms.DPTrainStep",
            "key",
            st.sampled_from(["key", 3, 0.5, [0, 1], None]),
            lambda k: _dp_step()(mlp(), opt_state(), (_X, _Y), k),
        ),
        Case(
            "transforms.DPTrainStep",
            "batch",
            not_a_batch,
            lambda b: _dp_step()(mlp(), opt_state(), b, jr.key(0)),
        ),
        Case(
            "transforms.clipped_grad_sum",
            "clip_norm",
            positive,
            lambda c: T.clipped_grad_sum(_mlp_loss, clip_norm=c),
        ),
        Case(
            "transforms.clipped_grad_sum",
            "method",
            st.sampled_from(["ghost", "jvp", "", None, 1]),
            lambda m: T.clipped_grad_sum(_mlp_loss, clip_norm=1.0, method=m),
        ),
        Case(
            "transforms.ClippedGradSum",
            "batch",
            not_a_batch,
            lambda b: T.clipped_grad_sum(_mlp_loss, clip_norm=1.0)(mlp(), b),
        ),
        Case(
            "transforms.dp_epsilon",
            "sampling_rate",
            rate,
            lambda q: T.dp_epsilon(**{**accounting, "sampling_rate": q}),
        ),
        Case(
            "transforms.dp_epsilon",
            "delta",
            probability,
            lambda d: T.dp_epsilon(**{**accounting, "delta": d}),
        ),
        Case(
            "transforms.dp_epsilon",
            "noise_multiplier",
            bad_real(low=0),
            lambda s: T.dp_epsilon(**{**accounting, "noise_multiplier": s}),
        ),
        Case(
            "transforms.dp_epsilon",
            "steps",
            bad_size(minimum=0),
            lambda n: T.dp_epsilon(**{**accounting, "steps": n}),
        ),
        Case(
            "transforms.dp_noise_multiplier",
            "epsilon",
            positive,
            lambda e: T.dp_noise_multiplier(
                epsilon=e, sampling_rate=0.1, steps=3, delta=1e-5
            ),
        ),
        Case(
            "transforms.PrivacyBudget",
            "epsilon",
            positive,
            lambda e: T.PrivacyBudget(epsilon=e, delta=1e-5),
        ),
        Case(
            "transforms.PrivacyBudget",
            "delta",
            probability,
            lambda d: T.PrivacyBudget(epsilon=1.0, delta=d),
        ),
        Case(
            "transforms.poisson_sampler",
            "sampling_rate",
            rate,
            lambda q: T.poisson_sampler((_X,), sampling_rate=q, key=jr.key(0)),
        ),
        Case(
            "transforms.PoissonSampler",
            "step",
            bad_size(minimum=0),
            lambda i: _samplers()[0](i),
        ),
        Case(
            "transforms.shuffle_sampler",
            "batch_size",
            bad_size(minimum=1, maximum=4),
            lambda b: T.shuffle_sampler((_X,), batch_size=b, key=jr.key(0)),
        ),
        Case(
            "transforms.ShuffleSampler",
            "step",
            bad_size(minimum=0),
            lambda i: _samplers()[1](i),
        ),
        Case(
            "transforms.fit",
            "n_steps",  # a privacy budget the run would exceed
            st.floats(1e-3, 1.0),
            _over_budget,
        ),
        *_attribution_cases(T, not_a_batch),
    ]


@cached
def _gradient_store():
    import tempfile

    import transforms as T

    project = T.projected_grads(_mlp_loss, k_out=2, k_in=2)
    path = os.path.join(tempfile.mkdtemp(), "store")
    store = T.build_gradient_store(
        path, project, mlp(), (_X, _Y), batch_size=2, chunk_size=2, progress=False
    )
    return project, store


def _attribution_cases(T, not_a_batch):
    project = lambda: _gradient_store()[0]
    store = lambda: _gradient_store()[1]
    return [
        Case(
            "transforms.projected_grads",
            "k_out",
            bad_size(),
            lambda k: T.projected_grads(_mlp_loss, k_out=k),
        ),
        Case(
            "transforms.projected_grads",
            "kind",
            st.sampled_from(["pca", "Gaussian", None, 0]),
            lambda k: T.projected_grads(_mlp_loss, kind=k),
        ),
        Case(
            "transforms.ProjectedGrads",
            "batch",
            not_a_batch,
            lambda b: T.projected_grads(_mlp_loss, k_out=2, k_in=2)(mlp(), b),
        ),
        Case(
            "transforms.ProjectedGrads",
            "k_in",  # larger than a layer
            st.integers(5, 100),
            lambda k: T.projected_grads(_mlp_loss, k_out=2, k_in=k)(mlp(), (_X, _Y)),
        ),
        Case(
            "transforms.calibrate_projection",
            "data",
            not_a_batch,
            lambda d: T.calibrate_projection(_mlp_loss, mlp(), d, k_out=2, k_in=2),
        ),
        Case(
            "transforms.calibrate_projection",
            "data",  # non-finite calibration examples
            NON_FINITE,
            lambda v: T.calibrate_projection(
                _mlp_loss, mlp(), (_X.copy() * v, _Y), k_out=2, k_in=2
            ),
        ),
        Case(
            "transforms.calibrate_projection",
            "k_in",  # larger than a layer
            st.integers(5, 100),
            lambda k: T.calibrate_projection(
                _mlp_loss, mlp(), (_X, _Y), k_out=2, k_in=k
            ),
        ),
        Case(
            "transforms.calibrate_projection",
            "max_side",
            bad_size(),
            lambda m: T.calibrate_projection(
                _mlp_loss, mlp(), (_X, _Y), k_out=2, k_in=2, max_side=m
            ),
        ),
        Case(
            "transforms.calibrate_projection",
            "batch_size",
            bad_size(),
            lambda b: T.calibrate_projection(
                _mlp_loss, mlp(), (_X, _Y), k_out=2, k_in=2, batch_size=b
            ),
        ),
        Case(
            "transforms.build_gradient_store",
            "data",
            not_a_batch,
            lambda d: T.build_gradient_store("unused", project(), mlp(), d),
        ),
        Case(
            "transforms.build_gradient_store",
            "chunk_size",
            bad_size() | st.sampled_from([3, 5, 7]),
            lambda c: T.build_gradient_store(
                "unused", project(), mlp(), (_X, _Y), batch_size=2, chunk_size=c
            ),
        ),
        Case(
            "transforms.build_gradient_store",
            "projector",
            st.sampled_from([None, _mlp_loss, "project"]),
            lambda p: T.build_gradient_store("unused", p, mlp(), (_X, _Y)),
        ),
        Case(
            "transforms.open_gradient_store",
            "path",
            st.sampled_from([None, 3, b"store", ["store"]]),
            lambda p: T.open_gradient_store(p),
        ),
        Case(
            "transforms.GradientStore",
            "c",
            st.integers(-100, -1) | st.integers(2, 100),
            lambda c: store().chunk(c),
        ),
        Case(
            "transforms.model_fingerprint",
            "model",
            st.sampled_from([None, "model", 3, {"a": 1.0}]),
            lambda m: T.model_fingerprint(m),
        ),
        Case(
            "transforms.tracin_scores",
            "models",  # another model than the store's
            st.floats(0.1, 2.0),
            lambda c: T.tracin_scores(
                store(),
                project(),
                jax.tree.map(lambda x: x + c if eqx.is_inexact_array(x) else x, mlp()),
                (_X, _Y),
            ),
        ),
        Case(
            "transforms.tracin_scores",
            "weights",
            st.sampled_from([[1.0, 2.0], [NAN], [INF], ["1"], 1.0, [True]]),
            lambda w: T.tracin_scores(store(), project(), mlp(), (_X, _Y), weights=w),
        ),
        Case(
            "transforms.influence_scores",
            "queries",
            not_a_batch,
            lambda q: T.influence_scores(store(), project(), mlp(), q),
        ),
        Case(
            "transforms.top_k_scores",
            "k",
            bad_size(maximum=4),
            lambda k: T.top_k_scores(store(), project(), mlp(), (_X, _Y), k),
        ),
        Case(
            "transforms.fisher_inverse",
            "damping",
            bad_real(low=0.0, inclusive=(False, True)),
            lambda d: T.fisher_inverse(store(), damping=d),
        ),
        Case(
            "transforms.self_influence",
            "store",
            st.sampled_from([None, "store", 3]),
            lambda x: T.self_influence(x),
        ),
    ]


# chmm ---------------------------------------------------------------------------


@cached
def chmm_setup():
    from eqx_models import chmm

    model = chmm.CHMM.random((2, 1), 2, key=jr.key(0), pseudocount=0.1)
    x = np.array([0, 1, 0, 0, 1], np.int32)
    a = np.array([0, 1, 1, 0, 0], np.int32)
    return chmm, model, x, a


def _chmm_cases():
    chmm, model, x, a = chmm_setup()
    T0 = np.asarray(model.T)
    emissions = np.full((3, 2), 0.5)
    states = np.array([0, 1, 2, 2, 1], np.int32)
    positions = np.array([[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]], np.int32)
    cases = []
    for fn in ("log_likelihood", "forward", "backward", "posteriors", "viterbi"):
        entry = getattr(chmm, fn)
        cases.append(
            Case(
                f"chmm.{fn}",
                "x",
                bad_ids(x, 2),
                lambda bad, entry=entry: entry(model, bad, jnp.asarray(a)),
            )
        )
    cases += [
        Case(
            "chmm.log_likelihood",
            "a[:-1]",
            bad_ids(a[:-1], 2).map(lambda b: jnp.concatenate([b, jnp.zeros(1, int)])),
            lambda bad: chmm.log_likelihood(model, jnp.asarray(x), bad),
        ),
        Case(
            "chmm.log_likelihood",
            "emissions",
            unnormalised(emissions),
            lambda e: chmm.log_likelihood(
                model, jnp.asarray(x), jnp.asarray(a), emissions=e
            ),
        ),
        Case(
            "chmm.log_likelihood",
            "method",
            st.sampled_from(["fast", "Scan", ""]),
            lambda m: chmm.log_likelihood(
                model, jnp.asarray(x), jnp.asarray(a), method=m
            ),
        ),
        Case(
            "chmm.expected_counts",
            "x",
            bad_ids(x, 2),
            lambda bad: chmm.expected_counts(model, bad, jnp.asarray(a)),
        ),
        Case(
            "chmm.em",
            "pseudocount",
            bad_real(low=0),
            lambda c: chmm.em(
                model, jnp.asarray(x), jnp.asarray(a), n_iter=1, pseudocount=c
            ),
        ),
        Case(
            "chmm.em",
            "n_iter",
            bad_size(minimum=0),
            lambda n: chmm.em(model, jnp.asarray(x), jnp.asarray(a), n_iter=n),
        ),
        Case(
            "chmm.viterbi_em",
            "pseudocount",
            bad_real(low=0),
            lambda c: chmm.viterbi_em(
                model, jnp.asarray(x), jnp.asarray(a), n_iter=1, pseudocount=c
            ),
        ),
        Case(
            "chmm.learn_emissions",
            "emissions",
            unnormalised(emissions),
            lambda e: chmm.learn_emissions(
                model, jnp.asarray(x), jnp.asarray(a), n_iter=1, emissions=e
            ),
        ),
        Case(
            "chmm.CHMM",
            "T",
            unnormalised(T0),
            lambda t: chmm.CHMM((2, 1), t),
        ),
        Case(
            "chmm.CHMM",
            "Pi",
            unnormalised(np.full(3, 1 / 3)),
            lambda p: chmm.CHMM((2, 1), T0, p),
        ),
        Case(
            "chmm.place_fields",
            "states",
            bad_ids(states, 3),
            lambda s: chmm.place_fields(
                s, jnp.asarray(positions), n_states=3, shape=(2, 2)
            ),
        ),
        Case(
            "chmm.place_fields",
            "positions[:, 1]",
            bad_ids(positions[:, 1], 2).map(
                lambda c: jnp.stack([jnp.asarray(positions[:, 0]), c], axis=1)
            ),
            lambda p: chmm.place_fields(
                jnp.asarray(states), p, n_states=3, shape=(2, 2)
            ),
        ),
        Case(
            "chmm.clone_graph",
            "states",
            bad_ids(states, 3),
            lambda s: chmm.clone_graph(model, s),
        ),
        Case(
            "chmm.plan",
            "goal",
            st.integers(3, 100) | st.integers(-100, -1),
            lambda g: chmm.plan(model, 0, g, max_steps=3),
        ),
        Case(
            "chmm.plan",
            "max_steps",
            bad_size(minimum=0),
            lambda n: chmm.plan(model, 0, 1, max_steps=n),
        ),
        Case(
            "chmm.sample",
            "a[:-1]",
            bad_ids(a[:-1], 2).map(lambda b: jnp.concatenate([b, jnp.zeros(1, int)])),
            lambda bad: chmm.sample(model, bad, key=jr.key(0)),
        ),
        Case(
            "chmm.random_room",
            "n_colours",
            bad_size(),
            lambda n: chmm.random_room(2, 3, n, key=jr.key(0)),
        ),
        Case(
            "chmm.room_walk",
            "length",
            bad_size(),
            lambda n: chmm.room_walk(jnp.zeros((2, 2), jnp.int32), n, key=jr.key(0)),
        ),
        Case(
            "chmm.bits_per_step",
            "length",
            bad_real(low=1),
            lambda n: chmm.bits_per_step(-3.0, n),
        ),
    ]
    sparse = chmm.SparseCHMM.from_dense(model, chmm.seen_transitions(x, a))
    blocks0, keys0 = np.asarray(sparse.blocks), np.asarray(sparse.keys)
    # Each uses a triple (a[t], x[t], x[t+1]) that `x` and `a` never use.
    disallowed = [np.array(v, np.int32) for v in ([1, 1, 0, 0, 1], [0, 0, 0, 0, 1])]
    cases += [
        Case(
            "chmm.SparseCHMM",
            "blocks",
            unnormalised(blocks0),
            lambda b: chmm.SparseCHMM((2, 1), b, keys0, 2),
        ),
        Case(
            "chmm.SparseCHMM",
            "keys",
            bad_ids(keys0, 2),
            lambda k: chmm.SparseCHMM((2, 1), blocks0, np.asarray(k), 2),
        ),
        Case(
            "chmm.log_likelihood",
            "x",
            st.sampled_from(disallowed).map(jnp.asarray),
            lambda bad: chmm.log_likelihood(sparse, bad, jnp.asarray(a)),
        ),
        Case(
            "chmm.seen_transitions",
            "x",
            st.tuples(st.integers(0, 4), st.integers(-100, -1)).map(
                lambda p: np.where(np.arange(5) == p[0], p[1], x)
            ),
            lambda bad: chmm.seen_transitions(bad, a),
        ),
        Case(
            "chmm.streaming_expected_counts",
            "chunk_size",
            bad_size(),
            lambda n: chmm.streaming_expected_counts(model, x, a, chunk_size=n),
        ),
        Case(
            "chmm.streaming_em",
            "chunk_size",
            bad_size(),
            lambda n: chmm.streaming_em(model, x, a, n_iter=1, chunk_size=n),
        ),
        Case(
            "chmm.streaming_expected_counts",
            "chunks_per_call",
            bad_size(),
            lambda n: chmm.streaming_expected_counts(
                model, x, a, chunk_size=2, chunks_per_call=n
            ),
        ),
        Case(
            "chmm.posteriors",
            "length",
            st.integers(-100, 0) | st.integers(6, 100),
            lambda n: chmm.posteriors(model, jnp.asarray(x), jnp.asarray(a), length=n),
        ),
        Case(
            "chmm.em",
            "lengths",
            st.integers(-100, 0).map(lambda n: jnp.asarray([5, n], jnp.int32)),
            lambda n: chmm.em(
                model,
                jnp.stack([jnp.asarray(x)] * 2),
                jnp.stack([jnp.asarray(a)] * 2),
                n_iter=1,
                lengths=n,
            ),
        ),
        Case(
            "chmm.hierarchical_plan",
            "communities",
            st.sampled_from([np.zeros(2, np.int32), np.array([0, 1, -1], np.int32)]),
            lambda c: chmm.hierarchical_plan(model, 0, 1, communities=c, max_steps=3),
        ),
        Case(
            "chmm.community_graph",
            "communities",
            bad_ids(np.array([0, 0, 1], np.int32), 3),
            lambda c: chmm.community_graph(model, c),
        ),
        Case(
            "chmm.clone_communities",
            "resolution",
            bad_real(low=0, inclusive=(False, True)),
            lambda r: chmm.clone_communities(model, resolution=r),
        ),
        Case(
            "chmm.online_em",
            "step_size",
            st.sampled_from([0.5, "fast", None]),
            lambda f: chmm.online_em(model, x, a, chunk_size=2, step_size=f),
        ),
    ]
    return cases


# tidhy --------------------------------------------------------------------------


@cached
def tidhy_setup():
    from eqx_models import tidhy

    model = tidhy.TiDHy(3, r_dim=2, r2_dim=2, mix_dim=2, hyper_hid_dim=3, key=jr.key(0))
    config = tidhy.InferenceConfig(max_iter=10)
    x = np.ones((2, 3), np.float32)
    return tidhy, model, config, x


def _tidhy_cases():
    tidhy, model, config, x = tidhy_setup()
    windows = np.ones((2, 4, 3), np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    z = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    train = tidhy.TiDHyTrainConfig(grad_norm=False)
    return [
        Case(
            "tidhy.infer",
            "x",
            bad_entries(x),
            lambda bad: tidhy.infer(
                model, bad, jnp.zeros((2, 2)), jnp.zeros((2, 2)), config
            ),
        ),
        Case(
            "tidhy.infer",
            "r_prev",
            bad_entries(np.zeros((2, 2), np.float32)),
            lambda bad: tidhy.infer(
                model, jnp.asarray(x), bad, jnp.zeros((2, 2)), config
            ),
        ),
        Case(
            "tidhy.infer_first_step",
            "x",
            bad_entries(x),
            lambda bad: tidhy.infer_first_step(model, bad, config),
        ),
        Case(
            "tidhy.InferenceConfig",
            "lr_r",
            bad_real(low=0, inclusive=(False, True)),
            lambda lr: tidhy.InferenceConfig(lr_r=lr),
        ),
        Case(
            "tidhy.InferenceConfig",
            "momentum",
            bad_real(low=0, high=1, inclusive=(True, False)),
            lambda m: tidhy.InferenceConfig(momentum=m),
        ),
        Case(
            "tidhy.InferenceConfig",
            "max_iter",
            bad_size(),
            lambda n: tidhy.InferenceConfig(max_iter=n, halve_lr_r=False),
        ),
        Case(
            "tidhy.InferenceConfig",
            "check_every",
            bad_size(),
            lambda k: tidhy.InferenceConfig(check_every=k),
        ),
        Case(
            "tidhy.TiDHyTrainConfig",
            "lr_hyper",
            bad_real(low=0, inclusive=(False, True)),
            lambda lr: tidhy.TiDHyTrainConfig(lr_hyper=lr),
        ),
        Case(
            "tidhy.TiDHyTrainConfig",
            "cos_eta",
            bad_real(low=0),
            lambda c: tidhy.TiDHyTrainConfig(cos_eta=c),
        ),
        Case(
            "tidhy.TiDHy",
            "temp_weight",
            bad_real(low=0),
            lambda t: tidhy.TiDHy(3, temp_weight=t, key=jr.key(0)),
        ),
        Case(
            "tidhy.TiDHy",
            "r_dim",
            bad_size(),
            lambda n: tidhy.TiDHy(3, r_dim=n, key=jr.key(0)),
        ),
        Case(
            "tidhy.knn_classify",
            "train_y",
            bad_ids(labels, 3),
            lambda y: tidhy.knn_classify(
                jnp.asarray(features), y, jnp.asarray(features), n_classes=3
            ),
        ),
        Case(
            "tidhy.knn_classify",
            "k",
            bad_size(maximum=6),
            lambda k: tidhy.knn_classify(
                jnp.asarray(features),
                jnp.asarray(labels),
                jnp.asarray(features),
                n_classes=3,
                k=k,
            ),
        ),
        Case(
            "tidhy.state_decoding_accuracy",
            "train_fraction",
            bad_real(low=0, high=1, inclusive=(False, False)),
            lambda f: tidhy.state_decoding_accuracy(
                jnp.asarray(features),
                jnp.asarray(labels),
                key=jr.key(0),
                n_classes=3,
                train_fraction=f,
            ),
        ),
        Case(
            "tidhy.state_decoding_accuracy",
            "block",
            bad_size(maximum=6),
            lambda b: tidhy.state_decoding_accuracy(
                jnp.asarray(features),
                jnp.asarray(labels),
                key=jr.key(0),
                n_classes=3,
                block=b,
            ),
        ),
        Case(
            "tidhy.fit_linear_dynamics",
            "z",
            bad_entries(z),
            lambda bad: tidhy.fit_linear_dynamics(bad),
        ),
        Case(
            "tidhy.fit_linear_dynamics",
            "mask",
            st.sampled_from([[False] * 5, [True, False, True, False, True]]),
            lambda m: tidhy.fit_linear_dynamics(jnp.asarray(z), jnp.asarray(m)),
        ),
        Case(
            "tidhy.timescales",
            "A",
            bad_entries(np.eye(2, dtype=np.float32)),
            lambda A: tidhy.timescales(A),
        ),
        Case(
            "tidhy.r2_score",
            "y_pred",
            st.sampled_from([jnp.ones((5, 3)), jnp.ones(5), None, "y"]),
            lambda y: tidhy.r2_score(jnp.asarray(z), y),
        ),
        Case(
            "tidhy.stack_windows",
            "stride",
            bad_size(),
            lambda s: tidhy.stack_windows(jnp.ones((10, 3)), 4, s),
        ),
        Case(
            "tidhy.evaluate_record",
            "X",
            bad_entries(windows),
            lambda X: tidhy.evaluate_record(model, X, config),
        ),
        Case(
            "tidhy.init_learner",
            "windows",
            bad_entries(windows) | st.just(jnp.ones((0, 4, 3))),
            lambda W: tidhy.init_learner(model, W, inference=config),
        ),
        Case(
            "tidhy.train",
            "windows",
            st.just(jnp.ones((0, 4, 3))) | bad_entries(windows),
            lambda W: tidhy.train(
                model, W, n_epochs=1, inference=config, progress=False
            ),
        ),
        Case(
            "tidhy.make_optimizer",
            "n_epochs",
            bad_size(),
            lambda n: tidhy.make_optimizer(
                tidhy.Learner(model, None), tidhy.TiDHyTrainConfig(), n_epochs=n
            ),
        ),
        Case(
            "tidhy.SwitchingLDS",
            "dynamics_noise",
            bad_real(low=0),
            lambda s: tidhy.SwitchingLDS(key=jr.key(0), dynamics_noise=s),
        ),
        Case(
            "tidhy.make_rossler",
            "noise",
            bad_real(low=0),
            lambda s: tidhy.make_rossler(10, key=jr.key(0), noise=s),
        ),
        Case(
            "tidhy.rossler_vector_field",
            "args",
            st.sampled_from([(1.0,) * 8, (1.0,) * 10, None, 1.0, "args"]),
            lambda a: tidhy.rossler_vector_field(0.0, jnp.ones(6), a),
        ),
        Case(
            "tidhy.training_loss",
            "learner",
            st.sampled_from([model, None, "learner", {"model": model}]),
            lambda learner: tidhy.training_loss(
                learner, jnp.asarray(windows), inference=config, train=train
            ),
        ),
        Case(
            "tidhy.training_loss",
            "windows",
            st.sampled_from(
                [jnp.ones((2, 4, 2)), jnp.ones((4, 3)), None, jnp.ones((2, 4, 3), int)]
            ),
            lambda w: tidhy.training_loss(
                tidhy.Learner(model, None), w, inference=config, train=train
            ),
        ),
        Case(
            "tidhy.task_losses_from_latents",
            "R",
            st.sampled_from(
                [jnp.zeros((2, 4, 3)), jnp.zeros((2, 3, 2)), jnp.zeros((4, 2)), None]
            ),
            lambda R: tidhy.task_losses_from_latents(
                model, jnp.asarray(windows), R, jnp.zeros((2, 4, 2))
            ),
        ),
        Case(
            "tidhy.regularisers",
            "train",
            st.sampled_from([None, {}, "config", config]),
            lambda t: tidhy.regularisers(model, t),
        ),
        Case(
            "tidhy.InferenceConfig",
            "batch_converge",
            st.sampled_from([0, 1, "no", None, 1.0]),
            lambda b: tidhy.InferenceConfig(batch_converge=b),
        ),
        Case(
            "tidhy.infer",
            "mask",
            st.sampled_from(
                [jnp.ones((2, 2), bool), jnp.ones((3,), bool), jnp.ones((2, 3)), "m"]
            ),
            lambda m: tidhy.infer(
                model, jnp.asarray(x), jnp.zeros((2, 2)), jnp.zeros((2, 2)), mask=m
            ),
        ),
        Case(
            "tidhy.evaluate_record",
            "mask",
            st.sampled_from(
                [
                    jnp.ones((2, 4, 2), bool),
                    jnp.ones((2, 3), bool),
                    jnp.ones((2, 4, 3), jnp.float32),
                    jnp.ones((4, 3), bool),
                ]
            ),
            lambda m: tidhy.evaluate_record(
                model, jnp.asarray(windows), config, mask=m
            ),
        ),
        Case(
            "tidhy.Sessions",
            "recordings",
            st.sampled_from(
                [
                    [],
                    [np.full((5, 3), np.nan)],
                    [np.ones((5, 3)), np.full((4, 3), np.nan)],
                    [np.ones((5, 3)), np.ones((5, 2))],
                    [np.ones(5)],
                    [np.ones((5, 3), int)],
                    [np.full((5, 3), np.inf)],
                    np.ones((5, 3)),
                ]
            ),
            lambda r: tidhy.Sessions(r),
        ),
        Case(
            "tidhy.Sessions",
            "masks",
            st.sampled_from(
                [
                    [np.ones((5, 2), bool)],
                    [np.ones((4,), bool)],
                    [np.ones((5, 3))],
                    [np.ones((5, 3), bool)] * 2,
                ]
            ),
            lambda m: tidhy.Sessions([np.ones((5, 3))], masks=m),
        ),
        Case(
            "tidhy.Sessions",
            "length",
            bad_size(minimum=2) | st.integers(6, 10**6),
            lambda n: tidhy.Sessions([np.ones((5, 3)), np.ones((9, 3))]).windows(n, 1),
        ),
        Case(
            "tidhy.load_sessions",
            "zscore",
            st.sampled_from(["frame", "Session", 1, True]),
            lambda z: tidhy.load_sessions([], zscore=z),
        ),
        Case(
            "tidhy.evaluate_recording",
            "length",
            bad_size(minimum=2) | st.integers(7, 10**6),
            lambda n: tidhy.evaluate_recording(model, np.ones((6, 3)), length=n),
        ),
        Case(
            "tidhy.evaluate_recording",
            "mask",
            st.sampled_from(
                [np.ones((6, 2), bool), np.ones((5,), bool), np.ones((6, 3)), "mask"]
            ),
            lambda m: tidhy.evaluate_recording(
                model, np.ones((6, 3)), length=3, mask=m
            ),
        ),
        Case(
            "tidhy.evaluate_sessions",
            "sessions",
            st.sampled_from([None, [np.ones((6, 3))], np.ones((6, 3)), "sessions"]),
            lambda ss: tidhy.evaluate_sessions(model, ss, length=3),
        ),
    ]


# causal -------------------------------------------------------------------------


@cached
def causal_setup():
    from eqx_models import causal

    config = causal.TaskConfig(n_vars=3, n_samples=12)
    task = causal.sample_task(jr.key(0), config)
    return causal, config, task


def _causal_cases():
    causal, config, task = causal_setup()
    log_probs = np.log(np.full(4, 0.25, np.float32))
    cycle = jnp.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], bool)
    model = functools.cache(
        lambda: causal.ParentSetPredictionModel(
            2, width=4, n_layers=1, n_heads=2, key=jr.key(0)
        )
    )
    return [
        Case(
            "causal.candidate_variables",
            "target",
            st.integers(3, 100) | st.integers(-100, -1),
            lambda t: causal.candidate_variables(t, 3, 2),
        ),
        Case(
            "causal.candidate_parent_sets",
            "n_vars",
            bad_size(),
            lambda n: causal.candidate_parent_sets(n, 2),
        ),
        Case(
            "causal.edge_marginals",
            "log_probs",
            unnormalised(np.full(4, 0.25), log=True),
            lambda lp: causal.edge_marginals(lp, 0, 3, 2),
        ),
        Case(
            "causal.edge_marginals",
            "target",
            st.integers(3, 100) | st.integers(-100, -1),
            lambda t: causal.edge_marginals(jnp.asarray(log_probs), t, 3, 2),
        ),
        Case(
            "causal.exact_parent_posterior",
            "on_degenerate",
            st.sampled_from(["ignore", "Raise", None]),
            lambda o: causal.exact_parent_posterior(task.data, 2, on_degenerate=o),
        ),
        Case(
            "causal.exact_parent_posterior",
            "degree",
            bad_size(),
            lambda g: causal.exact_parent_posterior(task.data, 2, degree=g),
        ),
        Case(
            "causal.exact_parent_posterior",
            "data",
            bad_entries(np.asarray(task.data)[..., :1]).map(
                lambda v: task.data.at[..., :1].set(v)
            ),
            lambda d: causal.exact_parent_posterior(d, 2),
        ),
        Case(
            "causal.sample_dag",
            "edges_per_node",
            bad_real(low=0),
            lambda e: causal.sample_dag(jr.key(0), 4, "erdos_renyi", edges_per_node=e),
        ),
        Case(
            "causal.sample_dag",
            "family",
            st.integers(5, 100)
            | st.integers(-100, -1)
            | st.sampled_from(["tree", True]),
            lambda f: causal.sample_dag(jr.key(0), 4, f),
        ),
        Case(
            "causal.sample_linear_gaussian_scm",
            "adjacency",
            st.just(cycle),
            lambda A: causal.sample_linear_gaussian_scm(jr.key(0), A),
        ),
        Case(
            "causal.sample_linear_gaussian_scm",
            "noise_range",
            st.sampled_from([(0.0, 1.0), (1.0, 0.5), (NAN, 1.0), (0.5, INF)]),
            lambda r: causal.sample_linear_gaussian_scm(
                jr.key(0),
                jnp.zeros((3, 3), bool),
                noise_range=r,
                explained_variance=None,
            ),
        ),
        Case(
            "causal.simulate",
            "scm.weights",
            st.just(cycle),
            lambda A: causal.simulate(
                jr.key(0),
                causal.LinearGaussianSCM(A, A.astype(float), jnp.zeros(3), jnp.ones(3)),
                jnp.array([-1]),
                jnp.array([0.0]),
            ),
        ),
        Case(
            "causal.LinearGaussianSCM",
            "bias",
            st.sampled_from([jnp.zeros(2), jnp.zeros((3, 1)), None]),
            lambda b: causal.LinearGaussianSCM(
                jnp.zeros((3, 3), bool), jnp.zeros((3, 3)), b, jnp.ones(3)
            ),
        ),
        Case(
            "causal.TaskConfig",
            "n_vars",
            bad_size(minimum=2),
            lambda n: causal.TaskConfig(n_vars=n, n_samples=10),
        ),
        Case(
            "causal.TaskConfig",
            "edges_per_node",
            bad_real(low=0),
            lambda e: causal.TaskConfig(n_vars=3, n_samples=10, edges_per_node=e),
        ),
        Case(
            "causal.sample_task",
            "family_weights",
            bad_entries(np.ones(5, np.float32), NON_FINITE | st.floats(-10, -0.01))
            | st.just(jnp.zeros(5)),
            lambda w: causal.sample_task(jr.key(0), config, w),
        ),
        Case(
            "causal.sample_training_batch",
            "batch_size",
            bad_size(),
            lambda b: causal.sample_training_batch(jr.key(0), config, b, 2),
        ),
        Case(
            "causal.BehaviouralCloningLoss",
            "uncertainty_scale",
            bad_real(low=0).filter(lambda s: s is not None),
            lambda s: causal.BehaviouralCloningLoss(uncertainty_scale=s),
        ),
        Case(
            "causal.make_optimizer",
            "peak_learning_rate",
            bad_real(low=0, inclusive=(False, True)),
            lambda lr: causal.make_optimizer(10, peak_learning_rate=lr),
        ),
        Case(
            "causal.set_run_length",
            "n_steps",
            bad_size(),
            lambda n: causal.set_run_length({}, n),
        ),
        Case(
            "causal.Curriculum",
            "ramp",
            bad_real(low=0, high=1),
            lambda r: causal.Curriculum((1.0,), (1.0,), ramp=r),
        ),
        Case(
            "causal.ParentSetPredictionModel",
            "width",
            bad_size(),
            lambda w: causal.ParentSetPredictionModel(2, width=w, key=jr.key(0)),
        ),
        Case(
            "causal.ParentSetPredictionModel",
            "attention",
            st.sampled_from(["flash", "CUDNN", None, 1]),
            lambda a: causal.ParentSetPredictionModel(
                2, width=4, n_heads=2, attention=a, key=jr.key(0)
            ),
        ),
        Case(
            "causal.evaluate_surrogate",
            "batch_size",
            bad_size(),
            lambda b: causal.evaluate_surrogate(
                model(), jax.tree.map(lambda x: x[None], task), batch_size=b
            ),
        ),
        Case(
            "causal.train",
            "n_steps",
            bad_size(),
            lambda n: causal.train(
                model(), [(config, 2)], n_steps=n, key=jr.key(0), progress=False
            ),
        ),
        Case(
            "causal.train",
            "buckets",
            st.sampled_from(
                [[], [(config, 0)], [(config, -2)], [("config", 2)], [config], None]
            ),
            lambda b: causal.train(
                model(), b, n_steps=2, key=jr.key(0), progress=False
            ),
        ),
        Case(
            "causal.TaskStream",
            "n_steps",
            bad_size(),
            lambda n: causal.TaskStream(
                [(config, 2)], 2, n, causal.Curriculum((1.0,), (1.0,)), jr.key(0)
            ),
        ),
        Case(
            "causal.sample_nonlinear_scm",
            "mechanism",
            st.sampled_from(["linear", "MLP", "gp", None]),
            lambda m: causal.sample_nonlinear_scm(
                jr.key(0), jnp.zeros((3, 3), bool), mechanism=m
            ),
        ),
        Case(
            "causal.sample_nonlinear_scm",
            "n_hidden",
            bad_size(),
            lambda h: causal.sample_nonlinear_scm(
                jr.key(0), jnp.zeros((3, 3), bool), n_hidden=h
            ),
        ),
        Case(
            "causal.MLPSCM",
            "w_out",
            st.sampled_from([jnp.zeros((3, 4)), jnp.zeros((2, 2)), None]),
            lambda w: causal.MLPSCM(
                jnp.zeros((3, 3), bool),
                jnp.zeros((3, 3, 2)),
                jnp.zeros((3, 2)),
                w,
                jnp.zeros(3),
                jnp.ones(3),
                jnp.zeros((3, 3)),
            ),
        ),
        Case(
            "causal.AdditiveFourierSCM",
            "phase",
            st.sampled_from([jnp.zeros((3, 3, 4)), jnp.zeros((3, 2)), None]),
            lambda ph: causal.AdditiveFourierSCM(
                jnp.zeros((3, 3), bool),
                jnp.zeros((3, 3, 2)),
                ph,
                jnp.zeros((3, 3, 2)),
                jnp.zeros(3),
                jnp.ones(3),
                jnp.zeros((3, 3)),
            ),
        ),
        Case(
            "causal.TaskConfig",
            "label_smoothing",
            bad_real(low=0, high=1, inclusive=(True, False)),
            lambda e: causal.TaskConfig(n_vars=3, n_samples=10, label_smoothing=e),
        ),
        Case(
            "causal.TaskConfig",
            "expert_degree",
            bad_size(),
            lambda g: causal.TaskConfig(n_vars=3, n_samples=10, expert_degree=g),
        ),
        Case(
            "causal.evaluate_by_mechanism",
            "tasks",
            st.sampled_from([{}, [task], None, "tasks"]),
            lambda t: causal.evaluate_by_mechanism(model(), t),
        ),
        Case(
            "causal.expected_information_gain",
            "rows",
            bad_size(),
            lambda r: causal.expected_information_gain(jr.key(0), task.data, 1, rows=r),
        ),
        Case(
            "causal.expected_information_gain",
            "candidate_batch",
            bad_size(),
            lambda b: causal.expected_information_gain(
                jr.key(0), task.data, 1, rows=2, candidate_batch=b
            ),
        ),
        Case(
            "causal.expected_information_gain",
            "degree",
            bad_size(),
            lambda g: causal.expected_information_gain(
                jr.key(0), task.data, 1, rows=2, degree=g
            ),
        ),
        Case(
            "causal.design_interventions",
            "rounds",
            bad_size(),
            lambda r: causal.design_interventions(
                jr.key(0),
                task.scm,
                task.data,
                rounds=r,
                rows_per_round=2,
                max_parents=1,
            ),
        ),
        Case(
            "causal.design_interventions",
            "nodes",
            st.just(jnp.asarray([int(task.target)]))
            | bad_ids(np.array([0, 1], np.int32), 3),
            lambda n: causal.design_interventions(
                jr.key(0),
                task.scm,
                task.data,
                rounds=1,
                rows_per_round=2,
                max_parents=1,
                nodes=n,
            ),
        ),
        Case(
            "causal.shortlist_parent_posterior",
            "shortlist_size",
            bad_size(maximum=2),
            lambda s: causal.shortlist_parent_posterior(task.data, 1, shortlist_size=s),
        ),
        Case(
            "causal.shortlist_parent_posterior",
            "degree",
            bad_size(),
            lambda g: causal.shortlist_parent_posterior(task.data, 1, degree=g),
        ),
        Case(
            "causal.weight_decay_mask",
            "params",
            st.sampled_from(
                [None, {"b": jnp.ones(2)}, jnp.ones(3), "params", eqx.nn.Identity()]
            ),
            lambda p: causal.weight_decay_mask(p),
        ),
    ]


# multimodal ---------------------------------------------------------------------


@cached
def multimodal_setup():
    from eqx_models import multimodal as mm

    layout = mm.VocabLayout(n_image=3, n_scalar=3, n_spectrum=2, spectrum_groups=("b",))
    codebooks = mm.Codebooks(
        layout,
        image=np.arange(6.0).reshape(3, 2),
        scalar=np.array([[0.0, 1.0, 2.0]] * 3),
        spectrum=[np.ones((2, 2))],
    )
    sequence = mm.build_sequence(layout, image=[0, 1], scalars=[0, 2, -1])
    batch = mm.pad_batch([sequence], length=10)
    model = mm.CausalTransformerLM(
        layout, d_model=4, n_layers=1, n_heads=1, max_len=10, key=jr.key(0)
    )
    return mm, layout, codebooks, batch, model


def _multimodal_cases():
    mm, layout, codebooks, batch, model = multimodal_setup()
    scalar = (batch.tokens >= layout.scalar_start) & (
        batch.tokens < layout.scalar_start + layout.n_scalar
    )
    column_positions = np.flatnonzero(np.asarray(scalar)[0])

    def with_column(value):
        columns = np.array(batch.columns)
        columns[0, column_positions[value[0] % len(column_positions)]] = value[1]
        return jnp.asarray(columns)

    bad_column = st.tuples(st.integers(0, 2), st.integers(3, 50)).map(with_column)
    sequence = mm.build_sequence(layout, image=[0, 1], scalars=[0, 2, -1])
    packed = mm.pack_sequences([sequence, sequence], length=20)

    def laid_out(tokens):
        # Tokens in another order than build_sequence's, typed by the layout (MISS
        # as a scalar).
        tokens = np.asarray([tokens + [mm.PAD] * (10 - len(tokens))], np.int32)
        implied = np.asarray(layout.type_ids(jnp.asarray(tokens)))
        types = np.where(tokens == mm.MISS, 2, implied)
        return mm.TokenBatch(
            jnp.asarray(tokens),
            jnp.asarray(types, jnp.int32),
            jnp.full(tokens.shape, -1, jnp.int32),
            jnp.full(tokens.shape, np.nan, jnp.float32),
        )

    image, scalar = layout.image_start, layout.scalar_start
    BOS, SEP, EOS, MISS = mm.BOS, mm.SEP, mm.EOS, mm.MISS
    misordered = [
        laid_out([BOS, scalar, scalar + 2, MISS, SEP, image, image + 1, EOS]),
        laid_out([BOS, image, SEP, scalar, SEP, image + 1, EOS]),
        laid_out([BOS, image, image + 1, scalar, EOS]),
        laid_out([BOS, image, SEP, SEP, scalar, EOS]),
        laid_out([image, image + 1, SEP, scalar, EOS]),
        laid_out([BOS, image, SEP, scalar, EOS, image]),
        laid_out([BOS, image, SEP, scalar]),
    ]
    loss = mm.MultimodalLoss(codebooks, sample_k=None)
    not_a_config = st.sampled_from([{"n_steps": 10}, None, 10, "config"])
    return [
        Case(
            "multimodal.expected_values",
            "columns",
            bad_column,
            lambda c: mm.expected_values(model, codebooks, batch.tokens, columns=c),
        ),
        Case(
            "multimodal.MultimodalLoss",
            "batch.columns",
            bad_column,
            lambda c: mm.MultimodalLoss(codebooks, sample_k=None)(
                model, mm.TokenBatch(batch.tokens, batch.type_ids, c, batch.values)
            ),
        ),
        Case(
            "multimodal.MultimodalLoss",
            "scalar_weight",
            bad_real(low=0),
            lambda w: mm.MultimodalLoss(codebooks, scalar_weight=w),
        ),
        Case(
            "multimodal.MultimodalLoss",
            "hl_gauss_sigma",
            bad_real(low=0, inclusive=(False, True)),
            lambda s: mm.MultimodalLoss(codebooks, hl_gauss_sigma=s),
        ),
        Case(
            "multimodal.MultimodalTrainConfig",
            "learning_rate",
            bad_real(low=0, inclusive=(False, True)),
            lambda lr: mm.MultimodalTrainConfig(n_steps=10, learning_rate=lr),
        ),
        Case(
            "multimodal.MultimodalTrainConfig",
            "b2",
            bad_real(low=0, high=1, inclusive=(True, False)),
            lambda b2: mm.MultimodalTrainConfig(n_steps=10, b2=b2),
        ),
        Case(
            "multimodal.MultimodalTrainConfig",
            "n_steps",
            bad_size(),
            lambda n: mm.MultimodalTrainConfig(n_steps=n),
        ),
        Case(
            "multimodal.bucket_length",
            "buckets",
            st.sampled_from([[], (), [8, 0], [8, 2.5], [True]]),
            lambda b: mm.bucket_length(4, b),
        ),
        Case(
            "multimodal.bucket_length",
            "length",
            bad_size(minimum=0),
            lambda n: mm.bucket_length(n),
        ),
        Case(
            "multimodal.pad_batch",
            "length",
            bad_size(),
            lambda n: mm.pad_batch([mm.build_sequence(layout, image=[0])], length=n),
        ),
        Case(
            "multimodal.build_sequence",
            "image",
            bad_ids(np.array([0, 1], np.int64), 3),
            lambda i: mm.build_sequence(layout, image=np.asarray(i)),
        ),
        Case(
            "multimodal.check_tokens",
            "tokens",
            bad_ids(np.asarray(batch.tokens), layout.vocab_size).filter(
                lambda t: bool(jnp.any(t < 0) | jnp.any(t >= layout.vocab_size))
            ),
            lambda t: mm.check_tokens(layout, t),
        ),
        Case(
            "multimodal.CausalTransformerLM",
            "dropout",
            bad_real(low=0, high=1, inclusive=(True, False)),
            lambda p: mm.CausalTransformerLM(
                layout, d_model=4, dropout=p, key=jr.key(0)
            ),
        ),
        Case(
            "multimodal.CausalTransformerLM",
            "unroll",
            bad_size(maximum=2) | st.sampled_from(["fast", "AUTO", ""]),
            lambda u: mm.CausalTransformerLM(
                layout, d_model=4, n_layers=2, n_heads=1, unroll=u, key=jr.key(0)
            ),
        ),
        Case(
            "multimodal.Codebooks",
            "image",
            bad_entries(np.arange(6.0).reshape(3, 2)),
            lambda img: mm.Codebooks(
                layout, image=img, scalar=np.arange(3.0), spectrum=[np.ones((2, 2))]
            ),
        ),
        Case(
            "multimodal.VocabLayout",
            "n_image",
            bad_size(),
            lambda n: mm.VocabLayout(
                n_image=n, n_scalar=2, n_spectrum=2, spectrum_groups=()
            ),
        ),
        Case(
            "multimodal.make_synthetic_data",
            "noise",
            bad_real(low=0),
            lambda s: mm.make_synthetic_data(jr.key(0), 4, noise=s),
        ),
        Case(
            "multimodal.train",
            "config",
            not_a_config,
            lambda c: mm.train(
                model, loss, lambda i: batch, c, key=jr.key(0), progress=False
            ),
        ),
        Case(
            "multimodal.train",
            "peak_flops",
            bad_real(low=0, inclusive=(False, True)),
            lambda f: mm.train(
                model,
                loss,
                lambda i: batch,
                mm.MultimodalTrainConfig(n_steps=1),
                key=jr.key(0),
                peak_flops=f,
                progress=False,
            ),
        ),
        Case(
            "multimodal.evaluate",
            "batches",
            st.sampled_from([[], (), None, "batch", [batch, "x"], batch.tokens]),
            lambda b: mm.evaluate(model, loss, b),
        ),
        Case(
            "multimodal.cast_floating",
            "dtype",
            st.sampled_from([jnp.int32, "int8", bool, "float17", None, 3]),
            lambda d: mm.cast_floating(model, d),
        ),
        Case(
            "multimodal.weight_decay_mask",
            "model",
            st.sampled_from([None, {"qkv_weight": jnp.ones(2)}, "model", layout]),
            lambda m: mm.weight_decay_mask(m),
        ),
        Case(
            "multimodal.learning_rate_schedule",
            "config",
            not_a_config,
            lambda c: mm.learning_rate_schedule(c),
        ),
        Case(
            "multimodal.make_optimizer",
            "config",
            not_a_config,
            lambda c: mm.make_optimizer(c, model),
        ),
        Case(
            "multimodal.load_codebooks",
            "image",
            st.sampled_from([None, 3, "", b"image.npz", ["image.npz"]]),
            lambda path: mm.load_codebooks(
                layout, image=path, scalar="scalar.npz", spectrum="spectrum.npz"
            ),
        ),
        Case(
            "multimodal.generate",
            "temperature",
            bad_real(low=0, inclusive=(False, True)),
            lambda t: mm.generate(
                model, batch, prompt_length=2, key=jr.key(0), temperature=t
            ),
        ),
        Case(
            "multimodal.generate",
            "top_k",
            bad_size(maximum=layout.vocab_size),
            lambda k: mm.generate(
                model, batch, prompt_length=2, key=jr.key(0), top_k=k
            ),
        ),
        Case(
            "multimodal.generate",
            "prompt_length",
            bad_size(maximum=10),
            lambda n: mm.generate(model, batch, prompt_length=n, key=jr.key(0)),
        ),
        Case(
            "multimodal.generate",
            "batch.tokens",
            st.sampled_from(misordered),
            lambda b: mm.generate(model, b, prompt_length=2, key=jr.key(0)),
        ),
        Case(
            "multimodal.pack_sequences",
            "length",
            bad_size(),
            lambda n: mm.pack_sequences([sequence], length=n),
        ),
        Case(
            "multimodal.packing_plan",
            "lengths",
            st.sampled_from([[0], [-3], [2.5], [True], [11], ["3"], [4, 12]]),
            lambda lengths: mm.packing_plan(lengths, length=10),
        ),
        Case(
            "multimodal.TokenBatch",
            "positions",
            st.sampled_from(
                [
                    None,
                    packed.positions[:, :-1],
                    packed.positions.astype(jnp.float32),
                    "positions",
                ]
            ),
            lambda p: mm.TokenBatch(
                packed.tokens,
                packed.type_ids,
                packed.columns,
                packed.values,
                segment_ids=packed.segment_ids,
                positions=p,
            ),
        ),
        Case(
            "multimodal.TokenBatch",
            "type_ids",
            st.sampled_from(
                [
                    batch.type_ids[:, :-1],
                    batch.type_ids[0],
                    batch.type_ids.astype(jnp.float32),
                    None,
                    "ids",
                ]
            ),
            lambda t: mm.TokenBatch(batch.tokens, t, batch.columns, batch.values),
        ),
        Case(
            "multimodal.TensorParallelRule",
            "axis",
            st.sampled_from([None, 3, ("model",), b"model"]),
            lambda a: mm.TensorParallelRule(a),
        ),
    ]


# The tests ----------------------------------------------------------------------

_FAMILIES = {
    "transforms": _transforms_cases,
    "chmm": _chmm_cases,
    "tidhy": _tidhy_cases,
    "causal": _causal_cases,
    "multimodal": _multimodal_cases,
}

# How many cases each family has; the cases themselves are built in the test (they
# need models), this only fixes the parametrisation.
_N_CASES = {
    "transforms": 107,
    "chmm": 37,
    "tidhy": 41,
    "causal": 42,
    "multimodal": 34,
}

TRIED: collections.Counter = collections.Counter()


@functools.cache
def cases(family: str) -> list[Case]:
    built = _FAMILIES[family]()
    assert len(built) == _N_CASES[family], (family, len(built))
    return built


def _names_the_argument(message: str, arg: str) -> bool:
    if f"`{arg}`" in message or f"`{arg}[" in message:  # `buckets[1]`
        return True
    # Under the test suite the jaxtyping import hook checks every annotated
    # function and dataclass before the library's own checks run, in its own
    # words; users get the library's message. When the hook's re-check cannot say
    # which parameter failed (beartype checks one random item of a list), it lists
    # the call's parameters.
    hook = message.startswith("Type-check error whilst checking the parameters")
    return f"parameter '{arg}'" in message or (hook and f"'{arg}':" in message)


@pytest.mark.parametrize(
    "family, index",
    [(family, i) for family, n in _N_CASES.items() for i in range(n)],
)
@given(data=st.data())
def test_bad_input_is_refused_naming_the_argument(family, index, data):
    case = cases(family)[index]
    value = data.draw(case.values, label=f"{case.name}({case.arg}=...)")
    # Every call here is eager, on concrete values: the library's plain
    # `ValueError`/`TypeError`, never Equinox's run-time error (kept for traced
    # values) nor an XLA error.
    with pytest.raises((ValueError, TypeError)) as info:
        jax.block_until_ready(case.call(value))
    message = str(info.value)
    assert _names_the_argument(message, case.arg), (case.name, case.arg, message)
    TRIED[family] += 1


def _outcomes(case: Case, max_examples: int) -> list[str]:
    """What went wrong when `case` ran its bad values (nothing: all refused well)."""
    from hypothesis import HealthCheck, settings

    found: list[str] = []

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data):
        value = data.draw(case.values)
        try:
            jax.block_until_ready(case.call(value))
        except (ValueError, TypeError) as error:
            if not _names_the_argument(str(error), case.arg):
                found.append(f"{type(error).__name__}: {error}"[:300])
            return
        except Exception as error:
            found.append(f"{type(error).__name__}: {error}"[:300])
            return
        found.append(f"a result for {value!r}"[:300])

    run()
    return found


def problems_without_the_hook(max_examples: int) -> list[str]:
    """Run every case as a user would, without jaxtyping's import hook (which
    checks annotated functions first, in its own words, under pytest): the library's
    own checks must still refuse each bad value with a message naming the argument.
    Returns what went wrong, one line per case."""
    problems = []
    for family in _FAMILIES:
        for case in cases(family):
            found = _outcomes(case, max_examples)
            if found:
                problems.append(f"{case.name}({case.arg}=...): {found[0]}")
    return problems


@pytest.mark.slow
def test_the_library_names_the_argument_without_the_import_hook():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    code = (
        "from tests.test_bad_inputs import problems_without_the_hook as run\n"
        "problems = run(2)\n"
        "print(*problems, sep='\\n')\n"
        "raise SystemExit(1 if problems else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if TRIED:
        print("\nbad inputs tried per family:", dict(sorted(TRIED.items())))


# The enumeration ----------------------------------------------------------------

_MODULES = {
    "transforms": "transforms",
    "chmm": "eqx_models.chmm",
    "tidhy": "eqx_models.tidhy",
    "causal": "eqx_models.causal",
    "multimodal": "eqx_models.multimodal",
    "eqx_models": "eqx_models",
}

_RETURNED = "a result type the library builds and returns"
_CONSTANT = "a constant"
_ERROR = "an exception or warning class"

NO_USER_VALUES = {
    "transforms.Checkpoint": _RETURNED,
    "transforms.CheckpointError": _ERROR,
    "transforms.ClippedGrads": _RETURNED,
    "transforms.MaskedBatch": "a batch the samplers build; the step that takes it "
    "checks it (its `batch` case)",
    "transforms.PrivacyBudgetError": _ERROR,
    "transforms.FitResult": _RETURNED,
    "transforms.GhostFallbackWarning": _ERROR,
    "transforms.GhostLeaf": _RETURNED,
    "transforms.GhostPlan": _RETURNED,
    "transforms.ProjectionBlock": _RETURNED,
    "transforms.FisherInverse": "built by fisher_inverse; the queries that take it "
    "check it (their `fisher` argument)",
    "transforms.NonFiniteLossError": _ERROR,
    "transforms.OptimizeStats": _RETURNED,
    "transforms.ShapleyState": _RETURNED,
    "transforms.FallbackStep": "built by with_fallback; forwards its arguments to "
    "the wrapped step, which checks them",
    "transforms.shapley_values": "reads a ShapleyState built by in_run_shapley",
    "transforms.copy_for_donation": "copies the arrays of any pytree",
    "transforms.describe_config": "describes any object",
    "transforms.injected_learning_rate": "reads any optimiser state (None without "
    "an injected rate)",
    "chmm.Plan": _RETURNED,
    "chmm.HierarchicalPlan": _RETURNED,
    "chmm.AbstractCHMM": "an abstract base class; CHMM and SparseCHMM have cases",
    "chmm.default_step_size": "a default schedule of an update count; online_em "
    "checks the step sizes it is given (its `step_size` case)",
    "chmm.Posteriors": _RETURNED,
    "tidhy.GradNormState": _RETURNED,
    "tidhy.InferenceStats": _RETURNED,
    "tidhy.Learner": _RETURNED,
    "tidhy.Record": _RETURNED,
    "tidhy.SessionWindows": _RETURNED,
    "tidhy.Trajectory": _RETURNED,
    "tidhy.RosslerSample": _RETURNED,
    "tidhy.SLDSSample": _RETURNED,
    "tidhy.TaskLosses": _RETURNED,
    "tidhy.HyperNetwork": "a layer of TiDHy, built by its initialisation",
    "tidhy.SpatialDecoder": "a layer of TiDHy, built by its initialisation",
    "causal.AbstractNonlinearSCM": "an abstract base; its concrete kinds (MLPSCM, "
    "AdditiveFourierSCM) have cases",
    "causal.CandidateSets": _RETURNED,
    "causal.DesignResult": _RETURNED,
    "causal.MECHANISMS": _CONSTANT,
    "causal.NOISE_MODELS": _CONSTANT,
    "causal.ShortlistPosterior": _RETURNED,
    "causal.STRATEGIES": _CONSTANT,
    "causal.Channel": "an enumeration of the data channels",
    "causal.GRAPH_FAMILIES": _CONSTANT,
    "causal.MAX_CANDIDATE_SETS": _CONSTANT,
    "causal.ParentSetPosterior": _RETURNED,
    "causal.Task": _RETURNED,
    "causal.TrainingBatch": _RETURNED,
    "causal.WarmupCosineState": _RETURNED,
    "multimodal.BOS": _CONSTANT,
    "multimodal.EOS": _CONSTANT,
    "multimodal.MISS": _CONSTANT,
    "multimodal.PAD": _CONSTANT,
    "multimodal.SEP": _CONSTANT,
    "multimodal.Generation": _RETURNED,
    "multimodal.SyntheticData": _RETURNED,
    "multimodal.TokenSequence": _RETURNED,
}


def _public_names() -> set[str]:
    names = set()
    for prefix, module_name in _MODULES.items():
        module = importlib.import_module(module_name)
        for name in dir(module):
            value = getattr(module, name)
            # Modules are not entry points: the subpackages are enumerated on their
            # own, and the jaxtyping import hook adds `import jaxtyping` to each.
            if name.startswith("_") or isinstance(value, types.ModuleType):
                continue
            names.add(f"{prefix}.{name}")
    return names


def test_every_public_name_is_accounted_for():
    public = _public_names()
    covered = {case.name for family in _FAMILIES for case in cases(family)}
    assert covered <= public, sorted(covered - public)
    assert not covered & set(NO_USER_VALUES), sorted(covered & set(NO_USER_VALUES))
    missing = public - covered - set(NO_USER_VALUES)
    assert not missing, f"public names without a bad-input case: {sorted(missing)}"
    unknown = set(NO_USER_VALUES) - public
    assert not unknown, f"not public names: {sorted(unknown)}"


def _docstrings(obj) -> list[str]:
    """The docstrings that describe calling `obj`: its own and, for a class, those
    of its `__init__` and `__call__`."""
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        for method in ("__init__", "__call__"):
            if method in vars(obj):
                docs.append(inspect.getdoc(vars(obj)[method]) or "")
    return docs


def test_every_public_callable_documents_what_it_rejects():
    # The names that take user values (those with bad-input cases): each says
    # what it refuses in a `**Raises:**` section, the docs' style.
    undocumented = []
    for name in sorted(_public_names() - set(NO_USER_VALUES)):
        prefix, attr = name.split(".", 1)
        obj = getattr(importlib.import_module(_MODULES[prefix]), attr)
        assert callable(obj), name
        if not any("**Raises:**" in doc for doc in _docstrings(obj)):
            undocumented.append(name)
    assert not undocumented, f"no **Raises:** section: {undocumented}"


def test_every_family_has_cases():
    for family in _FAMILIES:
        assert len(cases(family)) >= 10, family
