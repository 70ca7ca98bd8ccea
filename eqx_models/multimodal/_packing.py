"""Packing: several token sequences per fixed-length row, with segment ids and
positions that keep them apart.

Padding every object to a bucket length wastes the positions after its end; a
catalogue whose objects differ in length (spectra present for some objects and not
others) wastes many. `packing_plan` places sequences in rows (first fit by
decreasing length), `pack_sequences` builds the packed `TokenBatch`, and
`check_segments` checks a batch's segment ids and positions against its tokens, the
check the model runs before trusting them for its attention mask.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transforms.validation import check_size, check_type, fail, is_concrete

from ._guards import refuse_or_guard
from ._sequence import TokenBatch, TokenSequence
from ._vocab import PAD, SPECIAL_TYPE


def packing_plan(
    lengths: Sequence[int], *, length: int, n_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where each sequence goes in rows of `length` positions: first fit by
    decreasing length.

    Sequences are taken from the longest to the shortest (ties in their given
    order), each into the first row with room for it, opening a new row when none
    has (unless `n_rows` rows are open already). Within a row, sequences keep
    their given order. The plan depends only on the lengths, so it is
    reproducible.

    **Arguments:**

    - `lengths`: the sequences' lengths in tokens.
    - `length`: the positions per row.
    - `n_rows`: at most this many rows; sequences that find no room are left out
        (row and start -1), so that a data pipeline can carry them over to the
        next batch. `None`: as many rows as needed.

    **Returns:**

    `(rows, starts)`: integer arrays of shape `(len(lengths),)`, the row of each
    sequence and the position of its first token there (-1 for one left out).

    **Raises:**

    `ValueError` for a sequence longer than `length` (it cannot be packed without
    being cut), an empty or non-positive length, or a non-positive `length` or
    `n_rows`; `TypeError` if one is not an integer.
    """
    name = "packing_plan"
    length = check_size(name, "length", length)
    if n_rows is not None:
        n_rows = check_size(name, "n_rows", n_rows)
    sizes = [check_size(name, f"lengths[{i}]", n) for i, n in enumerate(lengths)]
    for i, n in enumerate(sizes):
        if n > length:
            raise fail(
                name,
                f"lengths[{i}]",
                f"at most `length`={length} (a sequence is never split over rows)",
                repr(n),
            )
    count = len(sizes)
    rows = np.full(count, -1, np.int64)
    free = np.zeros(0, np.int64)  # room left in each open row
    # Stable sort: equal lengths keep their given order.
    for i in np.argsort(-np.asarray(sizes, np.int64), kind="stable"):
        fits = np.flatnonzero(free >= sizes[i])
        if fits.size:
            row = int(fits[0])
        elif n_rows is None or free.size < n_rows:
            row = free.size
            free = np.append(free, length)
        else:
            continue
        rows[i] = row
        free[row] -= sizes[i]
    starts = np.full(count, -1, np.int64)
    filled = np.zeros(free.size, np.int64)
    for i in range(count):  # given order within each row
        if rows[i] >= 0:
            starts[i] = filled[rows[i]]
            filled[rows[i]] += sizes[i]
    return rows, starts


def pack_sequences(
    sequences: Sequence[TokenSequence], *, length: int, n_rows: int | None = None
) -> TokenBatch:
    """Pack token sequences into rows of `length` positions.

    The rows follow [`eqx_models.multimodal.packing_plan`][] (first fit by
    decreasing length). Each sequence keeps its tokens, types, columns and values;
    `segment_ids` numbers the sequences of a row 1, 2, ... in order (0 on the
    `PAD` suffix of a row that is not full) and `positions` restarts at 0 with each
    segment (the `PAD` suffix counts from 0 too). The model, given these, attends
    within segments only and embeds each token at its place in its own sequence,
    and [`eqx_models.multimodal.MultimodalLoss`][] never predicts the first token
    of a segment from the last of the previous one: the logits, losses and
    gradients are those of the same sequences padded one per row (up to rounding).

    **Arguments:**

    - `sequences`: [`eqx_models.multimodal.TokenSequence`][]s.
    - `length`: the positions per row (at most the model's `max_len`).
    - `n_rows`: the number of rows of the batch (a fixed shape, compiled once);
        rows left empty are all `PAD`. `None`: as many rows as the plan needs.

    **Returns:**

    A packed [`eqx_models.multimodal.TokenBatch`][] of shape `(rows, length)`.

    **Raises:**

    `ValueError` if there are no sequences, a sequence is longer than `length`,
    or they do not fit in `n_rows` rows (the message says how many are left over;
    `packing_plan` tells which); `TypeError` if a sequence is not a
    `TokenSequence` or `length`, `n_rows` not an integer.
    """
    name = "pack_sequences"
    if len(sequences) == 0:
        raise ValueError(f"{name}: `sequences` is empty.")
    for i, sequence in enumerate(sequences):
        check_type(name, f"sequences[{i}]", sequence, TokenSequence, "a TokenSequence")
    length = check_size(name, "length", length)
    if n_rows is not None:
        n_rows = check_size(name, "n_rows", n_rows)
    sizes = [len(s.tokens) for s in sequences]
    for i, n in enumerate(sizes):
        if n > length:
            raise fail(
                name,
                f"sequences[{i}]",
                f"at most `length`={length} tokens long (a sequence is never split "
                "over rows)",
                f"{n} tokens",
            )
    rows, starts = packing_plan(sizes, length=length, n_rows=n_rows)
    left_out = int(np.sum(rows < 0))
    if left_out:
        raise fail(
            name,
            "n_rows",
            "enough rows for every sequence",
            f"{n_rows} rows of {length} positions, which leave {left_out} of the "
            f"{len(sequences)} sequences out",
        )
    count = n_rows if n_rows is not None else int(rows.max()) + 1
    tokens = np.full((count, length), PAD, np.int32)
    types = np.full((count, length), SPECIAL_TYPE, np.int32)
    columns = np.full((count, length), -1, np.int32)
    values = np.full((count, length), np.nan, np.float32)
    segments = np.zeros((count, length), np.int32)
    next_id = np.ones(count, np.int32)
    # Segment ids follow the order along the row, which is the given order.
    for i in np.lexsort((starts, rows)):
        row, start, s = rows[i], starts[i], sequences[i]
        stop = start + sizes[i]
        tokens[row, start:stop] = s.tokens
        types[row, start:stop] = s.type_ids
        columns[row, start:stop] = s.columns
        values[row, start:stop] = s.values
        segments[row, start:stop] = next_id[row]
        next_id[row] += 1
    return TokenBatch(
        tokens=jnp.asarray(tokens),
        type_ids=jnp.asarray(types),
        columns=jnp.asarray(columns),
        values=jnp.asarray(values),
        segment_ids=jnp.asarray(segments),
        positions=jnp.asarray(_positions_in_segments(segments, np)),
    )


def _positions_in_segments(segment_ids, xp):
    """Each position's index within its run of equal segment ids, along the last
    axis (`xp`: `np` or `jnp`)."""
    index = xp.arange(segment_ids.shape[-1])
    first = xp.ones(segment_ids.shape[:-1] + (1,), bool)
    starts = xp.concatenate(
        [first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    marked = xp.where(starts, index, 0)
    if xp is np:
        begin = np.maximum.accumulate(marked, axis=-1)
    else:
        begin = jax.lax.cummax(marked, axis=marked.ndim - 1)
    return (index - begin).astype(segment_ids.dtype)


def check_segments(tokens, segment_ids, positions, *, where: str):
    """Check a packed batch's `segment_ids` and `positions` against its tokens.

    Concrete arrays are checked at once (a `ValueError` naming the argument and the
    first offending index); traced ones are returned guarded by one
    `eqx.branched_error_if`. Segment ids must be 0 exactly on the `PAD` suffix and
    positive elsewhere, and never decrease along a row (each segment one
    contiguous run); positions must be each position's index within its segment.

    Returns `tokens` (guarded when traced).
    """
    concrete = is_concrete(tokens, segment_ids, positions)
    xp: Any = np if concrete else jnp
    ids = np.asarray(tokens) if concrete else tokens
    segs = np.asarray(segment_ids) if concrete else segment_ids
    pos = np.asarray(positions) if concrete else positions
    pad = ids == PAD
    zero_not_pad = (pad != (segs == 0)) | (segs < 0)
    decreasing = (
        xp.concatenate(
            [xp.zeros(segs.shape[:-1] + (1,), bool), segs[..., 1:] < segs[..., :-1]],
            axis=-1,
        )
        & ~pad
    )
    misplaced = pos != _positions_in_segments(segs, xp)
    expected = (
        (
            "segment_ids",
            f"0 exactly at the PAD = {PAD} positions and positive elsewhere",
        ),
        ("segment_ids", "non-decreasing along each row (each segment contiguous)"),
        (
            "positions",
            "each position's index within its segment (0 where a segment starts, "
            "then counting up by one)",
        ),
    )
    values = (segs, segs, pos)
    checks = [
        (arg, text, mask, value)
        for (arg, text), mask, value in zip(
            expected, (zero_not_pad, decreasing, misplaced), values
        )
    ]
    return refuse_or_guard(where, tokens, checks, concrete=concrete)
