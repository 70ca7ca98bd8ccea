"""A hybrid PyTorch/JAX model: torch encoder -> cloned HMM (JAX) -> torch decoder.

An agent walks at random in a small room whose cells have one of a few colours, so
colours repeat across the room (aliasing). The agent does not see colours directly:
each step it receives a noisy feature vector (its cell colour's prototype plus
Gaussian noise). A torch encoder turns each feature vector into log-probabilities
over colours; these are soft evidence for a `TorchCHMM`, a cloned HMM whose
transition logits are a torch parameter and whose forward-backward pass runs in JAX
(`eqx_models.chmm`, compiled, through the DLPack bridge). A torch decoder
reconstructs the features from the HMM's smoothed posteriors over clones. Encoder,
transition logits and decoder train together with `torch.optim.Adam` on

    loss = -lnL / T + mean squared reconstruction error + KL(usage || uniform),

so the HMM's likelihood gradients reach the encoder through the evidence. The last
term (the encoder's average output distribution against the uniform one) stops the
encoder from collapsing onto one symbol, which would make every sequence trivially
likely. The script
reports the loss, the likelihood per step and the encoder's colour accuracy (after
matching its outputs to colours), and saves `examples/out/hybrid_chmm.png`.

Usage: `python examples/hybrid_chmm.py [--smoke]`.
"""

import time

import matplotlib
import numpy as np
import torch
from torch import nn


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path, parse_args, save_summary  # noqa: E402

from eqx_models.interop.torch import TorchCHMM  # noqa: E402


# Row and column offsets of the four actions (left, right, up, down), as in
# `eqx_models.chmm.room_walk`.
MOVES = np.array([(0, -1), (0, 1), (-1, 0), (1, 0)])


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(
            height=3, width=4, colours=3, clones=2, length=30, batch=3, steps=15
        )
    return dict(height=4, width=5, colours=4, clones=5, length=100, batch=8, steps=200)


def make_data(s: dict, features: int, noise: float, seed: int = 0):
    """Random walks in an aliased room (the walk of `eqx_models.chmm.room_walk`,
    drawn with NumPy), observed through noisy colour features."""
    rng = np.random.default_rng(seed)
    room = rng.integers(0, s["colours"], size=(s["height"], s["width"]))
    actions = rng.integers(0, 4, size=(s["batch"], s["length"]))
    cells = np.zeros((s["batch"], s["length"], 2), int)
    cells[:, 0] = rng.integers(0, [s["height"], s["width"]], size=(s["batch"], 2))
    for t in range(1, s["length"]):
        # Action a[t-1] moves from cell t-1 to cell t; a move off the grid stays.
        target = cells[:, t - 1] + MOVES[actions[:, t - 1]]
        inside = np.all((target >= 0) & (target < [s["height"], s["width"]]), axis=1)
        cells[:, t] = np.where(inside[:, None], target, cells[:, t - 1])
    colours = room[cells[..., 0], cells[..., 1]]
    prototypes = rng.normal(size=(s["colours"], features))
    observed = prototypes[colours] + noise * rng.normal(
        size=colours.shape + (features,)
    )
    return (
        torch.tensor(observed, dtype=torch.float32),
        torch.tensor(actions),
        colours,
    )


class Hybrid(nn.Module):
    """Encoder (torch) -> TorchCHMM (JAX) -> decoder (torch)."""

    def __init__(self, features: int, colours: int, clones: int, hidden: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, colours)
        )
        generator = torch.Generator().manual_seed(0)
        self.chmm = TorchCHMM(
            [clones] * colours, n_actions=4, init_scale=0.1, generator=generator
        )
        self.decoder = nn.Linear(self.chmm.n_states, features)

    def forward(self, observed, actions):
        evidence = torch.log_softmax(self.encoder(observed), dim=-1)
        log_likelihood, post = self.chmm(evidence, actions)
        reconstruction = self.decoder(post)
        length = observed.shape[1]
        nll = -log_likelihood.mean() / length
        mse = torch.mean((reconstruction - observed) ** 2)
        usage = evidence.exp().mean(dim=(0, 1))
        collapse = torch.sum(usage * torch.log(usage * usage.numel()))
        return nll + mse + collapse, nll, mse, evidence


def colour_accuracy(evidence: torch.Tensor, colours: np.ndarray) -> float:
    """Encoder accuracy after matching its output symbols to colours (the HMM
    only sees symbols, so any relabelling is as good)."""
    predicted = evidence.argmax(-1).numpy().ravel()
    truth = colours.ravel()
    n = evidence.shape[-1]
    counts = np.zeros((n, n), int)
    np.add.at(counts, (predicted, truth), 1)
    # Greedy matching is enough for a handful of colours.
    total, used = 0, set()
    for p in np.argsort(-counts.max(1)):
        order = [c for c in np.argsort(-counts[p]) if c not in used]
        if order:
            used.add(order[0])
            total += counts[p, order[0]]
    return float(total / truth.size)


def train(s: dict, *, features: int = 6, noise: float = 0.6, lr: float = 0.03):
    """Train the hybrid model; returns the history and the trained model."""
    torch.manual_seed(0)
    observed, actions, colours = make_data(s, features, noise)
    model = Hybrid(features, s["colours"], s["clones"])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict = {"loss": [], "nll": [], "mse": [], "encoder_grad_norm": []}
    for _ in range(s["steps"]):
        optimizer.zero_grad()
        loss, nll, mse, _ = model(observed, actions)
        loss.backward()
        grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
        history["encoder_grad_norm"].append(
            float(torch.cat([g.ravel() for g in grads]).norm())
        )
        optimizer.step()
        history["loss"].append(loss.item())
        history["nll"].append(nll.item())
        history["mse"].append(mse.item())
    with torch.no_grad():
        _, _, _, evidence = model(observed, actions)
    history["accuracy"] = colour_accuracy(evidence, colours)
    return history, model, (observed, actions, colours)


def main(argv=None) -> None:
    args = parse_args((__doc__ or "").splitlines()[0], argv)
    s = sizes(args.smoke)
    t0 = time.perf_counter()
    history, model, (observed, actions, _) = train(s)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        _, post = model.chmm(
            torch.log_softmax(model.encoder(observed[:1]), -1), actions[:1]
        )
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax0.plot(history["loss"], label="total")
    ax0.plot(history["nll"], label="-lnL / T")
    ax0.plot(history["mse"], label="reconstruction MSE")
    ax0.set_xlabel("Adam step")
    ax0.set_ylabel("loss (nats per step; MSE)")
    ax0.set_title("Training the hybrid model" + (" (smoke run)" if args.smoke else ""))
    ax0.legend()
    image = ax1.imshow(
        post[0].numpy().T, aspect="auto", cmap="viridis", interpolation="none"
    )
    ax1.set_xlabel("time step")
    ax1.set_ylabel("clone (hidden state)")
    ax1.set_title("Smoothed posteriors p(z_t | x, a), first walk")
    fig.colorbar(image, ax=ax1, label="posterior probability")
    fig.tight_layout()
    fig.savefig(out_path("hybrid_chmm.png"), dpi=120)
    save_summary(
        "hybrid_chmm",
        {
            "loss_first": round(history["loss"][0], 4),
            "loss_last": round(history["loss"][-1], 4),
            "nll_per_step_last": round(history["nll"][-1], 4),
            "encoder_accuracy": round(history["accuracy"], 3),
            "steps": s["steps"],
            "seconds": round(elapsed, 1),
        },
    )


if __name__ == "__main__":
    main()
