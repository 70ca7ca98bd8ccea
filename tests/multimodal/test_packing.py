"""Packed batches: the plan, the batch, and the model, loss and gradients on packed
rows against the same sequences padded one per row."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from eqx_models import multimodal as mm
from eqx_models.multimodal import (
    MultimodalLoss,
    pack_sequences,
    packing_plan,
    PAD,
    pad_batch,
    TokenBatch,
)
from transforms import copy_for_donation, make_train_step

from ..helpers import assert_tree_allclose
from .helpers import LAYOUT, make_codebooks, make_model, make_sequences


ROW = 32  # positions per packed row; the padded rows have 16


def mixed_sequences(seed=0):
    """Objects of three lengths (15, 12 and 11 tokens): with and without the image
    and the second spectrum group, as a catalogue's spectrum coverage varies."""
    full = make_sequences(seed, 3)
    no_b = make_sequences(seed + 1, 2, group_b=False)
    no_image = make_sequences(seed + 2, 2, image=False)
    return [full[0], no_b[0], no_image[0], full[1], no_image[1], full[2], no_b[1]]


def where_packed(sequences, length):
    rows, starts = packing_plan([len(s.tokens) for s in sequences], length=length)
    return [(int(r), int(s), len(q.tokens)) for r, s, q in zip(rows, starts, sequences)]


def test_plan_is_first_fit_by_decreasing_length():
    # Worked by hand: 6 opens row 0 (2 left), 5 row 1 (3 left), 4 row 2; 3 fits
    # row 1, 2 fits row 0. Within a row the given order: row 0 holds #3 then #4.
    rows, starts = packing_plan([5, 3, 4, 2, 6], length=8)
    assert rows.tolist() == [1, 1, 2, 0, 0]
    assert starts.tolist() == [0, 5, 0, 0, 2]
    rows, starts = packing_plan([5, 3, 4, 2, 6], length=8, n_rows=2)
    assert rows.tolist() == [1, 1, -1, 0, 0] and starts[2] == -1


@given(
    lengths=st.lists(st.integers(1, 10), min_size=1, max_size=30),
    n_rows=st.none() | st.integers(1, 5),
)
def test_plan_places_sequences_without_overlap(lengths, n_rows):
    rows, starts = packing_plan(lengths, length=10, n_rows=n_rows)
    placed = rows >= 0
    if n_rows is None:
        assert placed.all()
    else:
        assert rows.max() < n_rows
    for row in set(rows[placed].tolist()):
        members = np.flatnonzero(rows == row)  # in the given order
        ends = starts[members] + np.asarray(lengths)[members]
        assert starts[members][0] == 0 and ends[-1] <= 10
        np.testing.assert_array_equal(starts[members][1:], ends[:-1])  # no gaps
    # A sequence is left out only if no row had room for it when its turn came:
    # every row's remaining room is smaller than it.
    load = np.bincount(rows[placed], np.asarray(lengths)[placed], minlength=n_rows or 0)
    for i in np.flatnonzero(~placed):
        assert np.all(10 - load < lengths[i])


def test_pack_sequences_lays_out_segments():
    sequences = mixed_sequences()
    batch = pack_sequences(sequences, length=ROW)
    assert batch.packed and batch.tokens.shape[1] == ROW
    tokens, segments = np.asarray(batch.tokens), np.asarray(batch.segment_ids)
    positions = np.asarray(batch.positions)
    seen = np.zeros(tokens.shape, bool)
    for (row, start, n), s in zip(where_packed(sequences, ROW), sequences):
        span = slice(start, start + n)
        np.testing.assert_array_equal(tokens[row, span], s.tokens)
        np.testing.assert_array_equal(np.asarray(batch.type_ids)[row, span], s.type_ids)
        np.testing.assert_array_equal(np.asarray(batch.columns)[row, span], s.columns)
        np.testing.assert_array_equal(positions[row, span], np.arange(n))
        assert len(set(segments[row, span].tolist())) == 1
        seen[row, span] = True
    # Everything else is padding, segment 0, its positions counting from 0.
    assert np.all(tokens[~seen] == PAD) and np.all(segments[~seen] == 0)
    for row in range(tokens.shape[0]):
        ids = segments[row][seen[row]]
        assert np.all(np.diff(ids) >= 0) and ids[0] == 1
        n_pad = int(np.sum(~seen[row]))
        np.testing.assert_array_equal(positions[row][~seen[row]], np.arange(n_pad))
    fixed = pack_sequences(sequences, length=ROW, n_rows=5)
    assert fixed.tokens.shape == (5, ROW)
    assert np.all(np.asarray(fixed.tokens)[batch.tokens.shape[0] :] == PAD)


def _segment_rows(sequences, length, packed_values, padded_values):
    """Pairs (packed, padded) of each sequence's entries."""
    out = []
    for i, (row, start, n) in enumerate(where_packed(sequences, length)):
        out.append((packed_values[row, start : start + n], padded_values[i, :n]))
    return out


def _hidden(model, batch):
    return model.features_batch(
        batch.tokens,
        type_ids=batch.type_ids,
        segment_ids=batch.segment_ids,
        positions=batch.positions,
    )


@pytest.mark.parametrize("pre_ln", [False, True])
def test_packed_hidden_states_equal_padded_ones(x64, pre_ln):
    sequences = mixed_sequences()
    model = make_model(pre_ln=pre_ln, max_len=ROW)
    packed = pack_sequences(sequences, length=ROW)
    padded = pad_batch(sequences, length=16)
    run = eqx.filter_jit(_hidden)
    pairs = _segment_rows(sequences, ROW, run(model, packed), run(model, padded))
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_packed_reconstructions_equal_padded_ones(x64):
    sequences = mixed_sequences(2)
    model, codebooks = make_model(max_len=ROW), make_codebooks()
    packed = pack_sequences(sequences, length=ROW)
    padded = pad_batch(sequences, length=16)

    def predict(batch):
        return mm.expected_values(
            model,
            codebooks,
            batch.tokens,
            type_ids=batch.type_ids,
            columns=batch.columns,
            segment_ids=batch.segment_ids,
            positions=batch.positions,
        )

    a, b = predict(packed), predict(padded)
    for name in a:
        for x, y in _segment_rows(sequences, ROW, a[name], b[name]):
            # NaN where nothing predicts: each object's first position.
            assert np.all(np.isnan(np.asarray(x[0])))
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_segments_do_not_see_each_other():
    # An attention that ignored the segment ids would let the second segment of a
    # row see the first: change the first and the second must not move.
    sequences = make_sequences(3, 2)
    model = make_model(max_len=ROW)
    batch = pack_sequences(sequences, length=ROW)
    assert batch.tokens.shape[0] == 1
    n = len(sequences[0].tokens)
    tokens = np.array(batch.tokens)
    tokens[0, 1:4] = LAYOUT.image_start + (tokens[0, 1:4] - LAYOUT.image_start + 1) % 6
    changed = eqx.tree_at(lambda b: b.tokens, batch, jnp.asarray(tokens))
    before, after = _hidden(model, batch), _hidden(model, changed)
    assert not np.allclose(before[0, 1:n], after[0, 1:n])
    np.testing.assert_array_equal(before[0, n:], after[0, n:])


def test_every_attention_implementation_gets_the_segment_mask(monkeypatch):
    # The fused cuDNN path needs the segments as much as XLA's: the call for each
    # implementation must carry the block-diagonal mask (maxtext's cuDNN path once
    # dropped its segment ids without a word). The models are bfloat16 on a backend
    # reported as a GPU, which an explicit "cudnn" requires; the call runs with XLA.
    original = jax.nn.dot_product_attention
    calls = []

    def recording(q, k, v, bias=None, mask=None, **kwargs: Any):
        calls.append((kwargs["implementation"], mask))
        options: dict[str, Any] = {**kwargs, "implementation": "xla"}
        return original(q, k, v, bias, mask, **options)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    batch = pack_sequences(make_sequences(4, 2), length=ROW)
    segments = np.asarray(batch.segment_ids)
    expected = segments[:, None, :, None] == segments[:, None, None, :]
    outs = []
    for implementation in ("xla", "cudnn"):
        model = make_model(max_len=ROW, attention=implementation, unroll=1)
        outs.append(_hidden(mm.cast_floating(model, jnp.bfloat16), batch))
    # One call per model: the layers are one scanned block.
    assert [c[0] for c in calls] == ["xla", "cudnn"]
    for _, mask in calls:
        assert mask is not None
        np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "backend, dtype", [("cpu", jnp.bfloat16), ("gpu", jnp.float32)]
)
def test_explicit_cudnn_where_it_cannot_run_is_refused(monkeypatch, backend, dtype):
    # cuDNN's kernel takes half precision on a GPU only; anywhere else JAX would fail
    # while lowering, with a message about neither the model nor its `attention`.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    model = mm.cast_floating(make_model(max_len=ROW, attention="cudnn"), dtype)
    batch = pack_sequences(make_sequences(4, 2), length=ROW)
    with pytest.raises(ValueError, match="CausalTransformerLM: `attention` must be"):
        _hidden(model, batch)


@pytest.mark.parametrize(
    "backend, dtype, length, expected",
    [
        ("gpu", jnp.bfloat16, 32, "cudnn"),
        ("gpu", jnp.bfloat16, 31, "xla"),  # cuDNN's bias needs an even length
        ("gpu", jnp.float32, 32, "xla"),
        ("cpu", jnp.bfloat16, 32, "xla"),
    ],
)
def test_automatic_choice_for_packed_rows(
    monkeypatch, backend, dtype, length, expected
):
    from eqx_models._attention import attention_implementation

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    choose = attention_implementation
    assert choose("auto", dtype, 8, length, needs_even_length=True) == expected
    padded = choose("auto", dtype, 8, length, needs_even_length=False)
    assert padded == ("cudnn" if (backend, dtype) == ("gpu", jnp.bfloat16) else "xla")


# The implementations this backend runs: on a GPU the fused kernel is compared with
# XLA's on the same packed rows; on a CPU there is only XLA.
IMPLEMENTATIONS = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_rows_in_bfloat16_match_padded_ones(implementation):
    # bfloat16 has 8 bits of mantissa: hidden states (layer-normed, order 1) agree
    # to a few units of 2^-8 after two layers.
    sequences = mixed_sequences(5)
    model = mm.cast_floating(
        make_model(max_len=ROW, d_model=16, n_heads=2, attention=implementation),
        jnp.bfloat16,
    )
    packed = pack_sequences(sequences, length=ROW)
    padded = pad_batch(sequences, length=ROW)
    run = eqx.filter_jit(_hidden)
    pairs = _segment_rows(sequences, ROW, run(model, packed), run(model, padded))
    for a, b in pairs:
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.1
        )


def _loss_and_grads(loss, model, batch, key):
    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(
        model, batch, key
    )


@pytest.mark.slow
@pytest.mark.parametrize("scalar_loss", ["mse", "two_hot", "hl_gauss"])
def test_packed_losses_and_gradients_equal_padded_ones(x64, scalar_loss):
    sequences = mixed_sequences(6)
    model = make_model(max_len=ROW)
    loss = MultimodalLoss(
        make_codebooks(), scalar_loss=scalar_loss, compute_dtype="float64"
    )
    packed = pack_sequences(sequences, length=ROW)
    padded = pad_batch(sequences, length=16)
    # key=None: every valid position of each modality, no dropout.
    a = _loss_and_grads(loss, model, packed, None)
    b = _loss_and_grads(loss, model, padded, None)
    assert float(a[0][1]["spectrum"]) > 0 and float(a[0][1]["image"]) > 0
    assert_tree_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_sampled_losses_equal_when_every_position_is_drawn(x64):
    # With a key the loss samples `sample_k` positions per modality; when that is
    # at least the number of valid ones it takes them all, packed or not.
    sequences = mixed_sequences(7)
    model = make_model(max_len=ROW)
    loss = MultimodalLoss(make_codebooks(), sample_k=64, compute_dtype="float64")
    packed = pack_sequences(sequences, length=ROW)
    padded = pad_batch(sequences, length=16)
    a = _loss_and_grads(loss, model, packed, jr.key(0))
    b = _loss_and_grads(loss, model, padded, jr.key(1))
    assert_tree_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_train_step_on_a_packed_batch_equals_the_padded_one(x64):
    sequences = mixed_sequences(8)
    model = make_model(max_len=ROW)
    loss = MultimodalLoss(make_codebooks(), compute_dtype="float64")
    # SGD, not Adam: Adam would blow the rounding noise of gradients that are 0 in
    # exact arithmetic (the key biases') up to full-size steps.
    optimizer = optax.sgd(1e-1)
    step = make_train_step(lambda m, b, k: loss(m, b, None), optimizer, has_aux=True)
    results = []
    for batch in (
        pack_sequences(sequences, length=ROW),
        pad_batch(sequences, length=ROW),
    ):
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        # The step donates its model: give it a copy.
        new_model, _, metrics = step(
            copy_for_donation(model), opt_state, batch, jr.key(0)
        )
        results.append((eqx.filter(new_model, eqx.is_array), metrics["loss"]))
    assert_tree_allclose(results[0], results[1], rtol=1e-9, atol=1e-12)
    evaluated = [
        mm.evaluate(model, loss, b)
        for b in (
            pack_sequences(sequences, length=ROW),
            pad_batch(sequences, length=16),
        )
    ]
    assert evaluated[0] == pytest.approx(evaluated[1], rel=1e-10)


@pytest.mark.slow
def test_train_accepts_packed_batches():
    pool = mixed_sequences(9) + mixed_sequences(10)
    model = make_model(max_len=ROW)
    loss = MultimodalLoss(make_codebooks(), sample_k=8)
    config = mm.MultimodalTrainConfig(n_steps=2, learning_rate=1e-2)

    def data(i):
        return pack_sequences(pool[7 * (i % 2) : 7 * (i % 2) + 7], length=ROW, n_rows=4)

    result = mm.train(model, loss, data, config, key=jr.key(0), progress=False)
    assert len(result.history) == 2
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_bad_packing_is_refused_naming_the_argument():
    sequences = make_sequences(0, 3)
    with pytest.raises(ValueError, match=r"`sequences\[0\]` must be at most `length`"):
        pack_sequences(sequences, length=10)
    with pytest.raises(ValueError, match=r"`lengths\[1\]` must be at most `length`"):
        packing_plan([3, 11], length=10)
    with pytest.raises(ValueError, match="`n_rows` must be enough rows.*leave 1 of"):
        pack_sequences(sequences, length=ROW, n_rows=1)
    with pytest.raises(ValueError, match="`sequences` is empty"):
        pack_sequences([], length=ROW)
    batch = pack_sequences(sequences, length=ROW)
    assert batch.segment_ids is not None
    with pytest.raises(ValueError, match="`positions` must be given together"):
        TokenBatch(
            batch.tokens,
            batch.type_ids,
            batch.columns,
            batch.values,
            segment_ids=batch.segment_ids,
        )
    # (Under pytest jaxtyping's hook refuses it first, in its own words.)
    with pytest.raises(TypeError, match="segment_ids"):
        TokenBatch(
            batch.tokens,
            batch.type_ids,
            batch.columns,
            batch.values,
            segment_ids=batch.segment_ids.astype(jnp.float32),
            positions=batch.positions,
        )


def _with(batch, **fields):
    return eqx.tree_at(
        lambda b: [getattr(b, f) for f in fields],
        batch,
        [jnp.asarray(v) for v in fields.values()],
    )


def test_inconsistent_segments_are_refused():
    model = make_model(max_len=ROW)
    batch = pack_sequences(make_sequences(0, 3), length=ROW)
    assert batch.segment_ids is not None
    segments, positions = np.array(batch.segment_ids), np.array(batch.positions)
    n = int(np.sum(segments[0] == 1))
    cases = []
    bad = segments.copy()
    bad[0, -1] = 3  # a PAD position in a segment
    cases.append((dict(segment_ids=bad), "`segment_ids` must be 0 exactly at the PAD"))
    bad = segments.copy()
    bad[0, : n // 2] = 2  # segment 2, then 1, then 2: not contiguous
    cases.append((dict(segment_ids=bad), "`segment_ids` must be non-decreasing"))
    bad = positions.copy()
    bad[0, n] = 5  # the second segment starting at position 5
    cases.append((dict(positions=bad), r"`positions` must be each position's index"))
    run = eqx.filter_jit(_hidden)
    for fields, message in cases:
        wrong = _with(batch, **fields)
        with pytest.raises(ValueError, match=message):
            _hidden(model, wrong)
        with pytest.raises(eqx.EquinoxRuntimeError, match=message):
            run(model, wrong)
    with pytest.raises(ValueError, match="`positions` must be given together"):
        model.features_batch(batch.tokens, segment_ids=batch.segment_ids)
    with pytest.raises((ValueError, TypeError), match="`segment_ids` must"):
        model.features_batch(
            batch.tokens,
            segment_ids=batch.segment_ids[:, 1:],
            positions=batch.positions,
        )
