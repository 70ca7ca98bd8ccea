import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.multimodal import CausalTransformerLM, PAD, VocabLayout

from ..helpers import import_optional


pytestmark = pytest.mark.torch
torch = import_optional("torch")
nn = torch.nn

LAYOUT = VocabLayout(n_image=6, n_scalar=5, n_spectrum=4, spectrum_groups=("a", "b"))
SIZES = dict(d_model=8, n_layers=2, n_heads=2, d_ff=12, max_len=10)


class _Original(nn.Module):
    """The original model's structure, written here: summed token/type/position
    embeddings, an `nn.TransformerEncoder` named `enc` with a causal mask and a
    key-padding mask, a final LayerNorm `ln` and a bias-free head."""

    def __init__(self, norm_first=False, head_bias=False):
        super().__init__()
        d = SIZES["d_model"]
        self.tok_emb = nn.Embedding(LAYOUT.vocab_size, d)
        self.type_emb = nn.Embedding(LAYOUT.n_types, d)
        self.pos_emb = nn.Embedding(SIZES["max_len"], d)
        layer = nn.TransformerEncoderLayer(
            d_model=d,
            nhead=SIZES["n_heads"],
            dim_feedforward=SIZES["d_ff"],
            dropout=0.0,
            batch_first=True,
            activation="gelu",
            norm_first=norm_first,
        )
        self.enc = nn.TransformerEncoder(
            layer, num_layers=SIZES["n_layers"], enable_nested_tensor=False
        )
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, LAYOUT.vocab_size, bias=head_bias)
        for p in self.parameters():  # no structure (zero biases, unit norms) left
            nn.init.normal_(p, std=0.3)

    def forward(self, tokens, types, attn_mask):
        L = tokens.shape[1]
        pos = torch.arange(L).unsqueeze(0)
        x = self.tok_emb(tokens) + self.type_emb(types) + self.pos_emb(pos)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
        h = self.enc(x, mask=causal, src_key_padding_mask=~attn_mask)
        return self.head(self.ln(h))


def _template(pre_ln=False):
    return eqx.filter_eval_shape(
        lambda: CausalTransformerLM(
            LAYOUT, dropout=0.0, pre_ln=pre_ln, attention="xla", key=jr.key(0), **SIZES
        )
    )


def _tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, LAYOUT.vocab_size, size=(3, 7))
    tokens[0, 5:] = PAD
    tokens[2, 3:] = PAD
    return tokens


@pytest.mark.parametrize("pre_ln", [False, True])
def test_logits_match_the_torch_model(pre_ln):
    from eqx_models.interop.torch import multimodal_from_state_dict

    original = _original(pre_ln).double().eval()
    tokens = _tokens()
    with jax.enable_x64(True):
        model = multimodal_from_state_dict(original.state_dict(), _template(pre_ln))
        model = jax.tree.map(
            lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model
        )
        jtokens = jnp.asarray(tokens, jnp.int32)
        types = np.array(LAYOUT.type_ids(jtokens))
        logits = np.asarray(jax.vmap(model)(jtokens))
    with torch.no_grad():
        expected = original(
            torch.from_numpy(tokens),
            torch.from_numpy(types).long(),
            torch.from_numpy(tokens != PAD),
        ).numpy()
    valid = tokens != PAD  # torch leaves padded query rows undefined
    # XLA's dot_product_attention takes its softmax in float32 even for float64
    # inputs, so agreement is to float32 rounding, not float64's.
    np.testing.assert_allclose(logits[valid], expected[valid], rtol=1e-6, atol=1e-7)


def _original(pre_ln=False, head_bias=False, seed=0):
    torch.manual_seed(seed)
    return _Original(norm_first=pre_ln, head_bias=head_bias)


@pytest.mark.parametrize("compiled", [False, True])
def test_torch_to_eqx_to_torch_is_exact(compiled):
    from eqx_models.interop.torch import (
        multimodal_from_state_dict,
        multimodal_to_state_dict,
    )

    state = _original().state_dict()
    if compiled:
        state = {"_orig_mod." + k: v for k, v in state.items()}
    model = multimodal_from_state_dict(state, _template())
    back = multimodal_to_state_dict(model, compiled=compiled)
    assert sorted(back) == sorted(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype
        assert torch.equal(back[name], value), name


def test_eqx_to_torch_to_eqx_is_exact():
    from eqx_models.interop.torch import (
        multimodal_from_state_dict,
        multimodal_to_state_dict,
    )

    model = CausalTransformerLM(
        LAYOUT, dropout=0.0, attention="xla", key=jr.key(1), **SIZES
    )
    # The original's head has no bias.
    model = eqx.tree_at(lambda m: m.head_bias, model, jnp.zeros_like(model.head_bias))
    original = _original(seed=3)
    original.load_state_dict(multimodal_to_state_dict(model))  # strict names
    back = multimodal_from_state_dict(original.state_dict(), _template())
    assert bool(eqx.tree_equal(back, model))


def test_head_bias_round_trip_and_refusal():
    from eqx_models.interop.torch import (
        multimodal_from_state_dict,
        multimodal_to_state_dict,
    )

    original = _original(head_bias=True)
    model = multimodal_from_state_dict(original.state_dict(), _template())
    np.testing.assert_array_equal(
        np.asarray(model.head_bias), original.head.bias.detach().numpy()
    )
    with pytest.raises(ValueError, match="head bias is non-zero"):
        multimodal_to_state_dict(model)
    back = multimodal_to_state_dict(model, include_head_bias=True)
    assert torch.equal(back["head.bias"], original.head.bias.detach())


def test_mismatched_state_dict_lists_every_problem():
    from eqx_models.interop.torch import multimodal_from_state_dict, StateDictError

    state = dict(_original().state_dict())
    del state["enc.layers.1.norm2.bias"]
    state["enc.norm.weight"] = torch.ones(8)
    state["type_emb.weight"] = torch.zeros(3, 8)
    with pytest.raises(StateDictError) as info:
        multimodal_from_state_dict(state, _template())
    message = str(info.value)
    assert "multimodal_from_state_dict" in message
    assert "missing names: ['enc.layers.1.norm2.bias']" in message
    assert "unexpected names: ['enc.norm.weight']" in message
    expected = (LAYOUT.n_types, 8)
    assert f"'type_emb.weight': the model needs {expected}" in message
    assert "the state dict has (3, 8)" in message
    assert info.value.mismatched == {"type_emb.weight": (expected, (3, 8))}


def test_dtype_follows_the_model():
    from eqx_models.interop.torch import multimodal_from_state_dict

    state = {k: v.to(torch.bfloat16) for k, v in _original().state_dict().items()}
    model = multimodal_from_state_dict(state, _template())
    assert model.blocks.qkv_weight.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(model.token_embedding),
        state["tok_emb.weight"].float().numpy(),
    )
