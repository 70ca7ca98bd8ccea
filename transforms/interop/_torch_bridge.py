"""The JAX ↔ PyTorch bridge behind `transforms.interop.torch`.

Tensors cross through DLPack, copying only where they must. `jax_to_torch` wraps a
JAX function as a `torch.autograd.Function` whose forward pass and VJP are jitted;
`torch_to_jax` runs a torch function on the host through `jax.pure_callback`. Torch
is imported at module level: only the optional `interop` modules import this one.
"""

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .._validation import check_callable


_WIDE = {torch.float64: "float64", torch.complex128: "complex128"}


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """Convert a torch tensor to a JAX array through DLPack.

    No copy is made when the frameworks allow it (a contiguous CPU tensor, or a CUDA
    tensor on the device JAX uses): the array then shares the tensor's memory, so do
    not modify the tensor in place while the array is alive. A non-contiguous tensor
    is made contiguous first (a copy). The tensor is detached from torch's graph.

    **Arguments:**

    - `tensor`: a `torch.Tensor` on the CPU or a CUDA device.

    **Returns:**

    A `jax.Array` with the same shape and dtype. `int64` tensors become `int32` when
    JAX runs without `jax_enable_x64` (their values are checked to fit).

    **Raises:**

    `TypeError` if `tensor` is not a tensor, or is `float64`/`complex128` while
    `jax_enable_x64` is off (JAX would silently halve its precision).
    `ValueError` for a device other than CPU/CUDA, or `int64` values that do not fit
    in `int32` without x64.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"to_jax: expected a torch.Tensor, got {type(tensor).__name__}."
        )
    tensor = tensor.detach()
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"to_jax: tensors on {tensor.device} are not supported; move them to the "
            f"CPU or a CUDA device."
        )
    if not jax.config.read("jax_enable_x64"):
        if tensor.dtype in _WIDE:
            raise TypeError(
                f"to_jax: a {_WIDE[tensor.dtype]} tensor needs "
                "`jax.config.update('jax_enable_x64', True)`; without it JAX would "
                "silently convert it to 32 bits."
            )
        if tensor.dtype == torch.int64:
            info = torch.iinfo(torch.int32)
            if tensor.numel() and (tensor.min() < info.min or tensor.max() > info.max):
                raise ValueError(
                    "to_jax: int64 values outside the int32 range need "
                    "`jax_enable_x64`."
                )
            tensor = tensor.to(torch.int32)
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return jax.dlpack.from_dlpack(tensor)


def to_torch(array) -> torch.Tensor:
    """Convert a JAX array to a torch tensor through DLPack (no copy where possible).

    **Arguments:**

    - `array`: a `jax.Array` (or anything `jnp.asarray` accepts).

    **Returns:**

    A `torch.Tensor` on the same device with the same shape and dtype. It may share
    memory with the array: JAX arrays are immutable, so do not modify it in place.
    """
    return torch.from_dlpack(jnp.asarray(array))


@dataclasses.dataclass(frozen=True)
class _Signature:
    """How a call's flattened (args, kwargs) split into tensors and constants."""

    treedef: Any
    constants: tuple  # (position, value) of every non-tensor leaf
    n_leaves: int
    tensor_positions: tuple[int, ...]
    differentiable: tuple[bool, ...]  # per tensor


def _call(fn, signature: _Signature, arrays):
    leaves: list[Any] = [None] * signature.n_leaves
    for position, value in signature.constants:
        leaves[position] = value
    for position, array in zip(signature.tensor_positions, arrays):
        leaves[position] = array
    args, kwargs = jax.tree_util.tree_unflatten(signature.treedef, leaves)
    out = fn(*args, **kwargs)
    return jax.tree.map(jnp.asarray, out)


def _split(signature: _Signature, arrays):
    diff = [a for a, d in zip(arrays, signature.differentiable) if d]
    rest = [a for a, d in zip(arrays, signature.differentiable) if not d]
    return diff, rest


def _merge(signature: _Signature, diff, rest):
    diff, rest = list(diff), list(rest)
    return [diff.pop(0) if d else rest.pop(0) for d in signature.differentiable]


def _zero_cotangent(aval: jax.ShapeDtypeStruct):
    if jnp.issubdtype(aval.dtype, jnp.inexact):
        return jnp.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, dtype=jax.dtypes.float0)


# How Equinox marks the message of a failed `eqx.error_if` inside XLA's error text.
_CHECK_MARKER = "_EquinoxRuntimeError: "


@contextlib.contextmanager
def _check_messages_first():
    """Re-raise a failed run-time check (`eqx.error_if`) of the bridged function
    with the check's own message.

    The bridge compiles with `jax.jit`, under which XLA reports such a failure as a
    long `INTERNAL: CpuCallback error` trace with the message buried inside; a torch
    user should read the library's message first.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        text = str(error)
        if _CHECK_MARKER not in text:
            raise
        message = text.split(_CHECK_MARKER, 1)[1].split("\n\n", 1)[0].strip()
        raise RuntimeError(message) from None


class _Compiled:
    """The jitted forward, forward-with-VJP and VJP application of one function."""

    def __init__(self, fn: Callable):
        self.forward = jax.jit(
            lambda signature, arrays: _call(fn, signature, arrays), static_argnums=0
        )

        def forward_with_vjp(signature, diff, rest):
            def of_diff(diff):
                return _call(fn, signature, _merge(signature, diff, rest))

            return jax.vjp(of_diff, diff)

        self.forward_with_vjp = jax.jit(forward_with_vjp, static_argnums=0)
        self.apply_vjp = jax.jit(lambda vjp_fn, cotangent: vjp_fn(cotangent)[0])


class _Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compiled, signature, holder, *tensors):
        arrays = [to_jax(t) for t in tensors]
        wants_grad = any(
            need and diff
            for need, diff in zip(ctx.needs_input_grad[3:], signature.differentiable)
        )
        with _check_messages_first():
            if wants_grad:
                diff, rest = _split(signature, arrays)
                out, vjp_fn = compiled.forward_with_vjp(signature, diff, rest)
                ctx.vjp_fn = vjp_fn
                ctx.compiled = compiled
                ctx.signature = signature
                # Saved so that torch's version counters reject in-place changes to
                # the inputs, whose memory the JAX residuals may share.
                ctx.save_for_backward(*tensors)
            else:
                out = compiled.forward(signature, arrays)
            leaves, ctx.out_treedef = jax.tree_util.tree_flatten(out)
            # Waits for the result, so a failed check is raised here, on any backend.
            leaves = jax.block_until_ready(leaves)
        holder["treedef"] = ctx.out_treedef
        ctx.out_avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        outputs = tuple(to_torch(x) for x in leaves)
        ctx.mark_non_differentiable(
            *[t for t in outputs if not (t.is_floating_point() or t.is_complex())]
        )
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):  # pyright: ignore[reportIncompatibleMethodOverride]
        ctx.saved_tensors  # raises if an input was modified in place since forward
        cotangent = [
            _zero_cotangent(aval)
            if g is None or not jnp.issubdtype(aval.dtype, jnp.inexact)
            else to_jax(g).astype(aval.dtype)
            for g, aval in zip(grad_outputs, ctx.out_avals)
        ]
        cotangent_tree = jax.tree_util.tree_unflatten(ctx.out_treedef, cotangent)
        with _check_messages_first():
            grads = list(
                jax.block_until_ready(
                    ctx.compiled.apply_vjp(ctx.vjp_fn, cotangent_tree)
                )
            )
        result: list[Any] = [None, None, None]
        for diff, need in zip(ctx.signature.differentiable, ctx.needs_input_grad[3:]):
            grad = grads.pop(0) if diff else None
            result.append(to_torch(grad) if (grad is not None and need) else None)
        return tuple(result)


def jax_to_torch(fn: Callable) -> Callable:
    """Make a JAX function callable on torch tensors, differentiable by torch autograd.

    The returned function takes the same arguments as `fn` with torch tensors in place
    of arrays (anywhere in pytrees; other leaves are passed through as compile-time
    constants and must be hashable). Tensors are converted through DLPack without a
    copy where possible (CPU, or CUDA on JAX's device), `fn` runs compiled with
    `jax.jit`, and its outputs (a pytree of arrays) come back as torch tensors in the
    same pytree structure, with the same dtypes. `backward` evaluates the JAX VJP
    (compiled too), so gradients equal `jax.grad` of the same function.

    Floating-point inputs receive gradients; integer and boolean inputs never do, and
    integer outputs are marked non-differentiable. Non-contiguous tensors are made
    contiguous. Second derivatives through the bridge are not supported.

    **Arguments:**

    - `fn`: a JAX function of pytrees of arrays returning a pytree of arrays.

    **Returns:**

    A function of torch tensors returning torch tensors.

    **Raises:**

    (when called) `TypeError` for a `float64` tensor without `jax_enable_x64`, or an
    unhashable non-tensor argument; `ValueError` for tensors on unsupported devices.

    !!! example

        ```python
        import jax.numpy as jnp, torch
        from transforms.interop.torch import jax_to_torch

        energy = jax_to_torch(lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2))
        x = torch.randn(4, 3)
        w = torch.randn(3, 2, requires_grad=True)
        energy(x, w).backward()   # w.grad holds the JAX gradient
        ```
    """
    check_callable("jax_to_torch", "fn", fn)
    compiled = _Compiled(fn)

    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        tensors, positions, constants = [], [], []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                tensors.append(leaf)
                positions.append(i)
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(
                        f"jax_to_torch: non-tensor arguments are compile-time "
                        f"constants and must be hashable; got a "
                        f"{type(leaf).__name__}. Pass arrays as torch tensors."
                    ) from None
                constants.append((i, leaf))
        signature = _Signature(
            treedef=treedef,
            constants=tuple(constants),
            n_leaves=len(leaves),
            tensor_positions=tuple(positions),
            differentiable=tuple(t.is_floating_point() for t in tensors),
        )
        holder: dict[str, Any] = {}
        outputs = _Bridge.apply(compiled, signature, holder, *tensors)
        return jax.tree_util.tree_unflatten(holder["treedef"], list(outputs))

    return wrapped


def _to_torch_host(array) -> torch.Tensor:
    array = np.array(array)  # a writable host copy: torch.from_numpy needs one
    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _to_numpy(tensor: torch.Tensor, aval) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(jnp.bfloat16)
    return tensor.numpy().astype(aval.dtype, copy=False)


def torch_to_jax(fn: Callable, result_shape_dtypes) -> Callable:
    """Call a torch function from JAX, with gradients through torch autograd.

    The torch function always runs on the host CPU through `jax.pure_callback`: its
    inputs are copied to host memory and its outputs back to the device. It works
    under `jax.jit`, `jax.vmap` (one call per example) and `jax.grad` (the VJP runs
    torch autograd on a recomputed forward), but XLA cannot compile, fuse or
    parallelise the torch code, and on an accelerator every call pays a device-host
    round trip. Use it for glue around a model (a pretrained torch encoder in an
    evaluation pipeline), not inside hot training loops on a GPU.

    **Arguments:**

    - `fn`: a torch function of positional tensors returning a pytree of tensors.
      Its own parameters (e.g. those of an `nn.Module`) receive no gradient from JAX.
    - `result_shape_dtypes`: a pytree of `jax.ShapeDtypeStruct` describing the
      outputs, or a function mapping the `ShapeDtypeStruct`s of the inputs to it.

    **Returns:**

    A JAX function of positional arrays. Floating-point inputs get gradients;
    integer inputs get none.

    !!! example

        ```python
        import jax, jax.numpy as jnp, torch
        from transforms.interop.torch import torch_to_jax

        layer = torch.nn.Linear(3, 2)
        f = torch_to_jax(
            lambda x: layer(x),
            lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (2,), x.dtype),
        )
        g = jax.grad(lambda x: f(x).sum())(jnp.ones((4, 3)))
        ```
    """
    check_callable("torch_to_jax", "fn", fn)

    def result_avals(args):
        if callable(result_shape_dtypes):
            avals = [
                jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in args
            ]
            return result_shape_dtypes(*avals)
        return result_shape_dtypes

    def host_forward(*arrays):
        with torch.no_grad():
            out = fn(*[_to_torch_host(a) for a in arrays])
        avals = result_avals(arrays)
        return jax.tree.map(_to_numpy, out, avals)

    def host_vjp(arrays, cotangent):
        inputs = [_to_torch_host(a) for a in arrays]
        for t in inputs:
            if t.is_floating_point():
                t.requires_grad_(True)
        with torch.enable_grad():
            out = fn(*inputs)
        outs = [o for o in jax.tree.leaves(out) if o.requires_grad]
        cts = [
            _to_torch_host(c).to(o.dtype)
            for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cotangent))
            if o.requires_grad
        ]
        wanted = [t for t in inputs if t.requires_grad]
        grads = (
            torch.autograd.grad(outs, wanted, cts, allow_unused=True) if outs else []
        )
        grads = list(grads) + [None] * (len(wanted) - len(grads))
        result = []
        for t, a in zip(inputs, arrays):
            if not t.requires_grad:
                continue
            g = grads.pop(0)
            result.append(
                np.zeros(np.shape(a), np.asarray(a).dtype)
                if g is None
                else _to_numpy(
                    g, jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype)
                )
            )
        return tuple(result)

    @jax.custom_vjp
    def call(*args):
        return jax.pure_callback(
            host_forward, result_avals(args), *args, vmap_method="sequential"
        )

    def call_fwd(*args):
        return call(*args), args

    def call_bwd(args, cotangent):
        floating = [jnp.issubdtype(jnp.result_type(a), jnp.floating) for a in args]
        avals = tuple(
            jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
            for a, f in zip(args, floating)
            if f
        )
        grads = list(
            jax.pure_callback(
                host_vjp, avals, args, cotangent, vmap_method="sequential"
            )
        )
        return tuple(grads.pop(0) if f else None for f in floating)

    call.defvjp(call_fwd, call_bwd)

    def wrapped(*args):
        return call(*[jnp.asarray(a) for a in args])

    return wrapped
