import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models import tidhy

from . import reference
from .helpers import small_model


def test_defaults_shapes_and_initialisation(getkey):
    model = tidhy.TiDHy(20, key=getkey())
    assert (model.r_dim, model.r2_dim, model.mix_dim, model.hyper_hid_dim) == (
        10,
        5,
        15,
        50,
    )
    assert model.temporal.shape == (15, 100) and model.temp_weight == 2.0
    # Orthonormal rows for the temporal matrices (orthogonal_ in the original),
    # checked in float64 NumPy: a float32 product on a GPU would run in TF32.
    temporal = np.asarray(model.temporal, np.float64)
    np.testing.assert_allclose(temporal @ temporal.T, np.eye(15), atol=1e-5)
    # Xavier-normal weights: standard deviation sqrt(2 / (fan_in + fan_out)).
    W = np.asarray(model.hypernet.linear_hidden.weight)
    assert W.shape == (50, 50)
    assert np.std(W) == pytest.approx(np.sqrt(2 / 100), rel=0.05)
    assert model.hypernet.linear_out.bias is not None


def _kurtosis(z):
    return np.mean(z**4) / np.mean(z**2) ** 2


def test_initial_distributions_of_every_parameter():
    H, D, q, M = 40, 30, 5, 15
    # M > r²: the temporal matrix is taller than wide (orthonormal columns).
    model = tidhy.TiDHy(
        D,
        r_dim=3,
        r2_dim=q,
        mix_dim=M,
        hyper_hid_dim=H,
        nonlinear_decoder=True,
        key=jr.key(7),
    )
    r = 100  # enough draws of the dyn_bias row
    low_rank = tidhy.TiDHy(
        D,
        r_dim=r,
        r2_dim=q,
        mix_dim=M,
        hyper_hid_dim=H,
        low_rank_temporal=True,
        dyn_bias=True,
        key=jr.key(8),
    )
    linear = tidhy.TiDHy(20, key=jr.key(9))
    for leaf in jax.tree.leaves((model, low_rank, linear)):
        assert leaf.dtype == np.float32
    d, h = model.decoder, model.hypernet
    assert d.linear_hidden is not None and d.linear_out is not None
    assert linear.decoder.norm is None and linear.decoder.linear_out is None
    assert linear.decoder.linear_in.weight.shape == (20, 10)
    assert low_rank.temporal_bias is not None
    assert low_rank.temporal_bias.shape == (r,)
    assert low_rank.hypernet.linear_out.bias is None
    assert low_rank.hypernet.linear_out.weight.shape == (M + r, H)

    # (values, scale): Xavier-normal weights, N(0, 2 / (fan_in + fan_out)), and
    # the dyn_bias row, N(0, 2 / (1 + r)).
    normal = [
        (layer.weight, np.sqrt(2 / sum(layer.weight.shape)))
        for layer in (
            d.linear_in,
            h.linear_in,
            h.linear_hidden,
            h.linear_out,
            linear.decoder.linear_in,
            low_rank.hypernet.linear_out,
        )
    ]
    normal.append((low_rank.temporal_bias, np.sqrt(2 / (1 + r))))
    # PyTorch-default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) biases, and the weights of
    # the nonlinear decoder's hidden and output layers.
    uniform = [
        (layer.bias, 1 / np.sqrt(layer.weight.shape[1]))
        for layer in (d.linear_in, d.linear_hidden, d.linear_out, h.linear_in)
        + (h.linear_hidden, h.linear_out, linear.decoder.linear_in)
    ]
    uniform += [
        (layer.weight, 1 / np.sqrt(H)) for layer in (d.linear_hidden, d.linear_out)
    ]
    for values, std in normal:
        values = np.asarray(values, np.float64).ravel()
        assert values.size >= 100
        assert np.std(values) == pytest.approx(std, rel=0.3)
    for values, limit in uniform:
        values = np.asarray(values, np.float64).ravel()
        assert np.all(np.abs(values) <= limit)
        assert np.max(np.abs(values)) > 0.5 * limit
    # Standardised and pooled, the moments are sharp: N(0, 1) and U(-1, 1).
    z = np.concatenate([np.asarray(v, np.float64).ravel() / s for v, s in normal])
    assert abs(np.mean(z)) < 4 / np.sqrt(z.size)
    assert np.std(z) == pytest.approx(1.0, rel=0.03)
    assert _kurtosis(z) == pytest.approx(3.0, abs=0.3)
    u = np.concatenate([np.asarray(v, np.float64).ravel() / s for v, s in uniform])
    assert abs(np.mean(u)) < 4 / np.sqrt(3 * u.size)
    assert np.var(u) == pytest.approx(1 / 3, rel=0.06)
    assert _kurtosis(u) == pytest.approx(1.8, abs=0.15)

    # Orthonormal columns (M > r²) and orthonormal rows (M < r², M < 2r).
    T = np.asarray(model.temporal, np.float64)
    assert T.shape == (M, 9)
    np.testing.assert_allclose(T.T @ T, np.eye(9), atol=1e-5)
    for T in (linear.temporal, low_rank.temporal.reshape(M, 2 * r)):
        T = np.asarray(T, np.float64)
        np.testing.assert_allclose(T @ T.T, np.eye(M), atol=1e-5)
    # No two parameters share a draw (the LayerNorms are ones and zeros).
    drawn = eqx.tree_at(
        lambda m: (m.decoder.norm, m.hypernet.norm), model, replace=(None, None)
    )
    firsts = [float(leaf.ravel()[0]) for leaf in jax.tree.leaves(drawn)]
    assert len(firsts) == 13
    assert len(set(firsts)) == len(firsts)


def test_decoder_losses_match_their_formulas(getkey):
    r = jr.normal(getkey(), (3,))
    x = jr.uniform(getkey(), (4,))
    for loss_type in ("mse", "poisson", "bce"):
        model = small_model(getkey(), loss_type=loss_type)
        z = np.asarray(
            model.decoder.linear_in.weight @ r + model.decoder.linear_in.bias
        )
        loss = np.asarray(model.spatial_loss(r, x))
        mean = np.asarray(model.decode(r))
        if loss_type == "mse":
            np.testing.assert_allclose(loss, (z - x) ** 2, rtol=1e-6)
            np.testing.assert_allclose(mean, z, rtol=1e-6)
        elif loss_type == "poisson":
            np.testing.assert_allclose(loss, np.exp(z) - x * z, rtol=1e-5)
            np.testing.assert_allclose(mean, np.exp(z), rtol=1e-6)
        else:
            p = 1 / (1 + np.exp(-z))
            bce = -(x * np.log(p) + (1 - x) * np.log(1 - p))
            np.testing.assert_allclose(loss, bce, rtol=1e-5)
            np.testing.assert_allclose(mean, p, rtol=1e-6)


def test_hypernetwork_and_prediction_match_numpy(x64, getkey):
    model = small_model(getkey())
    p = reference.Params(model)
    r_prev, r2 = jr.normal(getkey(), (3,)), jr.normal(getkey(), (2,))
    w, gains = model.mixture(r2)
    assert gains is None
    np.testing.assert_allclose(
        w, reference.hyper_forward(p, np.asarray(r2))[0], rtol=1e-12
    )
    expected = reference.predict(p, np.asarray(r_prev), np.asarray(r2))
    np.testing.assert_allclose(model.predict(r_prev, r2), expected, rtol=1e-12)
    np.testing.assert_allclose(model.transition(r2) @ r_prev, expected, rtol=1e-12)
    # jit, vmap and grad of the prediction.
    batch = jr.normal(getkey(), (5, 3))
    np.testing.assert_allclose(
        jax.vmap(model.predict, in_axes=(0, None))(batch, r2)[2],
        model.predict(batch[2], r2),
        rtol=1e-12,
    )
    predict = eqx.filter_jit(lambda m, a, b: m.predict(a, b))
    np.testing.assert_allclose(predict(model, r_prev, r2), expected, rtol=1e-12)
    grad = jax.grad(lambda a: jnp.sum(model.predict(a, r2)))(r_prev)
    np.testing.assert_allclose(grad, model.transition(r2).sum(axis=0), rtol=1e-12)


def test_low_rank_and_dynamic_bias(x64, getkey):
    model = small_model(getkey(), low_rank_temporal=True, dyn_bias=True)
    assert model.temporal.shape == (4, 3, 2)
    assert model.temporal_bias is not None
    assert model.hypernet.linear_out.bias is None
    U = np.asarray(model.temporal)
    V = np.asarray(model.transition_matrices())
    for k in range(4):
        np.testing.assert_allclose(V[k], U[k] @ U[k].T, rtol=1e-12)
        assert np.all(np.linalg.eigvalsh(V[k]) >= -1e-12)
    r_prev, r2 = jr.normal(getkey(), (3,)), jr.normal(getkey(), (2,))
    out = np.asarray(model.hypernet(r2))
    w, gains = out[:4], out[4:]
    expected = np.einsum("k,kij,j->i", w, V, np.asarray(r_prev)) + gains * np.asarray(
        model.temporal_bias
    )
    np.testing.assert_allclose(model.predict(r_prev, r2), expected, rtol=1e-12)


def test_nonlinear_decoder(getkey):
    model = small_model(getkey(), nonlinear_decoder=True)
    r = jr.normal(getkey(), (3,))
    d = model.decoder
    assert d.norm is not None and d.linear_hidden is not None
    assert d.linear_out is not None
    h = jax.nn.elu(d.norm(d.linear_in(r)))
    np.testing.assert_allclose(model.decode(r), d.linear_out(d.linear_hidden(h)))
    assert model.decode(r).shape == (4,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r_dim=0), "`r_dim` must be a positive integer"),
        (dict(mix_dim=-2), "`mix_dim` must be a positive integer"),
        (dict(temp_weight=-1.0), "`temp_weight` must be a finite real number >= 0"),
        (dict(temp_weight=float("nan")), "`temp_weight` must be a finite real"),
    ],
)
def test_bad_hyperparameters_raise(getkey, kwargs, match):
    with pytest.raises(ValueError, match=f"TiDHy: {match}"):
        tidhy.TiDHy(4, key=getkey(), **kwargs)


def test_unknown_loss_type_raises(getkey):
    # The `Literal` annotation catches it under the suite's type checking, the
    # model's own check otherwise; both name the argument.
    with pytest.raises((ValueError, TypeError), match="loss_type"):
        tidhy.TiDHy(4, key=getkey(), loss_type="gaussian")  # pyright: ignore
