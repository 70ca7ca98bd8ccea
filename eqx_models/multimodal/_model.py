import math
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from beartype import beartype
from jaxtyping import Array, Float, Int, jaxtyped, PRNGKeyArray

from ._vocab import N_SPECIAL, PAD, SPECIAL_TYPE, VocabLayout


_LN_EPS = 1e-5


class _Block(eqx.Module):
    # Weights are stored (in, out) so that activations multiply from the left.
    ln1_weight: Float[Array, " d_model"]
    ln1_bias: Float[Array, " d_model"]
    qkv_weight: Float[Array, "d_model qkv"]
    qkv_bias: Float[Array, " qkv"]
    out_weight: Float[Array, "d_model d_model"]
    out_bias: Float[Array, " d_model"]
    ln2_weight: Float[Array, " d_model"]
    ln2_bias: Float[Array, " d_model"]
    fc_weight: Float[Array, "d_model d_ff"]
    fc_bias: Float[Array, " d_ff"]
    proj_weight: Float[Array, "d_ff d_model"]
    proj_bias: Float[Array, " d_model"]


def _uniform(key, shape, bound):
    return jr.uniform(key, shape, minval=-bound, maxval=bound)


def _make_block(d_model: int, d_ff: int, n_layers: int, init: str, key) -> _Block:
    k = jr.split(key, 8)
    if init == "torch":
        # torch defaults: MultiheadAttention's in-projection is Xavier-uniform with
        # zero bias and its out-projection zero-biased; Linear layers are
        # U(+-1/sqrt(fan_in)) for weight and bias.
        qkv = _uniform(k[0], (d_model, 3 * d_model), math.sqrt(6 / (4 * d_model)))
        qkv_b = jnp.zeros(3 * d_model)
        out = _uniform(k[1], (d_model, d_model), 1 / math.sqrt(d_model))
        out_b = jnp.zeros(d_model)
        fc = _uniform(k[2], (d_model, d_ff), 1 / math.sqrt(d_model))
        fc_b = _uniform(k[3], (d_ff,), 1 / math.sqrt(d_model))
        proj = _uniform(k[4], (d_ff, d_model), 1 / math.sqrt(d_ff))
        proj_b = _uniform(k[5], (d_model,), 1 / math.sqrt(d_ff))
    else:
        # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers).
        residual = 0.02 / math.sqrt(2 * n_layers)
        qkv = 0.02 * jr.normal(k[0], (d_model, 3 * d_model))
        qkv_b = jnp.zeros(3 * d_model)
        out = residual * jr.normal(k[1], (d_model, d_model))
        out_b = jnp.zeros(d_model)
        fc = 0.02 * jr.normal(k[2], (d_model, d_ff))
        fc_b = jnp.zeros(d_ff)
        proj = residual * jr.normal(k[4], (d_ff, d_model))
        proj_b = jnp.zeros(d_model)
    ones, zeros = jnp.ones(d_model), jnp.zeros(d_model)
    return _Block(
        ln1_weight=ones,
        ln1_bias=zeros,
        qkv_weight=qkv,
        qkv_bias=qkv_b,
        out_weight=out,
        out_bias=out_b,
        ln2_weight=ones,
        ln2_bias=zeros,
        fc_weight=fc,
        fc_bias=fc_b,
        proj_weight=proj,
        proj_bias=proj_b,
    )


def _layer_norm(x, weight, bias):
    # Statistics in float32 even for bfloat16 activations.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + _LN_EPS)
    return (y * weight.astype(y.dtype) + bias.astype(y.dtype)).astype(x.dtype)


def _dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jr.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _attention_implementation(
    choice: str, dtype, head_dim: int
) -> Literal["xla", "cudnn"]:
    if choice in ("xla", "cudnn"):
        return choice
    # cuDNN's fused flash attention: GPU, half precision, head dims it supports.
    if (
        jax.default_backend() == "gpu"
        and dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
    ):
        return "cudnn"
    return "xla"


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
    - The compute dtype is the dtype of the weights: cast the model (e.g. with
        `jax.tree.map`) to run in bfloat16; LayerNorm statistics stay float32.

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
    - `unroll`: how many layers `lax.scan` unrolls per iteration (`n_layers`
        unrolls fully: longer compilation, sometimes faster on a GPU).
    - `remat`: recompute each block's activations in the backward pass
        (`jax.checkpoint`), trading compute for memory.
    - `key`: PRNG key for the initialisation.

    **Raises:**

    `ValueError` for inconsistent sizes or unknown options.
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
    unroll: int = eqx.field(static=True)
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
        unroll: int = 1,
        remat: bool = False,
        key: PRNGKeyArray,
    ):
        if d_model < 1 or n_layers < 1 or n_heads < 1 or max_len < 1:
            raise ValueError(
                "CausalTransformerLM: `d_model`, `n_layers`, `n_heads` and `max_len` "
                f"must be positive, got {d_model}, {n_layers}, {n_heads}, {max_len}."
            )
        if d_model % n_heads:
            raise ValueError(
                f"CausalTransformerLM: `n_heads`={n_heads} must divide "
                f"`d_model`={d_model}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"CausalTransformerLM: `dropout` must be in [0, 1), got {dropout}."
            )
        if init not in ("torch", "gpt"):
            raise ValueError(
                f"CausalTransformerLM: `init` must be 'torch' or 'gpt', got {init!r}."
            )
        if attention not in ("auto", "xla", "cudnn"):
            raise ValueError(
                "CausalTransformerLM: `attention` must be 'auto', 'xla' or 'cudnn', "
                f"got {attention!r}."
            )
        if not 1 <= unroll <= n_layers:
            raise ValueError(
                f"CausalTransformerLM: `unroll` must be in [1, n_layers={n_layers}], "
                f"got {unroll}."
            )
        d_ff = 4 * d_model if d_ff is None else d_ff
        vocab = layout.vocab_size
        k_tok, k_type, k_pos, k_blocks, k_head, k_head_b = jr.split(key, 6)
        block_keys = jr.split(k_blocks, n_layers)
        self.blocks = eqx.filter_vmap(
            lambda k: _make_block(d_model, d_ff, n_layers, init, k)
        )(block_keys)
        if init == "torch":
            self.token_embedding = jr.normal(k_tok, (vocab, d_model))
            self.type_embedding = jr.normal(k_type, (layout.n_types, d_model))
            self.position_embedding = jr.normal(k_pos, (max_len, d_model))
            bound = 1 / math.sqrt(d_model)
            self.head_weight = _uniform(k_head, (vocab, d_model), bound)
            self.head_bias = _uniform(k_head_b, (vocab,), bound)
        else:
            self.token_embedding = 0.02 * jr.normal(k_tok, (vocab, d_model))
            self.type_embedding = 0.02 * jr.normal(k_type, (layout.n_types, d_model))
            self.position_embedding = 0.02 * jr.normal(k_pos, (max_len, d_model))
            self.head_weight = 0.02 * jr.normal(k_head, (vocab, d_model))
            self.head_bias = jnp.zeros(vocab)
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
        self.unroll = unroll
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
            "vocabulary": self.layout.to_dict(),
        }

    def _check_inputs(self, tokens, type_ids, where: str):
        if tokens.shape[-1] > self.max_len:
            raise ValueError(
                f"CausalTransformerLM.{where}: `tokens` has length {tokens.shape[-1]}, "
                f"longer than the position table (`max_len`={self.max_len})."
            )
        if tokens.shape[-1] < 1:
            raise ValueError(f"CausalTransformerLM.{where}: `tokens` is empty.")
        if type_ids is not None and type_ids.shape != tokens.shape:
            raise ValueError(
                f"CausalTransformerLM.{where}: `type_ids` must have the shape of "
                f"`tokens` {tokens.shape}, got {type_ids.shape}."
            )
        return check_tokens(self.layout, tokens, type_ids, where=where)

    @jaxtyped(typechecker=beartype)
    def features_batch(
        self,
        tokens: Int[Array, "batch length"],
        *,
        type_ids: Int[Array, "batch length"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch length d_model"]:
        """Final hidden states (after the last LayerNorm) of a batch of sequences.

        **Arguments:**

        - `tokens`: token ids, shape `(batch, length)`, `PAD` only as a suffix.
        - `type_ids`: type ids, same shape; default: derived from the token ids by
            the layout. Given ids must agree with the layout on non-special tokens.
        - `key`: PRNG key for dropout; `None` for a deterministic pass.

        **Returns:**

        Hidden states of shape `(batch, length, d_model)` in the weights' dtype.

        **Raises:**

        `ValueError` if the sequence is longer than `max_len` or shapes disagree; at
        run time (`eqx.error_if`) for token ids outside the vocabulary, type ids
        inconsistent with the layout, or `PAD` before a non-`PAD` token.
        """
        tokens = self._check_inputs(tokens, type_ids, "features_batch")
        if type_ids is None:
            type_ids = self.layout.type_ids(tokens)
        batch, length = tokens.shape
        dtype = self.token_embedding.dtype
        x = (
            self.token_embedding[tokens]
            + self.type_embedding[type_ids]
            + self.position_embedding[:length]
        )
        lengths = jnp.sum(tokens != PAD, axis=-1, dtype=jnp.int32)
        if key is None or self.dropout == 0.0:
            embed_key, layer_keys = None, None
        else:
            embed_key, k = jr.split(key)
            layer_keys = jr.split(k, self.n_layers)
        x = _dropout(x, self.dropout, embed_key)
        head_dim = self.d_model // self.n_heads
        implementation = _attention_implementation(self.attention, dtype, head_dim)

        def block(x, inputs):
            p, k = inputs
            k_attn, k_mlp = (None, None) if k is None else jr.split(k)

            def attention(h):
                qkv = h @ p.qkv_weight + p.qkv_bias
                q, kk, v = jnp.split(qkv, 3, axis=-1)
                shape = (batch, length, self.n_heads, head_dim)
                o = jax.nn.dot_product_attention(
                    q.reshape(shape),
                    kk.reshape(shape),
                    v.reshape(shape),
                    is_causal=True,
                    key_value_seq_lengths=lengths,
                    implementation=implementation,
                )
                o = o.reshape(batch, length, self.d_model) @ p.out_weight + p.out_bias
                return _dropout(o, self.dropout, k_attn)

            def mlp(h):
                h = jax.nn.gelu(h @ p.fc_weight + p.fc_bias, approximate=False)
                return _dropout(h @ p.proj_weight + p.proj_bias, self.dropout, k_mlp)

            if self.pre_ln:
                x = x + attention(_layer_norm(x, p.ln1_weight, p.ln1_bias))
                x = x + mlp(_layer_norm(x, p.ln2_weight, p.ln2_bias))
            else:
                x = _layer_norm(x + attention(x), p.ln1_weight, p.ln1_bias)
                x = _layer_norm(x + mlp(x), p.ln2_weight, p.ln2_bias)
            return x, None

        if self.remat:
            block = jax.checkpoint(block)
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def scanned(x, inputs):
            p, k = inputs
            return block(x, (eqx.combine(p, static), k))

        x, _ = jax.lax.scan(scanned, x, (params, layer_keys), unroll=self.unroll)
        return _layer_norm(x, self.final_norm_weight, self.final_norm_bias)

    @jaxtyped(typechecker=beartype)
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

    @jaxtyped(typechecker=beartype)
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


def check_tokens(
    layout: VocabLayout,
    tokens: Int[Array, "*batch length"],
    type_ids: Int[Array, "*batch length"] | None = None,
    *,
    where: str = "check_tokens",
) -> Int[Array, "*batch length"]:
    """Check token ids (and type ids) against the layout at run time.

    Returns `tokens` unchanged, wrapped in one `eqx.branched_error_if` that raises
    (inside `jit` too) if a token id lies outside `[0, vocab_size)`, if a `PAD`
    precedes a non-`PAD` token in a sequence, or if a type id disagrees with the
    layout (a non-special token must have the type its id implies; a special token
    any type in `[0, n_types)`).

    **Arguments:**

    - `layout`: the vocabulary layout.
    - `tokens`: token ids, shape `(..., length)`.
    - `type_ids`: optional type ids, same shape.
    - `where`: the caller's name, used in the error messages.

    **Returns:**

    `tokens`.
    """
    outside = jnp.any((tokens < 0) | (tokens >= layout.vocab_size))
    pad = tokens == PAD
    pad_before_token = jnp.any(pad[..., :-1] & ~pad[..., 1:])
    if type_ids is None:
        bad_types = jnp.zeros((), bool)
    else:
        implied = layout.type_ids(tokens)
        special = tokens < N_SPECIAL
        wrong = jnp.where(
            special,
            (type_ids < SPECIAL_TYPE) | (type_ids >= layout.n_types),
            type_ids != implied,
        )
        bad_types = jnp.any(wrong & ~outside)
    preds = jnp.stack([outside, pad_before_token, bad_types])
    messages = (
        f"{where}: `tokens` holds ids outside [0, vocab_size={layout.vocab_size}).",
        f"{where}: `tokens` has PAD ({PAD}) before a non-PAD token; pad only at "
        "the end.",
        f"{where}: `type_ids` disagree with the vocabulary layout (a non-special "
        "token's type must be the one its id implies; specials need a type in "
        f"[0, {layout.n_types})).",
    )
    return eqx.branched_error_if(tokens, jnp.any(preds), jnp.argmax(preds), messages)
