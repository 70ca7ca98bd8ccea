"""The common ground of the per-example transforms, and `per_sample_grads` itself.

`setup` checks a loss, a model and a batch once and flattens the model, so that the
norms, the dot products and the attribution step see one structure and raise the
same errors; `report_fallback` warns or raises about leaves off the ghost path.
`per_sample_grads` (`vmap` of `grad`) is the reference the other methods are tested
against.
"""

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._validation import check_callable, describe, fail, typechecked
from . import _ghost_eval
from ._ghost_plan import analyse, Analysis, GhostPlan, Mode
from ._ghost_rules import acc_dtype


class GhostFallbackWarning(UserWarning):
    """Warned when `method="ghost"` computes some parameters by another exact path.

    The message names each such parameter and the use the layer rules do not cover;
    [`transforms.GhostPlan`][] gives the same information as data. Pass
    `fallback=False` to make it an error instead.
    """


# How `loss_fn` is called, appended to every message about the batch or the loss.
_ONE_EXAMPLE = (
    " `loss_fn(model, *example)` is called on ONE example at a time: the arrays of "
    "the batch without their leading axis (the transform vmaps over the batch)."
)


def as_batch(name: str, arg: str, batch: Any, *, to_device: bool = True) -> tuple:
    """The arrays of a batch, checked: a non-empty tuple (or list) of arrays sharing
    a non-empty leading axis.

    The public methods annotate their batches as `Any`, so that a dict or a single
    array reaches this message rather than the annotation's. With
    `to_device=False`, arrays that have a shape (NumPy arrays, memory-mapped ones
    included) are returned as they are, not copied to the device: a whole dataset
    is then read batch by batch.
    """
    expected = "a tuple of arrays with a leading batch axis, one per argument of "
    expected += "`loss_fn` after the model"
    if not isinstance(batch, (tuple, list)):
        error = fail(name, arg, expected, describe(batch), TypeError)
        raise TypeError(str(error) + _ONE_EXAMPLE)
    if len(batch) == 0:
        raise fail(name, arg, expected, "an empty tuple")
    arrays = []
    for n, x in enumerate(batch):
        if not eqx.is_array_like(x) or isinstance(x, (bool, int, float, complex)):
            raise fail(
                name,
                f"{arg}[{n}]",
                "an array with a leading batch axis",
                describe(x),
                TypeError,
            )
        if to_device or not hasattr(x, "shape"):
            x = jnp.asarray(x)
        if x.ndim == 0:
            raise fail(
                name, f"{arg}[{n}]", "an array with a leading batch axis", describe(x)
            )
        arrays.append(x)
    sizes = [x.shape[0] for x in arrays]
    if len(set(sizes)) > 1:
        raise fail(
            name, arg, "arrays sharing their leading (batch) axis", f"sizes {sizes}"
        )
    if sizes[0] == 0:
        raise fail(name, arg, "a non-empty batch", "batch size 0")
    return tuple(arrays)


@dataclasses.dataclass
class Setup:
    """A loss function, a model and a batch, checked and flattened."""

    name: str
    leaves: list
    treedef: Any
    paths: list[str]
    per_example: Callable
    batch: tuple
    acc: Any
    # The transform's `unroll_layers`: True, False or "auto" (resolved by
    # `_resolve_unroll_layers` when the loss is analysed).
    unroll_layers: bool | str = "auto"

    @property
    def size(self) -> int:
        return self.batch[0].shape[0]

    def example(self) -> tuple:
        """Shapes and dtypes of one example (no slicing: the batch may be sharded)."""
        return tuple(jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in self.batch)

    def unflatten(self, leaves: list) -> PyTree:
        return jax.tree.unflatten(self.treedef, leaves)

    def losses(self, leaves, batch) -> jax.Array:
        return jax.vmap(self.per_example, in_axes=(None,) + (0,) * len(batch))(
            leaves, *batch
        )

    def per_example_grads(self, leaves, batch) -> list:
        grad = jax.grad(self.per_example)
        return jax.vmap(grad, in_axes=(None,) + (0,) * len(batch))(leaves, *batch)

    def reduced_grad(self, leaves, batch, reduction: str) -> list:
        def reduced(leaves):
            losses = self.losses(leaves, batch)
            return jnp.mean(losses) if reduction == "mean" else jnp.sum(losses)

        return jax.grad(reduced)(leaves)

    def analyse(self, mode: Mode) -> Analysis:
        return analyse(
            self.per_example,
            self.leaves,
            self.example(),
            mode=mode,
            paths=self.paths,
            unroll_layers=_resolve_unroll_layers(self.unroll_layers),
        )

    def with_stack_unrolled(self, analysis: Analysis) -> "Setup":
        """This setup, its loss evaluated from `analysis` with a scanned stack of
        layers unrolled where the ghost passes unroll it, so that a step's plain
        gradients cost what its ghost pass's do; itself elsewhere."""
        if not _ghost_eval.unrolls_a_stack(analysis):
            return self
        return dataclasses.replace(
            self, per_example=_ghost_eval.plain_loss(analysis, self.acc)
        )

    def check_val(self, arg: str, val) -> tuple:
        val = as_batch(self.name, arg, val)
        if len(val) != len(self.batch) or any(
            v.shape[1:] != t.shape[1:] or v.dtype != t.dtype
            for v, t in zip(val, self.batch)
        ):
            got = [(v.shape[1:], str(v.dtype)) for v in val]
            want = [(t.shape[1:], str(t.dtype)) for t in self.batch]
            raise ValueError(
                f"{self.name}: the examples of `{arg}` must have the structure of the "
                f"training examples (per-example shapes and dtypes {want}), got {got}."
            )
        return val


# The values of the ghost transforms' `unroll_layers`.
UNROLL_LAYERS = ("auto", True, False)


def _resolve_unroll_layers(unroll_layers: bool | str) -> bool:
    """Whether the ghost passes unroll a loss's scanned stack of layers.

    `"auto"` unrolls on a GPU or TPU, as the multimodal LM's `unroll="auto"` does:
    there the unrolled passes run faster in less memory (`benchmarks/layer_stack.py`
    measures both). A CPU keeps the loss's own setting: unrolled, a deep stack
    compiles several times slower there and does not run faster.
    """
    if unroll_layers == "auto":
        return jax.default_backend() != "cpu"
    return bool(unroll_layers)


def setup(
    name: str,
    loss_fn: Callable,
    model: Any,
    batch: Any,
    arg="batch",
    *,
    unroll_layers: bool | str = "auto",
) -> Setup:
    """Check the inputs of a per-example transform and flatten the model;
    `unroll_layers` is the transform's (checked by its builder)."""
    check_callable(name, "loss_fn", loss_fn)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError(
            f"{name}: `model` has no inexact (floating-point) arrays to differentiate."
        )
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    batch = as_batch(name, arg, batch)

    def per_example(leaves, *example):
        model = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
        return loss_fn(model, *example)

    example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in batch]
    shapes = ", ".join(f"{x.dtype}{list(x.shape)}" for x in example)
    try:
        out = jax.eval_shape(per_example, leaves, *example)
    except Exception as error:
        # A loss written for a batch (as for Opacus or a plain training step) fails
        # deep inside the model; say how it is called before the model's error.
        first_line = (str(error).strip().splitlines() or [""])[0].rstrip(".")
        raise ValueError(
            f"{name}: `loss_fn` failed on ONE example (arrays {shapes}) with "
            f"{type(error).__name__}: {first_line}.{_ONE_EXAMPLE} Write it for a "
            "single unbatched example."
        ) from error
    if (
        not isinstance(out, jax.ShapeDtypeStruct)
        or out.shape != ()
        or not jnp.issubdtype(out.dtype, jnp.inexact)
    ):
        got = (
            f"shape {out.shape} and dtype {out.dtype}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else describe(out)
        )
        error = fail(
            name,
            "loss_fn",
            "a function returning a floating-point scalar for one example",
            f"{got} from one example's arrays ({shapes})",
        )
        raise ValueError(str(error) + _ONE_EXAMPLE)
    acc = acc_dtype(*[jnp.result_type(x) for x in leaves])
    return Setup(
        name=name,
        leaves=leaves,
        treedef=treedef,
        paths=paths,
        per_example=per_example,
        batch=batch,
        acc=acc,
        unroll_layers=unroll_layers,
    )


def report_fallback(name: str, plan: GhostPlan, method: str, fallback: bool) -> None:
    """Warn (a ghost method named by the caller, not `"auto"`) or raise
    (`fallback=False`) about fallback leaves."""
    leaves = [leaf for leaf in plan.leaves if leaf.treatment == "fallback"]
    if not leaves:
        return
    detail = "; ".join(f"{leaf.path} {leaf.shape}: {leaf.reason}" for leaf in leaves)
    if not fallback:
        raise ValueError(
            f"{name}: method={method!r} cannot handle these parameters with its layer "
            f"rules and `fallback=False`: {detail}."
        )
    if method != "auto":
        warnings.warn(
            f"{name}: the ghost layer rules do not cover these parameters, computed "
            f"exactly by the fallback path instead: {detail}.",
            GhostFallbackWarning,
            stacklevel=3,
        )


def sum_squares(g: jax.Array, acc) -> jax.Array:
    """Per-example `Σ g²` over all but the leading axis, accumulated in `acc`."""
    g = g.astype(acc)
    return jnp.sum(g * g, axis=tuple(range(1, g.ndim)))


def per_example_dot(g: jax.Array, v: jax.Array, acc) -> jax.Array:
    """Per-example `<g_i, v>` for `g` with a leading batch axis."""
    axes = tuple(range(1, g.ndim))
    return jnp.tensordot(
        g.astype(acc), v.astype(acc), axes=(axes, tuple(range(v.ndim)))
    )


class PerSampleGrads(eqx.Module):
    """Per-example gradients; build it with [`transforms.per_sample_grads`][]."""

    loss_fn: Callable

    @typechecked
    def __call__(self, model: Any, batch: Any) -> PyTree:
        """Gradients of `loss_fn(model, *example)` for every example of `batch`.

        **Arguments:**

        - `model`: any pytree; its inexact arrays are differentiated.
        - `batch`: a tuple of arrays sharing a leading batch axis of size `B`; example
            `i` is `tuple(x[i] for x in batch)`.

        **Returns:**

        A pytree with the structure of `eqx.filter(model, eqx.is_inexact_array)` whose
        leaves have a leading axis of size `B`: leaf `[i]` is the gradient of example
        `i`'s loss.

        **Raises:**

        `ValueError`/`TypeError` for a model without inexact arrays, a loss that is
        not a scalar for one example, or an empty or ragged batch.
        """
        s = setup("per_sample_grads", self.loss_fn, model, batch)
        return s.unflatten(s.per_example_grads(s.leaves, s.batch))


@typechecked
def per_sample_grads(loss_fn: Callable) -> PerSampleGrads:
    """Per-example gradients by `vmap` of `grad`: the reference for the other methods.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, *example) -> scalar`, the loss of ONE example, e.g.
        `loss_fn(model, x_i, y_i)`.

    **Returns:**

    A [`transforms.PerSampleGrads`][], called as `fn(model, batch)` with `batch` a
    tuple of arrays with a leading batch axis. It materialises one gradient per
    example: memory grows as batch size times parameter count.

    **Raises:**

    `TypeError` if `loss_fn` is not callable. The returned function raises
    `TypeError`/`ValueError` for a batch that is not a non-empty tuple of arrays
    sharing a leading axis (a list is accepted, a dict is not), for a model without
    floating-point arrays, and, naming the shapes it received, if `loss_fn` fails
    on one unbatched example or does not return a floating-point scalar for it.

    !!! example

        ```python
        def loss_fn(model, x, y):
            return jnp.sum((model(x) - y) ** 2)

        grads = per_sample_grads(loss_fn)(model, (xs, ys))
        grads.layers[0].weight.shape  # (B, out, in)
        ```
    """
    check_callable("per_sample_grads", "loss_fn", loss_fn)
    return PerSampleGrads(loss_fn)
