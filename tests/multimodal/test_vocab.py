import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.multimodal import BOS, EOS, MISS, PAD, SEP, VocabLayout


def _reference_type(token, n_image, n_scalar, n_spectrum, n_groups):
    if token < 5:
        return 0
    token -= 5
    if token < n_image:
        return 1
    token -= n_image
    if token < n_scalar:
        return 2
    token -= n_scalar
    return 3 + token // n_spectrum


def test_layout_blocks_and_type_ids():
    layout = VocabLayout(
        n_image=7, n_scalar=4, n_spectrum=3, spectrum_groups=("bp", "rp", "z")
    )
    assert (PAD, BOS, EOS, SEP, MISS) == (0, 1, 2, 3, 4)
    assert layout.vocab_size == 5 + 7 + 4 + 3 * 3
    assert layout.n_types == 3 + 3
    slices = layout.slices()
    assert list(slices) == [
        "image",
        "scalar",
        "spectrum:bp",
        "spectrum:rp",
        "spectrum:z",
    ]
    # The blocks tile [5, vocab_size) without gaps or overlaps.
    bounds = list(slices.values())
    assert bounds[0][0] == 5 and bounds[-1][1] == layout.vocab_size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    tokens = jnp.arange(layout.vocab_size)
    want = [_reference_type(t, 7, 4, 3, 3) for t in range(layout.vocab_size)]
    np.testing.assert_array_equal(layout.type_ids(tokens), want)
    np.testing.assert_array_equal(jax.jit(layout.type_ids)(tokens), want)
    np.testing.assert_array_equal(
        jax.vmap(layout.type_ids)(tokens.reshape(5, -1)), np.reshape(want, (5, -1))
    )
    # No collisions: each block has its own type, distinct from the specials'.
    block_types = [layout.type_ids(jnp.arange(*b)) for b in bounds]
    assert [set(np.asarray(t).tolist()) for t in block_types] == [
        {1},
        {2},
        {3},
        {4},
        {5},
    ]
    assert layout.spectrum_start(1) == slices["spectrum:rp"][0]


def test_layout_serialises_and_compares():
    layout = VocabLayout(n_image=2, n_scalar=3, n_spectrum=4, spectrum_groups=["g"])
    assert layout.spectrum_groups == ("g",)
    described = json.loads(json.dumps(layout.to_dict()))
    assert described["vocab_size"] == layout.vocab_size == 5 + 2 + 3 + 4
    assert layout == VocabLayout(
        n_image=2, n_scalar=3, n_spectrum=4, spectrum_groups=("g",)
    )
    assert hash(layout) == hash(
        VocabLayout(n_image=2, n_scalar=3, n_spectrum=4, spectrum_groups=("g",))
    )


def test_layout_errors():
    with pytest.raises(ValueError, match="`n_image` must be a positive integer, got 0"):
        VocabLayout(n_image=0, n_scalar=3, n_spectrum=4, spectrum_groups=())
    with pytest.raises(ValueError, match="duplicate"):
        VocabLayout(n_image=1, n_scalar=3, n_spectrum=4, spectrum_groups=("a", "a"))
    layout = VocabLayout(n_image=1, n_scalar=3, n_spectrum=4, spectrum_groups=("a",))
    with pytest.raises(ValueError, match=r"`group` must be in \[0, 1\), got 1"):
        layout.spectrum_start(1)
