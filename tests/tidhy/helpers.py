import equinox as eqx
import jax.random as jr

from eqx_models import tidhy


def small_model(key, **kwargs) -> tidhy.TiDHy:
    """A tiny TiDHy (D=4, r=3, r2=2, M=4, H=6) for float64 reference tests."""
    options = dict(r_dim=3, r2_dim=2, mix_dim=4, hyper_hid_dim=6)
    options.update(kwargs)
    return tidhy.TiDHy(4, key=key, **options)


def random_temporal(model, key, scale=0.3):
    """Replace the orthonormal temporal rows by random ones (no exact zeros in the
    pairwise cosines, whose subgradient would otherwise hinge on rounding)."""
    return eqx.tree_at(
        lambda m: m.temporal,
        model,
        scale * jr.normal(key, model.temporal.shape, model.temporal.dtype),
    )


def step_inputs(key, B, D=4, r=3, q=2):
    """Observations, previous latents and warm starts for one inference step."""
    kx, kr, kq = jr.split(key, 3)
    return (
        jr.normal(kx, (B, D)),
        0.5 * jr.normal(kr, (B, r)),
        0.5 * jr.normal(kq, (B, q)),
    )
