"""TiDHy on several recording sessions with missing frames.

Three sessions of the multi-timescale switching system (the paper's benchmark: three
2-D systems, each switching between a slow and a fast regime, projected to 20
channels) of different lengths, with 10 % of the frames missing (NaN), as in
keypoint recordings where a detector drops frames. The script

- builds a `tidhy.Sessions` (NaN frames are masked), z-scores each session, and
  holds out the last 20 % of every session for evaluation (stratified by session);
- trains TiDHy on windows that never cross a session boundary, the missing frames
  contributing nothing to the losses;
- evaluates every session as one continuous trajectory
  (`tidhy.evaluate_sessions`, chunks of windows stitched together), and reports the
  reconstruction R² on the observed entries of the held-out parts and on the
  missing frames (the model's imputation, scored against the values that were
  removed, which the model never saw), and the timescales recovered from each
  system's latent read linearly out of `r`.

Figures go to `examples/out/tidhy_sessions_*.png`. Usage:
`python examples/tidhy_sessions.py [--smoke | --paper] [--epochs N] [--checkpoint F]`.
The default size trains for a few minutes on a CPU; `--paper` (sessions of 100 000,
60 000 and 140 000 frames, windows of 200 with stride 20, 1000 full-batch epochs)
needs a GPU; `--checkpoint F` saves every 10 epochs and resumes from `F`.
Both also report the accuracy of decoding the 8 combined discrete states from `r2`,
`r` and the observations (3-nearest neighbours, 75/25, held-out parts) over steps
split at random, as the paper does, and over held-out runs of one window length.
"""

import time

import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402
from _tidhy_decoding import decoding_accuracies  # noqa: E402
from _tidhy_timescales import plot_timescales, recovered_timescales  # noqa: E402

from eqx_models import tidhy  # noqa: E402


SIZES = {
    "smoke": dict(
        lengths=(300, 200, 400), length=40, stride=20, epochs=2, iters=50, chunk=16
    ),
    "small": dict(
        lengths=(3000, 2000, 4000), length=60, stride=20, epochs=40, iters=200, chunk=16
    ),
    # The paper's setting on sessions (a GPU run): windows of 200, stride 20,
    # 1000 full-batch epochs, inference up to 2000 iterations; evaluation in
    # chunks of 1024 windows (the inference is latency-bound: small chunks would
    # take one sequential loop each).
    "paper": dict(
        lengths=(100_000, 60_000, 140_000),
        length=200,
        stride=20,
        epochs=1000,
        iters=2000,
        chunk=1024,
    ),
}
MISSING = 0.10


def _flags(parser):
    parser.add_argument("--paper", action="store_true", help="the paper's sizes (GPU)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file: written every 10 epochs, and resumed from when it "
        "exists (a long run over several sessions of a machine)",
    )


def _r2(truth, prediction):
    """R² over the given entries, each channel against its own mean."""
    residual = np.sum((truth - prediction) ** 2)
    total = np.sum((truth - truth.mean(0)) ** 2)
    return float(1 - residual / total)


def main(argv=None):
    args = parse_args(__doc__, argv, extra=_flags)
    size = "smoke" if args.smoke else "paper" if args.paper else "small"
    cfg = dict(SIZES[size])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs

    system = tidhy.SwitchingLDS(key=jr.key(10))
    # One long draw cut into three sessions of different lengths (one compilation
    # of the sampler instead of one per length).
    whole = system.sample(sum(cfg["lengths"]), key=jr.key(100))
    bounds = np.cumsum([0, *cfg["lengths"]])
    rng = np.random.default_rng(0)
    samples, recordings = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sample = whole._replace(
            observations=whole.observations[a:b],
            latents=whole.latents[a:b],
            states=whole.states[a:b],
            combined_state=whole.combined_state[a:b],
        )
        x = np.array(sample.observations)
        x[rng.random(b - a) < MISSING] = np.nan  # 10 % of the frames dropped
        samples.append(sample)
        recordings.append(x)
    metadata = [{"first_step": int(a), "missing_frames": MISSING} for a in bounds[:-1]]
    sessions = tidhy.Sessions(recordings, metadata=metadata).zscore("session")
    mean, std = tidhy.Sessions(recordings).zscore_stats("session")
    train_part, val_part = sessions.split(0.2)
    windows = train_part.windows(cfg["length"], cfg["stride"])
    print(
        f"{size}: sessions of {list(sessions.lengths)} frames, "
        f"{windows.x.shape[0]} training windows of {cfg['length']} steps, "
        f"{cfg['epochs']} epochs"
    )

    model = tidhy.TiDHy(20, temp_weight=0.5, key=jr.key(0))
    inference = tidhy.InferenceConfig(max_iter=cfg["iters"], tol=0.005)
    t0 = time.perf_counter()
    result = tidhy.train(
        model,
        windows.x,
        mask=windows.mask,
        n_epochs=cfg["epochs"],
        inference=inference,
        train=tidhy.TiDHyTrainConfig(grad_norm=not args.smoke),
        batch_size=64 if size == "small" else None,
        key=jr.key(1),
        checkpoint_path=args.checkpoint,
        checkpoint_every=10 if args.checkpoint else 0,
        resume=args.checkpoint is not None,
    )
    train_time = time.perf_counter() - t0
    model = result.model

    # Every session as one stitched trajectory, a chunk of windows at a time.
    trajectories = tidhy.evaluate_sessions(
        model,
        sessions,
        length=cfg["length"],
        stride=cfg["stride"],
        config=inference,
        chunk_size=cfg["chunk"],
    )
    observed_true, observed_hat, missing_true, missing_hat = [], [], [], []
    for s, trajectory in enumerate(trajectories):
        # The data before the frames were removed, z-scored like the session.
        truth = (np.asarray(samples[s].observations) - mean[s]) / std[s]
        observed = sessions.mask[s][:, 0]
        held_out = np.arange(sessions.lengths[s]) >= train_part.lengths[s]
        # Observed entries of the held-out part; missing frames anywhere (their
        # values never reached the model).
        observed_true.append(truth[observed & held_out])
        observed_hat.append(trajectory.x_hat[observed & held_out])
        missing_true.append(truth[~observed])
        missing_hat.append(trajectory.x_hat[~observed])
    r2_observed = _r2(np.concatenate(observed_true), np.concatenate(observed_hat))
    r2_missing = _r2(np.concatenate(missing_true), np.concatenate(missing_hat))
    # Timescales from the sessions laid end to end (one fit, one compilation; the
    # two joins add two spurious transitions among hundreds).
    recovered = np.asarray(
        recovered_timescales(
            jnp.concatenate([jnp.asarray(t.r) for t in trajectories])[None],
            jnp.concatenate([s.latents for s in samples])[None],
            jnp.concatenate([s.states for s in samples])[None],
        )
    )
    true = np.asarray(system.timescales)
    # Decoding of the 8 combined discrete states over the held-out parts of all
    # sessions, from r2, r and the observations (z-scored, before frames were
    # dropped), over steps split at random (the paper's split) and over held-out
    # runs of one window length (see `_tidhy_decoding`); skipped in the smoke run.
    decoding = {}
    if not args.smoke:
        held_out = [slice(train_part.lengths[s], None) for s in range(len(samples))]
        truths = [
            (np.asarray(sample.observations) - mean[s]) / std[s]
            for s, sample in enumerate(samples)
        ]
        features = {
            "r2": [t.r2[part] for t, part in zip(trajectories, held_out)],
            "r": [t.r[part] for t, part in zip(trajectories, held_out)],
            "x": [truth[part] for truth, part in zip(truths, held_out)],
        }
        decoding = decoding_accuracies(
            {name: np.concatenate(parts) for name, parts in features.items()},
            np.concatenate(
                [sample.combined_state[part] for sample, part in zip(samples, held_out)]
            ),
            block=cfg["length"],
        )
    note = " (smoke run)" if args.smoke else ""
    _plot(sessions, trajectories, samples, train_part, mean, std, note)
    plot_timescales(
        true,
        recovered,
        title=f"Timescales from three sessions{note}",
        name="tidhy_sessions_timescales.png",
    )
    save_summary(
        "tidhy_sessions",
        {
            "r2_observed": round(r2_observed, 3),
            "r2_missing_frames": round(r2_missing, 3),
            "timescales_true": [[round(float(v), 1) for v in row] for row in true],
            "timescales_recovered": [
                [round(float(v), 1) for v in row] for row in recovered
            ],
            **{
                f"state_accuracy_from_{name}_{split}": value
                for name, values in decoding.items()
                for split, value in zip(("by_step", "by_window"), values)
            },
            "session_lengths": list(sessions.lengths),
            "epochs": cfg["epochs"],
            # A resumed run trains only the steps after its checkpoint (at the paper's
            # size a step is a full-batch epoch).
            "steps_this_run": len(result.history),
            "train_time_s": round(train_time, 1),
            # With the mean inner-loop iterations per time step, which set the
            # epoch time.
            "loss_and_inference_iterations_every_50_steps": [
                [
                    entry["step"],
                    round(entry["loss"], 4),
                    round(entry["inference_iters_mean"], 1),
                ]
                for entry in result.history
                if entry["step"] % 50 == 0 or entry is result.history[-1]
            ],
            "size": size,
        },
    )


def _plot(sessions, trajectories, samples, train_part, mean, std, note):
    """One channel of the held-out part of every session: data, reconstruction,
    imputed missing frames."""
    fig, axes = plt.subplots(len(trajectories), 1, figsize=(8, 6))
    channel = 0
    # At most this many frames per panel: at the paper's size a held-out part is
    # tens of thousands of frames, too many to see the missing ones.
    max_frames = 600
    for s, (ax, trajectory) in enumerate(zip(axes, trajectories)):
        n_train = train_part.lengths[s]
        shown = slice(n_train, min(n_train + max_frames, sessions.lengths[s]))
        truth = (np.asarray(samples[s].observations) - mean[s]) / std[s]
        steps = np.arange(sessions.lengths[s])[shown]
        truth = truth[shown]
        trajectory = trajectory._replace(x_hat=trajectory.x_hat[shown])
        missing = ~sessions.mask[s][shown, 0]
        ax.plot(steps, truth[:, channel], "k", lw=0.8, label="data (all frames)")
        ax.plot(steps, trajectory.x_hat[:, channel], "C0", lw=0.8, label="x̂")
        ax.plot(
            steps[missing],
            trajectory.x_hat[missing, channel],
            "C3o",
            ms=3,
            label="x̂ at missing frames (imputed)",
        )
        ax.set_ylabel(f"{sessions.names[s]}\nchannel {channel}", fontsize=8)
    axes[0].legend(fontsize=7, ncol=3, loc="upper right")
    axes[-1].set_xlabel("frame (start of the held-out part of each session)")
    fig.suptitle(f"Held-out parts of three sessions, 10 % frames missing{note}")
    fig.tight_layout()
    fig.savefig(out_path("tidhy_sessions_reconstruction.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
