"""A synthetic multimodal catalogue with known latents, for tests and examples.

Three latent parameters per object generate an image latent grid, scalar columns and
spectra; codebooks and quantile bins are then fitted with a small NumPy k-means, so
that the whole pipeline (tokens, codebooks, model, loss) runs without real data.
Host-side NumPy throughout, seeded from a JAX key.
"""

from typing import NamedTuple

import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from transforms.validation import check_in_range, check_size

from ._codebooks import Codebooks
from ._sequence import build_sequence, TokenSequence
from ._vocab import VocabLayout


class SyntheticData(NamedTuple):
    """What [`eqx_models.multimodal.make_synthetic_data`][] returns.

    - `layout`, `codebooks`: the vocabulary and the fitted codebooks / bin centres.
    - `sequences`: one [`eqx_models.multimodal.TokenSequence`][] per object.
    - `latents`: the objects' latent parameters, shape `(n, 3)`.
    - `image`: true image latent vectors per grid cell, `(n, grid**2, d_image)`.
    - `scalars`: true scalar values, `(n, n_columns)`, NaN where missing.
    - `spectra`: `{group: (n, n_segments, d_spectrum)}` true spectrum segments,
        NaN for objects without that group.
    - `image_tokens`, `scalar_bins`, `spectrum_tokens`: the codebook indices
        (-1 where missing).
    """

    layout: VocabLayout
    codebooks: Codebooks
    sequences: list[TokenSequence]
    latents: np.ndarray
    image: np.ndarray
    scalars: np.ndarray
    spectra: dict[str, np.ndarray]
    image_tokens: np.ndarray
    scalar_bins: np.ndarray
    spectrum_tokens: dict[str, np.ndarray]


def kmeans(
    points: np.ndarray, k: int, *, rng: np.random.Generator, iterations: int = 25
) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, in NumPy.

    **Arguments:**

    - `points`: shape `(m, D)`, `m >= k`.
    - `k`: number of centroids.
    - `rng`: a NumPy generator (seeding).
    - `iterations`: Lloyd iterations.

    **Returns:**

    Centroids of shape `(k, D)` (an empty cluster keeps its previous centroid).

    **Raises:**

    `ValueError` if there are fewer points than centroids.
    """
    points = np.asarray(points, np.float64)
    m = points.shape[0]
    if m < k:
        raise ValueError(f"kmeans: {m} points cannot make {k} centroids.")
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(m)]
    closest = np.sum((points - centroids[0]) ** 2, axis=1)
    for j in range(1, k):
        total = closest.sum()
        p = closest / total if total > 0 else np.full(m, 1 / m)
        centroids[j] = points[rng.choice(m, p=p)]
        closest = np.minimum(closest, np.sum((points - centroids[j]) ** 2, axis=1))
    for _ in range(iterations):
        labels = assign(points, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, points)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def assign(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each point (squared Euclidean distance).

    **Arguments:**

    - `points`: shape `(m, D)`.
    - `centroids`: shape `(k, D)`.

    **Returns:**

    Integer array of shape `(m,)`.
    """
    d = (
        np.sum(points**2, axis=1, keepdims=True)
        - 2 * points @ centroids.T
        + np.sum(centroids**2, axis=1)
    )
    return np.argmin(d, axis=1)


def quantile_bins(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantile bin edges and centres (mean of the values in each bin) of one column.

    **Arguments:**

    - `values`: 1-D, NaN entries ignored.
    - `n_bins`: number of bins.

    **Returns:**

    `(edges, centres)` of shapes `(n_bins + 1,)` and `(n_bins,)`; an empty bin's
    centre is the midpoint of its edges.
    """
    finite = values[np.isfinite(values)]
    edges = np.quantile(finite, np.linspace(0, 1, n_bins + 1))
    bins = digitize(finite, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    for b in range(n_bins):
        inside = finite[bins == b]
        if inside.size:
            centres[b] = inside.mean()
    return edges, np.maximum.accumulate(centres)


def digitize(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value for quantile `edges` (clipped to the end bins).

    **Arguments:**

    - `values`: any shape.
    - `edges`: increasing, shape `(n_bins + 1,)`.

    **Returns:**

    Integers in `[0, n_bins)`, the shape of `values`.
    """
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def _spectrum(latents, wavelengths, line_centres):
    temperature, size, metallicity = latents.T
    peak = 0.55 + 0.15 * np.tanh(temperature)
    continuum = (1.0 + 0.2 * size[:, None]) * np.exp(
        -((wavelengths[None] - peak[:, None]) ** 2) / 0.08
    )
    depth = 0.25 * (1 + np.tanh(metallicity))[:, None, None]
    lines = depth * np.exp(
        -((wavelengths[None, None] - line_centres[None, :, None]) ** 2) / 2e-4
    )
    return continuum * (1 - lines.sum(axis=1).clip(max=0.9))


def make_synthetic_data(
    key: PRNGKeyArray,
    n_objects: int,
    *,
    grid: int = 4,
    d_image: int = 4,
    n_image: int = 32,
    n_columns: int = 4,
    n_bins: int = 16,
    spectrum_groups: tuple[str, ...] = ("blue", "red"),
    n_segments: int = 6,
    d_spectrum: int = 8,
    n_spectrum: int = 32,
    missing: float = 0.1,
    noise: float = 0.03,
    fit_on: int | None = None,
) -> SyntheticData:
    """A synthetic multimodal catalogue: objects with latent parameters that generate
    an image latent grid, scalar columns and spectra; codebooks fitted with NumPy.

    Each object has three latent parameters `z` ("temperature", "size",
    "metallicity", standard normal). They generate: a `grid x grid` image latent
    map (a blob whose width and brightness depend on `z`, `d_image` channels per
    cell); `n_columns` scalar columns (smooth nonlinear functions of `z`); and per
    spectrum group a spectrum over the group's wavelength range (a continuum
    peaking at a `z`-dependent wavelength with absorption lines whose depth depends
    on `z`), cut into `n_segments` segments of `d_spectrum` samples. Gaussian noise
    of scale `noise` is added everywhere. A scalar is missing with probability
    `missing`, a whole spectrum group likewise.

    Tokenisation as the original system does it: k-means codebooks for image cells
    and for each spectrum group's segments (one codebook per group), quantile bins
    per scalar column (centres: mean value in the bin); every object becomes a
    token sequence with [`eqx_models.multimodal.build_sequence`][]. Everything is
    deterministic given `key`.

    **Arguments:**

    - `key`: PRNG key.
    - `n_objects`: number of objects.
    - `grid`, `d_image`, `n_image`: image grid side, latent channels, codebook size.
    - `n_columns`, `n_bins`: scalar columns and bins per column.
    - `spectrum_groups`, `n_segments`, `d_spectrum`, `n_spectrum`: spectrum group
        names, segments per group, samples per segment, codebook size per group.
    - `missing`: probability that a scalar value or a spectrum group is missing.
    - `noise`: observation noise scale.
    - `fit_on`: fit codebooks and bins on the first `fit_on` objects only (e.g. the
        training split); default all.

    **Returns:**

    A [`eqx_models.multimodal.SyntheticData`][].

    **Raises:**

    `ValueError` for a non-positive size, a `missing` outside `[0, 1)`, a negative
    `noise` (or either NaN), or a `fit_on` outside `[1, n_objects]`; `TypeError`
    for a size that is not an integer.
    """
    name = "make_synthetic_data"
    for arg, value in (
        ("n_objects", n_objects),
        ("grid", grid),
        ("d_image", d_image),
        ("n_image", n_image),
        ("n_columns", n_columns),
        ("n_bins", n_bins),
        ("n_segments", n_segments),
        ("d_spectrum", d_spectrum),
        ("n_spectrum", n_spectrum),
    ):
        check_size(name, arg, value)
    check_in_range(name, "missing", missing, low=0, high=1, inclusive=(True, False))
    check_in_range(name, "noise", noise, low=0)
    if fit_on is not None:
        check_size(name, "fit_on", fit_on, maximum=n_objects)
    seed = int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))
    rng = np.random.default_rng(seed)
    fit = slice(0, n_objects if fit_on is None else fit_on)
    z = rng.standard_normal((n_objects, 3))

    side = np.linspace(-1, 1, grid)
    x, y = [a.reshape(-1) for a in np.meshgrid(side, side, indexing="ij")]
    width = 0.45 * np.exp(0.3 * z[:, 1])
    blob = np.exp(-(x**2 + y**2)[None] / (2 * width[:, None] ** 2))
    mixing = rng.standard_normal((d_image, 3)) / np.sqrt(3)
    tilt = rng.standard_normal((d_image, 2))
    image = np.tanh(
        (1.5 + 0.5 * np.tanh(z[:, :1]))[:, :, None] * blob[:, :, None]
        + 0.5 * (z @ mixing.T)[:, None, :]
        + 0.3 * (np.stack([x, y], -1) @ tilt.T)[None]
    )
    image += noise * rng.standard_normal(image.shape)

    projections = rng.standard_normal((n_columns, 3))
    base = np.stack(
        [
            z[:, 0] + 0.3 * z[:, 1] ** 2,
            np.sin(1.5 * z[:, 1]) + 0.5 * z[:, 2],
            np.exp(0.5 * z[:, 2]),
            z[:, 0] * z[:, 2],
        ],
        axis=1,
    )[:, : min(n_columns, 4)]
    extra = (
        np.tanh(z @ projections[4:].T) if n_columns > 4 else np.zeros((n_objects, 0))
    )
    scalars = np.concatenate([base, extra], axis=1)
    scalars += noise * rng.standard_normal(scalars.shape)
    scalars[rng.random(scalars.shape) < missing] = np.nan

    spectra = {}
    n_samples = n_segments * d_spectrum
    for g, name in enumerate(spectrum_groups):
        low = g / max(len(spectrum_groups), 1)
        high = (g + 1) / max(len(spectrum_groups), 1)
        wavelengths = np.linspace(low, high, n_samples)
        lines = rng.uniform(low, high, 3)
        flux = _spectrum(z, wavelengths, lines)
        flux += noise * rng.standard_normal(flux.shape)
        segments = flux.reshape(n_objects, n_segments, d_spectrum)
        absent = rng.random(n_objects) < missing
        segments[absent] = np.nan
        spectra[name] = segments

    image_codebook = kmeans(image[fit].reshape(-1, d_image), n_image, rng=rng)
    image_tokens = assign(image.reshape(-1, d_image), image_codebook).reshape(
        n_objects, grid * grid
    )
    centres = np.empty((n_columns, n_bins))
    scalar_bins = np.full(scalars.shape, -1)
    for c in range(n_columns):
        edges, centres[c] = quantile_bins(scalars[fit, c], n_bins)
        known = np.isfinite(scalars[:, c])
        scalar_bins[known, c] = digitize(scalars[known, c], edges)
    spectrum_codebooks, spectrum_tokens = {}, {}
    for name, segments in spectra.items():
        present = np.isfinite(segments[:, 0, 0])
        fit_present = present.copy()
        fit_present[fit.stop :] = False
        points = segments[fit_present].reshape(-1, d_spectrum)
        spectrum_codebooks[name] = kmeans(points, n_spectrum, rng=rng)
        tokens = np.full((n_objects, n_segments), -1)
        tokens[present] = assign(
            segments[present].reshape(-1, d_spectrum), spectrum_codebooks[name]
        ).reshape(-1, n_segments)
        spectrum_tokens[name] = tokens

    layout = VocabLayout(
        n_image=n_image,
        n_scalar=n_bins,
        n_spectrum=n_spectrum,
        spectrum_groups=tuple(spectrum_groups),
    )
    codebooks = Codebooks(
        layout,
        image=image_codebook.astype(np.float32),
        scalar=centres.astype(np.float32),
        spectrum={k: v.astype(np.float32) for k, v in spectrum_codebooks.items()},
    )
    sequences = [
        build_sequence(
            layout,
            image=image_tokens[i],
            scalars=scalar_bins[i],
            scalar_values=scalars[i],
            spectra={
                name: tokens[i]
                for name, tokens in spectrum_tokens.items()
                if tokens[i, 0] >= 0
            },
        )
        for i in range(n_objects)
    ]
    return SyntheticData(
        layout=layout,
        codebooks=codebooks,
        sequences=sequences,
        latents=z,
        image=image,
        scalars=scalars,
        spectra=spectra,
        image_tokens=image_tokens,
        scalar_bins=scalar_bins,
        spectrum_tokens=spectrum_tokens,
    )
