import numpy as np
import pytest

from eqx_models.multimodal import (
    BOS,
    bucket_length,
    build_sequence,
    EOS,
    MISS,
    PAD,
    pad_batch,
    SEP,
)

from .helpers import LAYOUT


def test_build_sequence_layout_written_out():
    # LAYOUT: image ids 5..10, scalar 11..15, group "a" 16..19, group "b" 20..23.
    seq = build_sequence(
        LAYOUT,
        image=np.array([0, 5, 2]),
        scalars=np.array([4, -1]),
        scalar_values=np.array([1.5, np.nan]),
        spectra={"b": np.array([3, -1, 0])},
    )
    assert seq.tokens.tolist() == [
        BOS, 5, 10, 7, SEP, 15, MISS, SEP, 23, MISS, 20, EOS,
    ]  # fmt: skip
    assert seq.type_ids.tolist() == [0, 1, 1, 1, 0, 2, 2, 0, 4, 4, 4, 0]
    assert seq.columns.tolist() == [-1] * 5 + [0, 1] + [-1] * 5
    assert seq.values[5] == np.float32(1.5)
    assert np.isnan(seq.values[[0, 6, 8]]).all()
    only_a = build_sequence(LAYOUT, spectra={"a": np.array([1])})
    assert only_a.tokens.tolist() == [BOS, 17, EOS]
    assert only_a.type_ids.tolist() == [0, 3, 0]


def test_build_sequence_errors():
    with pytest.raises(ValueError, match=r"`image` must hold indices in \[0, 6\)"):
        build_sequence(LAYOUT, image=np.array([6]))
    with pytest.raises(ValueError, match=r"`image` must hold indices in \[0, 6\)"):
        build_sequence(LAYOUT, image=np.array([-1]))
    with pytest.raises(ValueError, match="`scalars` must hold indices"):
        build_sequence(LAYOUT, scalars=np.array([-2]))
    with pytest.raises(ValueError, match="1-D integer array"):
        build_sequence(LAYOUT, scalars=np.array([0.5]))
    with pytest.raises(ValueError, match="unknown spectrum groups"):
        build_sequence(LAYOUT, spectra={"c": np.array([0])})
    with pytest.raises(ValueError, match="`scalar_values` must have shape"):
        build_sequence(LAYOUT, scalars=np.array([0, 1]), scalar_values=np.ones(3))


def test_pad_batch_and_buckets():
    short = build_sequence(LAYOUT, image=np.array([1]))
    long = build_sequence(LAYOUT, image=np.arange(6), scalars=np.array([0, 1, 2]))
    batch = pad_batch([short, long], buckets=(4, 8, 16, 32))
    assert batch.tokens.shape == (2, 16)
    np.testing.assert_array_equal(batch.tokens[0, :3], short.tokens)
    assert np.all(np.asarray(batch.tokens[0, 3:]) == PAD)
    assert np.all(np.asarray(batch.columns[0, 3:]) == -1)
    np.testing.assert_array_equal(batch.tokens[1, : len(long.tokens)], long.tokens)
    assert pad_batch([short], length=5).tokens.shape == (1, 5)
    assert bucket_length(8, (4, 8, 16)) == 8 and bucket_length(9, (16, 4, 8)) == 16
    with pytest.raises(ValueError, match="longer than the largest bucket 8"):
        pad_batch([long], buckets=(4, 8))
    with pytest.raises(ValueError, match="more than `length`=2"):
        pad_batch([short], length=2)
    with pytest.raises(ValueError, match="empty"):
        pad_batch([])
