"""The values behind the tokens: image and spectrum codebooks, scalar bin centres.

A softmax over a modality's slice of the vocabulary becomes a vector or a number by
weighting these tables, in the loss and in `expected_values` alike, so they live in
one module, checked against the `VocabLayout`. Loading from `.npz` and `.npy` files
(or pickled `.joblib` files, only when allowed) is here too.
"""

import os
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from transforms.validation import (
    check_bool,
    check_finite,
    check_type,
    describe,
    fail,
    is_traced,
)

from ._vocab import VocabLayout


IMAGE_KEYS = (
    "codebook",
    "centroids",
    "cluster_centers_",
    "cluster_centers",
    "centers",
    "centres",
    "image_codebook",
)
SCALAR_KEYS = (
    "bin_centers",
    "bin_centres",
    "centers",
    "centres",
    "scalar_centers",
    "scalar_centres",
)
SCALAR_EDGE_KEYS = ("bin_edges", "edges")
SPECTRUM_KEYS = (
    "codebook",
    "centroids",
    "cluster_centers_",
    "cluster_centers",
    "centers",
    "centres",
)


def _spectrum_group_keys(group: str) -> tuple[str, ...]:
    return (group, f"{group}_codebook", f"codebook_{group}", f"{group}_centroids")


def _as_float(name: str, x) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.number):
            x = x.astype(jnp.result_type(float))
        else:
            raise TypeError(
                f"Codebooks: `{name}` must be a numeric array, got dtype {x.dtype}."
            )
    return x


class Codebooks(eqx.Module):
    """The values behind the tokens: image and spectrum codebooks, scalar bin centres.

    The expected-value losses compare `softmax(logits of a modality's slice) @
    codebook` with the codebook entry of the target token. Each spectrum group has
    its own codebook (its own block of token ids). Scalar bins have one row of
    centres per column, gathered by the target's column; a single row is a table
    shared by all columns (the original system's convention, kept for
    compatibility).

    **Arguments:**

    - `layout`: the [`eqx_models.multimodal.VocabLayout`][].
    - `image`: image codebook, shape `(n_image, D_img)`.
    - `scalar`: bin centres, shape `(n_columns, n_scalar)` or `(n_scalar,)` (one
        table shared by all columns).
    - `spectrum`: one codebook per spectrum group, each `(n_spectrum, D_g)`; a
        sequence in the order of `layout.spectrum_groups` or a mapping from group
        name.

    **Raises:**

    `ValueError` if a codebook's size differs from its vocabulary slice, if a group
    is missing, or if any value is non-finite.
    """

    layout: VocabLayout = eqx.field(static=True)
    image: Float[Array, "n_image d_image"]
    scalar: Float[Array, "n_columns n_scalar"]
    spectrum: tuple[Float[Array, "n_spectrum _"], ...]

    def __init__(self, layout: VocabLayout, *, image, scalar, spectrum):
        if not isinstance(layout, VocabLayout):
            raise TypeError(
                "Codebooks: `layout` must be a VocabLayout, got "
                f"{type(layout).__name__}."
            )
        self.layout = layout
        image = _as_float("image", image)
        if image.ndim != 2 or image.shape[0] != layout.n_image:
            raise ValueError(
                f"Codebooks: `image` must have shape (n_image={layout.n_image}, D), "
                f"got {image.shape}."
            )
        scalar = _as_float("scalar", scalar)
        if scalar.ndim == 1:
            scalar = scalar[None]
        if scalar.ndim != 2 or scalar.shape[1] != layout.n_scalar:
            raise ValueError(
                "Codebooks: `scalar` must have shape (n_scalar,) or (n_columns, "
                f"n_scalar) with n_scalar={layout.n_scalar}, got {scalar.shape}."
            )
        if isinstance(spectrum, Mapping):
            missing = [g for g in layout.spectrum_groups if g not in spectrum]
            extra = sorted(set(spectrum) - set(layout.spectrum_groups))
            if missing or extra:
                raise ValueError(
                    f"Codebooks: `spectrum` must have one codebook per group "
                    f"{layout.spectrum_groups}; missing {missing}, unknown {extra}."
                )
            spectrum = [spectrum[g] for g in layout.spectrum_groups]
        spectrum = list(spectrum)
        if len(spectrum) != layout.n_groups:
            raise ValueError(
                f"Codebooks: `spectrum` must hold {layout.n_groups} codebooks (one per "
                f"group {layout.spectrum_groups}), got {len(spectrum)}."
            )
        spectrum = tuple(
            _as_float(f"spectrum[{g!r}]", s)
            for g, s in zip(layout.spectrum_groups, spectrum)
        )
        for name, s in zip(layout.spectrum_groups, spectrum):
            if s.ndim != 2 or s.shape[0] != layout.n_spectrum:
                raise ValueError(
                    f"Codebooks: the codebook of spectrum group {name!r} must have "
                    f"shape (n_spectrum={layout.n_spectrum}, D), got {s.shape}."
                )
        self.image = image
        self.scalar = scalar
        self.spectrum = spectrum

    def __check_init__(self):
        tables = [("image", self.image), ("scalar", self.scalar)]
        tables += [
            (f"spectrum[{name!r}]", s)
            for name, s in zip(self.layout.spectrum_groups, self.spectrum)
        ]
        for name, table in tables:
            # Built inside a transformation there is nothing concrete to check, and a
            # check could not be threaded through the fields.
            if not is_traced(table):
                check_finite("Codebooks", name, table)

    @property
    def n_columns(self) -> int:
        """Rows of scalar bin centres (1: one table shared by all columns)."""
        return self.scalar.shape[0]

    @classmethod
    def from_shared_tables(cls, layout: VocabLayout, *, image, scalar, spectrum):
        """The original system's tables: one spectrum codebook for every group.

        A compatibility mode for checkpoints and codebook files of the original
        system, which used a single spectrum codebook for all groups and one scalar
        bin-centre table for all columns. New data should fit one codebook per
        group and one row of centres per column.

        **Arguments:**

        - `layout`: the vocabulary layout.
        - `image`: image codebook `(n_image, D_img)`.
        - `scalar`: shared bin centres `(n_scalar,)`.
        - `spectrum`: the shared spectrum codebook `(n_spectrum, D_spec)`.

        **Returns:**

        A [`eqx_models.multimodal.Codebooks`][] using `spectrum` for every group.
        """
        scalar = jnp.asarray(scalar)
        if scalar.ndim != 1:
            raise ValueError(
                "Codebooks.from_shared_tables: `scalar` must be one shared table of "
                f"shape (n_scalar,), got {scalar.shape}."
            )
        return cls(
            layout,
            image=image,
            scalar=scalar,
            spectrum=[spectrum] * layout.n_groups,
        )


def _check_path(arg: str, path) -> None:
    expected = "a non-empty path (a str or os.PathLike)"
    if not isinstance(path, (str, os.PathLike)):
        raise fail("load_codebooks", arg, expected, describe(path), TypeError)
    text = os.fspath(path)
    if not isinstance(text, str):
        raise fail("load_codebooks", arg, expected, describe(text), TypeError)
    if not text:
        raise fail("load_codebooks", arg, expected, "''")


def _read(path, allow_pickle: bool, what: str) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"load_codebooks: the {what} file {path!r} does not exist."
        )
    if path.endswith(".joblib"):
        if not allow_pickle:
            raise ValueError(
                f"load_codebooks: {path!r} ({what}) is a joblib file, i.e. a pickle, "
                "which can run arbitrary code when loaded; pass `allow_pickle=True` "
                "only if you trust it, or convert it to .npz."
            )
        try:
            import joblib  # pyright: ignore[reportMissingImports]
        except ImportError:
            raise ImportError(
                f"load_codebooks: reading {path!r} needs joblib, which is not "
                "installed (pip install joblib), or convert the file to .npz."
            ) from None
        obj = joblib.load(path)
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, np.ndarray):
            return {"<array>": obj}
        # A fitted estimator (e.g. k-means): its public array attributes.
        return {
            name: value
            for name in dir(obj)
            if not name.startswith("__")
            and isinstance(value := getattr(obj, name, None), np.ndarray)
        }
    if path.endswith(".npy"):
        return {"<array>": np.load(path, allow_pickle=allow_pickle)}
    with np.load(path, allow_pickle=allow_pickle) as data:
        if isinstance(data, np.ndarray):
            return {"<array>": data}
        return {k: data[k] for k in data.files}


def _pick(contents: dict, candidates, path, what: str):
    if len(contents) == 1 and "<array>" in contents:
        return contents["<array>"]
    for key in candidates:
        if key in contents:
            return contents[key]
    raise KeyError(
        f"load_codebooks: no {what} in {os.fspath(path)!r}: looked for keys "
        f"{list(candidates)}, found {sorted(contents)}."
    )


def load_codebooks(
    layout: VocabLayout,
    *,
    image: str | os.PathLike,
    scalar: str | os.PathLike,
    spectrum: str | os.PathLike | Mapping[str, str | os.PathLike],
    allow_pickle: bool = False,
    shared_spectrum: bool = False,
) -> Codebooks:
    """Load codebooks and bin centres from `.npz` / `.npy` (or `.joblib`) files.

    Each file is searched for the first of a list of usual key names:

    - image: `codebook`, `centroids`, `cluster_centers_`, `cluster_centers`,
        `centers`, `centres`, `image_codebook`;
    - scalar: `bin_centers`, `bin_centres`, `centers`, `centres`,
        `scalar_centers`, `scalar_centres`, else bin edges `bin_edges` / `edges`
        (shape `(..., n_scalar + 1)`, centres taken as midpoints);
    - spectrum, per group `g`: one file per group (a mapping from group name to
        path, searched like the image file), or a single file with keys `g`,
        `g_codebook`, `codebook_g` or `g_centroids`.

    A file holding a single array (`.npy`, or an `.npz` with one entry) is used as
    it is. `.joblib` files are pickles: they are read only with
    `allow_pickle=True`, and only if joblib is installed; a dict is searched by key,
    a fitted estimator by attribute (e.g. `cluster_centers_`).

    **Arguments:**

    - `layout`: the vocabulary layout the codebooks must match.
    - `image`, `scalar`: paths.
    - `spectrum`: a path, or a mapping `{group: path}`.
    - `allow_pickle`: allow pickled content (`.joblib` files, object arrays).
    - `shared_spectrum`: if a single spectrum file holds only one codebook, use it
        for every group (the original system's convention; see
        [`eqx_models.multimodal.Codebooks.from_shared_tables`][]).

    **Returns:**

    [`eqx_models.multimodal.Codebooks`][].

    **Raises:**

    `FileNotFoundError`; `KeyError` naming the keys looked for and the keys found;
    `ValueError` for a `.joblib` file without `allow_pickle=True` or codebooks that
    do not match `layout`; `ImportError` if joblib is needed but not installed;
    `TypeError` if `layout` is not a `VocabLayout`, a path is not a `str` or
    `os.PathLike`, or a flag not a bool, and `ValueError` for an empty path (both
    before any file is read).
    """
    name = "load_codebooks"
    check_type(name, "layout", layout, VocabLayout, "a VocabLayout")
    _check_path("image", image)
    _check_path("scalar", scalar)
    if isinstance(spectrum, Mapping):
        for group, path in spectrum.items():
            _check_path(f"spectrum[{group!r}]", path)
    else:
        _check_path("spectrum", spectrum)
    check_bool(name, "allow_pickle", allow_pickle)
    check_bool(name, "shared_spectrum", shared_spectrum)
    contents = _read(image, allow_pickle, "image codebook")
    image_cb = _pick(contents, IMAGE_KEYS, image, "image codebook")
    contents = _read(scalar, allow_pickle, "scalar bins")
    try:
        centres = _pick(contents, SCALAR_KEYS, scalar, "scalar bin centres")
    except KeyError:
        try:
            edges = np.asarray(_pick(contents, SCALAR_EDGE_KEYS, scalar, "bin edges"))
        except KeyError:
            raise KeyError(
                f"load_codebooks: no scalar bin centres or edges in "
                f"{os.fspath(scalar)!r}: looked for keys "
                f"{list(SCALAR_KEYS + SCALAR_EDGE_KEYS)}, found {sorted(contents)}."
            ) from None
        centres = 0.5 * (edges[..., 1:] + edges[..., :-1])
    if isinstance(spectrum, Mapping):
        spectra = {}
        for group, path in spectrum.items():
            found = _read(path, allow_pickle, f"spectrum codebook of {group!r}")
            keys = _spectrum_group_keys(group) + SPECTRUM_KEYS
            spectra[group] = _pick(found, keys, path, f"codebook for group {group!r}")
        return Codebooks(layout, image=image_cb, scalar=centres, spectrum=spectra)
    found = _read(spectrum, allow_pickle, "spectrum codebooks")
    spectra = {}
    for group in layout.spectrum_groups:
        for key in _spectrum_group_keys(group):
            if key in found:
                spectra[group] = found[key]
                break
    if len(spectra) == layout.n_groups:
        return Codebooks(layout, image=image_cb, scalar=centres, spectrum=spectra)
    if shared_spectrum:
        shared = _pick(found, SPECTRUM_KEYS, spectrum, "shared spectrum codebook")
        return Codebooks(
            layout, image=image_cb, scalar=centres, spectrum=[shared] * layout.n_groups
        )
    missing = [g for g in layout.spectrum_groups if g not in spectra]
    raise KeyError(
        f"load_codebooks: no codebook for spectrum groups {missing} in "
        f"{os.fspath(spectrum)!r}: looked for keys "
        f"{[k for g in missing for k in _spectrum_group_keys(g)]}, found "
        f"{sorted(found)}. Pass one file per group, or `shared_spectrum=True` to "
        "use a single codebook for every group (the original's convention)."
    )
