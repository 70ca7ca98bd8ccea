"""In-Run Data Shapley finds corrupted training examples.

A small transformer classifier learns a synthetic task (which of three marker tokens is
most frequent in a sequence); 10% of the training labels are replaced by wrong ones.
Every training step is a `make_attribution_step`: it updates the model with the mean
training gradient and returns, for each example of the batch, the dot product of its
gradient with the gradient of a clean validation batch. Weighted by the learning rate
and summed over the run (`in_run_shapley`), these are first-order In-Run Data Shapley
values, each example's share of the decrease of the validation loss: the corrupted
examples, whose gradients pull against the validation loss, end up with the lowest
values. The script reports precision@k of the lowest-valued
examples (k = the number of corrupted ones; chance is 10%) and plots the value
distributions to `examples/out/data_attribution.png`.

After training, a second part attributes with the trained model only: it writes the
projected per-example gradients of the whole training set to a gradient store on
disk (`build_gradient_store`), then ranks the training examples by self-influence
(`‖g_i‖²`, and `g_iᵀ(F + λI)⁻¹g_i` with the damped projected Fisher) and by their
influence on the clean validation examples (`g_valᵀ(F + λI)⁻¹g_i`, lowest first),
and compares the precision@k of each ranking with In-Run Data Shapley's and with
random inspection, plotted to `examples/out/data_attribution_influence.png`.

`--projection pca` projects with matrices calibrated on 256 training examples
(`calibrate_projection`, PCA-initialised as in LoGra) instead of random ones.

Usage: `python examples/data_attribution.py [--smoke] [--projection gaussian|pca]`.
"""

import shutil

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
    build_gradient_store,
    calibrate_projection,
    fisher_inverse,
    in_run_shapley,
    influence_scores,
    make_attribution_step,
    projected_grads,
    self_influence,
    shapley_values,
)


VOCAB, LENGTH, CLASSES = 8, 12, 3


class Classifier(eqx.Module):
    """Token + position embeddings, one pre-LN attention block, mean pool, head."""

    embed: eqx.nn.Embedding
    pos: eqx.nn.Embedding
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, dim, *, key):
        keys = jr.split(key, 7)
        self.embed = eqx.nn.Embedding(VOCAB, dim, key=keys[0])
        self.pos = eqx.nn.Embedding(LENGTH, dim, key=keys[1])
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=keys[2])
        self.proj = eqx.nn.Linear(dim, dim, key=keys[3])
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, 2 * dim, key=keys[4])
        self.down = eqx.nn.Linear(2 * dim, dim, key=keys[5])
        self.head = eqx.nn.Linear(dim, CLASSES, key=keys[6])

    def __call__(self, tokens):
        (T,) = tokens.shape
        h = jax.vmap(self.embed)(tokens) + jax.vmap(self.pos)(jnp.arange(T))
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.ln1)(h)), 3, axis=-1)
        attention = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]), axis=-1)
        h = h + jax.vmap(self.proj)(attention @ v)
        h = h + jax.vmap(self.down)(
            jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(h)))
        )
        return self.head(jnp.mean(h, axis=0))


def loss_fn(model, tokens, label):
    """Cross-entropy of ONE example."""
    return optax.softmax_cross_entropy_with_integer_labels(model(tokens), label)


def make_data(key, n):
    """Sequences over 8 tokens; the label is the most frequent of tokens 0, 1, 2."""
    k1, k2 = jr.split(key)
    tokens = jr.randint(k1, (n, LENGTH), 0, VOCAB)
    # Boost one marker so that the majority is clear.
    marker = jr.randint(k2, (n,), 0, CLASSES)
    boost = jr.bernoulli(jr.fold_in(key, 1), 0.35, (n, LENGTH))
    tokens = jnp.where(boost, marker[:, None], tokens)
    counts = jnp.stack([jnp.sum(tokens == c, axis=1) for c in range(CLASSES)], axis=1)
    return tokens, jnp.argmax(counts, axis=1)


def corrupt(key, labels, fraction):
    """Replace the labels of a random `fraction` of examples by a different label."""
    n = labels.shape[0]
    k1, k2 = jr.split(key)
    bad = jr.permutation(k1, n)[: int(round(fraction * n))]
    shift = jr.randint(k2, (bad.shape[0],), 1, CLASSES)
    labels = labels.at[bad].set((labels[bad] + shift) % CLASSES)
    mask = jnp.zeros(n, bool).at[bad].set(True)
    return labels, mask


def main(argv=None):
    args = parse_args(__doc__, argv, extra=_projection_flag)
    n_train, n_val, epochs, batch, dim = (
        (160, 32, 6, 32, 16) if args.smoke else (1024, 128, 30, 64, 32)
    )
    lr = 0.05
    key = jr.key(0)
    # Compiled as a whole: run op by op, each small array op would compile on its own.
    data = jax.jit(make_data, static_argnums=1)
    x, clean_y = data(jr.fold_in(key, 0), n_train)
    y, is_bad = jax.jit(corrupt, static_argnums=2)(jr.fold_in(key, 1), clean_y, 0.1)
    x_val, y_val = data(jr.fold_in(key, 2), n_val)

    model = eqx.filter_jit(lambda k: Classifier(dim, key=k))(jr.fold_in(key, 3))
    optimizer = optax.sgd(lr, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_attribution_step(loss_fn, optimizer, learning_rate=lr)
    shapley = in_run_shapley(n_train)
    state = shapley.init()
    update = jax.jit(shapley.update)
    n_steps = 0
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(n_train)
        for start in range(0, n_train - batch + 1, batch):
            idx = order[start : start + batch]
            model, opt_state, metrics, dots = step(
                model, opt_state, (x[idx], y[idx]), (x_val, y_val)
            )
            state = update(state, idx, dots, metrics["learning_rate"])
            n_steps += 1

    values = np.asarray(shapley_values(state))
    bad = np.asarray(is_bad)
    k = int(bad.sum())
    ranks = np.argsort(values)
    precision = float(bad[ranks[:k]].mean())
    # How many of the lowest-valued examples are corrupted before the first clean one.
    all_bad = int(np.argmin(bad[ranks])) if not bad.all() else n_train
    accuracy = float(
        eqx.filter_jit(lambda m, x, y: jnp.mean(jax.vmap(m)(x).argmax(axis=1) == y))(
            model, x_val, y_val
        )
    )

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(values.min(), values.max(), 40)
    ax0.hist(values[~bad], bins=bins, alpha=0.7, label=f"clean ({(~bad).sum()})")
    ax0.hist(values[bad], bins=bins, alpha=0.7, label=f"corrupted label ({k})")
    ax0.set_xlabel("In-Run Data Shapley value Σ_t η_t <∇l_i, ḡ_val>")
    ax0.set_ylabel("training examples")
    ax0.set_title("Values of clean and corrupted examples", fontsize=10)
    ax0.legend(fontsize=8)
    ks = np.arange(1, n_train + 1)
    ax1.plot(ks, np.cumsum(bad[ranks]) / ks, label="lowest values first")
    ax1.axhline(bad.mean(), color="grey", ls="--", label=f"chance ({bad.mean():.0%})")
    ax1.axvline(
        k,
        color="k",
        lw=0.8,
        label=f"k = {k} = number corrupted",
    )
    ax1.set_xscale("log")
    ax1.set_xlabel("k (lowest-valued examples inspected)")
    ax1.set_ylabel("precision@k (share corrupted)")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(
        f"Finding the corrupted labels: precision@{k} = {precision:.2f}", fontsize=10
    )
    ax1.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 0.15))
    fig.suptitle(
        f"In-Run Data Shapley over {n_steps} attribution steps, {n_train} training "
        f"examples, 10 % of labels corrupted" + (" (smoke run)" if args.smoke else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out_path("data_attribution.png"), dpi=120)

    save_summary(
        "data_attribution",
        {
            "precision_at_k": f"{precision:.2f}",
            "chance": f"{bad.mean():.2f}",
            "k": k,
            "lowest_all_corrupted": all_bad,
            "val_accuracy": f"{accuracy:.2f}",
            "steps": n_steps,
            "n_train": n_train,
        },
    )
    post_training(
        model,
        (x, y),
        (x_val, y_val),
        bad,
        values,
        smoke=args.smoke,
        projection=args.projection,
    )
    if precision <= 2 * bad.mean():
        raise SystemExit(
            f"precision@k {precision:.2f} is not clearly above chance {bad.mean():.2f}"
        )


def precision_curve(scores, bad):
    """precision@k for every k, inspecting the highest scores first."""
    hits = bad[np.argsort(-scores, kind="stable")]
    return np.cumsum(hits) / np.arange(1, len(bad) + 1)


def _projection_flag(parser):
    parser.add_argument(
        "--projection",
        choices=["gaussian", "pca"],
        default="gaussian",
        help="random projections, or PCA ones calibrated on 256 training examples",
    )


def post_training(model, train, val, bad, shapley, *, smoke, projection="gaussian"):
    """Attribution after training from a gradient store of the training set."""
    # 4 × 4 per matrix (capped for the 3-row head); biases and LayerNorm: 16 each.
    sizes = dict(k_out=4, k_in=4, k_vector=16, fit=True)
    if projection == "pca":
        calibration = tuple(a[:256] for a in train)
        project = calibrate_projection(loss_fn, model, calibration, **sizes)
    else:
        project = projected_grads(loss_fn, **sizes)
    directory = out_path("data_attribution_store")
    shutil.rmtree(directory, ignore_errors=True)
    store = build_gradient_store(
        directory, project, model, train, batch_size=32, chunk_size=256, progress=False
    )
    fisher = fisher_inverse(store, damping=0.1)
    rankings = {
        "self-influence ‖g_i‖² (TracIn)": self_influence(store),
        "self-influence g_iᵀ(F+λI)⁻¹g_i": self_influence(store, fisher=fisher),
        # Harmful examples push the validation loss up: the lowest scores first.
        "influence on clean validation (lowest)": -influence_scores(
            store, project, model, val, fisher=fisher
        ).mean(axis=0),
        "In-Run Data Shapley (lowest)": -shapley,
    }
    k = int(bad.sum())
    curves = {name: precision_curve(s, bad) for name, s in rankings.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks = np.arange(1, len(bad) + 1)
    for name, curve in curves.items():
        ax.plot(ks, curve, label=f"{name}: {curve[k - 1]:.2f}")
    ax.axhline(bad.mean(), color="grey", ls="--", label=f"random: {bad.mean():.2f}")
    ax.axvline(k, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k (examples inspected)")
    ax.set_ylabel("precision@k (share corrupted)")
    ax.set_title(
        f"Finding corrupted labels from a gradient store ({store.dim} dims per "
        f"example, {projection} projection)\nlegend: precision@{k}"
        + (" (smoke run)" if smoke else ""),
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_path("data_attribution_influence.png"), dpi=120)
    save_summary(
        "data_attribution_influence",
        {
            "store_dim": store.dim,
            "projection": projection,
            "store_bytes_per_example": 4 * store.dim,
            **{f"precision_at_k[{n}]": f"{c[k - 1]:.2f}" for n, c in curves.items()},
            "precision_at_k[random]": f"{bad.mean():.2f}",
        },
    )


if __name__ == "__main__":
    main()
