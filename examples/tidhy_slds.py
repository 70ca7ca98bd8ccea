"""TiDHy on the multi-timescale switching linear dynamical system.

Generates the paper's benchmark (three independent 2-D systems, each switching
between a slow and a fast regime, partially superposed and randomly projected to 20
channels), trains TiDHy with the compiled inner loop, and reports on held-out data:

- the reconstruction R² of `x̂ = decode(r_t)` and of the one-step-ahead prediction
  `x̄ = decode(V(w(r2_{t-1})) r_{t-1})`;
- the timescales recovered from least-squares dynamics fits of each system's latent
  read out linearly from `r`, per true discrete state, against the generating ones;
- the accuracy of decoding the 8 combined discrete states from `r2`, from `r` and
  from the raw observations `x` with a 3-nearest-neighbour classifier (75/25), over
  single steps split at random (the paper's split) and over held-out whole windows,
  against chance.

Figures go to `examples/out/tidhy_*.png`. Usage:
`python examples/tidhy_slds.py [--smoke | --paper] [--epochs N]`. The default size
trains for about two minutes on a CPU; `--paper` uses the paper's sizes (200 000
training steps, windows of 200 with stride 20, full-batch epochs), which needs a GPU.
"""

import time

import jax.random as jr
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402
from _tidhy_decoding import decoding_accuracies  # noqa: E402
from _tidhy_timescales import plot_timescales, recovered_timescales  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from eqx_models import tidhy  # noqa: E402


SIZES = {
    "smoke": dict(train=1200, test=600, length=40, stride=20, epochs=2, batch=None),
    "small": dict(train=6000, test=3000, length=60, stride=20, epochs=40, batch=64),
    "paper": dict(
        train=200_000, test=50_000, length=200, stride=20, epochs=1000, batch=None
    ),
}


def _flags(parser):
    parser.add_argument("--paper", action="store_true", help="the paper's sizes (GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")


def _labels_per_window(labels, length):
    """Non-overlapping windows of an integer label sequence."""
    n = labels.shape[0] // length
    return labels[: n * length].reshape(n, length, *labels.shape[1:])


def main(argv=None):
    args = parse_args(__doc__, argv, extra=_flags)
    size = "smoke" if args.smoke else "paper" if args.paper else "small"
    cfg = dict(SIZES[size])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs

    system = tidhy.SwitchingLDS(key=jr.key(10))
    # One trajectory, split in time: training steps first, held-out steps after.
    sample = system.sample(cfg["train"] + cfg["test"], key=jr.key(11))
    fields = ("observations", "latents", "states", "combined_state")
    train, test = (
        sample._replace(**{f: getattr(sample, f)[part] for f in fields})
        for part in (slice(0, cfg["train"]), slice(cfg["train"], None))
    )
    windows = tidhy.stack_windows(train.observations, cfg["length"], cfg["stride"])

    # The paper's sizes and losses. The per-window inner loop (each window its own
    # energy and stopping rule) uses step 0.05; the temporal weight is lowered from
    # 2 to 0.5 so that r follows the data closely at this short training budget.
    model = tidhy.TiDHy(20, temp_weight=0.5, key=jr.key(0))
    inference = tidhy.InferenceConfig(max_iter=200, tol=0.005)
    train_config = tidhy.TiDHyTrainConfig(grad_norm=not args.smoke)
    print(
        f"{size}: {windows.shape[0]} training windows of {cfg['length']} steps, "
        f"{cfg['epochs']} epochs"
    )
    t0 = time.perf_counter()
    result = tidhy.train(
        model,
        windows,
        n_epochs=cfg["epochs"],
        inference=inference,
        train=train_config,
        batch_size=cfg["batch"],
        key=jr.key(1),
    )
    train_time = time.perf_counter() - t0
    model = result.model

    length = cfg["length"]
    test_windows = _labels_per_window(test.observations, length)
    record = tidhy.evaluate_record(model, test_windows, inference)
    r2_hat = float(tidhy.r2_score(test_windows, record.x_hat))
    r2_bar = float(tidhy.r2_score(test_windows[:, 1:], record.x_bar[:, 1:]))

    latents = _labels_per_window(test.latents, length)
    states = _labels_per_window(test.states, length)
    recovered = np.asarray(recovered_timescales(record.r, latents, states))
    true = np.asarray(system.timescales)

    combined = _labels_per_window(test.combined_state, length).reshape(-1)
    # The paper's split (single steps at random) and held-out whole windows; the
    # raw observations are the baseline (see `_tidhy_decoding`).
    decoding = decoding_accuracies(
        {"r2": record.r2, "r": record.r, "x": test_windows}, combined, block=length
    )
    chance = float(
        np.max(np.bincount(np.asarray(combined), minlength=8)) / combined.size
    )

    # The mixture weights over one long held-out stretch, inferred as one window so
    # that r2 carries over from step to step (no restarts at window boundaries).
    stretch = min(2000, cfg["test"])
    long = tidhy.evaluate_record(model, test.observations[None, :stretch], inference)
    smoke_note = " (smoke run)" if args.smoke else ""
    _plot_reconstruction(test_windows, record, length, (r2_hat, r2_bar), smoke_note)
    plot_timescales(
        true,
        recovered,
        title=f"Timescales per system and regime{smoke_note}",
        name="tidhy_timescales.png",
    )
    _plot_mixture(
        np.asarray(long.w[0]),
        np.asarray(test.states[:stretch]),
        true,
        decoding["r2"],
        chance,
        smoke=args.smoke,
    )
    history = result.history
    save_summary(
        "tidhy_slds",
        {
            "r2_reconstruction": round(r2_hat, 3),
            "r2_one_step_prediction": round(r2_bar, 3),
            **{
                f"state_accuracy_from_{name}_{split}": value
                for name, values in decoding.items()
                for split, value in zip(("by_step", "by_window"), values)
            },
            "chance": round(chance, 3),
            "timescales_true": [[round(float(v), 1) for v in row] for row in true],
            "timescales_recovered": [
                [round(float(v), 1) for v in row] for row in recovered
            ],
            "epochs": cfg["epochs"],
            "train_time_s": round(train_time, 1),
            "final_loss_hat": round(history[-1]["loss_hat"], 3),
            "inference_iters_mean": round(history[-1]["inference_iters_mean"], 1),
            "size": size,
        },
    )


def _plot_reconstruction(X, record, length, r2, note):
    window = 0
    t = np.arange(length)
    fig, axes = plt.subplots(3, 1, figsize=(7, 5), sharex=True)
    for ax, channel in zip(axes, (0, 7, 14)):
        ax.plot(t, X[window, :, channel], "k", lw=1.2, label="observed")
        ax.plot(t, record.x_hat[window, :, channel], "C0", lw=1, label="x̂ (inferred r)")
        ax.plot(
            t[1:],
            record.x_bar[window, 1:, channel],
            "C3--",
            lw=1,
            label="x̄ (predicted one step ahead)",
        )
        ax.set_ylabel(f"channel {channel}\n(a.u.)")
    axes[0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[-1].set_xlabel("time step")
    fig.suptitle(
        "Held-out window: observations, reconstructions and one-step predictions"
        f"{note}\nR² over the test set: x̂ {r2[0]:.2f}, x̄ {r2[1]:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out_path("tidhy_reconstruction.png"), dpi=120)
    plt.close(fig)


def _plot_mixture(w, states, true, r2_decoding, chance, *, smoke):
    """Mixture weights against the true regimes of the three systems over time."""
    steps = np.arange(1, w.shape[0])  # step 0 has no r2 history yet
    w = w[1:]
    states = states[1:]
    n_systems = states.shape[1]
    spread = w.std(axis=0)
    active = np.flatnonzero(spread > 1e-6 * max(spread.max(), 1e-30))
    fig = plt.figure(figsize=(10, 6.6))
    grid = fig.add_gridspec(
        3 + n_systems,
        2,
        height_ratios=[3, 2.2, 0.12] + [0.45] * n_systems,
        width_ratios=[60, 1],
        hspace=0.35,
        wspace=0.03,
    )
    heat = fig.add_subplot(grid[0, 0])
    image = heat.imshow(
        w.T,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, w.shape[1] - 0.5, -0.5),
    )
    bar = fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]))
    bar.set_label("w_k", fontsize=8)
    heat.set_ylabel("mixture weight k")
    heat.set_yticks(range(0, w.shape[1], 2))
    heat.set_title("Mixture weights w(r2_t)", fontsize=10, loc="left")
    heat.tick_params(labelbottom=False)

    # Each weight's deviation from its own mean, in its own standard deviations:
    # switching shows as steps here even where the heat map looks flat.
    lines = fig.add_subplot(grid[1, 0], sharex=heat)
    top = active[np.argsort(-spread[active])][:4]
    for k in top:
        z = (w[:, k] - w[:, k].mean()) / spread[k]
        lines.plot(steps, z, lw=0.8, label=f"w_{k} (sd {spread[k]:.2g})")
    lines.set_ylabel("standardised w_k")
    lines.set_title(
        "The most variable weights, each minus its mean, in standard deviations",
        fontsize=9,
        loc="left",
    )
    lines.legend(fontsize=7, ncol=4, loc="upper right")
    lines.tick_params(labelbottom=False)

    colours = ("#cfd8e8", "#d1603d")  # slow regime, fast regime
    for i in range(n_systems):
        ax = fig.add_subplot(grid[3 + i, 0], sharex=heat)
        slow = int(np.argmax(true[i]))
        fast_steps = (states[:, i] != slow).astype(float)
        ax.imshow(
            fast_steps[None],
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap(colours),
            vmin=0,
            vmax=1,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, 0, 1),
        )
        ax.set_yticks([])
        if i == 0:
            ax.set_title("True regimes of the three systems", fontsize=9, loc="left")
        ax.set_ylabel(
            f"system {i + 1}: τ slow {true[i, slow]:.0f},\n"
            f"fast {true[i, 1 - slow]:.0f}",
            rotation=0,
            ha="right",
            va="center",
            fontsize=7,
        )
        if i < n_systems - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("held-out time step")
    fig.legend(
        [Patch(color=colours[0]), Patch(color=colours[1])],
        ["slow regime", "fast regime (τ: timescale in steps)"],
        loc="lower right",
        ncol=2,
        fontsize=8,
        bbox_to_anchor=(0.9, 0.0),
    )
    fig.suptitle(
        f"TiDHy mixture weights over {len(steps)} held-out steps against the true "
        f"regimes{' (smoke run)' if smoke else ''}\n3-NN decoding of the combined "
        f"state from r2: accuracy {r2_decoding[0]:.2f} over steps split at random, "
        f"{r2_decoding[1]:.2f} over held-out windows (chance {chance:.2f})",
        fontsize=10,
    )
    fig.savefig(out_path("tidhy_mixture_weights.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
