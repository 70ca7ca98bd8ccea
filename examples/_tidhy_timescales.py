"""The TiDHy examples' timescale check: the timescales each system's latent shows when
read linearly out of TiDHy's `r`, and their figure against the generating ones."""

import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import out_path  # noqa: E402

from eqx_models import tidhy  # noqa: E402


@jax.jit
def recovered_timescales(record_r, latents, states):
    """Per system: read its 2-D latent out of r linearly, then fit its dynamics in
    each of its two discrete states; returns (n_systems, 2) timescales (slowest)."""
    R = record_r.reshape(-1, record_r.shape[-1])
    design = jnp.concatenate([R, jnp.ones_like(R[:, :1])], axis=1)
    out = []
    for i in range(latents.shape[-2]):
        target = latents[..., i, :].reshape(-1, 2)
        readout, *_ = jnp.linalg.lstsq(design, target)
        z = (design @ readout).reshape(*record_r.shape[:2], 2)
        fits = [tidhy.fit_linear_dynamics(z, states[..., i] == k)[0] for k in (0, 1)]
        out.append(jnp.stack([tidhy.timescales(A)[0] for A in fits]))
    return jnp.stack(out)


def plot_timescales(true, recovered, *, title: str, name: str) -> None:
    """Recovered against true timescales, one marker per regime, on log axes; saved
    as `examples/out/<name>`."""
    fig, ax = plt.subplots(figsize=(4, 4))
    for k, marker in ((0, "o"), (1, "s")):
        ax.scatter(true[:, k], recovered[:, k], marker=marker, label=f"regime {k}")
    lo = min(true.min(), recovered.min()) * 0.7
    hi = max(true.max(), recovered.max()) * 1.4
    ax.plot([lo, hi], [lo, hi], "k:", lw=1, label="recovered = true")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true timescale (steps)")
    ax.set_ylabel("recovered timescale (steps)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path(name), dpi=120)
    plt.close(fig)
