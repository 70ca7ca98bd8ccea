"""Autoregressive generation with a key/value cache, within each position's modality.

A sequence's layout (`BOS`, image, `SEP`, scalars, `SEP`, spectrum groups, `EOS`)
fixes which modality every position holds, so a generated token is drawn from that
modality's slice of the vocabulary only, and the separators are written, not
drawn. `generate` reads the layout from a batch of sequences (the objects
themselves, or templates from `build_sequence`), keeps their first `prompt_length`
tokens, and draws the rest one position at a time: one forward pass over the
prompt fills the cache, then a compiled `lax.scan` over positions runs the model on
one token per sequence, attending to the cached keys and values. It is separate from
`_predict`, which reads the model's predictions under teacher forcing.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_bool,
    check_ids,
    check_in_range,
    check_size,
    check_type,
    fail,
    is_concrete,
)

from .._attention import attention_implementation, dot_product_attention
from .._layer_ops import layer_norm
from ._codebooks import Codebooks
from ._model import CausalTransformerLM, check_tokens, padded_attention
from ._sequence import TokenBatch
from ._vocab import (
    BOS,
    EOS,
    IMAGE_TYPE,
    MISS,
    N_SPECIAL,
    PAD,
    SCALAR_TYPE,
    SEP,
    SPECTRUM_TYPE,
    VocabLayout,
)


class Generation(eqx.Module):
    """The result of [`eqx_models.multimodal.generate`][].

    Fields:

    - `tokens`: the sequences, shape `(batch, length)`: the prompt, the separators
        and `EOS` of the layout, and the drawn tokens.
    - `generated`: where tokens were drawn, a boolean array of shape
        `(batch, length)`.
    - `expected`: with codebooks, the expected value at every drawn position
        under the model's distribution there (softmax over the position's
        modality slice, before temperature and top-k): `"image"`
        `(batch, length, D_img)`, `"scalar"` and `"scalar_std"` `(batch, length)`
        (the mean and standard deviation of the bin centres of the position's
        column) and `"spectrum:<group>"` `(batch, length, D_group)`; NaN where a
        position was not drawn or holds another modality. `None` without
        codebooks.
    - `logits`: with `return_logits=True`, the logits each token was predicted
        from (those of the position before it; full vocabulary), shape
        `(batch, length, vocab)`; NaN at position 0. `None` otherwise.
    """

    tokens: Int[Array, "batch length"]
    generated: Bool[Array, "batch length"]
    expected: dict[str, Float[Array, "..."]] | None
    logits: Float[Array, "batch length vocab"] | None


def _type_slices(layout: VocabLayout) -> tuple[np.ndarray, np.ndarray]:
    """`(start, stop)` of the vocabulary slice of each type id (empty for the
    specials' type)."""
    start = np.zeros(layout.n_types, np.int32)
    stop = np.zeros(layout.n_types, np.int32)
    slices = layout.slices()
    names = ["image", "scalar"] + [f"spectrum:{g}" for g in layout.spectrum_groups]
    types = [IMAGE_TYPE, SCALAR_TYPE] + [
        SPECTRUM_TYPE + g for g in range(layout.n_groups)
    ]
    for name, type_id in zip(names, types):
        start[type_id], stop[type_id] = slices[name]
    return start, stop


def check_layout(layout: VocabLayout, tokens, type_ids, *, where: str):
    """Check that each row of `tokens` is laid out as `build_sequence` lays out an
    object: `BOS`, segments of one modality each in the layout's order (image,
    scalars, spectrum groups) separated by single `SEP`s, `EOS`, then `PAD` only;
    a `MISS` typed as its segment.

    Concrete arrays raise a `ValueError` at once naming the first offending index;
    traced ones are returned guarded by `eqx.branched_error_if`. Returns `tokens`.
    """
    concrete = is_concrete(tokens, type_ids)
    xp: Any = np if concrete else jnp
    ids = np.asarray(tokens) if concrete else tokens
    types = np.asarray(type_ids) if concrete else type_ids
    value = (ids >= N_SPECIAL) | (ids == MISS)
    sep, eos, pad = ids == SEP, ids == EOS, ids == PAD
    false = xp.zeros(ids.shape[:-1] + (1,), bool)

    def before(x):  # x[t - 1] at t (False at 0)
        return xp.concatenate([false, x[..., :-1]], axis=-1)

    def after(x):  # x[t + 1] at t (False at the end)
        return xp.concatenate([x[..., 1:], false], axis=-1)

    index = xp.arange(ids.shape[-1])
    bos_misplaced = (ids == BOS) != (index == 0)
    # A separator between two segments; EOS right after BOS or a segment.
    lone_sep = sep & ~(before(value) & after(value))
    eos_misplaced = eos & ~(before(value) | before(ids == BOS))
    if xp is np:
        ended = np.logical_or.accumulate(eos, axis=-1)
    else:
        ended = jax.lax.cummax(eos.astype(jnp.int32), axis=eos.ndim - 1) > 0
    after_eos = before(ended) & ~pad
    no_eos = ~xp.any(eos, axis=-1, keepdims=True) & (index == 0)
    structure = bos_misplaced | lone_sep | eos_misplaced | after_eos | no_eos
    previous_value_type = before(xp.where(value, types, 0))
    mixed = value & before(value) & (types != previous_value_type)
    # Across a separator the type must grow: the layout's order, each modality once.
    type_before_sep = before(before(xp.where(value, types, 0)))
    out_of_order = value & before(sep) & (types <= type_before_sep)
    untyped_value = value & (types < IMAGE_TYPE)
    expected = (
        (
            "tokens",
            "laid out like build_sequence's output: BOS, modality segments "
            "separated by single SEPs, EOS, then only PAD",
        ),
        (
            "tokens",
            "modality segments in the layout's order (image, scalars, then the "
            "spectrum groups as in `layout.spectrum_groups`), each of one modality "
            "and present at most once",
        ),
        ("type_ids", "the type of its segment at a MISS token (not the specials' 0)"),
    )
    masks = (structure, mixed | out_of_order, untyped_value)
    if concrete:
        for (arg, text), mask in zip(expected, masks):
            if np.any(mask):
                index_ = tuple(int(i) for i in np.argwhere(mask)[0])
                got = ids if arg == "tokens" else types
                raise fail(
                    where,
                    f"batch.{arg}",
                    text,
                    f"{got[index_].item()!r} at index {index_}",
                )
        return tokens
    preds = jnp.stack([jnp.any(mask) for mask in masks])
    messages = tuple(
        f"{where}: `batch.{arg}` must be {text}, got some that are not (checked at "
        "run time)."
        for arg, text in expected
    )
    zero = jnp.zeros((), tokens.dtype)
    zero = eqx.branched_error_if(zero, jnp.any(preds), jnp.argmax(preds), messages)
    return tokens + zero


def _head(model: CausalTransformerLM, h):
    """Logits from final hidden states, as `CausalTransformerLM.__call__` forms
    them."""
    accumulate = jnp.promote_types(h.dtype, jnp.float32)
    logits = jnp.dot(
        h, model.head_weight.astype(h.dtype).T, preferred_element_type=accumulate
    )
    return logits + model.head_bias.astype(accumulate)


def _keep_keys_and_values(core):
    """An attention core that also returns its keys and values (to fill a cache)."""

    def keeping(q, k, v):
        o, _ = core(q, k, v)
        return o, (k, v)

    return keeping


def _prefill(model: CausalTransformerLM, tokens, type_ids, cache_length: int):
    """The prompt's forward pass: its final hidden states `(batch, prompt, d)` and a
    cache `(keys, values)`, each `(layers, batch, cache_length, heads, head_dim)`,
    holding the prompt's keys and values in its first positions."""
    batch, length = tokens.shape
    dtype = model.blocks.qkv_weight.dtype
    head_dim = model.d_model // model.n_heads
    implementation = attention_implementation(
        model.attention,
        dtype,
        head_dim,
        length,
        needs_even_length=False,
        fn="generate",
    )
    lengths = jnp.sum(tokens != PAD, axis=-1, dtype=jnp.int32)
    core = _keep_keys_and_values(padded_attention(lengths, implementation))
    h, (keys, values) = model._forward(tokens, type_ids, None, core, key=None)
    shape = (model.n_layers, batch, cache_length, model.n_heads, head_dim)
    cache = tuple(
        jnp.zeros(shape, dtype).at[:, :, :length].set(kv) for kv in (keys, values)
    )
    return h.reshape(batch, length, model.d_model), cache


def _decode_step(model: CausalTransformerLM, cache, tokens, type_ids, t):
    """One position of every sequence: token `tokens` (of type `type_ids`), shape
    `(batch,)`, at position `t`. Writes its keys and values into the cache at `t`
    and attends to positions `<= t`. Returns the next-token logits `(batch, vocab)`
    and the cache."""
    batch = tokens.shape[0]
    dtype = model.blocks.qkv_weight.dtype
    x = (
        model.token_embedding[tokens]
        + model.type_embedding[type_ids]
        + model.position_embedding[t]
    ).astype(dtype)
    seen = jnp.full((batch,), t + 1, jnp.int32)
    params, static = eqx.partition(model.blocks, eqx.is_array)

    def layer(carry, inputs):
        x, keys, values = carry
        p, i = inputs

        def core(q, k, v):
            at = (i, 0, t, 0, 0)
            new_keys = jax.lax.dynamic_update_slice(keys, k[None].astype(dtype), at)
            new_values = jax.lax.dynamic_update_slice(values, v[None].astype(dtype), at)
            # One query per sequence: XLA's attention over the cache.
            o = dot_product_attention(
                q,
                new_keys[i],
                new_values[i],
                is_causal=False,
                lengths=seen,
                implementation="xla",
            )
            return o, (new_keys, new_values)

        x, (keys, values) = eqx.combine(p, static)(
            x,
            core,
            batch=batch,
            n_heads=model.n_heads,
            pre_ln=model.pre_ln,
            dropout=model.dropout,
            key=None,
        )
        return (x, keys, values), None

    (x, keys, values), _ = jax.lax.scan(
        layer, (x, *cache), (params, jnp.arange(model.n_layers))
    )
    h = layer_norm(x, model.final_norm_weight, model.final_norm_bias)
    return _head(model, h), (keys, values)


def _choose(logits, allowed, key, temperature, top_k: int | None, greedy: bool):
    """A token per row from `logits` restricted to `allowed`: the most likely, or
    a draw at `temperature` among the `top_k` most likely."""
    masked = jnp.where(allowed, logits, -jnp.inf)
    if greedy:
        return jnp.argmax(masked, axis=-1).astype(jnp.int32)
    z = masked / temperature.astype(masked.dtype)
    if top_k is not None:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    return jr.categorical(key, z, axis=-1).astype(jnp.int32)


def _expected(layout: VocabLayout, codebooks: Codebooks, logits, columns):
    """The expected value of every modality under `logits` `(batch, vocab)`: the
    softmax over each modality's slice times its codebook, and for scalars the
    mean and standard deviation of the bin centres of `columns`."""
    accumulate = logits.dtype
    slices = layout.slices()

    def probs(name):
        start, stop = slices[name]
        return jax.nn.softmax(logits[:, start:stop], axis=-1)

    precision = jax.lax.Precision.HIGHEST
    out = {
        "image": jnp.dot(
            probs("image"), codebooks.image.astype(accumulate), precision=precision
        )
    }
    table = codebooks.scalar.astype(accumulate)
    centres = table[jnp.clip(columns, 0, table.shape[0] - 1)]
    p = probs("scalar")
    mean = jnp.sum(p * centres, axis=-1)
    second = jnp.sum(p * jnp.square(centres - mean[:, None]), axis=-1)
    out["scalar"] = mean
    out["scalar_std"] = jnp.sqrt(second)
    for name, codebook in zip(layout.spectrum_groups, codebooks.spectrum):
        out[f"spectrum:{name}"] = jnp.dot(
            probs(f"spectrum:{name}"), codebook.astype(accumulate), precision=precision
        )
    return out


@eqx.filter_jit
def _generate(
    model: CausalTransformerLM,
    tokens,
    type_ids,
    columns,
    codebooks: Codebooks | None,
    key,
    temperature,
    prompt_length: int,
    top_k: int | None,
    greedy: bool,
    return_logits: bool,
):
    layout = model.layout
    batch, length = tokens.shape
    p = prompt_length
    start, stop = (jnp.asarray(a) for a in _type_slices(layout))
    vocab = jnp.arange(layout.vocab_size)
    position = jnp.arange(length)
    drawn = ((tokens >= N_SPECIAL) | (tokens == MISS)) & (position >= p)

    hidden, cache = _prefill(model, tokens[:, :p], type_ids[:, :p], length)
    last = _head(model, hidden[:, -1])

    def step(carry, t):
        cache, logits = carry
        kind = type_ids[:, t]
        allowed = (vocab >= start[kind][:, None]) & (vocab < stop[kind][:, None])
        step_key = None if key is None else jr.fold_in(key, t)
        chosen = _choose(logits, allowed, step_key, temperature, top_k, greedy)
        token = jnp.where(drawn[:, t], chosen, tokens[:, t])
        out: dict[str, Any] = {"token": token}
        if codebooks is not None:
            out["expected"] = _expected(layout, codebooks, logits, columns[:, t])
        if return_logits:
            out["logits"] = logits
        new_logits, cache = _decode_step(model, cache, token, kind, t)
        return (cache, new_logits), out

    _, outs = jax.lax.scan(step, (cache, last), jnp.arange(p, length))

    def place(prefix_fill, steps):
        """The scan's `(steps, batch, ...)` outputs at positions `p:`, after a
        prefix of `prefix_fill`."""
        moved = jnp.moveaxis(steps, 0, 1)
        prefix = jnp.full((batch, p) + moved.shape[2:], prefix_fill, moved.dtype)
        return jnp.concatenate([prefix, moved], axis=1)

    out_tokens = jnp.concatenate(
        [tokens[:, :p], jnp.moveaxis(outs["token"], 0, 1)], axis=1
    )
    expected = None
    if codebooks is not None:
        kinds = {
            "image": IMAGE_TYPE,
            "scalar": SCALAR_TYPE,
            "scalar_std": SCALAR_TYPE,
        }
        for g, name in enumerate(layout.spectrum_groups):
            kinds[f"spectrum:{name}"] = SPECTRUM_TYPE + g
        expected = {}
        for name, values in outs["expected"].items():
            placed = place(jnp.nan, values)
            keep = drawn & (type_ids == kinds[name])
            keep = keep.reshape(keep.shape + (1,) * (placed.ndim - 2))
            expected[name] = jnp.where(keep, placed, jnp.nan)
    logits = None
    if return_logits:
        prompt_logits = _head(model, hidden[:, :-1])
        nan = jnp.full((batch, 1, layout.vocab_size), jnp.nan, prompt_logits.dtype)
        logits = jnp.concatenate(
            [nan, prompt_logits, jnp.moveaxis(outs["logits"], 0, 1)], axis=1
        )
    return Generation(
        tokens=out_tokens, generated=drawn, expected=expected, logits=logits
    )


def generate(
    model: CausalTransformerLM,
    batch: TokenBatch,
    *,
    prompt_length: int,
    key: PRNGKeyArray | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    codebooks: Codebooks | None = None,
    return_logits: bool = False,
) -> Generation:
    """Draw the tokens of sequences after a prompt, one position at a time, each
    within its position's modality.

    Each row of `batch` is a sequence laid out as
    [`eqx_models.multimodal.build_sequence`][] lays out an object (`BOS`, image,
    `SEP`, scalars, `SEP`, spectrum groups, `EOS`, `PAD`): its first
    `prompt_length` tokens are the prompt, and after them its layout says what to
    draw. `BOS`, `SEP`, `EOS` and `PAD` are copied; every other position (a
    codebook token or `MISS`) is drawn from the model's next-token distribution
    restricted to the vocabulary slice of the position's type (`MISS` is never
    drawn). For example, with an object's own sequence and `prompt_length = 1 +
    n_image` (`BOS` and the image), the model fills in the scalars and spectra of
    that object's layout; with a template from `build_sequence` (any codebook
    indices) it fills in that layout.

    The prompt goes through the model once and fills a key/value cache of the
    batch's length; then a compiled `lax.scan` over positions runs the model on
    one token per sequence against the cache, so generating costs one layer
    pass per token. Without dropout, the logits are those of the full forward
    pass over the result (tested to 1e-10 in float64). The loop is compiled once
    per model, batch shape, `prompt_length`, `top_k`, `greedy`, codebooks and
    `return_logits`; `temperature` and `key` are arrays (no recompilation).

    **Arguments:**

    - `model`: the [`eqx_models.multimodal.CausalTransformerLM`][] (its dropout
        is off here).
    - `batch`: a padded [`eqx_models.multimodal.TokenBatch`][] of shape
        `(batch, length)` with `length <= model.max_len`: the prompts and the
        layouts to fill in (`batch.columns` gives each scalar position's column
        for the expected values).
    - `prompt_length`: the prompt's length, the same for every row, in
        `[1, length]`.
    - `key`: PRNG key for sampling (unused and optional with `greedy=True`).
    - `temperature`: the logits are divided by it before sampling; `> 0`.
    - `top_k`: draw among the `top_k` most likely tokens of the slice (all of a
        slice narrower than that), in `[1, vocab_size]`; `None`: the whole slice.
    - `greedy`: take the most likely token of the slice instead of sampling
        (`temperature` and `top_k` then play no part).
    - `codebooks`: the [`eqx_models.multimodal.Codebooks`][] of the model's
        layout, for expected values at the drawn positions; `None`: none.
    - `return_logits`: also return the logits each token was predicted from
        (`(batch, length, vocab)` floats: for small vocabularies and tests).

    **Returns:**

    A [`eqx_models.multimodal.Generation`][]: the tokens, where they were drawn,
    and the expected values (and logits) at the drawn positions.

    **Raises:**

    `ValueError` for a `prompt_length` beyond `model.max_len` or the batch's length,
    a batch longer than `model.max_len`, a packed batch, rows not laid out as
    `build_sequence` lays out an object (a prompt of the wrong modality order
    included: the message names `batch.tokens`), token or type ids the layout
    rejects, a `temperature` that is not positive and finite when sampling, a
    `top_k` outside `[1, vocab_size]`, codebooks of another layout, or a scalar
    column outside the codebooks' rows, or a model with `attention="cudnn"` off a
    GPU or not in bfloat16 or float16; `TypeError` for a model, batch, key or
    codebooks of the wrong type, or a count or flag of the wrong type.
    """
    name = "generate"
    check_type(name, "model", model, CausalTransformerLM, "a CausalTransformerLM")
    check_type(name, "batch", batch, TokenBatch, "a TokenBatch")
    greedy = check_bool(name, "greedy", greedy)
    return_logits = check_bool(name, "return_logits", return_logits)
    prompt_length = check_size(name, "prompt_length", prompt_length)
    if prompt_length > model.max_len:
        raise fail(
            name,
            "prompt_length",
            f"at most `model.max_len`={model.max_len} (the size of the position table)",
            repr(prompt_length),
        )
    if batch.tokens.ndim != 2:
        raise fail(
            name, "batch", "a batch of shape (batch, length)", str(batch.tokens.shape)
        )
    if batch.packed:
        expected = "a padded batch (one sequence per row)"
        raise fail(name, "batch", expected, "a packed one")
    length = batch.tokens.shape[1]
    if length > model.max_len:
        raise fail(
            name,
            "batch",
            f"sequences of at most `model.max_len`={model.max_len} positions",
            f"length {length}",
        )
    if prompt_length > length:
        raise fail(
            name,
            "prompt_length",
            f"at most the batch's length {length} (the prompt is part of each row)",
            repr(prompt_length),
        )
    layout = model.layout
    if top_k is not None:
        top_k = check_size(name, "top_k", top_k, maximum=layout.vocab_size)
    dtype = jnp.promote_types(model.head_weight.dtype, jnp.float32)
    if greedy:
        temperature_array = jnp.ones((), dtype)
    else:
        # A traced temperature comes back guarded by a run-time check.
        temperature = check_in_range(
            name, "temperature", temperature, low=0, inclusive=(False, True)
        )
        check_type(name, "key", key, jax.Array, "a PRNG key (or greedy=True)")
        temperature_array = jnp.asarray(temperature, dtype)
    if codebooks is not None:
        check_type(name, "codebooks", codebooks, Codebooks, "a Codebooks or None")
        if codebooks.layout != layout:
            raise fail(
                name,
                "codebooks",
                "codebooks of the model's vocabulary layout",
                f"codebooks of {codebooks.layout}",
            )
    where = name
    tokens = check_tokens(layout, batch.tokens, batch.type_ids, where=where)
    tokens = check_layout(layout, tokens, batch.type_ids, where=where)
    columns = batch.columns
    if codebooks is not None and codebooks.n_columns > 1:
        scalar = batch.type_ids == SCALAR_TYPE
        columns = check_ids(
            name,
            "batch.columns",
            columns,
            codebooks.n_columns,
            where=scalar & (jnp.arange(length) >= prompt_length),
            upper_name="codebooks.n_columns",
        )
    return _generate(
        model,
        tokens,
        batch.type_ids,
        columns,
        codebooks,
        None if greedy else key,
        temperature_array,
        prompt_length,
        top_k,
        greedy,
        return_logits,
    )
