import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.chmm import CHMM, log_likelihood, posteriors

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")

N_CLONES = (2, 1, 3)
N_ACTIONS = 2
X = [0, 1, 2, 2, 0, 1]
A = [0, 1, 1, 0, 1, 0]


def _module(dtype=torch.float32, seed=0):
    from eqx_models.interop.torch import TorchCHMM

    generator = torch.Generator().manual_seed(seed)
    return TorchCHMM(N_CLONES, N_ACTIONS, generator=generator, dtype=dtype)


def _softmax64(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _brute_force(T, x, a, evidence=None):
    """ln p(x | a) by summing over every state path (float64 NumPy)."""
    n_clones = np.asarray(N_CLONES)
    symbol = np.repeat(np.arange(len(n_clones)), n_clones)
    n_states = symbol.size
    total = 0.0
    for path in itertools.product(range(n_states), repeat=len(a)):
        p = 1.0 / n_states
        for t, z in enumerate(path):
            if evidence is None:
                p *= float(symbol[z] == x[t])
            else:
                p *= np.exp(evidence[t, symbol[z]])
            if t + 1 < len(path):
                p *= T[a[t], z, path[t + 1]]
        total += p
    return np.log(total)


@pytest.mark.slow
def test_log_likelihood_equals_brute_force_and_chmm():
    chmm = _module(torch.float64)
    x, a = torch.tensor(X[:5]), torch.tensor(A[:5])
    with jax.enable_x64(True):
        lnL, post = chmm(x, a)
        T = _softmax64(chmm.logits.detach().numpy())
        assert lnL.dtype == torch.float64
        np.testing.assert_allclose(
            lnL.item(), _brute_force(T, X[:5], A[:5]), rtol=1e-12
        )
        reference = posteriors(
            CHMM(N_CLONES, jnp.asarray(T)), jnp.asarray(X[:5]), jnp.asarray(A[:5])
        )
    np.testing.assert_allclose(
        post.detach().numpy(), np.asarray(reference.smoothed), atol=1e-12
    )
    np.testing.assert_allclose(post.detach().sum(-1).numpy(), 1.0, atol=1e-12)


def test_batched_forward():
    chmm = _module()
    x = torch.tensor([X, X[::-1]])
    a = torch.tensor([A, A[::-1]])
    lnL, post = chmm(x, a)
    assert lnL.shape == (2,) and post.shape == (2, 6, sum(N_CLONES))
    model = chmm.to_chmm()
    for i in range(2):
        expected = log_likelihood(model, jnp.asarray(x[i]), jnp.asarray(a[i]))
        np.testing.assert_allclose(lnL[i].item(), float(expected), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float64"])
def test_gradients_to_logits_equal_jax_grad(precision):
    dtype = getattr(torch, precision)
    chmm = _module(dtype)
    x, a = torch.tensor(X), torch.tensor(A)
    with jax.enable_x64(precision == "float64"):
        lnL, post = chmm(x, a)
        # A loss that uses both outputs, so both cotangents enter the VJP.
        weights = torch.linspace(0, 1, sum(N_CLONES), dtype=dtype)
        (lnL + (post * weights).sum()).backward()

        def loss(logits):
            model = CHMM(N_CLONES, jax.nn.softmax(logits, axis=-1))
            p = posteriors(model, jnp.asarray(X), jnp.asarray(A))
            return p.log_likelihood + jnp.sum(p.smoothed * jnp.asarray(weights))

        expected = jax.grad(loss)(jnp.asarray(chmm.logits.detach().numpy()))
    tol = 1e-5 if precision == "float32" else 1e-11
    np.testing.assert_allclose(
        chmm.logits.grad.numpy(), np.asarray(expected), rtol=tol, atol=tol
    )


def test_gradient_against_finite_differences():
    chmm = _module(torch.float64)
    x, a = torch.tensor(X[:5]), torch.tensor(A[:5])
    with jax.enable_x64(True):
        chmm(x, a, return_posteriors=False).backward()
        logits = chmm.logits.detach().numpy()
        u, i, j, eps = 1, 2, 4, 1e-6
        bumped = [logits.copy(), logits.copy()]
        bumped[0][u, i, j] += eps
        bumped[1][u, i, j] -= eps
        values = [_brute_force(_softmax64(b), X[:5], A[:5]) for b in bumped]
    numeric = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(chmm.logits.grad[u, i, j].item(), numeric, rtol=1e-6)


def test_one_hot_evidence_matches_ids():
    chmm = _module(torch.float64)
    x, a = torch.tensor(X[:5]), torch.tensor(A[:5])
    evidence = torch.log(torch.nn.functional.one_hot(x, len(N_CLONES)).double())
    with jax.enable_x64(True):
        lnL_ids, post_ids = chmm(x, a)
        lnL_soft, post_soft = chmm(evidence, a)
    np.testing.assert_allclose(lnL_soft.item(), lnL_ids.item(), rtol=1e-12)
    np.testing.assert_allclose(
        post_soft.detach().numpy(), post_ids.detach().numpy(), atol=1e-12
    )


@pytest.mark.slow
def test_soft_evidence_gradients_reach_an_encoder():
    chmm = _module(torch.float64)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, len(N_CLONES)).double()
    features = torch.randn(len(A), 4, dtype=torch.float64)
    a = torch.tensor(A)
    with jax.enable_x64(True):
        evidence = torch.log_softmax(encoder(features), dim=-1)
        lnL, _ = chmm(evidence, a)
        lnL.backward()
        T = _softmax64(chmm.logits.detach().numpy())
        ev = evidence.detach().numpy()
        assert np.isclose(lnL.item(), _brute_force(T, None, A, evidence=ev))

        def of_evidence(e):
            return log_likelihood(CHMM(N_CLONES, jnp.asarray(T)), e, jnp.asarray(A))

        d_evidence = jax.grad(of_evidence)(jnp.asarray(ev))
    (expected,) = torch.autograd.grad(
        torch.log_softmax(encoder(features), dim=-1),
        encoder.weight,
        torch.from_numpy(np.array(d_evidence)),
    )
    assert encoder.weight.grad is not None
    assert encoder.weight.grad.abs().sum() > 0
    np.testing.assert_allclose(
        encoder.weight.grad.numpy(), expected.numpy(), rtol=1e-10, atol=1e-12
    )


def test_from_chmm_round_trip(getkey):
    from eqx_models.interop.torch import TorchCHMM

    model = CHMM.random(N_CLONES, n_actions=N_ACTIONS, key=getkey())
    # An exact zero must survive as a (numerically) zero probability.
    T = model.T.at[0, 0].set(jnp.eye(sum(N_CLONES))[1])
    model = CHMM(N_CLONES, T)
    back = TorchCHMM.from_chmm(model).to_chmm()
    np.testing.assert_allclose(np.asarray(back.T), np.asarray(model.T), atol=1e-6)
    assert float(back.T[0, 0, 0]) < 1e-30
    np.testing.assert_array_equal(np.asarray(back.Pi), np.asarray(model.Pi))


def test_training_with_a_torch_optimiser_raises_the_likelihood():
    chmm = _module()
    x, a = torch.tensor([X, X[::-1]]), torch.tensor([A, A[::-1]])
    optimiser = torch.optim.Adam(chmm.parameters(), lr=0.1)
    values = []
    for step in range(5):
        optimiser.zero_grad()
        lnL = chmm(x, a, return_posteriors=False)
        assert isinstance(lnL, torch.Tensor) and lnL.shape == (2,)
        if step == 0:
            model = chmm.to_chmm()
            for i in range(2):
                expected = log_likelihood(model, jnp.asarray(x[i]), jnp.asarray(a[i]))
                np.testing.assert_allclose(lnL[i].item(), float(expected), rtol=1e-6)
        loss = -lnL.sum()
        loss.backward()
        optimiser.step()
        values.append(loss.item())
    assert values[-1] < values[0]


def test_bad_inputs():
    from eqx_models.interop.torch import TorchCHMM

    chmm = _module()
    x, a = torch.tensor(X), torch.tensor(A)
    with pytest.raises(ValueError, match="TorchCHMM.forward: `x` \\(ids\\) must have"):
        chmm(x[:-1], a)
    with pytest.raises(TypeError, match="`a` must hold integer actions"):
        chmm(x, a.float())
    with pytest.raises(ValueError, match="`a` must have shape \\(T,\\) or"):
        chmm(x, a[None, None])
    with pytest.raises(ValueError, match="log-evidence\\) must have shape \\(6, 3\\)"):
        chmm(torch.zeros(6, 2), a)
    with pytest.raises(TypeError, match="must have the logits' dtype"):
        chmm(torch.zeros(6, 3, dtype=torch.float64), a)
    with pytest.raises(ValueError, match="TorchCHMM: `n_clones` must be"):
        TorchCHMM([2, 0], 2)
    with pytest.raises(ValueError, match="TorchCHMM: `n_actions` must be"):
        TorchCHMM([2, 1], 0)
    with pytest.raises(ValueError, match="TorchCHMM: `method` must be"):
        TorchCHMM([2, 1], 2, method="fast")
    with pytest.raises(ValueError, match="`logits` must have shape \\(2, 3, 3\\)"):
        TorchCHMM([2, 1], 2, logits=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="`Pi` must have shape \\(3,\\)"):
        TorchCHMM([2, 1], 2, Pi=torch.ones(4) / 4)
    # A run-time check inside the bridged function: the library's message comes
    # first, not XLA's "INTERNAL: CpuCallback error" trace (on any backend).
    with pytest.raises(RuntimeError, match="integer ids in \\[0, n_obs\\)") as error:
        chmm(torch.tensor([0, 1, 5, 2, 0, 1]), a)
    assert "INTERNAL" not in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__
