"""The shared training transforms on a small regression problem.

Builds a step with `make_train_step`, runs it with `fit` (evaluation, checkpoints),
interrupts and resumes the run to show that resuming is bit-identical, and plots the
learning curve to `examples/out/training_basics.png`.

Usage: `python examples/training_basics.py [--smoke]`.
"""

import os
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402

from transforms import fit, inject_learning_rate, make_train_step  # noqa: E402


def target(x):
    return jnp.sin(3 * x[..., :1]) * jnp.cos(2 * x[..., 1:2])


def batch_at(step: int, size: int = 64):
    """Batches are a function of the step index, so a resumed run sees the same data."""
    x = jr.uniform(jr.fold_in(jr.key(1), step), (size, 2), minval=-1, maxval=1)
    return x, target(x)


def loss_fn(model, batch, key):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main(argv=None):
    args = parse_args(__doc__, argv)
    n_steps = 60 if args.smoke else 2000
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, n_steps // 20, n_steps)
    # The optimiser is the single source of the learning rate: the schedule is
    # injected, and the step reports the rate the optimiser state records.
    optimizer = inject_learning_rate(optax.adamw, schedule)

    def fresh():
        model = eqx.nn.MLP(2, 1, 64, 3, activation=jax.nn.tanh, key=jr.key(0))
        return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    step = make_train_step(loss_fn, optimizer)
    x_val = jr.uniform(jr.key(2), (512, 2), minval=-1, maxval=1)

    def evaluate(model):
        return {"mse": jnp.mean((jax.vmap(model)(x_val) - target(x_val)) ** 2)}

    model, opt_state = fresh()
    full = fit(
        step,
        model,
        opt_state,
        batch_at,
        n_steps=n_steps,
        key=jr.key(3),
        eval_fn=evaluate,
        eval_every=max(n_steps // 20, 1),
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.ckpt")
        model, opt_state = fresh()
        fit(
            step,
            model,
            opt_state,
            batch_at,
            n_steps=n_steps // 2,
            key=jr.key(3),
            checkpoint_path=path,
            progress=False,
        )
        model, opt_state = fresh()
        resumed = fit(
            step,
            model,
            opt_state,
            batch_at,
            n_steps=n_steps,
            key=jr.key(3),
            checkpoint_path=path,
            resume=True,
            progress=False,
        )
    identical = all(
        bool(jnp.array_equal(a, b))
        for a, b in zip(
            jax.tree.leaves(eqx.filter(full.model, eqx.is_array)),
            jax.tree.leaves(eqx.filter(resumed.model, eqx.is_array)),
        )
    )

    history = full.history
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(
        [r["step"] for r in history], [r["loss"] for r in history], label="train"
    )
    evals = [(r["step"], r["eval_mse"]) for r in history if "eval_mse" in r]
    ax.semilogy(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean squared error")
    ax.set_title(
        "MLP regression trained with fit()" + (" (smoke run)" if args.smoke else ""),
        fontsize=9,
    )
    ax.legend(["training batch", "validation set"])
    fig.tight_layout()
    fig.savefig(out_path("training_basics.png"), dpi=120)

    times = sorted(r["step_time"] for r in history[1:])
    save_summary(
        "training_basics",
        {
            "final_val_mse": f"{evals[-1][1]:.2e}",
            "resume_bit_identical": identical,
            "median_step_ms": f"{1e3 * times[len(times) // 2]:.2f}",
            "steps": n_steps,
        },
    )
    if not identical:
        raise SystemExit("resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
