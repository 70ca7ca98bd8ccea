import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from eqx_models.causal import (
    BehaviouralCloningLoss,
    Curriculum,
    evaluate_surrogate,
    exact_parent_posterior,
    make_optimizer,
    ParentSetPredictionModel,
    sample_task,
    sample_training_batch,
    set_run_length,
    TaskConfig,
    TaskStream,
    train,
    TrainingBatch,
    WarmupCosineState,
    weight_decay_mask,
)
from transforms import injected_learning_rate

from ..helpers import run_script


K = 2
CONFIG = TaskConfig(n_vars=4, n_samples=16)


def _model(key=0, n_layers=1):
    return ParentSetPredictionModel(
        K, width=8, n_layers=n_layers, n_heads=2, key=jr.key(key)
    )


@pytest.fixture(scope="module")
def batch():
    return sample_training_batch(jr.key(0), CONFIG, 6, K)


def test_sampler_labels_with_the_expert(batch):
    assert batch.data.shape == (6, 16, 4, 3)
    expert = jax.vmap(lambda x: exact_parent_posterior(x, K).log_probs)(batch.data)
    # The same float32 computation batched differently: on a GPU the sums run in
    # another order, tens of float32 ulps apart at these magnitudes.
    np.testing.assert_allclose(batch.expert_log_probs, expert, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(batch.valid))
    again = sample_training_batch(jr.key(0), CONFIG, 6, K)
    np.testing.assert_array_equal(again.data, batch.data)


def test_the_sampler_labels_with_the_polynomial_expert():
    config = TaskConfig(
        n_vars=4, n_samples=16, mechanism="mlp", labels="expert", expert_degree=3
    )
    batch = sample_training_batch(jr.key(0), config, 4, K)
    expert = jax.vmap(lambda x: exact_parent_posterior(x, K, degree=3).log_probs)(
        batch.data
    )
    # The same float32 computation batched differently: on a GPU the sums run in
    # another order, tens of float32 ulps apart at these magnitudes.
    np.testing.assert_allclose(batch.expert_log_probs, expert, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(batch.valid))


def test_degenerate_tasks_are_flagged_by_the_sampler():
    # N = K' + 2 rows: any row with the target intervened leaves too few.
    config = TaskConfig(n_vars=4, n_samples=4, interventional_fraction=(0.5, 0.5))
    batch = sample_training_batch(jr.key(1), config, 32, K)
    flags = jax.vmap(
        lambda x: exact_parent_posterior(x, K, on_degenerate="flag").degenerate
    )(batch.data)
    np.testing.assert_array_equal(batch.valid, ~flags)
    assert 0 < int(jnp.sum(~batch.valid)) < 32
    assert bool(jnp.all(jnp.isnan(batch.expert_log_probs[~batch.valid])))


def _np_entropy(log_p):
    p = np.exp(log_p)
    return -np.sum(np.where(p > 0, p * np.where(p > 0, log_p, 0.0), 0.0), -1)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_loss_against_direct_computation(batch, scale):
    model = _model()
    # Make task 2 degenerate: NaN labels, not valid.
    labels = batch.expert_log_probs.at[2].set(jnp.nan)
    bad = TrainingBatch(batch.data, labels, batch.valid.at[2].set(False))
    loss_fn = BehaviouralCloningLoss(uncertainty_scale=scale, weight_decay=0.1)
    loss, aux = eqx.filter_jit(loss_fn)(model, bad, None)
    log_q = jax.nn.log_softmax(eqx.filter_jit(jax.vmap(model))(batch.data))
    log_q = np.asarray(log_q, np.float64)
    log_p = np.asarray(batch.expert_log_probs, np.float64)
    keep = np.arange(6) != 2
    p = np.exp(log_p)
    kl = np.sum(p * (log_p - log_q), -1)[keep]
    h_p = _np_entropy(log_p)[keep]
    weight = np.ones_like(kl) if scale is None else np.exp(-scale * h_p)
    np.testing.assert_allclose(loss, np.mean(weight * kl), rtol=1e-4)
    np.testing.assert_allclose(aux["kl"], np.mean(kl), rtol=1e-4)
    np.testing.assert_allclose(aux["expert_entropy"], np.mean(h_p), rtol=1e-4)
    np.testing.assert_allclose(
        aux["pred_entropy"], np.mean(_np_entropy(log_q)[keep]), rtol=1e-4
    )
    agree = (np.argmax(log_q, -1) == np.argmax(log_p, -1))[keep]
    np.testing.assert_allclose(aux["top1_agreement"], np.mean(agree), rtol=1e-6)
    assert float(aux["skipped"]) == 1.0 and float(aux["tasks"]) == 6.0
    weights = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            eqx.filter(model, eqx.is_inexact_array)
        )[0]
        if path[-1].name.startswith("w_")
    ]
    np.testing.assert_allclose(
        aux["reg_loss"],
        0.05 * sum(np.sum(w.astype(np.float64) ** 2) for w in weights),
        rtol=1e-4,
    )
    np.testing.assert_allclose(aux["total_loss"], loss + aux["reg_loss"], rtol=1e-6)
    # The NaN labels of the skipped task reach neither the loss nor the gradient.
    grads = eqx.filter_grad(lambda m: loss_fn(m, bad, None)[0])(model)
    assert all(
        bool(jnp.all(jnp.isfinite(g)))
        for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array))
    )


def test_optimizer_decays_only_weight_matrices():
    model = _model()
    params = eqx.filter(model, eqx.is_inexact_array)
    mask = weight_decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    names = {path[-1].name: value for path, value in flat}
    assert names["w_embed"] and names["w_qkv"] and names["w_in"]
    assert not names["ln_gain"] and not names["b_up"] and not names["size_embedding"]
    optimizer = make_optimizer(10, peak_learning_rate=0.1, warmup_steps=0)
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    for (path, u), (_, p) in zip(
        jax.tree_util.tree_flatten_with_path(updates)[0],
        jax.tree_util.tree_flatten_with_path(params)[0],
    ):
        if path[-1].name.startswith("w_"):
            np.testing.assert_allclose(u, -0.1 * 1e-4 * p, rtol=1e-5, atol=1e-12)
        else:
            np.testing.assert_array_equal(u, 0.0)


def _run_length(opt_state):
    (state,) = [
        s
        for s in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, WarmupCosineState)
        )
        if isinstance(s, WarmupCosineState)
    ]
    return state.total_steps


def _learning_rates(optimizer, opt_state, params, n):
    rates = []
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(n):
        _, opt_state = optimizer.update(zeros, opt_state, params)
        rates.append(float(injected_learning_rate(opt_state)))
    return rates


def test_schedule_and_run_length():
    params = {"w_x": jnp.ones((2, 2))}
    optimizer = make_optimizer(
        12, peak_learning_rate=1.0, warmup_steps=4, end_learning_rate=0.1
    )
    state = optimizer.init(params)
    expected = [
        0.25 * i if i < 4 else 0.1 + 0.45 * (1 + np.cos(np.pi * min((i - 4) / 8, 1)))
        for i in range(14)
    ]
    np.testing.assert_allclose(
        _learning_rates(optimizer, state, params, 14), expected, rtol=1e-6
    )
    longer = set_run_length(state, 20)
    expected = [
        0.25 * i if i < 4 else 0.1 + 0.45 * (1 + np.cos(np.pi * min((i - 4) / 16, 1)))
        for i in range(14)
    ]
    np.testing.assert_allclose(
        _learning_rates(optimizer, longer, params, 14), expected, rtol=1e-6
    )
    with pytest.raises(ValueError, match="set_run_length: `opt_state` holds no"):
        set_run_length(optax.adam(1e-3).init(params), 5)
    with pytest.raises(
        ValueError, match="make_optimizer: `n_steps` must be a positive integer"
    ):
        make_optimizer(0)


def test_curriculum_changes_what_is_sampled():
    buckets = [(CONFIG, 8), (TaskConfig(n_vars=5, n_samples=16), 8)]
    curriculum = Curriculum.easy_to_hard([4 * 16, 5 * 16], ramp=0.5)
    start_b, start_f = curriculum.weights(0.0)
    end_b, end_f = curriculum.weights(1.0)
    np.testing.assert_allclose(start_b, [1.0, 0.0])
    np.testing.assert_allclose(end_b, [0.5, 0.5])
    np.testing.assert_allclose(start_f, [1 / 3, 1 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(end_f, [0.2] * 5)
    np.testing.assert_allclose(curriculum.weights(0.25)[0], [0.75, 0.25])
    stream = TaskStream(buckets, K, 100, curriculum, jr.key(2))
    early = [stream.bucket_and_families(i)[0] for i in range(0, 5)]
    late = [stream.bucket_and_families(i)[0] for i in range(60, 100)]
    assert early == [0] * 5 and 0 < sum(late) < 40
    # The families really sampled: none of the last two early, all of them late.
    families = lambda w: np.asarray(
        jax.vmap(lambda k: sample_task(k, CONFIG, jnp.asarray(w, jnp.float32)).family)(
            jr.split(jr.key(3), 200)
        )
    )
    assert set(families(start_f)) == {0, 1, 2}
    assert set(families(end_f)) == {0, 1, 2, 3, 4}
    assert stream(3).data.shape == (8, 16, 4, 3)
    with pytest.raises(ValueError, match="Curriculum: `start_buckets` and"):
        Curriculum((1.0,), (1.0, 1.0))
    with pytest.raises(ValueError, match="one weight per family"):
        Curriculum((1.0,), (1.0,), start_families=(1.0,))


@pytest.mark.slow
def test_training_lowers_kl_and_resumes(tmp_path):
    held_out = jax.vmap(lambda k: sample_task(k, CONFIG))(jr.split(jr.key(4), 64))
    model = _model()
    before = evaluate_surrogate(model, held_out)
    optimizer = make_optimizer(60, peak_learning_rate=3e-3)
    buckets = [(CONFIG, 16)]
    curriculum = Curriculum((1.0,), (1.0,))
    common = dict(
        n_steps=60,
        key=jr.key(5),
        curriculum=curriculum,
        optimizer=optimizer,
        # Bit-identical resumes on a GPU too (a CPU is deterministic anyway).
        deterministic=True,
        progress=False,
    )

    @eqx.debug.assert_max_traces(max_traces=1)
    def loss(model, batch, key):
        return BehaviouralCloningLoss()(model, batch, key)

    full = train(_model(), buckets, loss=loss, **common)
    after = evaluate_surrogate(full.model, held_out)
    # Sixty steps of sixteen tasks move the KL only a little (the GPU benchmark
    # shows the full curve), but in the right direction on held-out tasks and in
    # training, and the MAP parent set improves clearly.
    assert after["kl"] < before["kl"]
    history = full.history
    first = np.mean([record["kl"] for record in history[:10]])
    last = np.mean([record["kl"] for record in history[-10:]])
    assert last < first
    assert after["map_f1"] > before["map_f1"] + 0.1
    assert {"kl", "reg_loss", "total_loss", "pred_entropy", "expert_entropy"} <= set(
        history[0]
    )
    assert {
        "top1_agreement",
        "grad_norm",
        "learning_rate",
        "step_time",
        "skipped",
    } <= set(history[0])
    # Stop half way with a checkpoint, resume: the same parameters as one run.
    path = tmp_path / "run.ckpt"
    train(
        _model(), buckets, loss=loss, stop_after=30, checkpoint_path=str(path), **common
    )
    resumed = train(
        _model(), buckets, loss=loss, checkpoint_path=str(path), resume=True, **common
    )
    for a, b in zip(
        jax.tree.leaves(eqx.filter(full.model, eqx.is_array)),
        jax.tree.leaves(eqx.filter(resumed.model, eqx.is_array)),
    ):
        np.testing.assert_array_equal(a, b)


def test_with_fallback_runs_an_uncompilable_loss(batch):
    # Eagerly, every operation compiles on its own: a loss of a few operations
    # keeps this test about the wiring (`transforms.with_fallback` is tested on
    # its own), not about compiling the whole model operation by operation.
    def python_branching(model, batch, key):
        loss = jnp.mean(model.size_embedding**2)
        if loss > 1e9:  # a Python branch on a traced value
            loss = loss * 0.0
        return loss, {"kl": loss}

    model = _model(n_layers=0)
    with pytest.warns(RuntimeWarning, match="with_fallback"):
        result = train(
            model,
            [(CONFIG, 2)],
            n_steps=1,
            key=jr.key(6),
            loss=python_branching,
            optimizer=optax.sgd(1e-3),
            curriculum=Curriculum((1.0,), (1.0,)),
            progress=False,
        )
    assert np.isfinite(result.history[0]["kl"])
    # The eager step did update the parameters.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(eqx.filter(model, eqx.is_array)),
            jax.tree.leaves(eqx.filter(result.model, eqx.is_array)),
        )
    )


def test_train_surrogate_errors():
    with pytest.raises(
        ValueError, match="train: `buckets` must be a non-empty sequence"
    ):
        train(_model(), [], n_steps=1, key=jr.key(0))
    with pytest.raises(
        ValueError, match="`curriculum` must be a curriculum over the 1 b"
    ):
        train(
            _model(),
            [(CONFIG, 2)],
            n_steps=1,
            key=jr.key(0),
            curriculum=Curriculum((1.0, 1.0), (1.0, 1.0)),
        )
    with pytest.raises(
        ValueError, match="sample_training_batch: `batch_size` must be a positive int"
    ):
        sample_training_batch(jr.key(0), CONFIG, 0, K)
    with pytest.raises(ValueError, match="too few for parent sets of size 3"):
        sample_training_batch(jr.key(0), TaskConfig(n_vars=4, n_samples=4), 2, 3)
    with pytest.raises(ValueError, match="train: `mesh` has no `data` axis"):
        train(
            _model(),
            [(CONFIG, 2)],
            n_steps=1,
            key=jr.key(0),
            mesh=jax.make_mesh((1,), ("model",)),
        )
    with pytest.raises(ValueError, match="BehaviouralCloningLoss: `uncertainty_scale`"):
        BehaviouralCloningLoss(uncertainty_scale=-1.0)


_SHARDED = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import equinox as eqx, jax.numpy as jnp, jax.random as jr, numpy as np
    from eqx_models.causal import (BehaviouralCloningLoss, ParentSetPredictionModel,
        TaskConfig, sample_training_batch, make_optimizer)
    from transforms import make_train_step

    assert jax.device_count() == 8
    model = ParentSetPredictionModel(2, width=8, n_layers=1, n_heads=2, key=jr.key(0))
    batch = sample_training_batch(jr.key(1), TaskConfig(n_vars=4, n_samples=16), 16, 2)
    optimizer = make_optimizer(10)
    loss = BehaviouralCloningLoss()
    init = lambda: (model, optimizer.init(eqx.filter(model, eqx.is_inexact_array)))
    single = make_train_step(loss, optimizer, has_aux=True, donate=False)
    mesh = jax.make_mesh((8,), ("data",))
    parallel = make_train_step(loss, optimizer, has_aux=True, mesh=mesh, donate=False)
    m1, s1 = init(); m8, s8 = init()
    for _ in range(3):
        m1, s1, a = single(m1, s1, batch, None)
        m8, s8, b = parallel(m8, s8, batch, None)
        for k in ("loss", "kl", "grad_norm", "top1_agreement", "learning_rate"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(eqx.filter(m1, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(m8, eqx.is_array))):
        # The final bias shifts every logit alike, so its gradient is rounding
        # noise that Adam normalises: compared through the outputs below.
        if x.size > 1:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        assert y.sharding.is_fully_replicated and len(y.sharding.device_set) == 8
    out = eqx.filter_jit(lambda m: jax.nn.log_softmax(jax.vmap(m)(batch.data)))
    np.testing.assert_allclose(out(m1), out(m8), rtol=1e-4, atol=1e-4)
    from eqx_models.causal import train
    try:
        train(model, [(TaskConfig(n_vars=4, n_samples=16), 12)], n_steps=1,
                        key=jr.key(2), mesh=mesh)
    except ValueError as e:
        assert "must divide by the 8 devices" in str(e), e
    else:
        raise AssertionError("no error for a batch of 12 on 8 devices")
    print("OK")
    """
)


@pytest.mark.slow
def test_data_parallel_training_step_matches_single_device():
    run_script(_SHARDED, devices=8)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Three steps of a six-step run, checkpointed: a run to resume."""
    path = tmp_path_factory.mktemp("causal") / "run.ckpt"
    common = dict(key=jr.key(7), curriculum=Curriculum((1.0,), (1.0,)), progress=False)
    first = train(
        _model(),
        [(CONFIG, 2)],
        n_steps=6,
        stop_after=3,
        checkpoint_path=str(path),
        **common,
    )
    return path, first, common


@pytest.mark.slow
def test_resume_refuses_another_configuration(stopped_run):
    from transforms import CheckpointError

    path, first, common = stopped_run
    assert [r["step"] for r in first.history] == [0, 1, 2]
    before = path.read_bytes()
    with pytest.raises(
        CheckpointError,
        match=r"(?s)^train: .*another configuration:\n  "
        r"buckets\[0\]\.batch_size: expected 4, checkpoint has 2\n  "
        r"n_steps: expected 10, checkpoint has 6$",
    ):
        train(
            _model(),
            [(CONFIG, 4)],
            n_steps=10,
            checkpoint_path=str(path),
            resume=True,
            **common,
        )
    with pytest.raises(
        CheckpointError,
        match=r"(?s)model\.width: expected 16, checkpoint has 8.*"
        r"loss\.weight_decay: expected 0\.001, checkpoint has 0\.0001",
    ):
        train(
            ParentSetPredictionModel(K, width=16, n_layers=1, n_heads=2, key=jr.key(0)),
            [(CONFIG, 2)],
            n_steps=6,
            loss=BehaviouralCloningLoss(weight_decay=1e-3),
            checkpoint_path=str(path),
            resume=True,
            **common,
        )
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_longer_run_when_allowed_follows_the_new_schedule(stopped_run, tmp_path):
    path, _, common = stopped_run
    copy = tmp_path / "run.ckpt"
    copy.write_bytes(path.read_bytes())
    longer = train(
        _model(),
        [(CONFIG, 2)],
        n_steps=10,
        checkpoint_path=str(copy),
        resume=True,
        allow_config_change=True,
        **common,
    )
    assert [r["step"] for r in longer.history] == list(range(3, 10))
    # The schedule of a ten-step run from its start, step by step; over the old
    # six-step layout the last four steps would sit at the floor.
    params = {"w_x": jnp.ones((2, 2))}
    optimizer = make_optimizer(10)
    reference = _learning_rates(optimizer, optimizer.init(params), params, 10)
    np.testing.assert_allclose(
        [r["learning_rate"] for r in longer.history], reference[3:], rtol=1e-6
    )
    assert int(_run_length(longer.opt_state)) == 10


def _scaled_loss(scale):
    base = BehaviouralCloningLoss()

    def loss(model, batch, key):
        value, aux = base(model, batch, key)
        return scale * value, aux

    return loss


@pytest.mark.slow
def test_resume_names_a_changed_custom_optimizer_or_loss(tmp_path):
    from transforms import CheckpointError

    path = tmp_path / "run.ckpt"
    common = dict(
        n_steps=2,
        key=jr.key(8),
        curriculum=Curriculum((1.0,), (1.0,)),
        checkpoint_path=path,
        progress=False,
    )
    train(
        _model(),
        [(CONFIG, 2)],
        optimizer=optax.adam(1e-3),
        loss=_scaled_loss(1.0),
        **common,
    )
    before = path.read_bytes()
    with pytest.raises(
        CheckpointError,
        match=r"\n  optimizer\.update_fns\[1\]\.tx\.update\.step_size: "
        r"expected -0\.002, checkpoint has -0\.001$",
    ):
        train(
            _model(),
            [(CONFIG, 2)],
            optimizer=optax.adam(2e-3),
            loss=_scaled_loss(1.0),
            resume=True,
            **common,
        )
    with pytest.raises(
        CheckpointError, match=r"\n  loss\.scale: expected 2\.0, checkpoint has 1\.0$"
    ):
        train(
            _model(),
            [(CONFIG, 2)],
            optimizer=optax.adam(1e-3),
            loss=_scaled_loss(2.0),
            resume=True,
            **common,
        )
    assert path.read_bytes() == before
    # Allowed: the (complete) run is taken as it is.
    done = train(
        _model(),
        [(CONFIG, 2)],
        optimizer=optax.adam(2e-3),
        loss=_scaled_loss(2.0),
        resume=True,
        allow_config_change=True,
        **common,
    )
    assert done.history == [] and done.step == 2


def _counted_loss(model, batch, key):
    TRACES.append(None)
    return BehaviouralCloningLoss()(model, batch, key)


TRACES = []


@pytest.mark.slow
def test_equal_configurations_share_one_compiled_step():
    # Each call builds its default optimiser and its step anew; they compare equal
    # by value, and the run length is an array in the optimiser: one compilation
    # for runs of different lengths.
    for n_steps in (2, 2, 3):
        result = train(
            _model(),
            [(CONFIG, 2)],
            n_steps=n_steps,
            key=jr.key(9),
            loss=_counted_loss,
            curriculum=Curriculum((1.0,), (1.0,)),
            progress=False,
        )
        assert len(result.history) == n_steps
    assert len(TRACES) == 1
    assert make_optimizer(3) == make_optimizer(3)
