import dataclasses
import math
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.multimodal import (
    CausalTransformerLM,
    evaluate,
    learning_rate_schedule,
    make_optimizer,
    MultimodalLoss,
    MultimodalTrainConfig,
    pad_batch,
    train,
    VocabLayout,
    weight_decay_mask,
)
from transforms import CheckpointError, NonFiniteLossError

from ..helpers import run_script
from .helpers import LENGTH, make_codebooks, make_model, make_sequences


# One configuration for the trainer tests, so that they share one compiled step:
# 3 optimiser steps of 4 micro-batches each, a checkpoint after every step.
CONFIG = MultimodalTrainConfig(
    n_steps=3,
    learning_rate=1e-2,
    warmup_steps=1,
    accumulation_steps=4,
    checkpoint_every=1,
)
# No missing scalars: every micro-batch then has the same number of targets per
# modality, so the mean of micro-batch means is the big batch's mean.
POOL = make_sequences(11, 48, missing=0.0)
_LOSS = MultimodalLoss(make_codebooks(), scalar_loss="hl_gauss")
TRACES = []


def LOSS(model, batch, key):
    # The loss every trainer test uses; counts how often it is traced.
    TRACES.append(None)
    return _LOSS(model, batch, key)


def micro_batch(i):
    return pad_batch(POOL[2 * i : 2 * i + 2], length=LENGTH)


def big_batch(s):
    return pad_batch(POOL[8 * s : 8 * s + 8], length=LENGTH)


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def test_schedule_follows_the_formula():
    config = MultimodalTrainConfig(
        n_steps=50, learning_rate=2.0, warmup_steps=10, min_lr_ratio=0.1
    )
    schedule = learning_rate_schedule(config)
    # The original's warmup: the first optimiser step has rate peak / warmup.
    for s in [0, 3, 9, 10, 20, 35, 50, 70]:
        if s < 10:
            want = 2.0 * (s + 1) / 10
        else:
            progress = min(s - 10, 40) / 40
            want = 0.2 + (2.0 - 0.2) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(s)) == pytest.approx(want, rel=1e-5), s
    assert float(schedule(0)) == pytest.approx(0.2, rel=1e-6)
    # Without warmup the cosine starts at the peak; one warmup step is the peak too.
    for warmup in (0, 1):
        config = MultimodalTrainConfig(
            n_steps=5, learning_rate=2.0, warmup_steps=warmup
        )
        assert float(learning_rate_schedule(config)(0)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be in \[0, n_steps\)"):
        MultimodalTrainConfig(n_steps=5, warmup_steps=5)
    with pytest.raises(
        ValueError, match="`accumulation_steps` must be a positive integer"
    ):
        MultimodalTrainConfig(n_steps=5, accumulation_steps=0)


def test_weight_decay_reaches_matrices_and_embeddings_only():
    model = make_model()
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = weight_decay_mask(params)
    assert mask.blocks.qkv_weight and mask.token_embedding and mask.head_weight
    assert not mask.blocks.ln1_weight and not mask.head_bias and not mask.blocks.fc_bias
    config = MultimodalTrainConfig(
        n_steps=10, learning_rate=0.1, weight_decay=0.5, clip_norm=None
    )
    optimizer = make_optimizer(config, model)
    # A value: equal configurations give equal optimisers (no cache involved).
    assert make_optimizer(config, make_model(key=1)) == optimizer
    state = optimizer.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero, state, params)
    # With zero gradients AdamW's update is -lr * weight_decay * param on decayed
    # leaves and exactly 0 elsewhere (lr = schedule(0) = 0.1 without warmup).
    np.testing.assert_allclose(
        updates.blocks.qkv_weight, -0.1 * 0.5 * params.blocks.qkv_weight, rtol=1e-5
    )
    assert np.all(np.asarray(updates.blocks.ln1_weight) == 0)
    assert np.all(np.asarray(updates.head_bias) == 0)


# Float32 matmuls (not TF32 on a GPU): Adam normalises the small differences of
# two summation orders, so the comparison needs the full float32 mantissa.
@pytest.mark.slow
@pytest.mark.usefixtures("highest_precision")
def test_accumulating_four_micro_batches_equals_one_big_batch(tmp_path):
    model = make_model()
    accumulated = train(model, LOSS, micro_batch, CONFIG, key=jr.key(0), progress=False)
    big = MultimodalTrainConfig(
        **{**CONFIG.__dict__, "accumulation_steps": 1, "eval_every": 1}
    )
    held_out = pad_batch(POOL[40:48], length=LENGTH)
    single = train(
        model,
        LOSS,
        big_batch,
        big,
        key=jr.key(0),
        eval_batches=held_out,
        peak_flops=1e12,
        progress=False,
    )
    # Same parameters... except the key bias: attention scores are invariant to it
    # (a softmax shift), so its true gradient is 0 and Adam normalises float noise
    # of order 1e-9 into steps of order lr. Its query and value parts must agree.
    d = 8
    for a, b in zip(
        _leaves(eqx.tree_at(lambda m: m.blocks.qkv_bias, accumulated.model, None)),
        _leaves(eqx.tree_at(lambda m: m.blocks.qkv_bias, single.model, None)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for part in (slice(0, d), slice(2 * d, 3 * d)):
        np.testing.assert_allclose(
            accumulated.model.blocks.qkv_bias[:, part],
            single.model.blocks.qkv_bias[:, part],
            rtol=1e-4,
            atol=1e-6,
        )
    # ...and the same losses: the big batch's loss is the mean of its four parts.
    micro_losses = np.reshape([r["loss"] for r in accumulated.history], (3, 4))
    np.testing.assert_allclose(
        micro_losses.mean(axis=1), [r["loss"] for r in single.history], rtol=1e-5
    )
    # The learning rate follows optimiser steps, not micro-steps.
    schedule = learning_rate_schedule(CONFIG)
    assert [r["learning_rate"] for r in accumulated.history] == pytest.approx(
        [float(schedule(i // 4)) for i in range(12)]
    )
    record = single.history[-1]
    assert record["tokens"] == 8 * LENGTH and record["tokens_per_s"] > 0
    assert 0 < record["mfu"] and "eval_loss" in record and "eval_spectrum" in record
    assert record["eval_loss"] < single.history[0]["eval_loss"]  # it learns
    again = evaluate(single.model, LOSS, held_out)
    assert again == pytest.approx(
        {k[5:]: v for k, v in record.items() if k[:5] == "eval_"}
    )
    assert evaluate(single.model, LOSS, [held_out, held_out]) == again


def test_resume_is_bit_identical_and_checks_the_configuration(tmp_path):
    model = make_model()
    traces = len(TRACES)
    # Deterministic compilation: bit-identical resumes on a GPU too.
    full = train(
        model,
        LOSS,
        micro_batch,
        CONFIG,
        key=jr.key(1),
        checkpoint_path=tmp_path / "a",
        deterministic=True,
    )

    def crashing(i):
        if i == 6:
            raise KeyboardInterrupt  # the process dies in the middle of a run
        return micro_batch(i)

    path = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(
            model,
            LOSS,
            crashing,
            CONFIG,
            key=jr.key(1),
            checkpoint_path=path,
            deterministic=True,
        )
    resumed = train(
        make_model(key=7),  # a template; the checkpoint's weights win
        LOSS,
        micro_batch,
        CONFIG,
        key=jr.key(1),
        checkpoint_path=path,
        resume=True,
        deterministic=True,
        progress=False,
    )
    assert [r["step"] for r in resumed.history] == list(range(4, 12))
    # Three runs of one configuration: the step compiled at most once among them
    # (once only if an earlier test has not already compiled it).
    assert len(TRACES) - traces <= 1
    for a, b in zip(_leaves(full.model), _leaves(resumed.model)):
        assert np.array_equal(a, b)
    for a, b in zip(_leaves(full.opt_state), _leaves(resumed.opt_state)):
        assert np.array_equal(a, b)
    # Another vocabulary layout and another head count: both are listed.
    layout = VocabLayout(
        n_image=7, n_scalar=5, n_spectrum=4, spectrum_groups=("a", "b")
    )
    other = CausalTransformerLM(
        layout, d_model=8, n_layers=2, n_heads=4, max_len=LENGTH, key=jr.key(0)
    )
    with pytest.raises(
        CheckpointError,
        match=r"(?s)^train: .*model\.n_heads: expected 4, checkpoint has 2.*"
        r"model\.vocabulary\.n_image: expected 7, checkpoint has 6",
    ):
        train(
            other,
            LOSS,
            micro_batch,
            CONFIG,
            key=jr.key(1),
            checkpoint_path=tmp_path / "a",
            resume=True,
        )


@pytest.mark.slow
def test_resume_checks_the_training_configuration_unless_allowed(tmp_path):
    path = tmp_path / "run"
    train(
        make_model(),
        LOSS,
        micro_batch,
        CONFIG,
        key=jr.key(1),
        checkpoint_path=path,
        progress=False,
    )
    before = path.read_bytes()
    common = dict(key=jr.key(1), checkpoint_path=path, resume=True, progress=False)
    longer = dataclasses.replace(CONFIG, n_steps=4)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)^train: .*another configuration:\n  "
        r"train\.n_steps: expected 4, checkpoint has 3\n  "
        r"train\.learning_rate: expected 0\.02, checkpoint has 0\.01$",
    ):
        train(
            make_model(),
            LOSS,
            micro_batch,
            dataclasses.replace(longer, learning_rate=2e-2),
            **common,
        )
    with pytest.raises(
        CheckpointError,
        match=r"data\.tokens_shape: expected \[3, 16\], checkpoint has \[2, 16\]",
    ):
        three = lambda i: pad_batch(POOL[3 * i : 3 * i + 3], length=LENGTH)
        train(make_model(), LOSS, three, CONFIG, **common)
    assert path.read_bytes() == before
    # The evaluation and checkpoint periods may change (the run is complete: no
    # step runs).
    done = train(
        make_model(),
        LOSS,
        micro_batch,
        dataclasses.replace(CONFIG, checkpoint_every=2),
        **common,
    )
    assert done.history == [] and path.read_bytes() == before
    # Allowed: one more optimiser step, on the schedule of a four-step run (over the
    # old three-step layout it would sit at the floor).
    resumed = train(
        make_model(), LOSS, micro_batch, longer, allow_config_change=True, **common
    )
    assert [r["step"] for r in resumed.history] == [12, 13, 14, 15]
    schedule = learning_rate_schedule(longer)
    assert float(schedule(3)) > 1.5 * float(learning_rate_schedule(CONFIG)(3))
    assert [r["learning_rate"] for r in resumed.history] == pytest.approx(
        [float(schedule(3))] * 4
    )


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from transforms import load_checkpoint

    # An absurd learning rate: the first update sends the weights to ~1e30 and the
    # next forward pass overflows.
    config = MultimodalTrainConfig(n_steps=4, learning_rate=1e30, checkpoint_every=1)
    model = make_model()
    path = tmp_path / "run"
    with pytest.raises(
        NonFiniteLossError,
        match="non-finite loss, gradient, parameters, optimiser state at step 1",
    ) as info:
        train(
            model,
            LOSS,
            big_batch,
            config,
            key=jr.key(2),
            checkpoint_path=path,
            progress=False,
        )
    assert info.value.checkpoint_step == 1
    optimizer = make_optimizer(config, model)
    kept = load_checkpoint(
        path,
        model=model,
        opt_state=optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        key=jr.key(0),
    )
    assert kept.step == 1
    assert all(np.all(np.isfinite(x)) for x in _leaves(kept.model))


_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx, jax.random as jr, numpy as np
    from eqx_models.multimodal import (
        MultimodalLoss, MultimodalTrainConfig, pad_batch, train,
    )
    from tests.multimodal.helpers import (
        LENGTH, make_codebooks, make_model, make_sequences,
    )

    assert jax.device_count() == 8
    pool = make_sequences(3, 32, missing=0.2)
    data = lambda i: pad_batch(pool[8 * i : 8 * i + 8], length=LENGTH)
    loss = MultimodalLoss(make_codebooks(), sample_k=4)
    config = MultimodalTrainConfig(n_steps=3, learning_rate=1e-2)
    mesh = jax.make_mesh((8,), ("data",))
    kwargs = dict(key=jr.key(0), progress=False)
    single = train(make_model(dropout=0.1), loss, data, config, **kwargs)
    parallel = train(make_model(dropout=0.1), loss, data, config, mesh=mesh, **kwargs)
    for a, b in zip(single.history, parallel.history):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # The key bias has a zero true gradient (see the accumulation test): skip it.
    no_key_bias = lambda m: eqx.tree_at(lambda t: t.blocks.qkv_bias, m, None)
    leaves = lambda m: jax.tree.leaves(eqx.filter(no_key_bias(m), eqx.is_array))
    for a, b in zip(leaves(single.model), leaves(parallel.model)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert b.sharding.is_fully_replicated and len(b.sharding.device_set) == 8
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_on_eight_devices_equals_one_device():
    # Dropout and position sampling are on: their keys do not depend on sharding.
    # CPU only, so that the eight devices are the fake CPU ones on any machine.
    run_script(_SCRIPT)


def test_equal_configurations_share_one_compiled_step():
    # No cache anywhere: the optimiser and the step are built anew by each call and
    # compare equal because the configuration does.
    traces = len(TRACES)
    config = MultimodalTrainConfig(n_steps=2, learning_rate=3e-3, clip_norm=None)
    for seed in (0, 1):
        train(
            make_model(key=seed),
            LOSS,
            big_batch,
            dataclasses.replace(config),
            key=jr.key(seed),
            progress=False,
        )
    assert len(TRACES) - traces == 1
    assert make_optimizer(config) == make_optimizer(dataclasses.replace(config))


def test_resume_names_the_model_options_and_the_loss(tmp_path):
    path = tmp_path / "run"
    common = dict(key=jr.key(1), checkpoint_path=path, progress=False)
    train(make_model(), LOSS, micro_batch, CONFIG, **common)
    before = path.read_bytes()
    for options, field, values in [
        (dict(remat=True), "remat", "True, checkpoint has False"),
        (dict(unroll=2), "unroll", "2, checkpoint has 'auto'"),
        (dict(attention="xla"), "attention", "'xla', checkpoint has 'auto'"),
    ]:
        with pytest.raises(
            CheckpointError, match=rf"model\.{field}: expected {values}$"
        ):
            train(
                make_model(**options), LOSS, micro_batch, CONFIG, resume=True, **common
            )
    with pytest.raises(
        CheckpointError,
        match=r"loss\.__type__: expected 'eqx_models\.multimodal\.MultimodalLoss', "
        r"checkpoint has '<absent>'",
    ):
        train(make_model(), _LOSS, micro_batch, CONFIG, resume=True, **common)
    assert path.read_bytes() == before
    # Allowed: the (complete) run is taken as it is.
    done = train(
        make_model(remat=True),
        _LOSS,
        micro_batch,
        CONFIG,
        resume=True,
        allow_config_change=True,
        **common,
    )
    assert done.history == [] and done.step == 12
