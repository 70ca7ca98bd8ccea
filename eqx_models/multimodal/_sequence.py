"""Token sequences on the host, and padded batches for the device.

`build_sequence` lays out one object's codebook indices as segments with separators
and `MISS` tokens, in NumPy; `pad_batch` pads sequences to one of a few bucket
lengths, so that few shapes are compiled, and returns the `TokenBatch` that the
model and the loss take.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from transforms.validation import check_size, check_type, describe, fail

from ._vocab import (
    BOS,
    EOS,
    IMAGE_TYPE,
    MISS,
    PAD,
    SCALAR_TYPE,
    SEP,
    SPECIAL_TYPE,
    SPECTRUM_TYPE,
    VocabLayout,
)


DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


class TokenSequence(NamedTuple):
    """One object's token sequence, as NumPy arrays of equal length (host side).

    Fields: `tokens` (token ids), `type_ids`, `columns` (the scalar column of each
    scalar position, -1 elsewhere) and `values` (the raw scalar value at scalar
    positions where known, NaN elsewhere).
    """

    tokens: np.ndarray
    type_ids: np.ndarray
    columns: np.ndarray
    values: np.ndarray


class TokenBatch(eqx.Module):
    """A batch of token sequences (device arrays), as the model and loss take.

    Fields, each of shape `(batch, length)` (or `(length,)` for one row):
    `tokens` (`PAD` after the end of each row), `type_ids`, `columns` (scalar
    column per position, -1 where none) and `values` (raw scalar values, NaN where
    unknown). A padded batch holds one sequence per row
    ([`eqx_models.multimodal.pad_batch`][]) and leaves `segment_ids` and
    `positions` as `None`. A packed batch
    ([`eqx_models.multimodal.pack_sequences`][]) holds several sequences per row
    and says where each lies: `segment_ids` (1, 2, ... for the sequences of a row,
    in order, 0 on the `PAD` suffix) and `positions` (each position's index within
    its segment); the model then attends within segments only and the loss never
    predicts across a boundary.

    **Raises:**

    `ValueError` if the fields differ in shape or only one of `segment_ids` and
    `positions` is given; `TypeError` if `tokens`, `type_ids`, `columns`,
    `segment_ids` or `positions` is not an integer array, or `values` not a
    floating one. (The values of `segment_ids` and `positions` are checked by the
    model, which also sees them inside `jit`.)
    """

    tokens: Int[Array, "*batch length"]
    type_ids: Int[Array, "*batch length"]
    columns: Int[Array, "*batch length"]
    values: Float[Array, "*batch length"]
    segment_ids: Int[Array, "*batch length"] | None = None
    positions: Int[Array, "*batch length"] | None = None

    def __check_init__(self):
        kinds = [
            ("tokens", jnp.integer, "an integer array"),
            ("type_ids", jnp.integer, "an integer array"),
            ("columns", jnp.integer, "an integer array"),
            ("values", jnp.floating, "a floating-point array"),
        ]
        if (self.segment_ids is None) != (self.positions is None):
            missing = "positions" if self.positions is None else "segment_ids"
            raise fail(
                "TokenBatch",
                missing,
                "given together with `segment_ids` and `positions` (a packed batch) "
                "or not at all",
                "None",
            )
        if self.segment_ids is not None:
            kinds += [
                ("segment_ids", jnp.integer, "an integer array or None"),
                ("positions", jnp.integer, "an integer array or None"),
            ]
        for arg, kind, expected in kinds:
            value = getattr(self, arg)
            if not (
                hasattr(value, "shape")
                and hasattr(value, "dtype")
                and jnp.issubdtype(value.dtype, kind)
            ):
                raise fail("TokenBatch", arg, expected, describe(value), TypeError)
            if value.shape != self.tokens.shape:
                raise fail(
                    "TokenBatch",
                    arg,
                    f"of the shape of `tokens`, {self.tokens.shape}",
                    f"shape {value.shape}",
                )

    @property
    def packed(self) -> bool:
        """Whether the batch is packed (has `segment_ids` and `positions`)."""
        return self.segment_ids is not None


def _indices(name: str, x, upper: int, allow_missing: bool) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(
            f"build_sequence: `{name}` must be a 1-D integer array, got shape "
            f"{x.shape} and dtype {x.dtype}."
        )
    low = -1 if allow_missing else 0
    bad = (x < low) | (x >= upper)
    if bad.any():
        allowed = f"[{low}, {upper})" + (" (-1: missing)" if allow_missing else "")
        raise ValueError(
            f"build_sequence: `{name}` must hold indices in {allowed}; got "
            f"{x[bad][:5].tolist()} at positions {np.flatnonzero(bad)[:5].tolist()}."
        )
    return x.astype(np.int64)


def build_sequence(
    layout: VocabLayout,
    *,
    image=None,
    scalars=None,
    spectra: Mapping[str, object] | None = None,
    scalar_values=None,
) -> TokenSequence:
    """Lay out one object's codebook indices as a token sequence.

    The sequence is `BOS, image..., SEP, scalars..., SEP, group_1..., SEP, ...,
    EOS`: one segment per modality present (a modality passed as `None` is left out
    together with its separator), spectrum groups in the order of
    `layout.spectrum_groups`. A missing scalar or spectrum entry (index -1) becomes
    the `MISS` token, typed as the segment it stands in.

    **Arguments:**

    - `layout`: the [`eqx_models.multimodal.VocabLayout`][].
    - `image`: image codebook indices in `[0, n_image)`, shape `(n_patches,)`
        (a flattened latent grid), or `None`.
    - `scalars`: bin indices in `[0, n_scalar)` per column, -1 for missing, shape
        `(n_columns,)`, or `None`.
    - `spectra`: `{group: indices}` with codebook indices in `[0, n_spectrum)` (or
        -1) per segment; groups not given are absent.
    - `scalar_values`: the raw scalar values, shape `(n_columns,)` (NaN where
        unknown), used by the distributional scalar losses; optional.

    **Returns:**

    A [`eqx_models.multimodal.TokenSequence`][].

    **Raises:**

    `ValueError` for indices out of range, unknown groups or mismatched shapes.
    """
    tokens, types, columns, values = [BOS], [SPECIAL_TYPE], [-1], [np.nan]

    def segment(ids, kinds, cols=None, vals=None):
        if len(tokens) > 1:
            tokens.append(SEP)
            types.append(SPECIAL_TYPE)
            columns.append(-1)
            values.append(np.nan)
        tokens.extend(ids)
        types.extend(kinds)
        columns.extend([-1] * len(ids) if cols is None else cols)
        values.extend([np.nan] * len(ids) if vals is None else vals)

    if image is not None:
        idx = _indices("image", image, layout.n_image, allow_missing=False)
        segment((idx + layout.image_start).tolist(), [IMAGE_TYPE] * len(idx))
    if scalars is not None:
        idx = _indices("scalars", scalars, layout.n_scalar, allow_missing=True)
        if scalar_values is None:
            vals = np.full(len(idx), np.nan)
        else:
            vals = np.asarray(scalar_values, np.float64)
            if vals.shape != idx.shape:
                raise ValueError(
                    f"build_sequence: `scalar_values` must have shape {idx.shape} "
                    f"like `scalars`, got {vals.shape}."
                )
        ids = np.where(idx >= 0, idx + layout.scalar_start, MISS)
        segment(
            ids.tolist(),
            [SCALAR_TYPE] * len(idx),
            list(range(len(idx))),
            np.where(idx >= 0, vals, np.nan).tolist(),
        )
    if spectra is not None:
        unknown = sorted(set(spectra) - set(layout.spectrum_groups))
        if unknown:
            raise ValueError(
                f"build_sequence: unknown spectrum groups {unknown}; the layout has "
                f"{layout.spectrum_groups}."
            )
        for g, name in enumerate(layout.spectrum_groups):
            if name not in spectra or spectra[name] is None:
                continue
            idx = _indices(f"spectra[{name!r}]", spectra[name], layout.n_spectrum, True)
            ids = np.where(idx >= 0, idx + layout.spectrum_start(g), MISS)
            segment(ids.tolist(), [SPECTRUM_TYPE + g] * len(idx))
    tokens.append(EOS)
    types.append(SPECIAL_TYPE)
    columns.append(-1)
    values.append(np.nan)
    return TokenSequence(
        tokens=np.asarray(tokens, np.int32),
        type_ids=np.asarray(types, np.int32),
        columns=np.asarray(columns, np.int32),
        values=np.asarray(values, np.float32),
    )


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket length that holds `length` tokens.

    **Arguments:**

    - `length`: a sequence length.
    - `buckets`: the allowed padded lengths.

    **Returns:**

    The bucket, an int.

    **Raises:**

    `ValueError` if `length` exceeds the largest bucket, if `buckets` is empty, or
    if a bucket or `length` is negative; `TypeError` if one is not an integer.
    """
    name = "bucket_length"
    length = check_size(name, "length", length, minimum=0)
    if len(buckets) == 0:
        raise fail(name, "buckets", "a non-empty sequence of lengths", "[]")
    for i, bucket in enumerate(buckets):
        check_size(name, f"buckets[{i}]", bucket)
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(
            f"bucket_length: a sequence of {length} tokens is longer than the largest "
            f"bucket {max(buckets)}; add a larger bucket or shorten the sequence."
        )
    return fitting[0]


def pad_batch(
    sequences: Sequence[TokenSequence],
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    length: int | None = None,
) -> TokenBatch:
    """Pad sequences with `PAD` at the end to a common bucket length.

    Padding to a few bucket lengths (rather than to each batch's maximum) keeps the
    number of distinct shapes, hence compilations, small.

    **Arguments:**

    - `sequences`: [`eqx_models.multimodal.TokenSequence`][]s.
    - `buckets`: allowed lengths; the smallest that holds the longest sequence is
        used.
    - `length`: a fixed length instead of a bucket.

    **Returns:**

    A [`eqx_models.multimodal.TokenBatch`][] of shape `(len(sequences), length)`.

    **Raises:**

    `ValueError` if there are no sequences, or one is longer than `length` or the
    largest bucket; `TypeError` if a sequence is not a
    [`eqx_models.multimodal.TokenSequence`][] or `length` not an integer.
    """
    if len(sequences) == 0:
        raise ValueError("pad_batch: `sequences` is empty.")
    for i, sequence in enumerate(sequences):
        check_type(
            "pad_batch", f"sequences[{i}]", sequence, TokenSequence, "a TokenSequence"
        )
    if length is not None:
        length = check_size("pad_batch", "length", length)
    longest = max(len(s.tokens) for s in sequences)
    if length is None:
        length = bucket_length(longest, buckets)
    elif longest > length:
        raise ValueError(
            f"pad_batch: a sequence has {longest} tokens, more than `length`={length}."
        )
    n = len(sequences)
    tokens = np.full((n, length), PAD, np.int32)
    types = np.full((n, length), SPECIAL_TYPE, np.int32)
    columns = np.full((n, length), -1, np.int32)
    values = np.full((n, length), np.nan, np.float32)
    for i, s in enumerate(sequences):
        m = len(s.tokens)
        tokens[i, :m] = s.tokens
        types[i, :m] = s.type_ids
        columns[i, :m] = s.columns
        values[i, :m] = s.values
    return TokenBatch(
        tokens=jnp.asarray(tokens),
        type_ids=jnp.asarray(types),
        columns=jnp.asarray(columns),
        values=jnp.asarray(values),
    )
