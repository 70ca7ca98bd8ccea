import jax.random as jr
import numpy as np
import pytest

from eqx_models.multimodal import make_synthetic_data, MISS
from eqx_models.multimodal._synthetic import assign, kmeans, quantile_bins


def test_synthetic_data_is_deterministic_and_consistent():
    a = make_synthetic_data(jr.key(0), 60, n_image=8, n_bins=6, n_spectrum=8)
    b = make_synthetic_data(jr.key(0), 60, n_image=8, n_bins=6, n_spectrum=8)
    c = make_synthetic_data(jr.key(1), 60, n_image=8, n_bins=6, n_spectrum=8)
    assert all(
        np.array_equal(x.tokens, y.tokens) for x, y in zip(a.sequences, b.sequences)
    )
    assert not np.allclose(a.latents, c.latents)
    layout, codebooks = a.layout, a.codebooks
    assert layout.vocab_size == 5 + 8 + 6 + 2 * 8
    assert codebooks.image.shape == (8, 4) and codebooks.scalar.shape == (4, 6)
    # Image tokens are the nearest codebook entries (brute force).
    cells = a.image.reshape(-1, 4)
    distances = ((cells[:, None, :] - np.asarray(codebooks.image)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(a.image_tokens.reshape(-1), distances.argmin(1))
    # Each spectrum group has its own codebook; missing values become MISS tokens.
    assert not np.allclose(codebooks.spectrum[0], codebooks.spectrum[1])
    missing = np.isnan(a.scalars)
    assert missing.any() and np.array_equal(a.scalar_bins == -1, missing)
    first = a.sequences[int(np.flatnonzero(missing.any(axis=1))[0])]
    assert MISS in first.tokens.tolist()
    assert len({len(s.tokens) for s in a.sequences}) > 1  # absent spectrum groups


def test_kmeans_quantiles_and_errors():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    points = np.concatenate([c + 0.1 * rng.normal(size=(50, 2)) for c in centres])
    found = kmeans(points, 3, rng=rng)
    matched = ((found[:, None] - centres[None]) ** 2).sum(-1).min(0)
    assert np.all(matched < 0.05)
    assert len(set(assign(centres, found).tolist())) == 3
    values = rng.normal(size=10_000)
    edges, mids = quantile_bins(values, 10)
    counts = np.histogram(values, edges)[0]
    assert counts.min() > 900 and counts.max() < 1100
    assert np.all(np.diff(mids) > 0)
    with pytest.raises(ValueError, match="3 points cannot make 4 centroids"):
        kmeans(points[:3], 4, rng=rng)
    with pytest.raises(
        ValueError, match=r"`missing` must be a finite real number in \[0, 1\)"
    ):
        make_synthetic_data(jr.key(0), 10, missing=1.0)
