"""Generation: cached decoding against the full forward pass, the modality
constraint, sampling, expected values and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.multimodal import (
    _generate as generate_module,
    build_sequence,
    generate,
    MISS,
    pack_sequences,
    PAD,
    pad_batch,
)

from .helpers import LAYOUT, LENGTH, make_batch, make_codebooks, make_model


SPECIAL = {1, 2, 3, PAD}  # BOS, EOS, SEP, PAD: copied from the layout, never drawn


def _full_logits(model, tokens, type_ids):
    return jax.vmap(lambda t, y: model(t, type_ids=y))(tokens, type_ids)


def _slice_of(type_id):
    slices = LAYOUT.slices()
    names = {1: "image", 2: "scalar"}
    names.update({3 + g: f"spectrum:{n}" for g, n in enumerate(LAYOUT.spectrum_groups)})
    return slices[names[type_id]]


@pytest.mark.parametrize(
    "prompt_length, dropout", [(1, 0.0), (5, 0.1), (9, 0.0), (LENGTH - 2, 0.1)]
)
def test_cached_decoding_gives_the_full_forward_logits(x64, dropout, prompt_length):
    # The model's dropout plays no part in generation: the logits are those of
    # the deterministic full forward pass over the generated sequences.
    model = make_model(dropout=dropout, pre_ln=prompt_length == 5)
    batch = make_batch(1)
    out = generate(
        model,
        batch,
        prompt_length=prompt_length,
        key=jr.key(0),
        temperature=2.0,
        return_logits=True,
    )
    assert out.logits is not None
    full = _full_logits(model, out.tokens, batch.type_ids)
    counted = np.asarray(out.tokens[:, 1:] != PAD)
    assert counted.sum() > 30
    np.testing.assert_allclose(
        np.asarray(out.logits[:, 1:])[counted],
        np.asarray(full[:, :-1])[counted],
        rtol=1e-10,
        atol=1e-12,
    )
    assert np.all(np.isnan(np.asarray(out.logits[:, 0])))


def test_drawn_tokens_stay_in_their_modality_and_the_layout_is_kept():
    model = make_model()
    batch = make_batch(2)
    prompt_length = 4
    out = generate(
        model, batch, prompt_length=prompt_length, key=jr.key(1), temperature=3.0
    )
    tokens, template = np.asarray(out.tokens), np.asarray(batch.tokens)
    types, drawn = np.asarray(batch.type_ids), np.asarray(out.generated)
    np.testing.assert_array_equal(
        tokens[:, :prompt_length], template[:, :prompt_length]
    )
    special = np.isin(template, list(SPECIAL))
    np.testing.assert_array_equal(tokens[special], template[special])
    np.testing.assert_array_equal(
        drawn, ~special & (np.arange(LENGTH) >= prompt_length)
    )
    for row, t in zip(*np.nonzero(drawn)):
        start, stop = _slice_of(types[row, t])
        assert start <= tokens[row, t] < stop
    # MISS in the template is a value to draw; it is never drawn itself.
    assert np.any(template[drawn] == MISS) and not np.any(tokens[drawn] == MISS)
    # At a high temperature the draws differ from the template somewhere.
    assert np.any(tokens[drawn] != template[drawn])


@pytest.mark.slow
def test_greedy_takes_the_most_likely_token_of_the_slice():
    model = make_model()
    batch = make_batch(3)
    out = generate(model, batch, prompt_length=2, greedy=True, return_logits=True)
    assert out.logits is not None
    tokens, types = np.asarray(out.tokens), np.asarray(batch.type_ids)
    logits = np.asarray(out.logits)
    for row, t in zip(*np.nonzero(np.asarray(out.generated))):
        start, stop = _slice_of(types[row, t])
        assert tokens[row, t] == start + np.argmax(logits[row, t, start:stop])
    # top_k=1 sampling is greedy, whatever the temperature and key.
    top_one = generate(
        model, batch, prompt_length=2, key=jr.key(5), temperature=5.0, top_k=1
    )
    np.testing.assert_array_equal(top_one.tokens, out.tokens)


def _one_drawn_position(n_rows):
    """`n_rows` copies of one object's sequence with only its last value drawn
    (prompt_length = its length - 2: the EOS follows)."""
    sequence = build_sequence(
        LAYOUT,
        image=np.array([1, 2, 3]),
        scalars=np.array([0, 1, 2]),
        spectra={"a": np.array([0, 1]), "b": np.array([2, 3])},
    )
    batch = pad_batch([sequence] * n_rows, length=LENGTH)
    return batch, len(sequence.tokens) - 2


@pytest.mark.parametrize("top_k", [None, 2])
def test_samples_follow_the_tempered_distribution(top_k):
    # 4000 draws of the one drawn position (spectrum group b, 4 tokens): the
    # frequencies match softmax(logits / T) over the slice (restricted to the two
    # most likely with top_k=2) within 5 standard errors.
    batch, prompt_length = _one_drawn_position(4000)
    model = make_model(init="gpt")
    model = eqx.tree_at(lambda m: m.head_bias, model, jr.normal(jr.key(3), (24,)))
    temperature = 0.7
    out = generate(
        model,
        batch,
        prompt_length=prompt_length,
        key=jr.key(4),
        temperature=temperature,
        top_k=top_k,
        return_logits=True,
    )
    assert out.logits is not None
    start, stop = _slice_of(4)
    drawn = np.asarray(out.tokens[:, prompt_length]) - start
    z = np.asarray(out.logits[0, prompt_length, start:stop], np.float64) / temperature
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(drawn, minlength=stop - start) / len(drawn)
    tolerance = 5 * np.sqrt(p * (1 - p) / len(drawn)) + 1e-12
    assert np.all(np.abs(counts - p) <= tolerance), (counts, p)
    if top_k is not None:
        assert np.all(counts[p == 0] == 0)


@pytest.mark.slow
def test_expected_values_at_the_drawn_positions(highest_precision):
    model, codebooks = make_model(), make_codebooks()
    batch = make_batch(4)
    out = generate(
        model,
        batch,
        prompt_length=3,
        key=jr.key(2),
        codebooks=codebooks,
        return_logits=True,
    )
    assert out.expected is not None and out.logits is not None
    logits = np.asarray(out.logits, np.float64)
    types, columns = np.asarray(batch.type_ids), np.asarray(batch.columns)
    drawn = np.asarray(out.generated)
    tables = {"image": np.asarray(codebooks.image, np.float64)}
    for g, name in enumerate(LAYOUT.spectrum_groups):
        tables[f"spectrum:{name}"] = np.asarray(codebooks.spectrum[g], np.float64)
    centres = np.asarray(codebooks.scalar, np.float64)
    checked = 0
    for row, t in zip(*np.nonzero(drawn)):
        start, stop = _slice_of(types[row, t])
        z = logits[row, t, start:stop]
        p = np.exp(z - z.max())
        p /= p.sum()
        if types[row, t] == 2:
            c = centres[columns[row, t]]
            mean = p @ c
            std = np.sqrt(p @ (c - mean) ** 2)
            np.testing.assert_allclose(out.expected["scalar"][row, t], mean, rtol=1e-5)
            np.testing.assert_allclose(
                out.expected["scalar_std"][row, t], std, rtol=1e-4
            )
            assert np.isnan(out.expected["image"][row, t]).all()
        else:
            name = (
                "image" if types[row, t] == 1 else f"spectrum:{'ab'[types[row, t] - 3]}"
            )
            np.testing.assert_allclose(
                out.expected[name][row, t], p @ tables[name], rtol=1e-5, atol=1e-6
            )
            assert np.isnan(out.expected["scalar"][row, t])
        checked += 1
    assert checked > 20
    for values in out.expected.values():
        assert np.all(np.isnan(np.asarray(values)[~drawn]))


@pytest.mark.slow
def test_compiled_once_under_jit_and_vmap(monkeypatch):
    traces = []
    original = generate_module._decode_step

    def counted(*args, **kwargs):
        traces.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "_decode_step", counted)
    model = make_model()
    batch = make_batch(5)
    # A prompt length no other test uses, so that the first call traces.
    first = generate(model, batch, prompt_length=7, key=jr.key(0), temperature=1.0)
    second = generate(model, batch, prompt_length=7, key=jr.key(1), temperature=0.5)
    assert len(traces) == 1
    assert not np.array_equal(first.tokens, second.tokens)
    # Inside a jit of the caller's, and vmapped over keys.
    jitted = eqx.filter_jit(
        lambda m, b, k: generate(m, b, prompt_length=7, key=k, temperature=1.0).tokens
    )
    np.testing.assert_array_equal(jitted(model, batch, jr.key(0)), first.tokens)
    keys = jr.split(jr.key(6), 3)
    many = jax.vmap(lambda k: generate(model, batch, prompt_length=7, key=k).tokens)(
        keys
    )
    assert many.shape == (3,) + batch.tokens.shape
    np.testing.assert_array_equal(
        many[1], generate(model, batch, prompt_length=7, key=keys[1]).tokens
    )


def _reordered(batch):
    """Row 0 with its image and scalar segments swapped: scalars first."""
    tokens, types = np.array(batch.tokens), np.array(batch.type_ids)
    row = tokens[0]
    seps = np.flatnonzero(row == 3)
    image, scalars = slice(1, seps[0]), slice(seps[0] + 1, seps[1])
    n_image, n_scalars = image.stop - image.start, scalars.stop - scalars.start
    new = np.concatenate([row[:1], row[scalars], [3], row[image], row[seps[1] :]])
    new_types = np.concatenate(
        [types[0, :1], types[0, scalars], [0], types[0, image], types[0, seps[1] :]]
    )
    assert len(new) == len(row) and n_image + n_scalars + 1 == seps[1] - 1
    tokens[0], types[0] = new, new_types
    return eqx.tree_at(
        lambda b: (b.tokens, b.type_ids),
        batch,
        (jnp.asarray(tokens), jnp.asarray(types)),
    )


def test_bad_input_is_refused_naming_the_argument():
    model, codebooks = make_model(), make_codebooks()
    batch = make_batch(6)
    key = jr.key(0)
    with pytest.raises(ValueError, match="`batch.tokens` must be modality segments in"):
        generate(model, _reordered(batch), prompt_length=6, key=key)
    with pytest.raises(
        ValueError, match="`prompt_length` must be at most `model.max_len`=16"
    ):
        generate(model, batch, prompt_length=LENGTH + 1, key=key)
    short = pad_batch([build_sequence(LAYOUT, image=np.array([1]))], length=4)
    with pytest.raises(
        ValueError, match="`prompt_length` must be at most the batch's length 4"
    ):
        generate(model, short, prompt_length=5, key=key)
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`temperature` must be a finite"):
            generate(model, batch, prompt_length=2, key=key, temperature=temperature)
    generate(model, batch, prompt_length=2, greedy=True, temperature=0.0)
    for top_k in (0, -3, LAYOUT.vocab_size + 1):
        with pytest.raises(ValueError, match="`top_k` must be an integer in"):
            generate(model, batch, prompt_length=2, key=key, top_k=top_k)
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        generate(model, batch, prompt_length=2)
    with pytest.raises(ValueError, match="`batch` must be a padded batch"):
        generate(
            model,
            pack_sequences([build_sequence(LAYOUT, image=np.array([1]))], length=8),
            prompt_length=2,
            key=key,
        )
    tokens = np.array(batch.tokens)
    tokens[1, 4] = tokens[1, 3]  # the SEP after the image becomes an image token
    bad = eqx.tree_at(lambda b: b.tokens, batch, jnp.asarray(tokens))
    types = np.array(batch.type_ids)
    types[1, 4] = 1
    bad = eqx.tree_at(lambda b: b.type_ids, bad, jnp.asarray(types))
    with pytest.raises(ValueError, match="`batch.tokens` must be modality segments"):
        generate(model, bad, prompt_length=2, key=key)
    tokens = np.array(batch.tokens)
    end = int(np.flatnonzero(tokens[2] == 2)[0])
    tokens[2, end - 1] = 3  # SEP right before EOS: an empty segment
    bad = eqx.tree_at(lambda b: b.tokens, batch, jnp.asarray(tokens))
    types = np.array(batch.type_ids)
    types[2, end - 1] = 0
    bad = eqx.tree_at(lambda b: b.type_ids, bad, jnp.asarray(types))
    with pytest.raises(ValueError, match="`batch.tokens` must be laid out like"):
        generate(model, bad, prompt_length=2, key=key)
    columns = np.array(batch.columns)
    columns[columns >= 0] = 7
    bad = eqx.tree_at(lambda b: b.columns, batch, jnp.asarray(columns))
    with pytest.raises(ValueError, match="`batch.columns` must be integer ids"):
        generate(model, bad, prompt_length=2, key=key, codebooks=codebooks)
    # Under an outer jit the layout check runs in the compiled code.
    run = eqx.filter_jit(lambda b: generate(model, b, prompt_length=6, key=key).tokens)
    with pytest.raises(eqx.EquinoxRuntimeError, match="modality segments"):
        run(_reordered(batch))
