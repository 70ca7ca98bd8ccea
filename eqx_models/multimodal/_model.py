"""The causal transformer over codebook tokens: embeddings, scanned blocks, output head.

`CausalTransformerLM` holds the parameters and the forward passes on one sequence and
on a padded batch; `check_tokens` checks token and type ids against the layout, also
inside `jit`. The loss and the predictions are separate modules that use the model's
final features and head weights.
"""

import dataclasses
import functools
import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from transforms import constrain_batch
from transforms.validation import (
    check_bool,
    check_choice,
    check_in_range,
    check_size,
    check_type,
    fail,
    is_concrete,
    typechecked,
)

from .._attention import (
    attention_implementation,
    dot_product_attention,
    Implementation,
)
from .._layer_ops import gelu, layer_norm
from ._guards import refuse_or_guard
from ._packing import check_segments
from ._vocab import implied_types, N_SPECIAL, PAD, SPECIAL_TYPE, VocabLayout


def _by_sequence(rows, batch: int):
    """Rows `(batch * length, ...)` kept split by whole sequences over the data axis
    of the sharded training step being traced ([`transforms.constrain_batch`][]; a
    no-op elsewhere). Constrained as `(batch, length, ...)`, so that a single
    sequence (a `batch` of 1, as under `vmap` over sequences) is never split along
    its length."""
    shape = (batch, rows.shape[0] // batch) + rows.shape[1:]
    return constrain_batch(rows.reshape(shape)).reshape(rows.shape)


class _Block(eqx.Module):
    """One transformer block: attention and MLP sublayers with residuals.

    The model holds all blocks stacked along a leading `layers` axis and scans over
    them, so the annotations allow that axis; a block is called with one layer's
    weights. Weights are `(in, out)`: activations multiply from the left. The
    activations are `(batch * length, d_model)` rows: with a 2-D operand the weight
    gradients contract a single axis and XLA keeps the activations in their natural
    layout instead of adding transposes around each matmul.

    Inside a sharded training step the activations are pinned to the batch split
    (`_by_sequence`): with parameters split over the same mesh axis (FSDP), XLA
    would otherwise be free to lay them out like the parameters, split by features
    over the whole batch, and gather whole batches around the matrix products
    instead of gathering each layer's weights.
    """

    ln1_weight: Float[Array, "*layers d_model"]
    ln1_bias: Float[Array, "*layers d_model"]
    qkv_weight: Float[Array, "*layers d_model qkv"]
    qkv_bias: Float[Array, "*layers qkv"]
    out_weight: Float[Array, "*layers d_model d_model"]
    out_bias: Float[Array, "*layers d_model"]
    ln2_weight: Float[Array, "*layers d_model"]
    ln2_bias: Float[Array, "*layers d_model"]
    fc_weight: Float[Array, "*layers d_model d_ff"]
    fc_bias: Float[Array, "*layers d_ff"]
    proj_weight: Float[Array, "*layers d_ff d_model"]
    proj_bias: Float[Array, "*layers d_model"]

    def projections(self, h):
        """Queries, keys and values of rows `h`, each `(rows, d_model)`."""
        d = h.shape[1]
        # One matmul per column block of the fused weight: each result feeds the
        # attention as it is, where slicing one (rows, 3 d) product would copy it
        # (and concatenate its gradient).
        return tuple(
            h @ self.qkv_weight[:, i * d : (i + 1) * d]
            + self.qkv_bias[i * d : (i + 1) * d]
            for i in range(3)
        )

    def attention(self, h, core, *, batch: int, n_heads: int):
        """Multi-head self-attention over rows `h` of `batch` sequences of equal
        length. `core(q, k, v) -> (o, extra)` mixes the heads' values, each of
        shape `(batch, length, n_heads, head_dim)` (the mask lives in `core`);
        `extra` is whatever it keeps (the keys and values for a decoding cache)."""
        d = h.shape[1]
        length = h.shape[0] // batch
        shape = (batch, length, n_heads, d // n_heads)
        q, k, v = (constrain_batch(p.reshape(shape)) for p in self.projections(h))
        o, extra = core(q, k, v)
        o = constrain_batch(o).reshape(batch * length, d)
        return _by_sequence(o @ self.out_weight + self.out_bias, batch), extra

    def mlp(self, h, *, batch: int):
        """The position-wise feed-forward sublayer (GELU) on rows `h` of `batch`
        sequences."""
        h = _by_sequence(gelu(h @ self.fc_weight + self.fc_bias), batch)
        return _by_sequence(h @ self.proj_weight + self.proj_bias, batch)

    def __call__(
        self,
        x,
        core,
        *,
        batch: int,
        n_heads: int,
        pre_ln: bool,
        dropout: float,
        key: PRNGKeyArray | None,
    ):
        """The block applied to rows `x` with the attention core `core` (see
        `attention`); dropout on each sublayer's output when `key` is given.
        Returns the new rows and the core's `extra`."""
        keep_attn, keep_mlp = _keep_masks(key, dropout, 2, x.shape)

        def attention(h):
            o, extra = self.attention(h, core, batch=batch, n_heads=n_heads)
            return _dropout(o, dropout, keep_attn), extra

        def mlp(h):
            return _dropout(self.mlp(h, batch=batch), dropout, keep_mlp)

        if pre_ln:
            o, extra = attention(layer_norm(x, self.ln1_weight, self.ln1_bias))
            x = x + o
            return x + mlp(layer_norm(x, self.ln2_weight, self.ln2_bias)), extra
        o, extra = attention(x)
        x = layer_norm(x + o, self.ln1_weight, self.ln1_bias)
        return layer_norm(x + mlp(x), self.ln2_weight, self.ln2_bias), extra


def padded_attention(lengths, implementation: Implementation):
    """The attention core of padded sequences: causal, each sequence attending to
    its first `lengths` positions only."""

    def core(q, k, v):
        o = dot_product_attention(
            q, k, v, is_causal=True, lengths=lengths, implementation=implementation
        )
        return o, None

    return core


def segment_attention(segment_ids, implementation: Implementation):
    """The attention core of packed rows: causal and block-diagonal, a position
    attending only to earlier positions of its own segment.

    The segment mask goes to `jax.nn.dot_product_attention` as its boolean `mask`
    on every implementation (float64 aside, see `dot_product_attention`): XLA
    applies it to the scores, cuDNN's fused kernel receives it as an additive
    bias. Neither may drop it, and
    `tests/multimodal/test_packing.py` checks that each implementation is handed
    it. Every query sees at least itself (the diagonal is always allowed), so no
    row of the softmax is empty, padding included (it forms a segment of its own).
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = same[:, None]  # (batch, 1, query, key): broadcast over the heads

    def core(q, k, v):
        o = dot_product_attention(
            q, k, v, is_causal=True, mask=mask, implementation=implementation
        )
        return o, None

    return core


def _draw(key, specs):
    """Arrays from `(name, shape, "normal" | "uniform" | "zeros" | "ones", scale)`.

    All normal entries come from one `jr.normal` call and all uniform ones
    (`U(-scale, scale)`) from one `jr.uniform` call: each random-number call is a
    threefry kernel that is slow to compile on a CPU.
    """
    sizes = {"normal": 0, "uniform": 0}
    for _, shape, dist, _ in specs:
        if dist in sizes:
            sizes[dist] += math.prod(shape)
    k_normal, k_uniform = jr.split(key)
    pools = {
        "normal": jr.normal(k_normal, (sizes["normal"],)),
        "uniform": jr.uniform(k_uniform, (sizes["uniform"],), minval=-1, maxval=1),
    }
    offsets = {"normal": 0, "uniform": 0}
    out = {}
    for name, shape, dist, scale in specs:
        if dist == "zeros":
            out[name] = jnp.zeros(shape)
        elif dist == "ones":
            out[name] = jnp.ones(shape)
        else:
            size = math.prod(shape)
            start = offsets[dist]
            offsets[dist] = start + size
            out[name] = scale * pools[dist][start : start + size].reshape(shape)
    return out


def _block_specs(d_model, d_ff, n_layers, init):
    n = (n_layers,)
    if init == "torch":
        # torch defaults: MultiheadAttention's in-projection is Xavier-uniform with
        # zero bias and its out-projection zero-biased; Linear layers are
        # U(+-1/sqrt(fan_in)) for weight and bias.
        in_bound, ff_bound = 1 / math.sqrt(d_model), 1 / math.sqrt(d_ff)
        return [
            ("qkv_weight", n + (d_model, 3 * d_model), "uniform",
             math.sqrt(6 / (4 * d_model))),
            ("qkv_bias", n + (3 * d_model,), "zeros", 0.0),
            ("out_weight", n + (d_model, d_model), "uniform", in_bound),
            ("out_bias", n + (d_model,), "zeros", 0.0),
            ("fc_weight", n + (d_model, d_ff), "uniform", in_bound),
            ("fc_bias", n + (d_ff,), "uniform", in_bound),
            ("proj_weight", n + (d_ff, d_model), "uniform", ff_bound),
            ("proj_bias", n + (d_model,), "uniform", ff_bound),
        ]  # fmt: skip
    # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers).
    residual = 0.02 / math.sqrt(2 * n_layers)
    return [
        ("qkv_weight", n + (d_model, 3 * d_model), "normal", 0.02),
        ("qkv_bias", n + (3 * d_model,), "zeros", 0.0),
        ("out_weight", n + (d_model, d_model), "normal", residual),
        ("out_bias", n + (d_model,), "zeros", 0.0),
        ("fc_weight", n + (d_model, d_ff), "normal", 0.02),
        ("fc_bias", n + (d_ff,), "zeros", 0.0),
        ("proj_weight", n + (d_ff, d_model), "normal", residual),
        ("proj_bias", n + (d_model,), "zeros", 0.0),
    ]


@functools.partial(
    jax.jit,
    static_argnames=(
        "vocab",
        "n_types",
        "max_len",
        "d_model",
        "d_ff",
        "n_layers",
        "init",
    ),
)
def _initial_weights(key, *, vocab, n_types, max_len, d_model, d_ff, n_layers, init):
    dist, scale = ("normal", 1.0) if init == "torch" else ("normal", 0.02)
    head = (
        [
            ("head_weight", (vocab, d_model), "uniform", 1 / math.sqrt(d_model)),
            ("head_bias", (vocab,), "uniform", 1 / math.sqrt(d_model)),
        ]
        if init == "torch"
        else [
            ("head_weight", (vocab, d_model), "normal", 0.02),
            ("head_bias", (vocab,), "zeros", 0.0),
        ]
    )
    norms = [
        (name, (n_layers, d_model), kind, 0.0)
        for name, kind in (
            ("ln1_weight", "ones"),
            ("ln1_bias", "zeros"),
            ("ln2_weight", "ones"),
            ("ln2_bias", "zeros"),
        )
    ]
    w = _draw(
        key,
        [
            ("token_embedding", (vocab, d_model), dist, scale),
            ("type_embedding", (n_types, d_model), dist, scale),
            ("position_embedding", (max_len, d_model), dist, scale),
        ]
        + head
        + norms
        + _block_specs(d_model, d_ff, n_layers, init),
    )
    block_fields = [f.name for f in dataclasses.fields(_Block)]
    w["blocks"] = _Block(**{name: w.pop(name) for name in block_fields})
    return w


def _dropout(x, rate: float, keep):
    if keep is None:
        return x
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _keep_masks(key, rate: float, count: int, shape):
    """`count` dropout masks from one random draw (one threefry kernel)."""
    if key is None or rate == 0.0:
        return [None] * count
    return list(jr.bernoulli(key, 1.0 - rate, (count,) + shape))


def _layers_per_iteration(choice: int | str, n_layers: int) -> int:
    if choice != "auto":
        return int(choice)
    # On an accelerator the unrolled stack is the faster step (XLA schedules across
    # layers and saves activations without stacking them). On a CPU neither wins
    # by much (measured on 2 cores, d_model 128 to 256, 2 to 12 layers: unrolled
    # 0.84x to 1.25x the scan's speed, faster only for the shallowest models) and
    # the scan compiles up to 2x faster, so the CPU keeps the scan.
    return 1 if jax.default_backend() == "cpu" else n_layers


class CausalTransformerLM(eqx.Module):
    """A causal transformer language model over multimodal codebook tokens.

    Token, type and learned absolute position embeddings are summed; a stack of
    `n_layers` identical blocks (multi-head causal self-attention, then a GELU MLP,
    each with a residual connection and LayerNorm) is applied with `lax.scan` over
    stacked weights; a final LayerNorm and an untied linear head give logits over
    the whole vocabulary.

    - `pre_ln=False` (default) is the original's post-LN block,
        `x = LN(x + Attn(x)); x = LN(x + MLP(x))`; `pre_ln=True` is
        `x = x + Attn(LN(x)); x = x + MLP(LN(x))`. Both end with the final LayerNorm.
    - Attention is `jax.nn.dot_product_attention` with a causal mask and the
        sequence's length (the number of non-`PAD` tokens; `PAD` may only appear as
        a suffix): cuDNN's fused kernel on a GPU in bfloat16/float16 when
        `attention="auto"`, XLA otherwise.
    - Dropout (rate `dropout`) acts on the embedding sum, the attention output and
        the MLP output when a `key` is given; without a key the model is
        deterministic (evaluation).
    - The compute dtype is the dtype of the blocks' weights: cast them (e.g. with
        [`transforms.cast_floating`][]) to run in bfloat16; embedding
        tables may stay float32 (their sum is cast), LayerNorm statistics are
        float32.

    The model acts on one sequence (`__call__`, `features`); `features_batch` is
    the batched equivalent used for training (one fused computation, equal to
    `jax.vmap` of `features` when there is no dropout).

    **Arguments:**

    - `layout`: the [`eqx_models.multimodal.VocabLayout`][] (sets the vocabulary and
        type-embedding sizes).
    - `d_model`: width.
    - `n_layers`: number of blocks.
    - `n_heads`: attention heads; must divide `d_model`.
    - `d_ff`: MLP hidden width (default `4 * d_model`).
    - `max_len`: size of the position table, the longest sequence accepted.
    - `dropout`: dropout rate in `[0, 1)`.
    - `pre_ln`: pre-LN blocks instead of the original's post-LN.
    - `init`: `"torch"` (PyTorch's default initialisers, as the original) or
        `"gpt"` (normal 0.02, residual projections scaled by `1/sqrt(2 n_layers)`).
    - `attention`: `"auto"`, `"xla"` or `"cudnn"`.
    - `unroll`: how many layers `lax.scan` unrolls per iteration, or `"auto"`
        (the default): fully on a GPU or TPU, one layer (a rolled scan) on a CPU,
        decided by the default backend when the model is traced. `n_layers`
        unrolls fully: compilation grows with depth, and on a GPU the step is
        faster (about 17 % for 12 layers on an H200) because XLA can schedule
        across layers and does not stack the saved activations; the rolled scan
        compiles in near-constant time. The layers compute the same either way.
    - `remat`: recompute each block's activations in the backward pass
        (`jax.checkpoint`), trading compute for memory.
    - `key`: PRNG key for the initialisation.

    **Raises:**

    `ValueError` for inconsistent sizes, unknown options or a `dropout` outside
    `[0, 1)` (NaN included); `TypeError` for a size that is not an integer, a flag
    that is not a bool or a `layout` that is not a `VocabLayout`.
    """

    token_embedding: Float[Array, "vocab d_model"]
    type_embedding: Float[Array, "n_types d_model"]
    position_embedding: Float[Array, "max_len d_model"]
    blocks: _Block
    final_norm_weight: Float[Array, " d_model"]
    final_norm_bias: Float[Array, " d_model"]
    head_weight: Float[Array, "vocab d_model"]
    head_bias: Float[Array, " vocab"]
    layout: VocabLayout = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    d_ff: int = eqx.field(static=True)
    max_len: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    pre_ln: bool = eqx.field(static=True)
    attention: str = eqx.field(static=True)
    unroll: int | Literal["auto"] = eqx.field(static=True)
    remat: bool = eqx.field(static=True)

    def __init__(
        self,
        layout: VocabLayout,
        *,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_len: int = 1024,
        dropout: float = 0.1,
        pre_ln: bool = False,
        init: Literal["torch", "gpt"] = "torch",
        attention: Literal["auto", "xla", "cudnn"] = "auto",
        unroll: int | Literal["auto"] = "auto",
        remat: bool = False,
        key: PRNGKeyArray,
    ):
        name = "CausalTransformerLM"
        check_type(name, "layout", layout, VocabLayout, "a VocabLayout")
        for arg, value in (
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("max_len", max_len),
        ):
            check_size(name, arg, value)
        auto = isinstance(unroll, str) and unroll == "auto"
        if isinstance(unroll, str) and not auto:
            raise fail(name, "unroll", "'auto' or a positive integer", repr(unroll))
        layers_per_iteration = 1 if auto else check_size(name, "unroll", unroll)
        if d_ff is not None:
            check_size(name, "d_ff", d_ff)
        check_bool(name, "pre_ln", pre_ln)
        check_bool(name, "remat", remat)
        if d_model % n_heads:
            raise ValueError(
                f"CausalTransformerLM: `n_heads`={n_heads} must divide "
                f"`d_model`={d_model}."
            )
        check_in_range(name, "dropout", dropout, low=0, high=1, inclusive=(True, False))
        check_choice(name, "init", init, ("torch", "gpt"))
        check_choice(name, "attention", attention, ("auto", "xla", "cudnn"))
        if not 1 <= layers_per_iteration <= n_layers:
            raise ValueError(
                f"CausalTransformerLM: `unroll` must be in [1, n_layers={n_layers}] "
                f"or 'auto', got {unroll}."
            )
        d_ff = 4 * d_model if d_ff is None else d_ff
        weights = _initial_weights(
            key,
            vocab=layout.vocab_size,
            n_types=layout.n_types,
            max_len=max_len,
            d_model=d_model,
            d_ff=d_ff,
            n_layers=n_layers,
            init=init,
        )
        self.blocks = weights["blocks"]
        self.token_embedding = weights["token_embedding"]
        self.type_embedding = weights["type_embedding"]
        self.position_embedding = weights["position_embedding"]
        self.head_weight = weights["head_weight"]
        self.head_bias = weights["head_bias"]
        self.final_norm_weight = jnp.ones(d_model)
        self.final_norm_bias = jnp.zeros(d_model)
        self.layout = layout
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.max_len = max_len
        self.dropout = float(dropout)
        self.pre_ln = pre_ln
        self.attention = attention
        self.unroll = "auto" if auto else layers_per_iteration
        self.remat = remat

    def config(self) -> dict[str, Any]:
        """The hyperparameters and vocabulary layout, JSON-serialisable.

        Checkpoints store this and refuse to load into a model whose configuration
        differs.
        """
        return {
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_ff": self.d_ff,
            "max_len": self.max_len,
            "dropout": self.dropout,
            "pre_ln": self.pre_ln,
            "attention": self.attention,
            "unroll": self.unroll,
            "remat": self.remat,
            "vocabulary": self.layout.to_dict(),
        }

    def _check_inputs(self, tokens, type_ids, where: str, segment_ids, positions):
        name = f"CausalTransformerLM.{where}"
        if tokens.shape[-1] > self.max_len:
            raise ValueError(
                f"{name}: `tokens` has length {tokens.shape[-1]}, "
                f"longer than the position table (`max_len`={self.max_len})."
            )
        if tokens.shape[-1] < 1:
            raise ValueError(f"{name}: `tokens` is empty.")
        for arg, value in (
            ("type_ids", type_ids),
            ("segment_ids", segment_ids),
            ("positions", positions),
        ):
            if value is not None and value.shape != tokens.shape:
                raise ValueError(
                    f"{name}: `{arg}` must have the shape of `tokens` {tokens.shape}, "
                    f"got {value.shape}."
                )
        if (segment_ids is None) != (positions is None):
            missing = "positions" if positions is None else "segment_ids"
            raise fail(
                name,
                missing,
                "given together with `segment_ids` and `positions` (a packed batch) "
                "or not at all",
                "None",
            )
        tokens = check_tokens(self.layout, tokens, type_ids, where=name)
        if segment_ids is not None:
            tokens = check_segments(tokens, segment_ids, positions, where=name)
        return tokens

    @typechecked
    def features_batch(
        self,
        tokens: Int[Array, "batch length"],
        *,
        type_ids: Int[Array, "batch length"] | None = None,
        segment_ids: Int[Array, "batch length"] | None = None,
        positions: Int[Array, "batch length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch length d_model"]:
        """Final hidden states (after the last LayerNorm) of a batch of sequences.

        A batch is either padded (one sequence per row, `PAD` after its end) or
        packed (several sequences per row, see
        [`eqx_models.multimodal.pack_sequences`][]): with `segment_ids` and
        `positions`, a position attends only to earlier positions of its own
        segment and its position embedding is its place in the segment, so each
        packed sequence gets the hidden states it would get alone.

        **Arguments:**

        - `tokens`: token ids, shape `(batch, length)`, `PAD` only as a suffix.
        - `type_ids`: type ids, same shape; default: derived from the token ids by
            the layout. Given ids must agree with the layout on non-special tokens.
        - `segment_ids`: for a packed batch, the segment of each position (1, 2, ...
            in order along a row, 0 exactly at the `PAD` suffix), same shape.
        - `positions`: for a packed batch, each position's index within its
            segment (0 at the first position of every segment, the `PAD` suffix
            included), same shape.
        - `key`: PRNG key for dropout; `None` for a deterministic pass.

        **Returns:**

        Hidden states of shape `(batch, length, d_model)` in the weights' dtype.

        **Raises:**

        `ValueError` if the sequence is longer than `max_len`, shapes disagree, or
        only one of `segment_ids` and `positions` is given; for concrete ids (at run
        time by `eqx.error_if` for traced ones): token ids outside the vocabulary,
        type ids inconsistent with the layout, `PAD` before a non-`PAD` token,
        segment ids that are not 0 exactly at `PAD`, decrease along a row, or
        positions that do not restart at 0 with each segment and count up by one;
        `ValueError` too for `attention="cudnn"` off a GPU or with weights not in
        bfloat16 or float16 (cuDNN's fused kernel cannot run there).
        """
        tokens = self._check_inputs(
            tokens, type_ids, "features_batch", segment_ids, positions
        )
        if type_ids is None:
            type_ids = self.layout.type_ids(tokens)
        batch, length = tokens.shape
        dtype = self.blocks.qkv_weight.dtype
        head_dim = self.d_model // self.n_heads
        packed = segment_ids is not None
        implementation = attention_implementation(
            self.attention,
            dtype,
            head_dim,
            length,
            needs_even_length=packed,
            fn="CausalTransformerLM",
        )
        if packed:
            core = segment_attention(segment_ids, implementation)
        else:
            lengths = jnp.sum(tokens != PAD, axis=-1, dtype=jnp.int32)
            core = padded_attention(lengths, implementation)
        x, _ = self._forward(tokens, type_ids, positions, core, key=key)
        return x.reshape(batch, length, self.d_model)

    def _forward(self, tokens, type_ids, positions, core, *, key):
        """Embeddings, the scanned blocks with attention core `core` (see
        `_Block.attention`) and the final LayerNorm, on checked inputs.

        Returns the final rows `(batch * length, d_model)` and the cores' `extra`
        stacked over the layers. Not part of the public API: the forward passes and
        the decoding cache share it.
        """
        batch, length = tokens.shape
        dtype = self.blocks.qkv_weight.dtype
        position_rows = (
            self.position_embedding[:length]
            if positions is None
            else self.position_embedding[positions]
        )
        # Embeddings are summed in their own dtype and then cast, so that float32
        # tables keep a float32 gradient (a scatter-add) under bfloat16 compute.
        x = (
            self.token_embedding[tokens] + self.type_embedding[type_ids] + position_rows
        ).astype(dtype)
        if key is None or self.dropout == 0.0:
            embed_key, layer_keys = None, None
        else:
            keys = jr.split(key, self.n_layers + 1)
            embed_key, layer_keys = keys[0], keys[1:]
        x = _dropout(
            x, self.dropout, _keep_masks(embed_key, self.dropout, 1, x.shape)[0]
        )
        # The blocks work on `(batch * length, d_model)` rows (see `_Block`).
        x = _by_sequence(x.reshape(batch * length, self.d_model), batch)

        def block(x, inputs):
            p, k = inputs
            x, extra = p(
                x,
                core,
                batch=batch,
                n_heads=self.n_heads,
                pre_ln=self.pre_ln,
                dropout=self.dropout,
                key=k,
            )
            return _by_sequence(x, batch), extra

        if self.remat:
            block = jax.checkpoint(block)
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def scanned(x, inputs):
            p, k = inputs
            return block(x, (eqx.combine(p, static), k))

        unroll = _layers_per_iteration(self.unroll, self.n_layers)
        x, extra = jax.lax.scan(scanned, x, (params, layer_keys), unroll=unroll)
        x = layer_norm(x, self.final_norm_weight, self.final_norm_bias)
        return _by_sequence(x, batch), extra

    @typechecked
    def features(
        self,
        tokens: Int[Array, " length"],
        *,
        type_ids: Int[Array, " length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "length d_model"]:
        """Final hidden states of one sequence.

        **Arguments:**

        - `tokens`: token ids, shape `(length,)`, `PAD` only as a suffix.
        - `type_ids`: optional type ids, shape `(length,)`.
        - `key`: PRNG key for dropout, or `None`.

        **Returns:**

        Hidden states of shape `(length, d_model)`.

        **Raises:**

        As [`eqx_models.multimodal.CausalTransformerLM.features_batch`][].
        """
        return self.features_batch(
            tokens[None], type_ids=None if type_ids is None else type_ids[None], key=key
        )[0]

    @typechecked
    def __call__(
        self,
        tokens: Int[Array, " length"],
        *,
        type_ids: Int[Array, " length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "length vocab"]:
        """Next-token logits of one sequence: position `t` predicts token `t + 1`.

        **Arguments:**

        - `tokens`: token ids, shape `(length,)`, `PAD` only as a suffix.
        - `type_ids`: optional type ids, shape `(length,)`.
        - `key`: PRNG key for dropout, or `None` (deterministic).

        **Returns:**

        Logits of shape `(length, vocab_size)`, in float32 or wider.

        **Raises:**

        As [`eqx_models.multimodal.CausalTransformerLM.features_batch`][].
        """
        h = self.features(tokens, type_ids=type_ids, key=key)
        accumulate = jnp.promote_types(h.dtype, jnp.float32)
        logits = jnp.dot(
            h, self.head_weight.astype(h.dtype).T, preferred_element_type=accumulate
        )
        return logits + self.head_bias.astype(accumulate)

    def flops_per_token(self, length: int, *, causal: bool = False) -> float:
        """Matmul FLOPs of one training step (forward and backward) per token.

        Counts `2 * m * n * k` per matmul of the forward pass: per layer the QKV,
        output, and two MLP projections `2 (4 d^2 + 2 d d_ff)` plus attention scores
        and values `4 length d` (halved with `causal=True`, the work a causal kernel
        does), and the head `2 d V`; the backward pass costs twice the forward.
        Embeddings, LayerNorms and the softmax are not counted (the usual MFU
        convention; with `causal=False` this matches `6 N + 12 L d T`).

        **Arguments:**

        - `length`: the sequence length.
        - `causal`: count only the causal half of the attention matmuls.

        **Returns:**

        FLOPs per token, a float.
        """
        d, n_layers = self.d_model, self.n_layers
        attention = 4 * length * d * (0.5 if causal else 1.0)
        per_layer = 2 * (4 * d * d + 2 * d * self.d_ff) + attention
        forward = n_layers * per_layer + 2 * d * self.layout.vocab_size
        return 3.0 * forward


@typechecked
def check_tokens(
    layout: VocabLayout,
    tokens: Int[Array, "*batch length"],
    type_ids: Int[Array, "*batch length"] | None = None,
    *,
    where: str = "check_tokens",
) -> Int[Array, "*batch length"]:
    """Check token ids (and type ids) against the layout at run time.

    Concrete arrays are checked at once; traced ones (inside `jit`, `vmap`) are
    returned guarded by one `eqx.branched_error_if`. The checks: a token id lies
    outside `[0, vocab_size)`, a `PAD` precedes a non-`PAD` token in a sequence, or
    a type id disagrees with the layout (a non-special token must have the type its
    id implies; a special token any type in `[0, n_types)`).

    **Arguments:**

    - `layout`: the vocabulary layout.
    - `tokens`: token ids, shape `(..., length)`.
    - `type_ids`: optional type ids, same shape.
    - `where`: the caller's name, used in the error messages.

    **Returns:**

    `tokens`.

    **Raises:**

    `ValueError` for the conditions above with concrete ids; Equinox's
    `RuntimeError` (`EquinoxRuntimeError`) at run time inside `jit`; `TypeError`
    (from the annotations) for non-integer ids.
    """
    concrete = is_concrete(tokens, type_ids)
    xp: Any = np if concrete else jnp
    ids = np.asarray(tokens) if concrete else tokens
    outside = (ids < 0) | (ids >= layout.vocab_size)
    pad = ids == PAD
    pad_before_token = pad[..., :-1] & ~pad[..., 1:]
    if type_ids is None:
        wrong = xp.zeros(ids.shape, bool)
    else:
        types = np.asarray(type_ids) if concrete else type_ids
        implied = implied_types(layout, ids, xp)
        wrong = (
            xp.where(
                ids < N_SPECIAL,
                (types < SPECIAL_TYPE) | (types >= layout.n_types),
                types != implied,
            )
            & ~outside
        )
    expected = (
        ("tokens", f"token ids in [0, vocab_size) = [0, {layout.vocab_size})"),
        ("tokens", f"padded only at the end (no PAD = {PAD} before another token)"),
        (
            "type_ids",
            "the types the layout implies (a non-special token's type follows from "
            f"its id; specials need a type in [0, {layout.n_types}))",
        ),
    )
    given_types = ids if type_ids is None else type_ids
    checks = [
        (arg, text, mask, value)
        for (arg, text), mask, value in zip(
            expected, (outside, pad_before_token, wrong), (ids, ids, given_types)
        )
    ]
    return refuse_or_guard(where, tokens, checks, concrete=concrete)
