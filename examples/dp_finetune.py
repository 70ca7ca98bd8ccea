"""Differentially private training of a small classifier at ε = 1, 3 and 8.

A two-layer MLP learns to classify synthetic data (four overlapping Gaussian
clusters in 16 dimensions, labels flipped for 5% of the examples) with DP-SGD:
Poisson-sampled batches (`poisson_sampler`), per-example gradients clipped to norm 1
on the ghost engine and Gaussian noise (`make_dp_train_step`), and `fit` holding
each run to its budget (`PrivacyBudget`) and reporting the ε spent after every step.
For each target ε the noise multiplier comes from `dp_noise_multiplier` (the RDP
accountant of `dp-accounting`, δ = 1/N^1.1); a run without privacy (plain steps on
shuffled batches) is the reference. The script plots test accuracy against ε and ε
against the steps to `examples/out/dp_finetune.png`.

Usage: `python examples/dp_finetune.py [--smoke]`. Needs the `dp` extra
(`pip install -e ".[dp,examples]"`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402

from transforms import (  # noqa: E402
    copy_for_donation,
    dp_noise_multiplier,
    fit,
    make_dp_train_step,
    make_train_step,
    poisson_sampler,
    PrivacyBudget,
    shuffle_sampler,
)


DIM, CLASSES = 16, 4
TARGETS = (1.0, 3.0, 8.0)


def make_data(key, n):
    """Four Gaussian clusters around random centres; 5% of labels flipped."""
    k1, k2, k3, k4 = jr.split(key, 4)
    centres = 1.2 * jr.normal(jr.key(42), (CLASSES, DIM))  # shared by every split
    labels = jr.randint(k1, (n,), 0, CLASSES)
    x = centres[labels] + jr.normal(k2, (n, DIM))
    flip = jr.bernoulli(k3, 0.05, (n,))
    noisy = jnp.where(flip, jr.randint(k4, (n,), 0, CLASSES), labels)
    return x, noisy


def loss_fn(model, x, y):
    """Cross-entropy of ONE example (the DP step clips per example)."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def batch_loss(model, batch, key):
    """Mean cross-entropy of a batch, for the plain step."""
    del key
    x, y = batch.examples
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(model, x, y))


@eqx.filter_jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=1) == y)


def main(argv=None):
    args = parse_args(__doc__, argv)
    n_train, n_test, batch, epochs = (
        (2048, 512, 128, 2) if args.smoke else (32768, 4096, 512, 15)
    )
    key = jr.key(0)
    x, y = jax.jit(make_data, static_argnums=1)(jr.fold_in(key, 0), n_train)
    x_test, y_test = jax.jit(make_data, static_argnums=1)(jr.fold_in(key, 1), n_test)
    q = batch / n_train
    n_steps = epochs * n_train // batch
    delta = float(n_train**-1.1)
    model0 = eqx.nn.MLP(DIM, CLASSES, 64, 2, key=jr.fold_in(key, 2))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=2e-3)
    progress = None if not args.smoke else False

    def start():
        # The steps donate (reuse) the model's buffers: each run trains a copy.
        model = copy_for_donation(model0)
        return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    runs = {}
    for target in TARGETS:
        sigma = dp_noise_multiplier(
            epsilon=target, sampling_rate=q, steps=n_steps, delta=delta
        )
        step = make_dp_train_step(
            loss_fn, optimizer, clip_norm=1.0, noise_multiplier=sigma
        )
        sampler = poisson_sampler((x, y), sampling_rate=q, key=jr.fold_in(key, 3))
        model, opt_state = start()
        result = fit(
            step,
            model,
            opt_state,
            sampler,
            n_steps=n_steps,
            key=jr.fold_in(key, 4),
            progress=progress,
            privacy=PrivacyBudget(epsilon=target, delta=delta),
        )
        runs[target] = {
            "sigma": sigma,
            "accuracy": float(accuracy(result.model, x_test, y_test)),
            "epsilon": [r["epsilon"] for r in result.history],
            "clipped": float(np.mean([r["clipped_fraction"] for r in result.history])),
        }
        print(f"ε = {target:g}: σ = {sigma:.3f}, accuracy {runs[target]['accuracy']}")

    model, opt_state = start()
    plain = fit(
        make_train_step(batch_loss, optimizer),
        model,
        opt_state,
        shuffle_sampler((x, y), batch_size=batch, key=jr.fold_in(key, 3)),
        n_steps=n_steps,
        progress=progress,
    )
    baseline = float(accuracy(plain.model, x_test, y_test))

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax0.plot(TARGETS, [runs[t]["accuracy"] for t in TARGETS], "o-", label="DP-SGD")
    ax0.axhline(baseline, color="k", ls="--", label=f"no privacy ({baseline:.2f})")
    ax0.axhline(1 / CLASSES, color="grey", ls=":", label="chance")
    ax0.set_xscale("log")
    ax0.minorticks_off()
    ax0.set_xticks(TARGETS, [f"{t:g}" for t in TARGETS])
    ax0.set_xlabel(f"ε (δ = {delta:.1e})")
    ax0.set_ylabel("test accuracy")
    ax0.set_title("Accuracy against the privacy budget", fontsize=10)
    ax0.legend(fontsize=8)
    steps = np.arange(1, n_steps + 1)
    for target in TARGETS:
        line = ax1.plot(
            steps, runs[target]["epsilon"], label=f"σ = {runs[target]['sigma']:.2f}"
        )
        ax1.axhline(target, color=line[0].get_color(), ls=":", lw=0.8)
    ax1.set_xlabel("step")
    ax1.set_ylabel("ε spent (RDP accountant)")
    ax1.set_title("ε over the run; dotted: each run's budget", fontsize=10)
    ax1.legend(fontsize=8)
    fig.suptitle(
        f"DP-SGD on {n_train} examples, Poisson sampling q = {q:.3g}, clip norm 1, "
        f"{n_steps} steps" + (" (smoke run)" if args.smoke else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out_path("dp_finetune.png"), dpi=120)

    summary: dict[str, str | int] = {
        f"accuracy_eps{t:g}": f"{runs[t]['accuracy']:.3f}" for t in TARGETS
    }
    summary["accuracy_no_privacy"] = f"{baseline:.3f}"
    summary.update({f"sigma_eps{t:g}": f"{runs[t]['sigma']:.3f}" for t in TARGETS})
    summary.update(
        {f"clipped_share_eps{t:g}": f"{runs[t]['clipped']:.2f}" for t in TARGETS}
    )
    summary.update(steps=n_steps, n_train=n_train, delta=f"{delta:.2e}")
    save_summary("dp_finetune", summary)
    spent = {t: runs[t]["epsilon"][-1] for t in TARGETS}
    if any(spent[t] > t for t in TARGETS):
        raise SystemExit(f"a run spent more than its budget: {spent}")
    if baseline <= 1.5 / CLASSES:
        raise SystemExit(f"the non-private run did not learn: accuracy {baseline}")


if __name__ == "__main__":
    main()
