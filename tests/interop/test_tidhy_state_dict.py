import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.tidhy import TiDHy

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")
nn = torch.nn

CONFIGS = [
    dict(),
    dict(nonlinear_decoder=True, dyn_bias=True),
    dict(low_rank_temporal=True),
]
SIZES = dict(input_dim=7, r_dim=4, r2_dim=3, mix_dim=5, hyper_hid_dim=6)


class _Original(nn.Module):
    """The original implementation's parameter structure and forward pieces,
    written here from its description: `nn.Sequential` decoder and hypernetwork,
    a `temporal` parameter and, with `dyn_bias`, a `(1, r)` `temporal_bias`."""

    def __init__(self, D, r, q, M, H, nonlin=False, dyn_bias=False, low_rank=False):
        super().__init__()
        if nonlin:
            self.spatial_decoder = nn.Sequential(
                nn.Linear(r, H), nn.LayerNorm(H), nn.ELU(), nn.Linear(H, H),
                nn.Linear(H, D),
            )  # fmt: skip
        else:
            self.spatial_decoder = nn.Sequential(nn.Linear(r, D))
        shape = (M, r, 2) if low_rank else (M, r * r)
        self.temporal = nn.Parameter(torch.randn(shape))
        if dyn_bias:
            self.temporal_bias = nn.Parameter(torch.randn(1, r))
        last = nn.Linear(H, M + r, bias=False) if dyn_bias else nn.Linear(H, M)
        self.hypernet = nn.Sequential(
            nn.Linear(q, H), nn.LayerNorm(H), nn.ELU(), nn.Linear(H, H), last,
            nn.ReLU(),
        )  # fmt: skip
        for module in self.modules():  # non-trivial LayerNorm affine parameters
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight)
                nn.init.normal_(module.bias)
        self.M, self.r, self.dyn_bias, self.low_rank = M, r, dyn_bias, low_rank

    def temporal_prediction(self, r_prev, r2):
        wb = self.hypernet(r2)
        w, b = wb[:, : self.M], wb[:, self.M :]
        if self.low_rank:
            Vk = torch.bmm(self.temporal, self.temporal.permute(0, 2, 1))
            Vk = Vk.reshape(self.M, -1)
        else:
            Vk = self.temporal
        V = (w @ Vk).reshape(-1, self.r, self.r)
        out = torch.bmm(V, r_prev.unsqueeze(2)).squeeze(-1)
        if self.dyn_bias:
            out = out + b * self.temporal_bias
        return out, w


def _original(config, seed=0):
    torch.manual_seed(seed)
    s = SIZES
    return _Original(
        s["input_dim"], s["r_dim"], s["r2_dim"], s["mix_dim"], s["hyper_hid_dim"],
        nonlin=config.get("nonlinear_decoder", False),
        dyn_bias=config.get("dyn_bias", False),
        low_rank=config.get("low_rank_temporal", False),
    )  # fmt: skip


def _template(config):
    # Only the configuration matters for an import: an abstract model (shapes and
    # dtypes, no initialisation to compute) is enough.
    return eqx.filter_eval_shape(lambda: TiDHy(key=jr.key(0), **SIZES, **config))


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_to_eqx_to_torch_is_exact(config):
    from eqx_models.interop.torch import tidhy_from_state_dict, tidhy_to_state_dict

    original = _original(config)
    model = tidhy_from_state_dict(original.state_dict(), _template(config))
    back = tidhy_to_state_dict(model)
    reference = original.state_dict()
    assert list(back) == list(reference)
    for name, value in reference.items():
        assert back[name].dtype == value.dtype
        assert torch.equal(back[name], value), name


@pytest.mark.parametrize("config", CONFIGS)
def test_eqx_to_torch_to_eqx_is_exact(config):
    from eqx_models.interop.torch import tidhy_from_state_dict, tidhy_to_state_dict

    model = tidhy_from_state_dict(
        _original(config, seed=2).state_dict(), _template(config)
    )
    model = jax.tree.map(lambda x: x + 1.0 if eqx.is_inexact_array(x) else x, model)
    original = _original(config, seed=1)
    original.load_state_dict(tidhy_to_state_dict(model))  # strict: names must agree
    back = tidhy_from_state_dict(original.state_dict(), _template(config))
    assert bool(eqx.tree_equal(back, model))


@pytest.mark.parametrize("config", CONFIGS)
def test_outputs_match_the_torch_forward(config):
    from eqx_models.interop.torch import tidhy_from_state_dict

    original = _original(config).double()
    with jax.enable_x64(True):
        model = tidhy_from_state_dict(original.state_dict(), _template(config))
        model = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
        )
        B = 3
        r_prev = np.random.default_rng(0).normal(size=(B, SIZES["r_dim"]))
        r2 = np.random.default_rng(1).normal(size=(B, SIZES["r2_dim"]))
        with torch.no_grad():
            x_t = original.spatial_decoder(torch.from_numpy(r_prev)).numpy()
            pred_t, w_t = original.temporal_prediction(
                torch.from_numpy(r_prev), torch.from_numpy(r2)
            )
        x_j = jax.vmap(model.decoder)(jnp.asarray(r_prev))
        pred_j = jax.vmap(model.predict)(jnp.asarray(r_prev), jnp.asarray(r2))
        w_j = jax.vmap(lambda z: model.mixture(z)[0])(jnp.asarray(r2))
        np.testing.assert_allclose(np.asarray(x_j), x_t, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(w_j), w_t.numpy(), atol=1e-12)
        np.testing.assert_allclose(
            np.asarray(pred_j), pred_t.numpy(), rtol=1e-10, atol=1e-12
        )


def test_compiled_prefix_and_dtype():
    from eqx_models.interop.torch import tidhy_from_state_dict

    original = _original({})
    state = {"_orig_mod." + k: v.double() for k, v in original.state_dict().items()}
    model = tidhy_from_state_dict(state, _template({}))
    assert model.temporal.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(model.temporal), original.temporal.detach().numpy()
    )


def test_mismatched_state_dict_lists_every_problem():
    from eqx_models.interop.torch import StateDictError, tidhy_from_state_dict

    state = dict(_original({}).state_dict())
    del state["hypernet.3.bias"]
    state["R2_Decoder.0.weight"] = torch.zeros(2, 2)
    state["temporal"] = torch.zeros(5, 9)
    with pytest.raises(StateDictError) as info:
        tidhy_from_state_dict(state, _template({}))
    message = str(info.value)
    assert "tidhy_from_state_dict" in message
    assert "missing names: ['hypernet.3.bias']" in message
    assert "unexpected names: ['R2_Decoder.0.weight']" in message
    assert "'temporal': the model needs (5, 16), the state dict has (5, 9)" in message
    assert info.value.missing == ["hypernet.3.bias"]
    assert isinstance(info.value, ValueError)


def test_dyn_bias_mismatch_is_reported():
    from eqx_models.interop.torch import StateDictError, tidhy_from_state_dict

    state = _original(dict(dyn_bias=True)).state_dict()
    with pytest.raises(StateDictError, match="unexpected names: \\['temporal_bias'\\]"):
        tidhy_from_state_dict(state, _template({}))


def test_entries_must_be_arrays():
    from eqx_models.interop.torch import tidhy_from_state_dict

    state = dict(_original({}).state_dict())
    state["temporal"] = "weights"
    with pytest.raises(TypeError, match="entry 'temporal' must be a torch tensor"):
        tidhy_from_state_dict(state, _template({}))
