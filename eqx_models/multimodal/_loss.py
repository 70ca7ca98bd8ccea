"""The training objective of the multimodal transformer, as one `loss_fn`.

`MultimodalLoss` adds to the chunked next-token cross-entropy one expected-value
loss per modality, computed on sampled positions through a head restricted to the
modality's slice of the vocabulary, so full logits are never formed. It has the
`(model, batch, key) -> (loss, aux)` signature that `transforms.make_train_step`
takes.
"""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from transforms import (
    cast_floating,
    chunked_cross_entropy,
    expected_value,
    expected_value_loss,
    hl_gauss,
    masked_mean,
    sample_positions,
    soft_cross_entropy,
    two_hot,
)
from transforms.validation import (
    check_choice,
    check_ids,
    check_in_range,
    check_size,
    check_type,
    typechecked,
)

from ._codebooks import Codebooks
from ._model import CausalTransformerLM
from ._sequence import TokenBatch
from ._vocab import PAD


_DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def _shift(x, fill):
    """Targets: position t predicts the entry at t + 1; the last predicts nothing."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def _targets(batch):
    """The token each position predicts: the next one, or `PAD` (counted by no loss)
    at the end of a row and, in a packed batch, at the last position of each
    segment, whose successor starts another sequence."""
    targets = _shift(batch.tokens, PAD)
    if batch.segment_ids is None:
        return targets
    same = _shift(batch.segment_ids, -1) == batch.segment_ids
    return jnp.where(same, targets, PAD)


def _take(x, rows):
    """The entries of `x` at `rows`; all of them, in order, for `rows=None`."""
    return x if rows is None else x[rows]


def _row(rows, i):
    """Modality `i`'s rows from `_rows`' stacked rows (`None`: every position)."""
    return None if rows is None else rows[i]


def _edges_from_centres(centres):
    mid = 0.5 * (centres[..., 1:] + centres[..., :-1])
    first = centres[..., :1] - (mid[..., :1] - centres[..., :1])
    last = centres[..., -1:] + (centres[..., -1:] - mid[..., -1:])
    return jnp.concatenate([first, mid, last], axis=-1)


class MultimodalLoss(eqx.Module):
    """Cross-entropy plus expected-value reconstruction losses, as one loss function.

    Called as `loss(model, batch, key) -> (total, aux)`, the signature
    [`transforms.make_train_step`][] takes (with `has_aux=True`). Position `t`
    predicts token `t + 1`:

    - `ce`: cross-entropy over the full vocabulary, mean over non-`PAD` targets,
        with the head applied chunk by chunk
        ([`transforms.chunked_cross_entropy`][]), so no `(batch, length, vocab)`
        float32 logits exist.
    - per modality (image, scalar, each spectrum group), the valid positions are
        targets inside the modality's id range (never specials); at most
        `sample_k` of them are sampled uniformly without replacement over the
        whole batch (all when fewer; spectrum groups get `max(1, sample_k //
        n_groups)` each); the head is applied to those rows only and restricted to
        the modality's slice of the vocabulary; the softmax over that slice (in
        float32) gives the expected codebook vector (image, spectrum) or bin centre
        (scalar, gathered from the target's column's centres), and the loss is the
        squared error to the target token's codebook vector or centre, averaged
        over positions x dimensions.
    - `image`, `scalar`: those losses; `spectrum`: the mean of the groups' losses
        over the groups present in the batch. A modality with no valid position
        contributes exactly 0 with no gradient.
    - total `= ce + image_weight * image + scalar_weight * scalar +
        spectrum_weight * spectrum`.

    With `key=None` the loss is deterministic: no dropout and every valid position
    counted (use it for evaluation). The model runs in `compute_dtype` (its float32
    weights cast inside the loss, so gradients reach the float32 master weights);
    the head's weight is used in float32 with bfloat16 matmuls.

    **Arguments:**

    - `codebooks`: the [`eqx_models.multimodal.Codebooks`][] (their layout must be
        the model's).
    - `image_weight`, `scalar_weight`, `spectrum_weight`: loss weights, default 0.1.
    - `sample_k`: positions sampled per modality per batch; `None` uses all.
    - `scalar_loss`: `"mse"` (expected bin centre), or the distributional
        alternatives `"two_hot"` / `"hl_gauss"`: cross-entropy of the scalar slice
        against a two-hot or HL-Gauss target built from the raw value in
        `batch.values` (the target's bin centre where it is NaN or infinite).
    - `hl_gauss_sigma`: HL-Gauss width in units of the target bin's width.
    - `compute_dtype`: `"float32"`, `"bfloat16"`, `"float16"`, or `"float64"`
        (with `jax_enable_x64`).
    - `ce_chunk_size`: rows per chunk of the cross-entropy.

    **Raises:**

    `ValueError` for a negative, NaN or infinite loss weight, a non-positive
    `hl_gauss_sigma`, `sample_k` or `ce_chunk_size`, or an unknown `scalar_loss` or
    `compute_dtype`; `TypeError` for codebooks that are not
    [`eqx_models.multimodal.Codebooks`][] or a count that is not an integer.
    """

    codebooks: Codebooks
    image_weight: float = eqx.field(static=True, default=0.1)
    scalar_weight: float = eqx.field(static=True, default=0.1)
    spectrum_weight: float = eqx.field(static=True, default=0.1)
    sample_k: int | None = eqx.field(static=True, default=1024)
    scalar_loss: Literal["mse", "two_hot", "hl_gauss"] = eqx.field(
        static=True, default="mse"
    )
    hl_gauss_sigma: float = eqx.field(static=True, default=0.75)
    compute_dtype: str = eqx.field(static=True, default="float32")
    ce_chunk_size: int = eqx.field(static=True, default=8192)

    def __check_init__(self):
        name = "MultimodalLoss"
        check_type(name, "codebooks", self.codebooks, Codebooks, "a Codebooks")
        for arg in ("image_weight", "scalar_weight", "spectrum_weight"):
            check_in_range(name, arg, getattr(self, arg), low=0)
        if self.sample_k is not None:
            check_size(name, "sample_k", self.sample_k)
        check_choice(
            name, "scalar_loss", self.scalar_loss, ("mse", "two_hot", "hl_gauss")
        )
        check_in_range(
            name, "hl_gauss_sigma", self.hl_gauss_sigma, low=0, inclusive=(False, True)
        )
        check_choice(name, "compute_dtype", self.compute_dtype, tuple(_DTYPES))
        check_size(name, "ce_chunk_size", self.ce_chunk_size)

    def _rows(self, keys, valid, k):
        """Rows (and validity) per modality: `valid` is `(modalities, n)`, `keys` one
        key per modality (or `None`), the same `k` for all. Sampled with one
        vmapped draw, or every position: rows `None`, so that the losses use the
        hidden states as they are, where gathering every row would (in a sharded
        step) gather the whole batch onto every device."""
        n = valid.shape[1]
        if keys is None or k is None or k >= n:
            return None, valid
        return jax.vmap(sample_positions, in_axes=(0, 0, None))(keys, valid, k)

    @typechecked
    def __call__(
        self,
        model: CausalTransformerLM,
        batch: TokenBatch,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Array]]:
        """The total loss and its parts.

        **Arguments:**

        - `model`: the [`eqx_models.multimodal.CausalTransformerLM`][].
        - `batch`: a [`eqx_models.multimodal.TokenBatch`][] of shape
            `(batch, length)`, padded or packed (with `segment_ids`: no position
            predicts the first token of the next segment, so every part of the
            loss is the one of the same sequences padded one per row).
        - `key`: PRNG key for dropout and position sampling; `None` for a
            deterministic evaluation.

        **Returns:**

        `(total, {"ce", "image", "scalar", "spectrum"})`, float32 scalars.

        **Raises:**

        `ValueError` if the codebooks' layout is not the model's or the batch is not
        2-D; at run time for token ids outside the vocabulary, inconsistent type
        ids, inconsistent segment ids or positions, or scalar columns beyond the
        codebooks' rows.
        """
        layout = model.layout
        if self.codebooks.layout != layout:
            raise ValueError(
                "MultimodalLoss: the codebooks were built for another vocabulary "
                f"layout ({self.codebooks.layout}) than the model's ({layout})."
            )
        if batch.tokens.ndim != 2:
            raise ValueError(
                "MultimodalLoss: `batch.tokens` must have shape (batch, length), got "
                f"{batch.tokens.shape}."
            )
        # One split for everything: each split is a threefry kernel to compile.
        n_groups = layout.n_groups
        if key is None:
            dropout_key, main_keys, group_keys = None, None, None
        else:
            keys = jr.split(key, 3 + n_groups)
            dropout_key = keys[0] if model.dropout > 0.0 else None
            main_keys, group_keys = keys[1:3], keys[3:]
        hidden = self._hidden(model, batch, dropout_key)
        targets = _targets(batch).reshape(-1)
        head = _SliceHead(
            model.head_weight,
            model.head_bias,
            hidden,
            layout.slices(),
            jnp.promote_types(hidden.dtype, jnp.float32),
        )
        ce = chunked_cross_entropy(
            hidden,
            model.head_weight,
            model.head_bias,
            targets,
            where=targets != PAD,
            chunk_size=self.ce_chunk_size,
            check_targets=False,
        )
        # Image and scalar positions are sampled in one draw, spectrum groups (with
        # their smaller per-group count) in another.
        main_rows, main_ok = self._rows(
            main_keys,
            jnp.stack(
                [head.in_range("image", targets), head.in_range("scalar", targets)]
            ),
            self.sample_k,
        )
        image = self._vector_loss(
            head, "image", self.codebooks.image, targets, _row(main_rows, 0), main_ok[0]
        )
        scalar = self._scalar_loss(head, batch, targets, _row(main_rows, 1), main_ok[1])
        spectrum = self._spectrum_loss(head, targets, group_keys)
        total = (
            ce
            + self.image_weight * image
            + self.scalar_weight * scalar
            + self.spectrum_weight * spectrum
        )
        aux = {"ce": ce, "image": image, "scalar": scalar, "spectrum": spectrum}
        return total, aux

    def _hidden(self, model, batch, dropout_key) -> Array:
        """The final hidden states, `(batch * length, d)`, in `compute_dtype`.

        Only the blocks and the final norm are cast: the head is applied only where
        needed, with its float32 weight, and the embedding tables are gathered in
        float32 (a float32 scatter-add in the backward pass).
        """
        compute = _DTYPES[self.compute_dtype]
        body = eqx.tree_at(
            lambda m: (m.blocks, m.final_norm_weight, m.final_norm_bias),
            model,
            cast_floating(
                (model.blocks, model.final_norm_weight, model.final_norm_bias), compute
            ),
        )
        hidden = body.features_batch(
            batch.tokens,
            type_ids=batch.type_ids,
            segment_ids=batch.segment_ids,
            positions=batch.positions,
            key=dropout_key,
        )
        return hidden.reshape(-1, hidden.shape[-1])

    @staticmethod
    def _vector_loss(head, name, codebook, targets, rows, ok):
        """The MSE of the expected codebook vector of modality `name` at `rows`."""
        start, _ = head.slices[name]
        return expected_value_loss(
            head.logits(name, rows),
            codebook.astype(head.accumulate),
            _take(targets, rows) - start,
            where=ok,
            # Selected rows hold targets of this slice by construction.
            check_targets=False,
        )

    def _scalar_loss(self, head, batch, targets, rows, ok):
        """The scalar loss at `rows`: each target's column has its own bin centres."""
        start, stop = head.slices["scalar"]
        centres_table = self.codebooks.scalar.astype(head.accumulate)
        n_columns = centres_table.shape[0]
        if n_columns > 1:
            row_columns = _take(_shift(batch.columns, -1).reshape(-1), rows)
            row_columns = check_ids(
                "MultimodalLoss",
                "batch.columns",
                row_columns,
                n_columns,
                where=ok,
                upper_name="codebooks.n_columns",
            )
            centres = centres_table[jnp.clip(row_columns, 0, n_columns - 1)]
        else:
            centres = jnp.broadcast_to(centres_table, (ok.shape[0], stop - start))
        logits = head.logits("scalar", rows)
        target_bins = jnp.clip(_take(targets, rows) - start, 0, stop - start - 1)
        target_centres = jnp.take_along_axis(centres, target_bins[:, None], 1)[:, 0]
        if self.scalar_loss == "mse":
            # Not `expected_value_loss`: the bin centres differ between rows.
            predicted = jax.vmap(expected_value)(logits, centres)
            return masked_mean(jnp.square(predicted - target_centres), ok)
        raw = _take(_shift(batch.values, jnp.nan).reshape(-1), rows)
        raw = raw.astype(head.accumulate)
        raw = jnp.where(jnp.isfinite(raw), raw, target_centres)
        if self.scalar_loss == "two_hot":
            probs = jax.vmap(two_hot)(raw, centres)
        else:
            edges = _edges_from_centres(centres)
            widths = jnp.take_along_axis(
                edges[:, 1:] - edges[:, :-1], target_bins[:, None], 1
            )[:, 0]
            sigma = self.hl_gauss_sigma * jnp.where(widths > 0, widths, 1.0)
            probs = jax.vmap(hl_gauss)(raw, edges, sigma)
        return soft_cross_entropy(logits, jax.lax.stop_gradient(probs), where=ok)

    def _spectrum_loss(self, head, targets, keys):
        """The mean of the spectrum groups' losses over the groups present."""
        groups = self.codebooks.layout.spectrum_groups
        if not groups:
            return jnp.zeros((), head.accumulate)
        k = None if self.sample_k is None else max(1, self.sample_k // len(groups))
        names = [f"spectrum:{name}" for name in groups]
        rows, ok = self._rows(
            keys, jnp.stack([head.in_range(name, targets) for name in names]), k
        )
        losses = [
            self._vector_loss(head, name, codebook, targets, _row(rows, g), ok[g])
            for g, (name, codebook) in enumerate(zip(names, self.codebooks.spectrum))
        ]
        return masked_mean(jnp.stack(losses), jnp.any(ok, axis=1))


class _SliceHead(eqx.Module):
    """The output head restricted to one modality's slice of the vocabulary, at
    selected rows of the hidden states (the loss never forms full logits)."""

    weight: Array
    bias: Array
    hidden: Array
    slices: dict[str, tuple[int, int]] = eqx.field(static=True)
    accumulate: jnp.dtype = eqx.field(static=True)

    def in_range(self, name: str, targets: Array) -> Array:
        """Which targets lie in modality `name`'s id range."""
        start, stop = self.slices[name]
        return (targets >= start) & (targets < stop)

    def logits(self, name: str, rows: Array | None) -> Array:
        """Logits over modality `name`'s slice at `rows` (every row for `None`),
        accumulated in float32."""
        start, stop = self.slices[name]
        h = _take(self.hidden, rows)
        w = self.weight[start:stop].astype(h.dtype)
        logits = jnp.dot(h, w.T, preferred_element_type=self.accumulate)
        return logits + self.bias[start:stop].astype(self.accumulate)
