"""A multimodal token LM trained with cross-entropy plus expected-value losses.

Builds a synthetic catalogue (objects whose latent parameters generate an image
latent grid, scalar columns and two spectra), tokenises it with k-means codebooks and
quantile bins, trains a small causal transformer on the CPU with
`eqx_models.multimodal.train` (AdamW, warmup + cosine, held-out evaluation), and
plots the held-out losses and the model's expected-value reconstructions against
the truth to `examples/out/multimodal_lm_*.png`. Then, given only the image of each
held-out object, it generates the rest of the object (`generate`, with a key/value
cache) and scores the scalars it expects, with their uncertainties, against the
truth.

Usage: `python examples/multimodal_lm.py [--smoke]`.
"""

import os
import sys
import time


if "--smoke" in sys.argv:
    # A smoke run is mostly XLA compilation: compile with the cheapest backend
    # optimisation (about half the compile time; the few steps run slower).
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402


matplotlib.use("Agg")
import equinox as eqx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402

from eqx_models.multimodal import (  # noqa: E402
    CausalTransformerLM,
    expected_values,
    generate,
    make_synthetic_data,
    MultimodalLoss,
    MultimodalTrainConfig,
    pad_batch,
    train,
)


def r_squared(prediction, truth):
    ok = np.isfinite(prediction) & np.isfinite(truth)
    residual = np.sum((prediction[ok] - truth[ok]) ** 2)
    return 1 - residual / np.sum((truth[ok] - truth[ok].mean()) ** 2)


def main(argv=None):
    args = parse_args(__doc__, argv)
    if args.smoke:
        n_objects, n_steps, batch_size, d_model, eval_every = 240, 30, 16, 32, 10
    else:
        n_objects, n_steps, batch_size, d_model, eval_every = 3000, 1000, 48, 64, 50
    n_train = int(0.85 * n_objects)
    t0 = time.perf_counter()
    data = make_synthetic_data(jr.key(0), n_objects, fit_on=n_train)
    layout, codebooks = data.layout, data.codebooks
    length = max(len(s.tokens) for s in data.sequences)
    train_batch = pad_batch(data.sequences[:n_train], length=length)
    held_out = pad_batch(data.sequences[n_train:], length=length)
    print(
        f"{n_objects} objects, {length} tokens each, vocabulary {layout.vocab_size} "
        f"({time.perf_counter() - t0:.1f} s to simulate and tokenise)"
    )

    def batch_at(step):
        rows = jr.choice(jr.fold_in(jr.key(1), step), n_train, (batch_size,), False)
        return jax.tree.map(lambda x: x[rows], train_batch)

    model = CausalTransformerLM(
        layout, d_model=d_model, n_layers=2, n_heads=4, max_len=length, key=jr.key(2)
    )
    loss = MultimodalLoss(codebooks, sample_k=256)
    config = MultimodalTrainConfig(
        n_steps=n_steps,
        learning_rate=3e-3,
        warmup_steps=n_steps // 20,
        weight_decay=0.01,
        eval_every=eval_every,
    )
    result = train(
        model,
        loss,
        batch_at,
        config,
        key=jr.key(3),
        eval_batches=held_out,
    )
    history = result.history
    evals = [r for r in history if "eval_loss" in r]

    note = " (smoke run)" if args.smoke else ""
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, name in zip(axes, ["ce", "image", "scalar", "spectrum"]):
        steps = [r["step"] + 1 for r in history]
        ax.plot(steps, [r[name] for r in history], alpha=0.35, label="training batch")
        ax.plot(
            [r["step"] + 1 for r in evals],
            [r[f"eval_{name}"] for r in evals],
            "o-",
            label="held out",
        )
        ax.set_title(
            {"ce": "cross-entropy"}.get(name, f"{name}: expected-value MSE"),
            fontsize=10,
        )
        ax.set_xlabel("training step")
        ax.set_ylabel("nats per token" if name == "ce" else "MSE (codebook units²)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Multimodal LM: training and held-out losses{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_path("multimodal_lm_losses.png"), dpi=110)

    # Teacher-forced reconstructions on held-out objects.
    predicted = eqx.filter_jit(expected_values)(
        result.model,
        codebooks,
        held_out.tokens,
        type_ids=held_out.type_ids,
        columns=held_out.columns,
    )
    tokens = np.asarray(held_out.tokens)
    test = slice(n_train, n_objects)
    start, stop = layout.slices()["scalar"]
    is_scalar = (tokens >= start) & (tokens < stop)
    scalar_pred = np.asarray(predicted["scalar"])[is_scalar]
    scalar_true = np.asarray(held_out.values)[is_scalar]
    scalar_cols = np.asarray(held_out.columns)[is_scalar]
    scalar_r2 = [
        r_squared(scalar_pred[scalar_cols == c], scalar_true[scalar_cols == c])
        for c in range(codebooks.n_columns)
    ]
    group = layout.spectrum_groups[0]
    start, stop = layout.slices()[f"spectrum:{group}"]
    spectra_true = data.spectra[group][test]
    present = np.isfinite(spectra_true[:, 0, 0])
    spectrum_pred = np.full(spectra_true.shape, np.nan)
    spectrum_tok = np.full(spectra_true.shape, np.nan)
    for i in np.flatnonzero(present):
        where = (tokens[i] >= start) & (tokens[i] < stop)
        spectrum_pred[i] = np.asarray(predicted[f"spectrum:{group}"][i])[where]
        spectrum_tok[i] = np.asarray(codebooks.spectrum[0])[tokens[i][where] - start]
    spectrum_r2 = r_squared(spectrum_pred[present], spectra_true[present])
    start, stop = layout.slices()["image"]
    image_pred = np.asarray(predicted["image"])[(tokens >= start) & (tokens < stop)]
    image_r2 = r_squared(image_pred.reshape(-1), data.image[test].reshape(-1))

    fig = plt.figure(figsize=(14, 7.4))
    grid = fig.add_gridspec(2, 4, hspace=0.45, wspace=0.3)
    for c in range(2):
        ax = fig.add_subplot(grid[0, c])
        cols = scalar_cols == c
        ax.scatter(scalar_true[cols], scalar_pred[cols], s=5, alpha=0.5)
        low, high = np.nanpercentile(scalar_true[cols], [1, 99])
        ax.plot([low, high], [low, high], "k--", lw=1, label="prediction = truth")
        ax.set_title(f"scalar column {c}: R² = {scalar_r2[c]:.2f}", fontsize=10)
        ax.set_xlabel("true value")
        ax.set_ylabel("expected bin centre")
        ax.legend(fontsize=7, loc="upper left")
    for j, i in enumerate(np.flatnonzero(present)[:2]):
        ax = fig.add_subplot(grid[0, 2 + j])
        ax.plot(spectra_true[i].reshape(-1), "k", lw=1, label="true spectrum")
        ax.plot(spectrum_tok[i].reshape(-1), color="0.6", lw=1, label="its tokens")
        ax.plot(spectrum_pred[i].reshape(-1), "C3", lw=1.5, label="expected value")
        ax.set_title(
            f"spectrum {group!r}, held-out object {i}\nR² (all objects) = "
            f"{spectrum_r2:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("wavelength sample")
        ax.set_ylabel("flux (a.u.)")
        if j == 0:
            ax.legend(fontsize=7)

    # The image: one held-out object's latent map, channel 0, as generated, as its
    # tokens quantise it, and as the model's expected value; then every cell.
    side = int(round(np.sqrt(data.image.shape[1])))
    true_image = data.image[test]
    image_pred = image_pred.reshape(true_image.shape)
    token_image = np.asarray(codebooks.image)[data.image_tokens[test]]
    obj, channel = 0, 0
    maps = [
        ("true latent map", true_image[obj]),
        ("its tokens (codebook)", token_image[obj]),
        ("model: expected value", image_pred[obj]),
    ]
    scale = np.abs(true_image[obj][:, channel]).max()
    pictures = []
    for j, (title, values) in enumerate(maps):
        ax = fig.add_subplot(grid[1, j])
        picture = ax.imshow(
            values[:, channel].reshape(side, side),
            cmap="RdBu_r",
            vmin=-scale,
            vmax=scale,
        )
        ax.set_title(f"image, held-out object {obj}:\n{title}", fontsize=9)
        ax.set_xlabel("grid column")
        ax.set_ylabel("grid row")
        pictures.append(picture)
    bar = fig.colorbar(pictures[0], ax=fig.axes[-3:], shrink=0.85, pad=0.02)
    bar.set_label(f"latent channel {channel} (a.u.)")
    ax = fig.add_subplot(grid[1, 3])
    ax.scatter(true_image.reshape(-1), image_pred.reshape(-1), s=2, alpha=0.15)
    low, high = np.percentile(true_image, [1, 99])
    ax.plot([low, high], [low, high], "k--", lw=1, label="prediction = truth")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"image, every held-out cell: R² = {image_r2:.2f}", fontsize=9)
    ax.set_xlabel("true latent value")
    ax.set_ylabel("expected codebook value")
    fig.suptitle(
        "Teacher-forced reconstructions of held-out objects from the model's "
        f"expected values{note}",
        fontsize=11,
    )
    fig.savefig(
        out_path("multimodal_lm_reconstructions.png"), dpi=110, bbox_inches="tight"
    )

    # Generation from the image alone: BOS and the image cells are the prompt; the
    # scalars and spectra of each object's layout are drawn one by one (their
    # tokens at temperature 1), and each drawn scalar comes with the mean and
    # standard deviation of the bin centres under the model's distribution.
    prompt_length = 1 + data.image_tokens.shape[1]
    generated = generate(
        result.model,
        held_out,
        prompt_length=prompt_length,
        key=jr.key(4),
        codebooks=codebooks,
    )
    assert generated.expected is not None
    drawn_scalar = np.asarray(generated.generated) & (
        np.asarray(held_out.type_ids) == 2
    )
    known = drawn_scalar & np.isfinite(np.asarray(held_out.values))
    mean = np.asarray(generated.expected["scalar"])[known]
    std = np.asarray(generated.expected["scalar_std"])[known]
    truth = np.asarray(held_out.values)[known]
    columns = np.asarray(held_out.columns)[known]
    generated_r2 = [
        r_squared(mean[columns == c], truth[columns == c])
        for c in range(codebooks.n_columns)
    ]
    within = float(np.mean(np.abs(mean - truth) <= 2 * std))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for c, ax in enumerate(axes):
        cols = columns == c
        ax.errorbar(
            truth[cols], mean[cols], yerr=std[cols], fmt="o", ms=2, alpha=0.4, lw=0.5
        )
        low, high = np.percentile(truth[cols], [1, 99])
        ax.plot([low, high], [low, high], "k--", lw=1, label="prediction = truth")
        ax.set_title(
            f"scalar column {c} from the image alone: R² = {generated_r2[c]:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("true value")
        ax.set_ylabel("expected value ± 1 sd")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Generated scalars of held-out objects{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_path("multimodal_lm_generation.png"), dpi=110)

    first, last = evals[0], evals[-1]
    times = sorted(r["step_time"] for r in history[1:])
    save_summary(
        "multimodal_lm",
        {
            "held_out_ce": f"{first['eval_ce']:.3f} -> {last['eval_ce']:.3f}",
            "held_out_scalar_mse": f"{first['eval_scalar']:.3f} -> "
            f"{last['eval_scalar']:.3f}",
            "held_out_spectrum_mse": f"{first['eval_spectrum']:.4f} -> "
            f"{last['eval_spectrum']:.4f}",
            "held_out_image_mse": f"{first['eval_image']:.4f} -> "
            f"{last['eval_image']:.4f}",
            "scalar_r2": [round(float(r), 3) for r in scalar_r2],
            "spectrum_r2": round(float(spectrum_r2), 3),
            "image_r2": round(float(image_r2), 3),
            "generated_scalar_r2": [round(float(r), 3) for r in generated_r2],
            "generated_scalars_within_2sd": round(within, 3),
            "steps": n_steps,
            "median_step_ms": round(1e3 * times[len(times) // 2], 2),
            "tokens_per_s": round(
                float(np.median([r["tokens_per_s"] for r in history[1:]]))
            ),
        },
    )
    if not last["eval_ce"] < first["eval_ce"]:
        raise SystemExit("the held-out cross-entropy did not fall")


if __name__ == "__main__":
    main()
