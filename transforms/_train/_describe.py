"""Comparable descriptions of the parts of a run (losses, optimisers, settings) for
checkpoint metadata and the resume check.

Why a module of its own: a trainer records its whole configuration with every
checkpoint and refuses to resume under another one. Settings objects describe
themselves easily, but losses and optimisers are often functions and closures; this
module turns any of them into JSON that compares equal exactly when what it can see
is equal, and that names each part so that a difference reads as a path
(`optimizer.update_fns[1].b1`).
"""

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._validation import describe, fail
from ._optimizer import optimizer_value


_MAX_DEPTH = 12


def _public_name(obj: Any) -> str:
    """`module.qualname` with the module cut at its first private part, so that
    moving code between private files does not change the description."""
    module = getattr(obj, "__module__", None) or "?"
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and part != "__main__":
            parts = parts[:i]
            break
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return ".".join([*parts, qualname])


def _array(x) -> Any:
    is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    if x.ndim == 0 and not is_key and np.dtype(x.dtype).kind in "biuf":
        value = np.asarray(x).item()
        return value if not isinstance(value, float) or math.isfinite(value) else str(x)
    return {"shape": list(x.shape), "dtype": str(x.dtype)}


def _describe(obj: Any, depth: int, seen: frozenset[int]) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return _array(obj)
    if isinstance(obj, np.dtype):
        return str(obj)
    if depth >= _MAX_DEPTH or id(obj) in seen:
        return {"__type__": _public_name(type(obj))}
    seen = seen | {id(obj)}
    recurse = lambda x: _describe(x, depth + 1, seen)
    value = optimizer_value(obj)
    if value is not None:
        return {
            "__optimizer__": _public_name(value.factory),
            **{k: recurse(v) for k, v in value.hyperparameters().items()},
        }
    if isinstance(obj, Mapping):
        return {str(k): recurse(v) for k, v in obj.items()}
    names = getattr(obj, "_fields", None)
    if isinstance(obj, tuple) and names is not None:  # a NamedTuple
        fields = {name: recurse(getattr(obj, name)) for name in names}
        return {"__type__": _public_name(type(obj)), **fields}
    if isinstance(obj, (list, tuple)):
        return [recurse(x) for x in obj]
    if isinstance(obj, functools.partial):
        return {
            "__partial__": recurse(obj.func),
            "args": [recurse(x) for x in obj.args],
            "keywords": {k: recurse(v) for k, v in obj.keywords.items()},
        }
    if isinstance(obj, type):
        return {"__class__": _public_name(obj)}
    if dataclasses.is_dataclass(obj):
        fields = {
            field.name: recurse(getattr(obj, field.name, None))
            for field in dataclasses.fields(obj)
        }
        # An Equinox bound method: the function and the module it is bound to.
        if "__self__" in fields and "__func__" in fields:
            return {
                "__method__": _public_name(getattr(obj, "__func__")),
                "__self__": fields["__self__"],
            }
        return {"__type__": _public_name(type(obj)), **fields}
    if hasattr(obj, "__code__") and hasattr(obj, "__closure__"):
        out: dict[str, Any] = {"__function__": _public_name(obj)}
        closure = obj.__closure__ or ()
        for name, cell in zip(obj.__code__.co_freevars, closure):
            try:
                out[name] = recurse(cell.cell_contents)
            except ValueError:  # an empty cell
                out[name] = None
        return out
    bound_self = getattr(obj, "__self__", None)
    bound_func = getattr(obj, "__func__", None)
    if bound_self is not None and bound_func is not None:
        return {"__method__": _public_name(bound_func), "__self__": recurse(bound_self)}
    if callable(obj) and hasattr(obj, "__qualname__"):  # a jitted or builtin function
        return {"__function__": _public_name(obj)}
    return {"__type__": _public_name(type(obj))}


def describe_config(obj: Any) -> Any:
    """A JSON description of a loss, an optimiser or a settings object, for
    checkpoint metadata and the resume check.

    Family trainers record their losses and optimisers with it, so that
    [`transforms.check_checkpoint_metadata`][] refuses to resume a run under a
    changed one and names what changed. The description is built from what can be
    seen without running anything:

    - numbers, strings, `None`, and arrays of one element by value; larger arrays
        by shape and dtype (not their contents);
    - mappings, lists, tuples and NamedTuples item by item;
    - dataclasses and Equinox modules as `{"__type__": name, field: ...}`;
    - an optimiser from [`transforms.hashable_optimizer`][] as
        `{"__optimizer__": factory name, hyperparameter: ...}`;
    - functions (optax's transformations included, which are closures) as
        `{"__function__": name, variable: ...}` over the variables they close over,
        and bound methods by their function and object;
    - anything else by its type's name.

    Names are `module.qualname`, the module cut at its first private part.

    **Limits:** what a function reads from global variables, from mutable objects
    at call time, or from the contents of large arrays is not described; neither is
    anything nested deeper than 12 levels. Two parts that differ only there compare
    equal, so a resume check cannot notice such a change. A function defined in
    another module or script (`__main__`) is a different name, so it reads as a
    change.

    **Arguments:**

    - `obj`: the object to describe.

    **Returns:**

    A JSON-serialisable value: `None`, a bool, int, float, string, list or dict
    with string keys.

    !!! example

        ```python
        describe_config(optax.adam(1e-3))
        # {"__function__": "optax.transforms.chain.<locals>.update_fn",
        #  "update_fns": [...]}
        ```
    """
    if isinstance(obj, optax.GradientTransformation) and optimizer_value(obj) is None:
        # `init` and `update` close over the same settings; the update shows them.
        return _describe(obj.update, 0, frozenset())
    return _describe(obj, 0, frozenset())


def static_fields(module: Any) -> dict[str, Any]:
    """The static fields of an Equinox module by name.

    Static fields (`eqx.field(static=True)`) are a module's hyperparameters: what a
    trainer records with its checkpoints and compares on resume, next to the
    arrays the checkpoint holds.

    **Arguments:**

    - `module`: an `eqx.Module` (any dataclass instance works).

    **Returns:**

    `{name: value}` for every static field, in declaration order.

    **Raises:**

    `TypeError` if `module` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(module) or isinstance(module, type):
        raise fail(
            "static_fields", "module", "an eqx.Module", describe(module), TypeError
        )
    return {
        field.name: getattr(module, field.name)
        for field in dataclasses.fields(module)
        if field.metadata.get("static", False)
    }
