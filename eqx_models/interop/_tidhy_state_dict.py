"""TiDHy weights to and from the original PyTorch implementation's state dict."""

from collections import OrderedDict
from collections.abc import Mapping
from functools import reduce
from typing import Any

import equinox as eqx
import torch

from ..tidhy import TiDHy
from ._state_dict import as_leaf, check_state_dict, ordered


# (torch name, attribute path of the TiDHy leaf it holds). The original builds its
# decoder and hypernetwork as `nn.Sequential`s, so their names are positional:
# index 2 is the parameter-free ELU.
def _entries(model: TiDHy) -> list[tuple[str, str]]:
    # Torch lists a module's own parameters before its submodules'.
    entries = [("temporal", "temporal")]
    if model.dyn_bias:
        entries.append(("temporal_bias", "temporal_bias"))
    entries += [
        ("spatial_decoder.0.weight", "decoder.linear_in.weight"),
        ("spatial_decoder.0.bias", "decoder.linear_in.bias"),
    ]
    if model.nonlinear_decoder:
        entries += [
            ("spatial_decoder.1.weight", "decoder.norm.weight"),
            ("spatial_decoder.1.bias", "decoder.norm.bias"),
            ("spatial_decoder.3.weight", "decoder.linear_hidden.weight"),
            ("spatial_decoder.3.bias", "decoder.linear_hidden.bias"),
            ("spatial_decoder.4.weight", "decoder.linear_out.weight"),
            ("spatial_decoder.4.bias", "decoder.linear_out.bias"),
        ]
    entries += [
        ("hypernet.0.weight", "hypernet.linear_in.weight"),
        ("hypernet.0.bias", "hypernet.linear_in.bias"),
        ("hypernet.1.weight", "hypernet.norm.weight"),
        ("hypernet.1.bias", "hypernet.norm.bias"),
        ("hypernet.3.weight", "hypernet.linear_hidden.weight"),
        ("hypernet.3.bias", "hypernet.linear_hidden.bias"),
        ("hypernet.4.weight", "hypernet.linear_out.weight"),
    ]
    if not model.dyn_bias:
        entries.append(("hypernet.4.bias", "hypernet.linear_out.bias"))
    return entries


def _leaf(model: TiDHy, path: str) -> Any:
    return reduce(getattr, path.split("."), model)


def _torch_shape(name: str, leaf) -> tuple[int, ...]:
    # The original stores the bias of the gated dynamics as a (1, r_dim) row.
    if name == "temporal_bias":
        return (1,) + tuple(leaf.shape)
    return tuple(leaf.shape)


def tidhy_to_state_dict(model: TiDHy) -> "OrderedDict[str, torch.Tensor]":
    """Export a TiDHy model's weights under the original PyTorch implementation's
    parameter names.

    The names are those of the original's `state_dict()`: `spatial_decoder.<i>.*`
    (its decoder `nn.Sequential`: `0` the linear layer; with the nonlinear decoder
    also `1` the LayerNorm, `3` and `4` the two further linear layers), `temporal`
    (`(mix_dim, r_dim²)`, or `(mix_dim, r_dim, 2)` for the low-rank option),
    `temporal_bias` (`(1, r_dim)`, with `dyn_bias`) and `hypernet.<i>.*` (`0` linear,
    `1` LayerNorm, `3` and `4` linear; `4` has no bias with `dyn_bias`). Linear
    weights are `(out, in)` in both libraries, so values are copied unchanged.

    **Arguments:**

    - `model`: an [`eqx_models.tidhy.TiDHy`][].

    **Returns:**

    An `OrderedDict` of CPU tensors (copies, in the model's dtypes), ready for the
    original module's `load_state_dict`.

    **Raises:**

    `TypeError` if `model` is not a `TiDHy`.
    """
    if not isinstance(model, TiDHy):
        raise TypeError(
            f"tidhy_to_state_dict: `model` must be a TiDHy, got {type(model).__name__}."
        )
    values = []
    for name, path in _entries(model):
        leaf = _leaf(model, path)
        values.append((name, leaf.reshape(_torch_shape(name, leaf))))
    return ordered(values)


def tidhy_from_state_dict(state_dict: Mapping, model: TiDHy) -> TiDHy:
    """Load the original PyTorch TiDHy's weights into a TiDHy model.

    `model` supplies the configuration (sizes and options: build it with the
    original's `input_dim`, `r_dim`, `r2_dim`, `mix_dim`, `hyper_hid_dim`,
    `low_rank_temporal`, `dyn_bias`, `nonlinear_decoder`); its weights are replaced.
    An abstract model from `eqx.filter_eval_shape` serves as well (nothing is
    initialised).
    The names are listed in [`eqx_models.interop.torch.tidhy_to_state_dict`][]; a
    `_orig_mod.` prefix (a `torch.compile`d module) is removed first. Values keep
    their numbers and take the dtype of the leaf they replace.

    The original's optional `R2_Decoder` (`use_r2_decoder`) has no counterpart here:
    its entries are reported as unexpected.

    **Arguments:**

    - `state_dict`: a mapping from names to tensors (or arrays), e.g. the original
        module's `state_dict()`.
    - `model`: a `TiDHy` of the same configuration.

    **Returns:**

    A new `TiDHy` holding the state dict's weights.

    **Raises:**

    [`eqx_models.interop.torch.StateDictError`][] (a `ValueError`) listing every
    missing name, unexpected name and shape mismatch (with both shapes);
    `TypeError` for a `model` that is not a `TiDHy` or entries that are not arrays.
    """
    fn = "tidhy_from_state_dict"
    if not isinstance(model, TiDHy):
        raise TypeError(f"{fn}: `model` must be a TiDHy, got {type(model).__name__}.")
    entries = _entries(model)
    expected = {name: _torch_shape(name, _leaf(model, path)) for name, path in entries}
    arrays = check_state_dict(fn, state_dict, expected)
    leaves = []
    for name, path in entries:
        old = _leaf(model, path)
        leaves.append(as_leaf(arrays[name].reshape(old.shape), old))
    return eqx.tree_at(lambda m: [_leaf(m, path) for _, path in entries], model, leaves)
