"""Teacher-forced expected-value reconstructions of every position, for evaluation.

The same slice-softmax-times-codebook prediction as the loss, but at every position,
without sampling or dropout, and returned per modality instead of reduced to a
scalar: what plots and reconstruction metrics need, and what training does not.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from transforms.validation import check_ids, typechecked

from ._codebooks import Codebooks
from ._model import CausalTransformerLM


@typechecked
def expected_values(
    model: CausalTransformerLM,
    codebooks: Codebooks,
    tokens: Int[Array, "batch length"],
    *,
    type_ids: Int[Array, "batch length"] | None = None,
    columns: Int[Array, "batch length"] | None = None,
    segment_ids: Int[Array, "batch length"] | None = None,
    positions: Int[Array, "batch length"] | None = None,
) -> dict[str, Float[Array, "..."]]:
    """Teacher-forced expected-value reconstructions of every position.

    For each position `t >= 1` and each modality, the softmax of the model's logits
    at `t - 1` restricted to the modality's slice gives an expected codebook vector
    (image, each spectrum group) or bin centre (scalar, with the centres of the
    column in `columns`): the model's reconstruction of the value at `t` from the
    tokens before it. Position 0 has no prediction (NaN), nor, in a packed batch,
    the first position of each segment. No sampling, no dropout.

    **Arguments:**

    - `model`: the [`eqx_models.multimodal.CausalTransformerLM`][].
    - `codebooks`: the [`eqx_models.multimodal.Codebooks`][] of its layout.
    - `tokens`: token ids, shape `(batch, length)`.
    - `type_ids`: optional type ids, same shape.
    - `columns`: the scalar column of each position (as in
        [`eqx_models.multimodal.TokenBatch`][]); needed with per-column centres.
    - `segment_ids`, `positions`: for a packed batch, as in
        [`eqx_models.multimodal.TokenBatch`][].

    **Returns:**

    A dict with `"image"` `(batch, length, D_img)`, `"scalar"` `(batch, length)` and
    `"spectrum:<group>"` `(batch, length, D_group)` for each group: the expected
    value of the token at each position, whatever its actual modality (mask with
    the layout's slices to keep the relevant ones).

    **Raises:**

    `ValueError` if the codebooks' layout is not the model's, per-column centres
    are given without `columns`, or a scalar token's column lies outside the rows
    of centres (at once for concrete arrays, by `eqx.error_if` under `jit`; a gather
    would clip it to the last row); for tokens, type ids, segment ids or positions
    that [`eqx_models.multimodal.CausalTransformerLM.features_batch`][] refuses.
    """
    layout = model.layout
    if codebooks.layout != layout:
        raise ValueError(
            "expected_values: the codebooks were built for another vocabulary layout "
            "than the model's."
        )
    if codebooks.n_columns > 1 and columns is None:
        raise ValueError(
            f"expected_values: the codebooks have {codebooks.n_columns} rows of "
            "scalar centres (one per column); pass `columns`."
        )
    hidden = model.features_batch(
        tokens, type_ids=type_ids, segment_ids=segment_ids, positions=positions
    )
    accumulate = jnp.promote_types(hidden.dtype, jnp.float32)
    slices = layout.slices()

    def slice_probs(name):
        start, stop = slices[name]
        w = model.head_weight[start:stop].astype(hidden.dtype)
        logits = jnp.einsum(
            "bld,vd->blv", hidden, w, preferred_element_type=accumulate
        ) + model.head_bias[start:stop].astype(accumulate)
        return jax.nn.softmax(logits, axis=-1)

    # Positions without a prediction: the first of each sequence (a segment's first
    # token is not predicted by the previous segment).
    if positions is None:
        first = jnp.broadcast_to(jnp.arange(tokens.shape[1]) == 0, tokens.shape)
    else:
        first = positions == 0

    def shifted(x):
        # Logits at t - 1 predict the token at t.
        pad = jnp.full((x.shape[0], 1) + x.shape[2:], jnp.nan, x.dtype)
        x = jnp.concatenate([pad, x[:, :-1]], axis=1)
        keep = ~first.reshape(first.shape + (1,) * (x.ndim - first.ndim))
        return jnp.where(keep, x, jnp.nan)

    precision = jax.lax.Precision.HIGHEST
    out = {
        "image": shifted(
            jnp.einsum(
                "blv,vd->bld",
                slice_probs("image"),
                codebooks.image.astype(accumulate),
                precision=precision,
            )
        )
    }
    table = codebooks.scalar.astype(accumulate)
    if codebooks.n_columns > 1:
        assert columns is not None
        start, stop = slices["scalar"]
        columns = check_ids(
            "expected_values",
            "columns",
            columns,
            codebooks.n_columns,
            where=(tokens >= start) & (tokens < stop),
            upper_name="codebooks.n_columns",
        )
        rows = table[jnp.clip(columns, 0, codebooks.n_columns - 1)]
        # Position t's centres are those of the column at t, applied to logits t-1.
        probs = shifted(slice_probs("scalar"))
        out["scalar"] = jnp.sum(probs * rows, axis=-1)
    else:
        out["scalar"] = shifted(slice_probs("scalar") @ table[0])
    for name, codebook in zip(layout.spectrum_groups, codebooks.spectrum):
        out[f"spectrum:{name}"] = shifted(
            jnp.einsum(
                "blv,vd->bld",
                slice_probs(f"spectrum:{name}"),
                codebook.astype(accumulate),
                precision=precision,
            )
        )
    return out
