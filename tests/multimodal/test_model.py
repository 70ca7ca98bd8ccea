import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.special import erf

from eqx_models.multimodal import CausalTransformerLM, check_tokens, PAD

from .helpers import LAYOUT, LENGTH, make_batch, make_model


def _layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * w + b


def reference_logits(model, tokens, type_ids):
    """The model's maths in float64 NumPy, written from the definition."""
    p = jax.tree.map(
        lambda a: np.asarray(a, np.float64), eqx.filter(model, eqx.is_array)
    )
    tokens, type_ids = np.asarray(tokens), np.asarray(type_ids)
    length = len(tokens)
    n_valid = int(np.sum(tokens != PAD))
    heads, dh = model.n_heads, model.d_model // model.n_heads
    x = (
        p.token_embedding[tokens]
        + p.type_embedding[type_ids]
        + p.position_embedding[:length]
    )
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    allowed = (j <= i) & (j < n_valid)
    for layer in range(model.n_layers):
        b = jax.tree.map(lambda a: a[layer], p.blocks)

        def attention(h):
            q, k, v = np.split(h @ b.qkv_weight + b.qkv_bias, 3, axis=-1)
            outs = []
            for head in range(heads):
                sl = slice(head * dh, (head + 1) * dh)
                s = q[:, sl] @ k[:, sl].T / np.sqrt(dh)
                s = np.where(allowed, s, -np.inf)
                a = np.exp(s - s.max(-1, keepdims=True))
                outs.append((a / a.sum(-1, keepdims=True)) @ v[:, sl])
            return np.concatenate(outs, -1) @ b.out_weight + b.out_bias

        def mlp(h):
            u = h @ b.fc_weight + b.fc_bias
            return (0.5 * u * (1 + erf(u / np.sqrt(2)))) @ b.proj_weight + b.proj_bias

        if model.pre_ln:
            x = x + attention(_layer_norm(x, b.ln1_weight, b.ln1_bias))
            x = x + mlp(_layer_norm(x, b.ln2_weight, b.ln2_bias))
        else:
            x = _layer_norm(x + attention(x), b.ln1_weight, b.ln1_bias)
            x = _layer_norm(x + mlp(x), b.ln2_weight, b.ln2_bias)
    x = _layer_norm(x, p.final_norm_weight, p.final_norm_bias)
    return x @ p.head_weight.T + p.head_bias


@eqx.filter_jit
def batch_logits(model, tokens, type_ids):
    h = model.features_batch(tokens, type_ids=type_ids)
    return h @ model.head_weight.T + model.head_bias


def _assert_matches_reference(model, batch, logits, rtol=2e-4, atol=2e-4):
    for row in range(batch.tokens.shape[0]):
        want = reference_logits(model, batch.tokens[row], batch.type_ids[row])
        np.testing.assert_allclose(logits[row], want, rtol=rtol, atol=atol)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("pre_ln", [False, True])
def test_forward_matches_numpy_reference(pre_ln):
    model = make_model(pre_ln=pre_ln)
    batch = make_batch(1)
    assert int(jnp.sum(batch.tokens == PAD)) > 0  # padding is exercised
    logits = batch_logits(model, batch.tokens, batch.type_ids)
    assert logits.shape == (4, LENGTH, LAYOUT.vocab_size)
    _assert_matches_reference(model, batch, logits)


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_single_sequence_call_and_vmap():
    model = make_model(init="gpt")
    batch = make_batch(2)
    logits = eqx.filter_jit(lambda m, t: jax.vmap(lambda s: m(s, type_ids=None))(t))(
        model, batch.tokens
    )
    assert logits.dtype == jnp.float32
    # Type ids derived from the layout equal the builder's (no MISS in a special
    # role here other than those the layout types as specials).
    derived = LAYOUT.type_ids(batch.tokens)
    for row in range(4):
        want = reference_logits(model, batch.tokens[row], derived[row])
        np.testing.assert_allclose(logits[row], want, rtol=2e-4, atol=2e-4)


def test_causality_and_padding():
    model = make_model()
    batch = make_batch(3)
    tokens = np.array(batch.tokens)
    first = batch_logits(model, batch.tokens, batch.type_ids)
    # Changing the future (positions >= 6) leaves positions < 6 unchanged.
    changed = tokens.copy()
    changed[:, 6:10] = 5 + (changed[:, 6:10] % 6)
    types = np.asarray(batch.type_ids).copy()
    types[:, 6:10] = 1
    second = batch_logits(model, jnp.asarray(changed), jnp.asarray(types))
    np.testing.assert_allclose(first[:, :6], second[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(first[:, 6:10], second[:, 6:10])


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_dropout_uses_keys_and_is_off_without_a_key():
    model = make_model(dropout=0.3)
    batch = make_batch(4)
    run = eqx.filter_jit(lambda m, t, k: m.features_batch(t, type_ids=None, key=k))
    a = run(model, batch.tokens, jr.key(1))
    b = run(model, batch.tokens, jr.key(2))
    c = run(model, batch.tokens, jr.key(1))
    assert np.array_equal(a, c) and not np.allclose(a, b)
    deterministic = batch_logits(model, batch.tokens, batch.type_ids)
    _assert_matches_reference(model, batch, deterministic)


@pytest.mark.usefixtures("highest_precision")
def test_remat_and_unrolled_scan_give_the_same_model():
    model = make_model(remat=True, unroll=2)
    batch = make_batch(5)
    _assert_matches_reference(
        model, batch, batch_logits(model, batch.tokens, batch.type_ids)
    )


@pytest.mark.parametrize("backend, expected", [("cpu", 1), ("gpu", 2), ("tpu", 2)])
def test_default_unroll_is_a_scan_on_a_cpu_and_unrolled_elsewhere(
    monkeypatch, backend, expected
):
    model = make_model()
    assert model.unroll == "auto" and model.n_layers == 2
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    batch = make_batch(2)
    jaxpr = jax.make_jaxpr(lambda t: model.features_batch(t))(batch.tokens)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [2]
    assert [e.params["unroll"] for e in scans] == [expected]


@pytest.mark.usefixtures("highest_precision")
def test_default_unroll_computes_what_a_rolled_and_an_unrolled_scan_do():
    batch = make_batch(3)
    outs = [
        batch_logits(make_model(**options), batch.tokens, batch.type_ids)
        for options in ({}, dict(unroll=1), dict(unroll=2))
    ]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-6, atol=1e-6)


def test_compiles_once_and_checks_tokens_at_run_time():
    model = make_model()
    batch = make_batch(6)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(model, tokens, type_ids):
        return model.features_batch(tokens, type_ids=type_ids)

    run(model, batch.tokens, batch.type_ids)
    run(model, make_batch(7).tokens, make_batch(7).type_ids)
    tokens = np.array(batch.tokens)
    bad = tokens.copy()
    bad[1, 2] = LAYOUT.vocab_size
    outside = r"`tokens` must be token ids in \[0, vocab_size\)"
    with pytest.raises(eqx.EquinoxRuntimeError, match=outside):
        run(model, jnp.asarray(bad), batch.type_ids)
    # Called eagerly on concrete ids: the library's plain `ValueError`.
    with pytest.raises(ValueError, match=outside + r".*got 24 at index \(1, 2\)"):
        model.features_batch(jnp.asarray(bad), type_ids=batch.type_ids)
    bad = tokens.copy()
    bad[0, 1] = PAD
    with pytest.raises(eqx.EquinoxRuntimeError, match="padded only at the end"):
        run(model, jnp.asarray(bad), batch.type_ids)
    with pytest.raises(ValueError, match="`tokens` must be padded only at the end"):
        check_tokens(LAYOUT, jnp.asarray(bad), batch.type_ids)
    types = np.array(batch.type_ids)
    types[2, 1] = 2  # an image token typed as scalar
    wrong_type = "`type_ids` must be the types the layout implies"
    with pytest.raises(eqx.EquinoxRuntimeError, match=wrong_type):
        run(model, batch.tokens, jnp.asarray(types))
    with pytest.raises(ValueError, match=wrong_type + r".*got 2 at index \(2, 1\)"):
        check_tokens(LAYOUT, batch.tokens, jnp.asarray(types))
    types = np.array(batch.type_ids)
    types[2, 0] = LAYOUT.n_types  # a special token with a type beyond the table
    with pytest.raises(eqx.EquinoxRuntimeError, match=wrong_type):
        run(model, batch.tokens, jnp.asarray(types))
    with pytest.raises(ValueError, match=wrong_type):
        check_tokens(LAYOUT, batch.tokens, jnp.asarray(types))


def test_trace_time_errors():
    model = make_model()
    with pytest.raises(ValueError, match="length 17, longer than the position table"):
        model.features_batch(jnp.ones((1, LENGTH + 1), jnp.int32))
    with pytest.raises(TypeError, match="type_ids"):
        model.features_batch(
            jnp.ones((1, 4), jnp.int32), type_ids=jnp.ones((1, 5), jnp.int32)
        )
    key = jr.key(0)
    with pytest.raises(ValueError, match="`n_heads`=3 must divide `d_model`=8"):
        CausalTransformerLM(LAYOUT, d_model=8, n_heads=3, key=key)
    with pytest.raises(
        ValueError, match=r"`dropout` must be a finite real number in \[0, 1\)"
    ):
        CausalTransformerLM(LAYOUT, d_model=8, n_heads=2, dropout=1.0, key=key)
    with pytest.raises(ValueError, match="`unroll` must be in"):
        CausalTransformerLM(LAYOUT, d_model=8, n_heads=2, n_layers=2, unroll=3, key=key)


@pytest.mark.slow
def test_initialisations_and_flop_count():
    torch_like = make_model(d_model=64, n_heads=4, init="torch")
    gpt = make_model(d_model=64, n_heads=4, init="gpt", n_layers=8)
    # torch: Linear weights U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in); embeddings
    # N(0, 1).
    assert abs(float(jnp.std(torch_like.blocks.fc_weight)) - 1 / np.sqrt(3 * 64)) < 0.01
    assert abs(float(jnp.std(torch_like.token_embedding)) - 1) < 0.2
    # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers).
    assert abs(float(jnp.std(gpt.blocks.fc_weight)) - 0.02) < 0.002
    assert abs(float(jnp.std(gpt.blocks.proj_weight)) - 0.02 / 4) < 0.0005
    assert float(jnp.max(jnp.abs(gpt.head_bias))) == 0.0
    # Counted by hand for d=8, d_ff=32, 2 layers, length 16, V=24:
    # per layer 2*(4*64 + 2*8*32) + 4*16*8 = 1536 + 512; head 2*8*24 = 384.
    model = make_model()
    assert model.flops_per_token(16) == 3 * (2 * (1536 + 512) + 384)
    assert model.flops_per_token(16, causal=True) == 3 * (2 * (1536 + 256) + 384)
