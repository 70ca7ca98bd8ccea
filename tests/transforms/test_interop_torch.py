import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")


def _energy(params, x, scale):
    h = jnp.tanh(x @ params["w"] + params["b"])
    return {"energy": scale * jnp.sum(h**2), "argmax": jnp.argmax(h, axis=-1)}


def _torch_params(dtype, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    return {"w": w.requires_grad_(requires_grad), "b": b.requires_grad_(requires_grad)}


@pytest.mark.parametrize(
    "dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2), ("float16", 5e-3)]
)
def test_gradients_equal_jax_grad(dtype, tol):
    from transforms.interop.torch import jax_to_torch

    tdtype = getattr(torch, dtype)
    params = _torch_params(tdtype)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=tdtype)
    x.requires_grad_(True)
    out = jax_to_torch(_energy)(params, x, 0.5)
    assert out["energy"].dtype == tdtype and out["argmax"].dtype == torch.int32
    assert not out["argmax"].requires_grad
    out["energy"].backward()

    as_jax = lambda t: jnp.asarray(t.detach().float().numpy()).astype(dtype)
    jparams = {k: as_jax(v) for k, v in params.items()}
    grads = jax.grad(lambda p, x: _energy(p, x, 0.5)["energy"], argnums=(0, 1))(
        jparams, as_jax(x)
    )
    for got, want in [
        (params["w"].grad, grads[0]["w"]),
        (params["b"].grad, grads[0]["b"]),
        (x.grad, grads[1]),
    ]:
        assert got.dtype == tdtype
        np.testing.assert_allclose(
            got.float().numpy(), np.asarray(want, np.float32), rtol=tol, atol=tol
        )


def test_float64_matches_finite_differences(x64):
    from transforms.interop.torch import jax_to_torch

    fn = jax_to_torch(lambda a, b: jnp.sin(a) * jnp.exp(b).sum() + a**3)
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (a, b))


def test_integer_inputs_get_no_gradient_and_non_contiguous_inputs_work():
    from transforms.interop.torch import jax_to_torch

    table = torch.randn(6, 3).t().requires_grad_(True)  # non-contiguous, shape (3, 6)
    assert not table.is_contiguous()
    ids = torch.tensor([0, 5, 2, 5])
    fn = jax_to_torch(lambda t, i: jnp.sum(t[:, i] ** 2))
    loss = fn(table, ids)
    loss.backward()
    expected = np.zeros((3, 6), np.float32)
    for i in [0, 5, 2, 5]:
        expected[:, i] += 2 * table.detach().numpy()[:, i]
    np.testing.assert_allclose(table.grad.numpy(), expected, rtol=1e-6)
    assert ids.grad is None
    np.testing.assert_allclose(
        loss.item(), float((table.detach()[:, ids] ** 2).sum()), rtol=1e-6
    )


def test_no_gradient_needed_runs_the_plain_forward():
    from transforms.interop.torch import jax_to_torch

    fn = jax_to_torch(lambda a: a * 2)
    out = fn(torch.ones(3))
    assert not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), np.full(3, 2.0, np.float32))


def test_to_jax_shares_cpu_memory_and_checks_dtypes():
    from transforms.interop.torch import to_jax, to_torch

    tensor = torch.zeros(4)
    array = to_jax(tensor)
    tensor[0] = 7.0  # zero-copy: the array sees the write
    assert float(array[0]) == 7.0
    with pytest.raises(TypeError, match="jax_enable_x64"):
        to_jax(torch.zeros(2, dtype=torch.float64))
    small = to_jax(torch.tensor([1, 2, 3]))
    assert small.dtype == jnp.int32 and small.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="int32 range"):
        to_jax(torch.tensor([2**40]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        to_jax(np.zeros(2))  # pyright: ignore[reportArgumentType]
    back = to_torch(jnp.arange(3, dtype=jnp.bfloat16))
    assert back.dtype == torch.bfloat16 and back.tolist() == [0.0, 1.0, 2.0]


def test_float64_under_x64_keeps_dtype(x64):
    from transforms.interop.torch import jax_to_torch

    out = jax_to_torch(lambda a: a / 3)(torch.ones(2, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert out[0].item() == 1 / 3


def test_bad_arguments_and_in_place_modification():
    from transforms.interop.torch import jax_to_torch, torch_to_jax

    fn = jax_to_torch(lambda a, c: a * c)
    with pytest.raises(TypeError, match="hashable"):
        fn(torch.ones(2), np.ones(2))  # arrays must come as tensors
    # (The suite's jaxtyping import hook checks the annotation first; without it
    # the validation layer's own message names `fn` too.)
    with pytest.raises(TypeError, match="fn"):
        jax_to_torch(3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="fn"):
        torch_to_jax(3, None)  # pyright: ignore[reportArgumentType]

    square = jax_to_torch(lambda a: a * a)
    a = torch.ones(3, requires_grad=True)
    b = a * 1.0
    out = square(b).sum()
    b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_torch_to_jax_values_and_gradients():
    from transforms.interop.torch import torch_to_jax

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    w = jnp.asarray(layer.weight.detach().numpy())
    b = jnp.asarray(layer.bias.detach().numpy())

    def reference(x, scale):
        return jnp.tanh(x @ w.T + b) * scale

    f = torch_to_jax(
        lambda x, scale: torch.tanh(layer(x)) * scale,
        lambda x, scale: jax.ShapeDtypeStruct(x.shape[:-1] + (2,), x.dtype),
    )
    x = jax.random.normal(jax.random.key(0), (4, 3))
    scale = jnp.float32(1.5)
    np.testing.assert_allclose(f(x, scale), reference(x, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.jit(f)(x, scale), reference(x, scale), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        jax.vmap(f, in_axes=(0, None))(x, scale),
        reference(x, scale),
        rtol=1e-5,
        atol=1e-6,
    )
    loss = lambda fn: lambda x, s: jnp.sum(fn(x, s) ** 2)
    got = jax.grad(loss(f), argnums=(0, 1))(x, scale)
    want = jax.grad(loss(reference), argnums=(0, 1))(x, scale)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)

    counts = torch_to_jax(
        lambda x, n: x * n.to(x.dtype),
        lambda x, n: jax.ShapeDtypeStruct(x.shape, x.dtype),
    )
    g = jax.grad(lambda x: counts(x, jnp.array([1, 2, 3])).sum())(jnp.ones(3))
    np.testing.assert_allclose(g, [1.0, 2.0, 3.0])
