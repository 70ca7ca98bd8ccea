"""Overhead of `transforms.make_train_step` against a hand-written optax step.

Usage: `python benchmarks/train_step.py [--size small|large]`. Both steps do the same
work (an MLP regression with AdamW); the difference is the library's wrapper: the
partition/combine of the model, the metrics (gradient norm, learning rate) and the
Python-side call path of `eqx.filter_jit`.
"""

import argparse
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from _harness import Results, time_callable

from transforms import make_train_step


SIZES = {
    "small": dict(width=256, depth=3, batch=256),
    "large": dict(width=2048, depth=4, batch=4096),
}


def loss_fn(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    args = parser.parse_args(argv)
    size = args.size or ("small" if jax.devices()[0].platform == "cpu" else "large")
    cfg = SIZES[size]
    results = Results(
        "train_step",
        "Training step overhead",
        "`make_train_step` against a hand-written `jax.jit` + optax step on an MLP "
        "regression (AdamW with a cosine schedule), and the same hand-written step "
        "under `eqx.filter_jit`. The differences are Python-side dispatch costs: "
        "they matter only for steps of a few milliseconds.",
    )
    key = jr.key(0)
    model = eqx.nn.MLP(cfg["width"], 1, cfg["width"], cfg["depth"], key=key)
    x = jr.normal(jr.key(1), (cfg["batch"], cfg["width"]))
    y = jnp.sin(x[:, :1])
    schedule = optax.cosine_decay_schedule(1e-3, 1000)
    optimizer = optax.adamw(schedule)

    params, static = eqx.partition(model, eqx.is_inexact_array)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def hand_written(params, opt_state, batch):
        def loss(p):
            return loss_fn(eqx.combine(p, static), batch, None)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    state = {"params": params, "opt": optimizer.init(params)}

    def run_hand_written():
        state["params"], state["opt"], value = hand_written(
            state["params"], state["opt"], (x, y)
        )
        return value

    @eqx.filter_jit(donate="all")
    def filter_jitted(model, opt_state, batch):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(p):
            return loss_fn(eqx.combine(p, static), batch, None)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value

    eqx_state = {
        "model": jax.tree.map(lambda a: a.copy() if eqx.is_array(a) else a, model),
        "opt": optimizer.init(params),
    }

    def run_filter_jitted():
        eqx_state["model"], eqx_state["opt"], value = filter_jitted(
            eqx_state["model"], eqx_state["opt"], (x, y)
        )
        return value

    step = make_train_step(loss_fn, optimizer)
    lib = {"model": model, "opt": optimizer.init(params)}
    lib["model"] = jax.tree.map(lambda a: a.copy() if eqx.is_array(a) else a, model)

    def run_library():
        lib["model"], lib["opt"], metrics = step(lib["model"], lib["opt"], (x, y), None)
        return metrics

    sizes = dict(cfg)
    hand = results.add(
        workload="mlp",
        impl="hand-written jit",
        sizes=sizes,
        **time_callable(run_hand_written, repeats=50),
    )
    results.add(
        workload="mlp",
        impl="hand-written eqx.filter_jit",
        sizes=sizes,
        **time_callable(run_filter_jitted, repeats=50),
    )
    ours = results.add(
        workload="mlp",
        impl="make_train_step",
        sizes=sizes,
        **time_callable(run_library, repeats=50),
    )
    results.note(
        f"make_train_step / hand-written median ratio: "
        f"{ours['median_s'] / hand['median_s']:.3f} ({size} size)."
    )
    results.save()


if __name__ == "__main__":
    main()
