"""The amortised parent-set model: a transformer over the samples and the variables.

`ParentSetPredictionModel` reads AVICI data and scores every canonical candidate set
of the target in one pass, invariant to the order of the rows and equivariant to the
order of the variables. This module holds the parameters and the forward pass only;
the loss, the optimiser and the task stream are in `_training.py`.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from transforms.validation import (
    check_bool,
    check_choice,
    check_size,
    fail,
    is_concrete,
    typechecked,
)

from .._attention import attention_implementation, dot_product_attention
from .._layer_ops import layer_norm
from ._candidates import candidate_parent_sets, checked_table
from ._data import Channel, check_shapes, check_values
from ._expert import relative_to_variables


def _normal(key, shape, fan_in, gain=1.0):
    return gain * jr.normal(key, shape) / math.sqrt(fan_in)


@jax.custom_jvp
def max_over_rows(x: Float[Array, "N ..."]) -> Float[Array, "..."]:
    """`jnp.max(x, axis=0)`, whose derivative is routed to the first maximising row.

    JAX differentiates `max` by comparing `x` with its maximum and dividing by the
    number of equal entries. When XLA fuses that comparison separately from the
    reduction and the two round differently, the count is 0 and the gradient NaN
    (seen on a CPU at LLVM optimisation level 0). An argmax picks a row whatever the
    rounding; the derivative is the same wherever the maximum is unique.
    """
    return jnp.max(x, axis=0)


@max_over_rows.defjvp
def _max_over_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    first = jnp.expand_dims(jnp.argmax(x, axis=0), 0)
    return jnp.max(x, axis=0), jnp.take_along_axis(dx, first, axis=0)[0]


class _Block(eqx.Module):
    """One pre-LN layer: attention over samples, MLP, attention over variables, MLP.

    Fields named `w_*` are matrices (weight-decayed); the others are vectors.
    """

    ln_gain: Float[Array, "4 width"]
    ln_bias: Float[Array, "4 width"]
    w_qkv: Float[Array, "2 width 3*width"]
    w_out: Float[Array, "2 width width"]
    b_out: Float[Array, "2 width"]
    w_up: Float[Array, "2 width hidden"]
    b_up: Float[Array, "2 hidden"]
    w_down: Float[Array, "2 hidden width"]
    b_down: Float[Array, "2 width"]
    n_heads: int = eqx.field(static=True)

    def __init__(self, width, hidden, n_heads, residual_gain, *, key):
        keys = jr.split(key, 4)
        self.ln_gain = jnp.ones((4, width))
        self.ln_bias = jnp.zeros((4, width))
        self.w_qkv = _normal(keys[0], (2, width, 3 * width), width)
        self.w_out = _normal(keys[1], (2, width, width), width, residual_gain)
        self.b_out = jnp.zeros((2, width))
        self.w_up = _normal(keys[2], (2, width, hidden), width)
        self.b_up = jnp.zeros((2, hidden))
        self.w_down = _normal(keys[3], (2, hidden, width), hidden, residual_gain)
        self.b_down = jnp.zeros((2, width))
        self.n_heads = n_heads

    def _attention(self, x, i, axis, mask, lengths, implementation):
        # Attention along `axis` (0: over samples, within each variable; 1: over
        # variables, within each row), heads batched, softmax in float32. The
        # sample axis may use cuDNN's fused kernel: its keys are the first
        # `lengths` rows (the caller puts the real rows first). The variable axis
        # is short (d ≤ 100) and masked anywhere: XLA's attention.
        h = layer_norm(x, self.ln_gain[2 * i], self.ln_bias[2 * i])
        n, d, width = x.shape
        head = width // self.n_heads
        qkv = (h @ self.w_qkv[i]).reshape(n, d, 3, self.n_heads, head)
        if axis == 0:
            # (variables, samples, heads, head): one sequence per variable.
            qkv = jnp.swapaxes(qkv, 0, 1)
            lengths = jnp.broadcast_to(lengths, (d,))
            out = dot_product_attention(
                *(qkv[:, :, j] for j in range(3)),
                lengths=lengths,
                implementation=implementation,
            )
            out = jnp.swapaxes(out, 0, 1)
        else:
            out = dot_product_attention(
                *(qkv[:, :, j] for j in range(3)),
                mask=mask[None, None, None, :],
                implementation="xla",
            )
        return x + out.reshape(n, d, width) @ self.w_out[i] + self.b_out[i]

    def _mlp(self, x, i):
        h = layer_norm(x, self.ln_gain[2 * i + 1], self.ln_bias[2 * i + 1])
        h = jax.nn.gelu(h @ self.w_up[i] + self.b_up[i])
        return x + h @ self.w_down[i] + self.b_down[i]

    def __call__(self, x, n_rows, variable_mask, implementation):
        # The scopes name the parts in a profile (both attentions call the same
        # functions; XLA keeps the names through `vmap`, `grad` and `scan`).
        with jax.named_scope("attention_over_samples"):
            x = self._attention(x, 0, 0, None, n_rows, implementation)
        with jax.named_scope("mlp_after_samples"):
            x = self._mlp(x, 0)
        with jax.named_scope("attention_over_variables"):
            x = self._attention(x, 1, 1, variable_mask, None, implementation)
        with jax.named_scope("mlp_after_variables"):
            return self._mlp(x, 1)


class _MLP(eqx.Module):
    w_in: Float[Array, "fan_in hidden"]
    b_in: Float[Array, " hidden"]
    w_out: Float[Array, "hidden fan_out"]
    b_out: Float[Array, " fan_out"]

    def __init__(self, fan_in, hidden, fan_out, *, key):
        k1, k2 = jr.split(key)
        self.w_in = _normal(k1, (fan_in, hidden), fan_in)
        self.b_in = jnp.zeros((hidden,))
        self.w_out = _normal(k2, (hidden, fan_out), hidden)
        self.b_out = jnp.zeros((fan_out,))

    def __call__(self, x):
        return jax.nn.gelu(x @ self.w_in + self.b_in) @ self.w_out + self.b_out


# The initialisers as one compiled program. Run eagerly, every random array of a new
# shape and every scaling compiles on its own: 65 small programs, and the default
# model took 13 s to build on a 2-core CPU (8 s as one program).
@eqx.filter_jit
def _initial_parameters(
    key, *, n_features, width, hidden, n_heads, n_layers, stats, max_parents
):
    keys = jr.split(key, 9)
    # Residual branches start small (GPT-2 style) so the deep stack starts near the
    # identity.
    residual_gain = 1.0 / math.sqrt(max(4 * n_layers, 1))
    make = lambda k: _Block(width, hidden, n_heads, residual_gain, key=k)
    # Keyed by field name: a positional tuple could swap two arrays of one shape
    # (the two statistics maps, the final gain and bias) without an error.
    return dict(
        w_embed=_normal(keys[0], (n_features, width), n_features),
        b_embed=jnp.zeros((width,)),
        blocks=eqx.filter_vmap(make)(jr.split(keys[1], max(n_layers, 1))),
        final_gain=jnp.ones((width,)),
        final_bias=jnp.zeros((width,)),
        w_stat_a=_normal(keys[7], (width, stats), width),
        w_stat_b=_normal(keys[8], (width, stats), width),
        member=_MLP(2 * width + stats, 2 * width, width, key=keys[2]),
        pair=_MLP(3 * width + stats, 2 * width, width, key=keys[3]),
        w_target=_normal(keys[4], (width, width), width),
        size_embedding=0.1 * jr.normal(keys[5], (max_parents + 1, width)),
        score=_MLP(width, 2 * width, 1, key=keys[6]),
    )


class ParentSetPredictionModel(eqx.Module):
    """An amortised posterior over the parent sets of a target variable.

    Reads AVICI data `[N, d, 3]` (see [`eqx_models.causal.Channel`][]) and returns
    one logit for **every** candidate parent set of the target of size `≤ K`, in the
    canonical order of [`eqx_models.causal.candidate_parent_sets`][] (the same index
    as the exact expert's posterior, so the two are compared entry by entry).

    Architecture:

    1. each value column is standardised over the (unmasked) rows, then every cell's
        three channels (value, intervened, target) are embedded by one linear map to
        `width` features, together (with `target_context=True`, the default) with
        the target's cell of the same row: its value, its intervention indicator
        and the product of the two values when the target was not intervened on.
        Every cell of a row thus sees the pairing with the target that the
        regression of the target on its parents is built from;
    2. `n_layers` pre-LayerNorm blocks, each: multi-head attention over the sample
        axis (within each variable), an MLP, attention over the variable axis
        (within each row), an MLP; no positional encodings, so the network is
        invariant to the order of the rows and equivariant to the order of the
        variables; the blocks are stacked and run with `lax.scan`;
    3. a final LayerNorm and a max-pool over the rows give one embedding `h_i` per
        variable; with `pair_statistics=True` (the default) the final row-level
        features also give pooled second-order statistics
        `c_ij = mean_r(A x_ri ⊙ B x_rj)` (symmetrised), a learned analogue of the
        correlations the expert's regressions are built from;
    4. each candidate set `S` gets `z_S = T h_t + e_{|S|} + Σ_{i∈S} u_i +
        Σ_{i<j∈S} v_ij` with `h_t` the target's embedding, `e_k` a learned size
        embedding, `u_i = MLP([h_i, h_t, c_it])` and `v_ij = MLP([c_ij, h_i ⊙ h_j,
        h_i + h_j, h_t])` (pair terms let the score see redundancy between members,
        e.g. a parent and its own child), and the logit `MLP(z_S)`. All sets are
        scored with static gathers: no loop over sets, no model-chosen top-k.

    The model computes in the dtype of its blocks' weights: a copy cast with
    [`transforms.cast_floating`][] runs in bfloat16 (the inputs are standardised
    in their own dtype first; softmaxes, LayerNorm statistics and the sums over
    the rows accumulate in float32; the logits are float32). On a GPU the
    attention over the samples then runs in cuDNN's fused kernel (`attention`).

    The output is invariant to permutations of the rows and equivariant to
    permutations of the non-target variables (permuting the variables permutes the
    candidate sets accordingly). Masks allow padding of rows and variables for
    batches of tasks of different `N` and `d`: masked rows are ignored and sets
    with a masked variable get logit `-inf`.

    !!! example

        ```python
        model = ParentSetPredictionModel(max_parents=3, key=jr.key(0))
        logits = model(task.data)  # one per candidate set
        log_probs = jax.nn.log_softmax(logits)
        ```
    """

    w_embed: Float[Array, "features width"]
    b_embed: Float[Array, " width"]
    blocks: _Block
    final_gain: Float[Array, " width"]
    final_bias: Float[Array, " width"]
    w_stat_a: Float[Array, "width stats"]
    w_stat_b: Float[Array, "width stats"]
    member: _MLP
    pair: _MLP
    w_target: Float[Array, "width width"]
    size_embedding: Float[Array, "sizes width"]
    score: _MLP
    max_parents: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    pair_features: bool = eqx.field(static=True)
    target_context: bool = eqx.field(static=True)
    pair_statistics: bool = eqx.field(static=True)
    attention: Literal["auto", "xla", "cudnn"] = eqx.field(static=True)

    def __init__(
        self,
        max_parents: int = 3,
        *,
        width: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        pair_features: bool = True,
        target_context: bool = True,
        pair_statistics: bool = True,
        attention: Literal["auto", "xla", "cudnn"] = "auto",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `max_parents`: `K`, the largest candidate set size.
        - `width`: the embedding width; a multiple of `n_heads`.
        - `n_layers`: the number of blocks (each with one attention over samples
            and one over variables).
        - `n_heads`: attention heads.
        - `mlp_ratio`: hidden width of the block MLPs, in multiples of `width`.
        - `pair_features`: include the pairwise terms `v_ij` in the set scores.
        - `target_context`: embed each cell together with the target's cell of the
            same row (its value, its intervention indicator, and the product of the
            cell's value with the target's when the target was not intervened on).
        - `pair_statistics`: give the member and pair terms second-order statistics
            pooled over the rows, `c_ij = mean_r(a(x_ri) ⊙ b(x_rj))` of two linear
            maps of the final row-level features (symmetrised).
        - `attention`: the implementation of the attention over the samples:
            `"auto"` (default: cuDNN's fused kernel on a GPU when the model runs
            in bfloat16 or float16, XLA's otherwise), `"xla"` or `"cudnn"`. The
            attention over the variables is XLA's.
        - `key`: a PRNG key for the initialisation.

        **Raises:**

        `TypeError` for a size that is not an integer or a flag that is not a bool;
        `ValueError` for a negative `max_parents` or `n_layers`, a non-positive
        `width`, `n_heads` or `mlp_ratio`, a `width` not divisible by `n_heads`, or
        another `attention`.
        """
        name = "ParentSetPredictionModel"
        check_size(name, "max_parents", max_parents, minimum=0)
        check_size(name, "width", width)
        check_size(name, "n_layers", n_layers, minimum=0)
        check_size(name, "n_heads", n_heads)
        check_size(name, "mlp_ratio", mlp_ratio)
        for arg, flag in (
            ("pair_features", pair_features),
            ("target_context", target_context),
            ("pair_statistics", pair_statistics),
        ):
            check_bool(name, arg, flag)
        check_choice(name, "attention", attention, ("auto", "xla", "cudnn"))
        if width % n_heads:
            raise fail(name, "width", f"a multiple of `n_heads`={n_heads}", f"{width}")
        self.max_parents = max_parents
        self.width = width
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.pair_features = pair_features
        self.target_context = target_context
        self.pair_statistics = pair_statistics
        self.attention = attention
        parameters = _initial_parameters(
            key,
            n_features=6 if target_context else 3,
            width=width,
            hidden=mlp_ratio * width,
            n_heads=n_heads,
            n_layers=n_layers,
            stats=width // 2 if pair_statistics else 0,
            max_parents=max_parents,
        )
        for name, value in parameters.items():
            setattr(self, name, value)

    def embed_variables(
        self,
        data: Float[Array, "N d 3"],
        target,
        sample_mask: Bool[Array, " N"],
        variable_mask: Bool[Array, " d"],
    ) -> tuple[Float[Array, "N d width"], Float[Array, "d width"]]:
        """The final row-level features and the pooled per-variable embeddings
        `h_i` (no input checks; the real rows must come first, see
        `real_rows_first`)."""
        rows = sample_mask[:, None]
        count = jnp.maximum(jnp.sum(sample_mask), 1)
        values = data[..., Channel.VALUE]
        mean = jnp.sum(jnp.where(rows, values, 0.0), axis=0) / count
        centred = jnp.where(rows, values - mean, 0.0)
        std = jnp.sqrt(jnp.sum(centred**2, axis=0) / count)
        scaled = centred / jnp.where(std > 0, std, 1.0)
        features = [scaled, data[..., Channel.INTERVENED], data[..., Channel.TARGET]]
        if self.target_context:
            is_target = jnp.arange(data.shape[1]) == target
            y = jnp.sum(jnp.where(is_target, scaled, 0.0), axis=1, keepdims=True)
            y_intervened = jnp.sum(
                jnp.where(is_target, data[..., Channel.INTERVENED], 0.0),
                axis=1,
                keepdims=True,
            )
            features += [
                jnp.broadcast_to(y, scaled.shape),
                jnp.broadcast_to(y_intervened, scaled.shape),
                scaled * y * (1.0 - y_intervened),
            ]
        dtype = self.blocks.w_qkv.dtype
        cells = jnp.stack(features, -1).astype(dtype)
        x = cells @ self.w_embed.astype(dtype) + self.b_embed.astype(dtype)
        params, static = eqx.partition(self.blocks, eqx.is_array)
        n_rows = jnp.sum(sample_mask, dtype=jnp.int32)
        head = self.width // self.n_heads
        implementation = attention_implementation(
            self.attention,
            dtype,
            head,
            data.shape[0],
            needs_even_length=False,
            fn="ParentSetPredictionModel",
        )

        def layer(x, block_params):
            block = eqx.combine(block_params, static)
            return block(x, n_rows, variable_mask, implementation), None

        if self.n_layers > 0:
            x, _ = jax.lax.scan(layer, x, params)
        x = layer_norm(x, self.final_gain, self.final_bias)
        return x, max_over_rows(jnp.where(rows[..., None], x, -jnp.inf))

    def score_sets(
        self,
        tokens: Float[Array, "N d width"],
        embeddings: Float[Array, "d width"],
        target,
        sample_mask: Bool[Array, " N"],
        variable_mask: Bool[Array, " d"],
    ) -> Float[Array, " C"]:
        """Logits of every canonical candidate set from the row-level features and
        the pooled embeddings."""
        d = embeddings.shape[0]
        table = candidate_parent_sets(d, self.max_parents)
        h_t = embeddings[target]
        count = jnp.maximum(jnp.sum(sample_mask), 1).astype(jnp.float32)
        rows = sample_mask[:, None, None]
        a = jnp.where(rows, tokens @ self.w_stat_a.astype(tokens.dtype), 0.0)
        b = tokens @ self.w_stat_b.astype(tokens.dtype)
        # Summed over the rows in float32 at least (bfloat16 compute).
        accumulate = jnp.promote_types(tokens.dtype, jnp.float32)
        stats = jnp.einsum("nip,njp->ijp", a, b, preferred_element_type=accumulate)
        stats = (stats / count).astype(tokens.dtype)
        stats = 0.5 * (stats + jnp.swapaxes(stats, 0, 1))
        both = jnp.concatenate(
            [embeddings, jnp.broadcast_to(h_t, embeddings.shape), stats[:, target]],
            axis=-1,
        )
        member = jax.vmap(self.member)(both)
        members = relative_to_variables(table.members, target)
        mask = jnp.asarray(table.mask)
        z = h_t @ self.w_target + self.size_embedding[table.sizes]
        z = z + jnp.sum(jnp.where(mask[..., None], member[members], 0.0), axis=1)
        if self.pair_features and table.pairs.shape[0] > 0:
            first = members[:, table.pairs[:, 0]]
            second = members[:, table.pairs[:, 1]]
            a, b = embeddings[:, None, :], embeddings[None, :, :]
            features = jnp.concatenate(
                [stats, a * b, a + b, jnp.broadcast_to(h_t, (d, d, self.width))],
                axis=-1,
            )
            pair = jax.vmap(jax.vmap(self.pair))(features)
            pair_mask = jnp.asarray(table.pair_mask)[..., None]
            z = z + jnp.sum(jnp.where(pair_mask, pair[first, second], 0.0), axis=1)
        logits = jax.vmap(self.score)(z)[:, 0]
        # A comparison instead of the gather `variable_mask[members]`: with a batch
        # sharded over a mesh, that gather of an unbatched mask by batched indices
        # has no unambiguous output sharding.
        member_valid = jnp.any(
            (members[..., None] == jnp.arange(d)) & variable_mask, axis=-1
        )
        set_valid = jnp.all(~mask | member_valid, axis=1)
        return jnp.where(set_valid, logits, -jnp.inf)

    @typechecked
    def __call__(
        self,
        data: Float[Array, "N d 3"],
        *,
        sample_mask: Bool[Array, " N"] | None = None,
        variable_mask: Bool[Array, " d"] | None = None,
    ) -> Float[Array, " C"]:
        """Logits over the canonical candidate parent sets of the target.

        **Arguments:**

        - `data`: AVICI data of shape `(N, d, 3)`; the target is the variable marked
            in the target channel.
        - `sample_mask`: optional `(N,)` boolean, the real rows (padding).
        - `variable_mask`: optional `(d,)` boolean, the real variables (padding).

        **Returns:**

        `(C,)` logits, `C = Σ_{k≤min(K, d-1)} C(d-1, k)`; `-inf` for sets with a
        masked variable. `jax.nn.log_softmax` turns them into log-probabilities.

        **Raises:**

        `ValueError` if `data` is not `(N, d, 3)`, a mask has the wrong shape, or
        `(d, K)` exceeds `MAX_CANDIDATE_SETS`; `ValueError` too for non-finite
        values, indicators that are not 0/1, or a target channel that does not mark
        exactly one variable, the same in every row: at once for concrete data,
        else (under `jit` or `vmap`) by `eqx.error_if` at run time. `ValueError`
        for `attention="cudnn"` off a GPU or with weights not in bfloat16 or
        float16 (cuDNN's fused kernel cannot run there).
        """
        name = "ParentSetPredictionModel"
        sample_mask, variable_mask = check_shapes(
            name, data, sample_mask, variable_mask
        )
        checked_table(name, data.shape[1], self.max_parents)
        if is_concrete(data, sample_mask, variable_mask):
            # Concrete data: a bad value is a plain `ValueError` here, not a
            # run-time error from the compiled forward pass.
            check_values(name, data, sample_mask, variable_mask)
        return _forward(self, data, sample_mask, variable_mask)


# Compiled as one program even when the model is called eagerly; inlined under an
# outer `jit`.
@eqx.filter_jit
def _forward(model, data, sample_mask, variable_mask):
    # The scopes name the parts in a profile (see `_Block.__call__`).
    with jax.named_scope("input_checks"):
        data, target = check_values(
            "ParentSetPredictionModel", data, sample_mask, variable_mask
        )
        data, sample_mask = real_rows_first(data, sample_mask)
    with jax.named_scope("encoder"):
        tokens, embeddings = model.embed_variables(
            data, target, sample_mask, variable_mask
        )
    with jax.named_scope("set_scores"):
        logits = model.score_sets(
            tokens, embeddings, target, sample_mask, variable_mask
        )
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def real_rows_first(
    data: Float[Array, "N d 3"], sample_mask: Bool[Array, " N"]
) -> tuple[Float[Array, "N d 3"], Bool[Array, " N"]]:
    """The rows of `data` reordered so that the real ones (in their order) come
    before the padding, and the mask to match.

    The model is invariant to the order of the rows; with the real rows first, the
    attention over the samples masks its keys by a length, which cuDNN's fused
    kernel takes without a bias tensor of the scores' size.
    """
    order = jnp.argsort(~sample_mask, stable=True)
    return data[order], sample_mask[order]
