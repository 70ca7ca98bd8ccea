import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.multimodal import (
    CausalTransformerLM,
    Codebooks,
    MultimodalLoss,
    PAD,
    TokenBatch,
    VocabLayout,
)

from .helpers import LAYOUT, make_batch, make_codebooks, make_model


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _shift(x, fill):
    x = np.asarray(x)
    return np.concatenate([x[:, 1:], np.full_like(x[:, :1], fill)], axis=1).reshape(-1)


@eqx.filter_jit
def features(model, batch):
    return model.features_batch(batch.tokens, type_ids=batch.type_ids)


def reference(model, batch, codebooks, *, weights=(0.1, 0.1, 0.1), scalar="mse"):
    """DESIGN section 8 in float64 NumPy, from the model's hidden states."""
    hidden = features(model, batch)
    h = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
    w = np.asarray(model.head_weight, np.float64)
    b = np.asarray(model.head_bias, np.float64)
    t = _shift(batch.tokens, PAD)
    columns = _shift(batch.columns, -1)
    values = _shift(batch.values, np.nan)
    z = h @ w.T + b
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    counted = t != PAD
    ce = np.mean((lse - z[np.arange(len(t)), t])[counted])
    slices = LAYOUT.slices()

    def vector(name, codebook):
        start, stop = slices[name]
        rows = np.flatnonzero((t >= start) & (t < stop))
        if rows.size == 0:
            return 0.0, False
        cb = np.asarray(codebook, np.float64)
        pred = _softmax(z[rows, start:stop]) @ cb
        return np.mean(np.mean((pred - cb[t[rows] - start]) ** 2, axis=1)), True

    image, _ = vector("image", codebooks.image)
    start, stop = slices["scalar"]
    rows = np.flatnonzero((t >= start) & (t < stop))
    table = np.asarray(codebooks.scalar, np.float64)
    per = []
    for r in rows:
        centres = table[columns[r]] if table.shape[0] > 1 else table[0]
        p = _softmax(z[r, start:stop])
        target = centres[t[r] - start]
        if scalar == "mse":
            per.append((p @ centres - target) ** 2)
        else:
            raw = target if np.isnan(values[r]) else values[r]
            raw = min(max(raw, centres[0]), centres[-1])
            q = np.zeros(len(centres))
            j = min(np.searchsorted(centres, raw, side="right"), len(centres) - 1)
            q[j - 1] = (centres[j] - raw) / (centres[j] - centres[j - 1])
            q[j] = 1 - q[j - 1]
            per.append(-(q * np.log(p)).sum())
    scalar_loss = np.mean(per) if per else 0.0
    groups = [
        vector(f"spectrum:{g}", cb)
        for g, cb in zip(LAYOUT.spectrum_groups, codebooks.spectrum)
    ]
    present = [value for value, ok in groups if ok]
    spectrum = np.mean(present) if present else 0.0
    parts = {"ce": ce, "image": image, "scalar": scalar_loss, "spectrum": spectrum}
    total = ce + weights[0] * image + weights[1] * scalar_loss + weights[2] * spectrum
    return total, parts


@eqx.filter_jit
def deterministic(loss, model, batch):
    return loss(model, batch, None)


def _check(got, want, rtol=1e-5, atol=1e-6):
    total, parts = got
    want_total, want_parts = want
    np.testing.assert_allclose(total, want_total, rtol=rtol, atol=atol)
    for name, value in want_parts.items():
        np.testing.assert_allclose(
            parts[name], value, rtol=rtol, atol=atol, err_msg=name
        )


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_loss_matches_numpy_reference():
    model, codebooks = make_model(), make_codebooks()
    loss = MultimodalLoss(codebooks)  # sample_k=1024: more than any count here

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def sampled(model, batch, key):
        return loss(model, batch, key)

    for batch in (
        make_batch(0),
        make_batch(1, group_b=False),  # group "b" absent: averaged over "a" only
        make_batch(2, image=False),  # no image anywhere: image loss exactly 0
    ):
        want = reference(model, batch, codebooks)
        _check(deterministic(loss, model, batch), want)
        # With a key, sampling is disabled when sample_k exceeds every count.
        _check(sampled(model, batch, jr.key(0)), want)
    assert (
        float(deterministic(loss, model, make_batch(2, image=False))[1]["image"]) == 0.0
    )


@pytest.mark.slow
def test_absent_modality_has_no_gradient():
    model, codebooks = make_model(), make_codebooks()
    loss = MultimodalLoss(codebooks)
    batch = make_batch(3, image=False)
    image_loss = lambda m: loss(m, batch, None)[1]["image"]
    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(image_loss))(model)
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_sampling_picks_one_valid_position_uniformly():
    # sample_k=1: each image loss is the error of exactly one image position, chosen
    # uniformly; two spectrum groups get max(1, 1 // 2) = 1 position each.
    model, codebooks = make_model(), make_codebooks()
    loss = MultimodalLoss(codebooks, sample_k=1)
    batch = make_batch(4)
    hidden = features(model, batch)
    h = np.asarray(hidden, np.float64).reshape(-1, hidden.shape[-1])
    z = h @ np.asarray(model.head_weight, np.float64).T + np.asarray(model.head_bias)
    t = _shift(batch.tokens, PAD)
    start, stop = LAYOUT.slices()["image"]
    rows = np.flatnonzero((t >= start) & (t < stop))
    cb = np.asarray(codebooks.image, np.float64)
    errors = np.mean((_softmax(z[rows, start:stop]) @ cb - cb[t[rows] - start]) ** 2, 1)
    keys = jr.split(jr.key(1), 300)
    images = eqx.filter_jit(jax.vmap(lambda k: loss(model, batch, k)[1]["image"]))(keys)
    images = np.asarray(images, np.float64)
    distance = np.abs(images[:, None] - errors[None, :])
    assert np.all(distance.min(axis=1) < 1e-5), "a sampled loss is no position's error"
    counts = np.bincount(distance.argmin(axis=1), minlength=len(rows))
    # 12 positions, 300 draws: 25 expected each; a uniform sampler stays within 2x.
    assert len(rows) == 12 and counts.min() > 8 and counts.max() < 50


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
@pytest.mark.parametrize("scalar_loss", ["two_hot", "hl_gauss"])
def test_distributional_scalar_losses(scalar_loss):
    model, codebooks = make_model(), make_codebooks()
    loss = MultimodalLoss(codebooks, scalar_loss=scalar_loss, hl_gauss_sigma=0.75)
    batch = make_batch(5)
    total, parts = deterministic(loss, model, batch)
    if scalar_loss == "two_hot":
        _check((total, parts), reference(model, batch, codebooks, scalar="two_hot"))
    else:
        # HL-Gauss: finite, and closer to the two-hot loss than to zero.
        two_hot = reference(model, batch, codebooks, scalar="two_hot")[1]["scalar"]
        assert np.isfinite(float(parts["scalar"]))
        assert abs(float(parts["scalar"]) - two_hot) < 0.5 * two_hot


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.slow
def test_shared_scalar_table_and_bfloat16_compute():
    model = make_model()
    shared = make_codebooks(n_columns=1)
    batch = make_batch(6)
    loss = MultimodalLoss(shared)
    _check(deterministic(loss, model, batch), reference(model, batch, shared))
    half = MultimodalLoss(shared, compute_dtype="bfloat16")
    total, parts = deterministic(half, model, batch)
    assert total.dtype == jnp.float32
    want, _ = reference(model, batch, shared)
    np.testing.assert_allclose(total, want, rtol=3e-2)


@pytest.mark.slow
def test_no_full_float32_logits_at_a_large_vocabulary():
    layout = VocabLayout(n_image=8000, n_scalar=8, n_spectrum=8, spectrum_groups=("a",))
    rng = np.random.default_rng(0)
    codebooks = Codebooks(
        layout,
        image=rng.normal(size=(8000, 2)),
        scalar=np.sort(rng.normal(size=8)),
        spectrum=[rng.normal(size=(8, 2))],
    )
    model = CausalTransformerLM(
        layout,
        d_model=8,
        n_layers=1,
        n_heads=2,
        max_len=256,
        dropout=0.0,
        key=jr.key(0),
    )
    batch = TokenBatch(
        tokens=jnp.ones((8, 256), jnp.int32),
        type_ids=jnp.ones((8, 256), jnp.int32),
        columns=jnp.zeros((8, 256), jnp.int32),
        values=jnp.zeros((8, 256), jnp.float32),
    )
    logits_bytes = 8 * 256 * layout.vocab_size * 4  # 65 MB

    def naive(model, batch, key):
        logits = jax.vmap(model)(batch.tokens)
        targets = jnp.concatenate([batch.tokens[:, 1:], batch.tokens[:, :1] * 0], 1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(targets != PAD, picked, 0)) / jnp.sum(targets != PAD)

    params, static = eqx.partition(model, eqx.is_array)

    def temp_bytes(fn):
        def loss_of_params(p, b, k):
            return fn(eqx.combine(p, static), b, k)

        grad = jax.jit(jax.grad(loss_of_params))
        compiled = grad.lower(params, batch, jr.key(0)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def features_only(model, batch, key):
        return jnp.mean(
            model.features_batch(batch.tokens, type_ids=batch.type_ids) ** 2
        )

    ours = MultimodalLoss(codebooks, sample_k=64, ce_chunk_size=128)
    ours_bytes = temp_bytes(lambda m, b, k: ours(m, b, k)[0])
    naive_bytes = temp_bytes(naive)
    # Counted beyond the gradient of the transformer body alone, which holds its
    # activations and the backend's matmul workspace (tens of MB on a GPU).
    baseline = temp_bytes(features_only)
    assert naive_bytes - baseline >= logits_bytes
    # What remains is a few (chunk, vocab) buffers of the cross-entropy scan.
    assert ours_bytes - baseline < logits_bytes / 2, (ours_bytes, baseline, naive_bytes)


def test_loss_errors():
    model, codebooks = make_model(), make_codebooks()
    other = VocabLayout(n_image=6, n_scalar=5, n_spectrum=4, spectrum_groups=("a", "c"))
    rng = np.random.default_rng(0)
    foreign = Codebooks(
        other,
        image=rng.normal(size=(6, 3)),
        scalar=rng.normal(size=5),
        spectrum=[rng.normal(size=(4, 2))] * 2,
    )
    batch = make_batch(7)
    with pytest.raises(ValueError, match="codebooks were built for another"):
        MultimodalLoss(foreign)(model, batch, None)
    loss = MultimodalLoss(codebooks)
    flat = jax.tree.map(lambda x: x[0], batch)
    with pytest.raises(ValueError, match=r"must have shape \(batch, length\)"):
        loss(model, flat, None)
    columns = np.array(batch.columns)
    columns[columns == 2] = 7  # beyond the 3 rows of scalar centres
    bad = TokenBatch(batch.tokens, batch.type_ids, jnp.asarray(columns), batch.values)
    with pytest.raises(
        eqx.EquinoxRuntimeError,
        match=r"`batch.columns` must be integer ids in \[0, codebooks.n_columns\)",
    ):
        deterministic(loss, model, bad)
    with pytest.raises(ValueError, match="`sample_k` must be a positive integer"):
        MultimodalLoss(codebooks, sample_k=0)
    with pytest.raises(TypeError, match="scalar_loss"):
        MultimodalLoss(codebooks, scalar_loss="l1")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`compute_dtype` must be one of"):
        MultimodalLoss(codebooks, compute_dtype="int8")


@pytest.mark.slow
def test_loss_in_float64(x64):
    model, codebooks = make_model(), make_codebooks()
    assert model.blocks.qkv_weight.dtype == jnp.float64
    batch = make_batch(8)
    loss = MultimodalLoss(codebooks, compute_dtype="float64")
    total, parts = deterministic(loss, model, batch)
    assert total.dtype == jnp.float64
    _check((total, parts), reference(model, batch, codebooks), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("highest_precision")
def test_expected_values_are_the_losses_predictions():
    from eqx_models.multimodal import expected_values

    model, codebooks = make_model(), make_codebooks()
    batch = make_batch(9)
    predicted = eqx.filter_jit(expected_values)(
        model, codebooks, batch.tokens, type_ids=batch.type_ids, columns=batch.columns
    )
    hidden = np.asarray(features(model, batch), np.float64)
    z = hidden @ np.asarray(model.head_weight, np.float64).T + np.asarray(
        model.head_bias
    )
    tokens = np.asarray(batch.tokens)
    columns = np.asarray(batch.columns)
    start, stop = LAYOUT.slices()["scalar"]
    table = np.asarray(codebooks.scalar, np.float64)
    checked = 0
    for row, t in zip(*np.nonzero((tokens >= start) & (tokens < stop))):
        want = _softmax(z[row, t - 1, start:stop]) @ table[columns[row, t]]
        np.testing.assert_allclose(predicted["scalar"][row, t], want, rtol=1e-5)
        checked += 1
    start, stop = LAYOUT.slices()["spectrum:b"]
    for row, t in zip(*np.nonzero((tokens >= start) & (tokens < stop))):
        want = _softmax(z[row, t - 1, start:stop]) @ np.asarray(codebooks.spectrum[1])
        np.testing.assert_allclose(predicted["spectrum:b"][row, t], want, rtol=1e-5)
        checked += 1
    assert checked > 10
    assert predicted["image"].shape == (4, 16, 3)
    assert np.all(np.isnan(np.asarray(predicted["image"][:, 0])))
    with pytest.raises(ValueError, match="pass `columns`"):
        expected_values(model, codebooks, batch.tokens)
