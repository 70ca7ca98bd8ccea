"""Checking and converting PyTorch state dicts (shared by the model adapters)."""

from collections import OrderedDict
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import torch


_COMPILED_PREFIX = "_orig_mod."


class StateDictError(ValueError):
    """A state dict does not match the model: missing, unexpected or misshapen
    entries. The message lists every problem; the attributes hold them too.

    **Attributes:**

    - `missing`: names the model needs that the state dict lacks, sorted.
    - `unexpected`: names in the state dict the model has no place for, sorted.
    - `mismatched`: `{name: (expected_shape, got_shape)}`.
    """

    def __init__(
        self,
        fn: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ):
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        lines = [f"{fn}: the state dict does not match the model."]
        if missing:
            lines.append(f"  missing names: {missing}")
        if unexpected:
            lines.append(f"  unexpected names: {unexpected}")
        for name, (expected, got) in mismatched.items():
            lines.append(
                f"  shape mismatch for {name!r}: the model needs {expected}, the "
                f"state dict has {got}"
            )
        super().__init__("\n".join(lines))


def strip_compiled_prefix(state_dict: Mapping) -> dict:
    """Drop `torch.compile`'s `_orig_mod.` prefix when every name carries it."""
    names = list(state_dict)
    if names and all(n.startswith(_COMPILED_PREFIX) for n in names):
        return {n[len(_COMPILED_PREFIX) :]: v for n, v in state_dict.items()}
    return dict(state_dict)


def to_numpy(fn: str, name: str, value) -> np.ndarray:
    """A state-dict entry (tensor or array) as a NumPy array of the same values."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            return value.view(torch.uint16).numpy().view(jnp.bfloat16)
        return value.numpy()
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value)
    raise TypeError(
        f"{fn}: entry {name!r} must be a torch tensor or an array, got "
        f"{type(value).__name__}."
    )


def check_state_dict(
    fn: str,
    state_dict: Mapping,
    expected: Mapping[str, tuple[int, ...]],
    optional: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Entries of `state_dict` as arrays, after checking names and shapes.

    `expected` maps every required name to its shape; names in `optional` may be
    absent (their expected shapes are in `expected` too). Raises a
    [`eqx_models.interop.torch.StateDictError`][] listing every problem at once.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{fn}: `state_dict` must be a mapping from names to tensors, got "
            f"{type(state_dict).__name__}."
        )
    entries = strip_compiled_prefix(state_dict)
    missing = sorted(n for n in expected if n not in entries and n not in optional)
    unexpected = sorted(n for n in entries if n not in expected)
    arrays, mismatched = {}, {}
    for name, value in entries.items():
        if name not in expected:
            continue
        array = to_numpy(fn, name, value)
        if tuple(array.shape) != tuple(expected[name]):
            mismatched[name] = (tuple(expected[name]), tuple(array.shape))
        arrays[name] = array
    if missing or unexpected or mismatched:
        raise StateDictError(fn, missing, unexpected, mismatched)
    return arrays


def as_leaf(array: np.ndarray, like) -> jnp.ndarray:
    """`array` as a JAX array with the dtype of the model leaf it replaces."""
    return jnp.asarray(array, dtype=like.dtype)


def to_tensor(array) -> torch.Tensor:
    """A JAX/NumPy array as a contiguous CPU torch tensor that owns its memory."""
    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def ordered(entries: list[tuple[str, object]]) -> "OrderedDict[str, torch.Tensor]":
    """An `OrderedDict` of tensors (what `nn.Module.state_dict` returns)."""
    return OrderedDict((name, to_tensor(value)) for name, value in entries)
