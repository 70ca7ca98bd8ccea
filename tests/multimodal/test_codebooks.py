import sys
import types

import numpy as np
import pytest

from eqx_models.multimodal import Codebooks, load_codebooks

from .helpers import LAYOUT


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(6, 3)),
        np.sort(rng.normal(size=(3, 5)), axis=1),
        {"a": rng.normal(size=(4, 2)), "b": rng.normal(size=(4, 3))},
    )


def test_codebooks_shapes_and_shared_tables():
    image, scalar, spectrum = _arrays()
    cb = Codebooks(LAYOUT, image=image, scalar=scalar, spectrum=spectrum)
    assert cb.n_columns == 3 and cb.image.shape == (6, 3)
    assert [s.shape for s in cb.spectrum] == [(4, 2), (4, 3)]
    ordered = Codebooks(
        LAYOUT, image=image, scalar=scalar[0], spectrum=[spectrum["a"], spectrum["b"]]
    )
    assert ordered.scalar.shape == (1, 5) and ordered.n_columns == 1
    shared = Codebooks.from_shared_tables(
        LAYOUT, image=image, scalar=scalar[0], spectrum=spectrum["a"]
    )
    np.testing.assert_array_equal(shared.spectrum[0], shared.spectrum[1])
    with pytest.raises(ValueError, match="one shared table"):
        Codebooks.from_shared_tables(
            LAYOUT, image=image, scalar=scalar, spectrum=spectrum["a"]
        )


def test_codebook_errors():
    image, scalar, spectrum = _arrays()
    with pytest.raises(ValueError, match=r"`image` must have shape \(n_image=6, D\)"):
        Codebooks(LAYOUT, image=image[:5], scalar=scalar, spectrum=spectrum)
    with pytest.raises(ValueError, match="`scalar` must have shape"):
        Codebooks(LAYOUT, image=image, scalar=scalar[:, :4], spectrum=spectrum)
    with pytest.raises(ValueError, match="spectrum group 'b' must have shape"):
        Codebooks(
            LAYOUT,
            image=image,
            scalar=scalar,
            spectrum={**spectrum, "b": np.ones((5, 3))},
        )
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        Codebooks(
            LAYOUT, image=image, scalar=scalar, spectrum={"a": spectrum["a"], "c": 1}
        )
    with pytest.raises(ValueError, match="must hold 2 codebooks"):
        Codebooks(LAYOUT, image=image, scalar=scalar, spectrum=[spectrum["a"]])
    bad = image.copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="`image` must be all finite"):
        Codebooks(LAYOUT, image=bad, scalar=scalar, spectrum=spectrum)
    bad = spectrum["b"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"spectrum\[.b.\]` must be all finite"):
        Codebooks(LAYOUT, image=image, scalar=scalar, spectrum={**spectrum, "b": bad})
    with pytest.raises(TypeError, match="layout"):
        Codebooks("layout", image=image, scalar=scalar, spectrum=spectrum)


def test_load_from_npz_with_key_candidates(tmp_path):
    image, scalar, spectrum = _arrays(1)
    np.savez(tmp_path / "image.npz", cluster_centers_=image, other=np.ones(2))
    edges = np.concatenate([scalar[:, :1] - 1, scalar + 0.1], axis=1)
    np.savez(tmp_path / "scalar.npz", bin_edges=edges)
    np.savez(tmp_path / "spectra.npz", a_codebook=spectrum["a"], b=spectrum["b"])
    cb = load_codebooks(
        LAYOUT,
        image=tmp_path / "image.npz",
        scalar=tmp_path / "scalar.npz",
        spectrum=tmp_path / "spectra.npz",
    )
    np.testing.assert_allclose(cb.image, image, rtol=1e-6)
    np.testing.assert_allclose(
        cb.scalar, 0.5 * (edges[:, 1:] + edges[:, :-1]), rtol=1e-6
    )
    np.testing.assert_allclose(cb.spectrum[1], spectrum["b"], rtol=1e-6)
    # One file per group, and a plain .npy array.
    np.save(tmp_path / "a.npy", spectrum["a"])
    np.savez(tmp_path / "b.npz", centroids=spectrum["b"])
    np.savez(tmp_path / "centres.npz", bin_centres=scalar)
    cb = load_codebooks(
        LAYOUT,
        image=tmp_path / "image.npz",
        scalar=tmp_path / "centres.npz",
        spectrum={"a": tmp_path / "a.npy", "b": tmp_path / "b.npz"},
    )
    np.testing.assert_allclose(cb.spectrum[0], spectrum["a"], rtol=1e-6)
    np.testing.assert_allclose(cb.scalar, scalar, rtol=1e-6)


def test_load_errors_list_the_keys_found(tmp_path):
    image, scalar, spectrum = _arrays(2)
    np.savez(tmp_path / "image.npz", weights=image, extra=np.ones(3))
    np.savez(tmp_path / "ok_image.npz", codebook=image)
    np.savez(tmp_path / "scalar.npz", centers=scalar)
    np.savez(tmp_path / "shared.npz", codebook=spectrum["a"], notes=np.ones(1))
    paths = dict(scalar=tmp_path / "scalar.npz", spectrum=tmp_path / "shared.npz")
    with pytest.raises(KeyError, match=r"found \['extra', 'weights'\]"):
        load_codebooks(LAYOUT, image=tmp_path / "image.npz", **paths)
    with pytest.raises(KeyError, match=r"groups \['a', 'b'\].*shared_spectrum=True"):
        load_codebooks(LAYOUT, image=tmp_path / "ok_image.npz", **paths)
    shared = load_codebooks(
        LAYOUT, image=tmp_path / "ok_image.npz", shared_spectrum=True, **paths
    )
    np.testing.assert_array_equal(shared.spectrum[0], shared.spectrum[1])
    with pytest.raises(KeyError, match="no scalar bin centres or edges"):
        load_codebooks(
            LAYOUT,
            image=tmp_path / "ok_image.npz",
            scalar=tmp_path / "image.npz",
            spectrum=tmp_path / "shared.npz",
            shared_spectrum=True,
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_codebooks(LAYOUT, image=tmp_path / "missing.npz", **paths)


def test_joblib_files_need_allow_pickle_and_joblib(tmp_path, monkeypatch):
    image, scalar, spectrum = _arrays(3)
    for name in ("image", "scalar", "spectra"):
        (tmp_path / f"{name}.joblib").write_bytes(b"pickled")
    paths = dict(
        image=tmp_path / "image.joblib",
        scalar=tmp_path / "scalar.joblib",
        spectrum=tmp_path / "spectra.joblib",
    )
    with pytest.raises(
        ValueError, match="is a joblib file, i.e. a pickle.*allow_pickle"
    ):
        load_codebooks(LAYOUT, **paths)
    monkeypatch.setitem(sys.modules, "joblib", None)  # joblib not installed
    with pytest.raises(ImportError, match="needs joblib"):
        load_codebooks(LAYOUT, allow_pickle=True, **paths)

    class FittedKMeans:  # what a pickled estimator looks like after loading
        cluster_centers_ = image

    contents = {
        "image.joblib": FittedKMeans(),
        "scalar.joblib": {"bin_centers": scalar},
        "spectra.joblib": {"a": spectrum["a"], "b_centroids": spectrum["b"]},
    }
    fake = types.ModuleType("joblib")
    fake.load = lambda path: contents[path.rsplit("/", 1)[-1]]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "joblib", fake)
    cb = load_codebooks(LAYOUT, allow_pickle=True, **paths)
    np.testing.assert_allclose(cb.image, image, rtol=1e-6)
    np.testing.assert_allclose(cb.spectrum[1], spectrum["b"], rtol=1e-6)
