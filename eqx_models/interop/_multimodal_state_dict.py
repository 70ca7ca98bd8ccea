"""CausalTransformerLM weights to and from the original PyTorch model's state dict."""

from collections import OrderedDict
from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import torch

from ..multimodal import CausalTransformerLM
from ._state_dict import as_leaf, check_state_dict, ordered


_COMPILED_PREFIX = "_orig_mod."

# Per-layer entries of the original's `nn.TransformerEncoderLayer`: (torch name,
# field of the stacked blocks, whether torch stores the transpose). Torch's linear
# layers hold `(out, in)` weights and compute `x @ W.T`; the blocks hold `(in, out)`
# weights. `self_attn.in_proj_weight` is nn.MultiheadAttention's fused projection:
# its rows are the query, key and value projections in that order, the same order
# as the columns of `qkv_weight`.
_LAYER = (
    ("self_attn.in_proj_weight", "qkv_weight", True),
    ("self_attn.in_proj_bias", "qkv_bias", False),
    ("self_attn.out_proj.weight", "out_weight", True),
    ("self_attn.out_proj.bias", "out_bias", False),
    ("linear1.weight", "fc_weight", True),
    ("linear1.bias", "fc_bias", False),
    ("linear2.weight", "proj_weight", True),
    ("linear2.bias", "proj_bias", False),
    ("norm1.weight", "ln1_weight", False),
    ("norm1.bias", "ln1_bias", False),
    ("norm2.weight", "ln2_weight", False),
    ("norm2.bias", "ln2_bias", False),
)
_TOP = (
    ("tok_emb.weight", "token_embedding"),
    ("type_emb.weight", "type_embedding"),
    ("pos_emb.weight", "position_embedding"),
    ("ln.weight", "final_norm_weight"),
    ("ln.bias", "final_norm_bias"),
    ("head.weight", "head_weight"),
)


def _check_model(fn: str, model) -> None:
    if not isinstance(model, CausalTransformerLM):
        raise TypeError(
            f"{fn}: `model` must be a CausalTransformerLM, got {type(model).__name__}."
        )


def _expected(model: CausalTransformerLM) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(getattr(model, field).shape) for name, field in _TOP}
    shapes["head.bias"] = tuple(model.head_bias.shape)
    for i in range(model.n_layers):
        for name, field, transposed in _LAYER:
            shape = tuple(getattr(model.blocks, field).shape[1:])
            shapes[f"enc.layers.{i}.{name}"] = shape[::-1] if transposed else shape
    return shapes


def multimodal_to_state_dict(
    model: CausalTransformerLM,
    *,
    include_head_bias: bool = False,
    compiled: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """Export a `CausalTransformerLM` under the original PyTorch model's names.

    The original sums `tok_emb`, `type_emb` and `pos_emb` embeddings, runs an
    `nn.TransformerEncoder` called `enc` (GELU, `batch_first`) with a causal mask,
    then a LayerNorm `ln` and a bias-free linear `head`. Per layer `i` the names are
    `enc.layers.<i>.self_attn.in_proj_weight` (the fused `(3 d, d)` query/key/value
    projection of `nn.MultiheadAttention`) and `in_proj_bias`,
    `self_attn.out_proj.{weight,bias}`, `linear1.*`, `linear2.*`, `norm1.*`,
    `norm2.*`. Torch's linear weights are the transposes of this model's.

    The original's blocks are post-LN (`norm_first=False`); a `pre_ln=True` model
    exports to the same names, for an encoder layer built with `norm_first=True`.

    **Arguments:**

    - `model`: the [`eqx_models.multimodal.CausalTransformerLM`][].
    - `include_head_bias`: also export `head.bias` (for a head built with
        `bias=True`). The original's head has no bias, so by default the model's
        head bias must be all zeros.
    - `compiled`: prefix every name with `_orig_mod.`, as in the state dict of a
        `torch.compile`d module.

    **Returns:**

    An `OrderedDict` of CPU tensors (copies, in the model's dtypes).

    **Raises:**

    `ValueError` if the head bias is non-zero and `include_head_bias=False`;
    `TypeError` for a model of another type.
    """
    fn = "multimodal_to_state_dict"
    _check_model(fn, model)
    if not include_head_bias and np.any(np.asarray(model.head_bias) != 0):
        raise ValueError(
            f"{fn}: the model's head bias is non-zero but the original's head has "
            "no bias; pass `include_head_bias=True` (and build the torch head with "
            "`bias=True`) to keep it."
        )
    values: list[tuple[str, object]] = [
        (name, getattr(model, field)) for name, field in _TOP
    ]
    if include_head_bias:
        values.append(("head.bias", model.head_bias))
    for i in range(model.n_layers):
        for name, field, transposed in _LAYER:
            leaf = getattr(model.blocks, field)[i]
            values.append((f"enc.layers.{i}.{name}", leaf.T if transposed else leaf))
    prefix = _COMPILED_PREFIX if compiled else ""
    return ordered([(prefix + name, value) for name, value in values])


def multimodal_from_state_dict(
    state_dict: Mapping, model: CausalTransformerLM
) -> CausalTransformerLM:
    """Load the original PyTorch model's weights into a `CausalTransformerLM`.

    `model` supplies the configuration: build it with the original's vocabulary
    layout (vocabulary size and number of types), `d_model`, `n_layers`,
    `n_heads`, `d_ff`, `max_len` and `pre_ln` matching the original's `norm_first`
    (the state dict cannot tell them apart). An abstract model from
    `eqx.filter_eval_shape` serves as well (nothing is initialised). Names are listed in
    [`eqx_models.interop.torch.multimodal_to_state_dict`][]. A `_orig_mod.` prefix
    (the state dict of a `torch.compile`d model) is removed first. `head.bias` is
    optional: without it the head bias is zero, as in the original. Values keep
    their numbers and take the dtype of the leaf they replace.

    **Arguments:**

    - `state_dict`: a mapping from names to tensors (or arrays).
    - `model`: a `CausalTransformerLM` of the same configuration.

    **Returns:**

    A new `CausalTransformerLM` with the state dict's weights.

    **Raises:**

    [`eqx_models.interop.torch.StateDictError`][] (a `ValueError`) listing every
    missing name, unexpected name and shape mismatch (with both shapes);
    `TypeError` for a model of another type or entries that are not arrays.
    """
    fn = "multimodal_from_state_dict"
    _check_model(fn, model)
    arrays = check_state_dict(fn, state_dict, _expected(model), optional=("head.bias",))
    fields = [field for _, field in _TOP] + ["head_bias"]
    leaves = [as_leaf(arrays[name], getattr(model, field)) for name, field in _TOP]
    head_bias = arrays.get("head.bias")
    leaves.append(
        jnp.zeros(model.head_bias.shape, model.head_bias.dtype)
        if head_bias is None
        else as_leaf(head_bias, model.head_bias)
    )
    block_fields = [field for _, field, _ in _LAYER]
    for name, field, transposed in _LAYER:
        per_layer = [arrays[f"enc.layers.{i}.{name}"] for i in range(model.n_layers)]
        stacked = np.stack([a.T if transposed else a for a in per_layer])
        leaves.append(as_leaf(stacked, getattr(model.blocks, field)))
    return eqx.tree_at(
        lambda m: (
            [getattr(m, f) for f in fields]
            + [getattr(m.blocks, f) for f in block_fields]
        ),
        model,
        leaves,
    )
