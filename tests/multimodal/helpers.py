"""Small shared objects for the multimodal tests."""

import jax.random as jr
import numpy as np

from eqx_models.multimodal import (
    build_sequence,
    CausalTransformerLM,
    Codebooks,
    pad_batch,
    VocabLayout,
)


LAYOUT = VocabLayout(n_image=6, n_scalar=5, n_spectrum=4, spectrum_groups=("a", "b"))
LENGTH = 16


def make_model(key=0, **kwargs):
    options = dict(d_model=8, n_layers=2, n_heads=2, max_len=LENGTH, dropout=0.0)
    return CausalTransformerLM(LAYOUT, **(options | kwargs), key=jr.key(key))


def make_codebooks(seed=0, n_columns=3):
    rng = np.random.default_rng(seed)
    return Codebooks(
        LAYOUT,
        image=rng.normal(size=(6, 3)).astype(np.float32),
        scalar=np.sort(rng.normal(size=(n_columns, 5)), axis=1).astype(np.float32),
        spectrum={
            "a": rng.normal(size=(4, 2)).astype(np.float32),
            "b": rng.normal(size=(4, 3)).astype(np.float32),
        },
    )


def make_sequences(seed=0, n=4, *, image=True, group_b=True, missing=0.3):
    """Objects with 3 image cells, 3 scalar columns (some missing), two spectrum
    groups (group "b" optional)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scalars = rng.integers(0, 5, 3)
        scalars[rng.random(3) < missing] = -1
        spectra = {"a": rng.integers(0, 4, 2)}
        if group_b:
            spectra["b"] = rng.integers(0, 4, 2)
        out.append(
            build_sequence(
                LAYOUT,
                image=rng.integers(0, 6, 3) if image else None,
                scalars=scalars,
                scalar_values=rng.normal(size=3),
                spectra=spectra,
            )
        )
    return out


def make_batch(seed=0, n=4, **kwargs):
    return pad_batch(make_sequences(seed, n, **kwargs), length=LENGTH)
