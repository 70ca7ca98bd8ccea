import os
import pathlib
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from tests.helpers import assert_tree_allclose
from transforms import inject_learning_rate


def _dropout_mlp(key):
    k1, k2 = jr.split(key)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, 16, key=k1),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Dropout(0.3),
            eqx.nn.Linear(16, 1, key=k2),
        ]
    )


def _loss(model, batch, key):
    x, y = batch
    keys = jr.split(key, x.shape[0])
    pred = jax.vmap(lambda xi, k: model(xi, key=k))(x, keys)
    return jnp.mean((pred - y) ** 2)


def _data(i):
    # A deterministic function of the step index, as fit recommends.
    x = jr.normal(jr.fold_in(jr.key(123), i), (8, 3))
    return x, jnp.sin(x.sum(axis=1, keepdims=True))


def _setup(schedule_steps=40, inject=False):
    model = _dropout_mlp(jr.key(0))
    schedule = optax.cosine_decay_schedule(3e-2, schedule_steps)
    # Injected, the schedule is reported among the metrics.
    optimizer = (
        inject_learning_rate(optax.adamw, schedule) if inject else optax.adamw(schedule)
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    return model, optimizer, opt_state, schedule


def test_history_eval_and_loss_decrease():
    from transforms import fit, make_train_step

    model, optimizer, opt_state, schedule = _setup(inject=True)
    step = make_train_step(_loss, optimizer)
    evaluated = []

    def eval_fn(model):
        evaluated.append(True)
        x, y = _data(10_000)
        pred = jax.vmap(eqx.nn.inference_mode(model))(x)
        return {"mse": jnp.mean((pred - y) ** 2)}

    result = fit(
        step,
        model,
        opt_state,
        _data,
        n_steps=40,
        key=jr.key(1),
        eval_fn=eval_fn,
        eval_every=10,
        progress=False,
    )
    assert result.step == 40 and len(result.history) == 40
    assert [r["step"] for r in result.history] == list(range(40))
    assert all(r["step_time"] > 0 for r in result.history)
    assert len(evaluated) == 4
    assert ["eval_mse" in r for r in result.history] == [
        (i + 1) % 10 == 0 for i in range(40)
    ]
    evals = [r["eval_mse"] for r in result.history if "eval_mse" in r]
    assert evals[-1] < 0.8 * evals[0]
    assert result.history[3]["learning_rate"] == pytest.approx(float(schedule(3)))


def test_resume_is_bit_identical(tmp_path):
    from transforms import fit, load_checkpoint, make_train_step

    model, optimizer, opt_state, schedule = _setup()
    step = make_train_step(_loss, optimizer)
    full = fit(step, model, opt_state, _data, n_steps=12, key=jr.key(5), progress=False)

    path = tmp_path / "run.ckpt"
    model, _, opt_state, _ = _setup()
    first = fit(
        step,
        model,
        opt_state,
        _data,
        n_steps=5,
        key=jr.key(5),
        checkpoint_path=path,
        progress=False,
    )
    assert first.step == 5
    # A fresh process would rebuild its templates; so does this.
    model, _, opt_state, _ = _setup()
    resumed = fit(
        step,
        model,
        opt_state,
        _data,
        n_steps=12,
        key=jr.key(999),  # the stored key wins
        checkpoint_path=path,
        resume=True,
        progress=False,
    )
    assert [r["step"] for r in resumed.history] == list(range(5, 12))
    assert_tree_allclose(resumed.model, full.model, rtol=0, atol=0)
    assert_tree_allclose(resumed.opt_state, full.opt_state, rtol=0, atol=0)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[5:]]
    model, _, opt_state, _ = _setup()
    assert (
        load_checkpoint(path, model=model, opt_state=opt_state, key=jr.key(0)).step
        == 12
    )


def test_deterministic_resume_and_steps_without_the_option(tmp_path):
    from transforms import fit, make_train_step, with_fallback

    model, optimizer, opt_state, _ = _setup()
    # The option reaches a step inside `with_fallback` too; a resumed deterministic
    # run is bit-identical on every backend (on a GPU the default may not be).
    step = with_fallback(make_train_step(_loss, optimizer))
    common = dict(key=jr.key(5), deterministic=True, progress=False)
    full = fit(step, model, opt_state, _data, n_steps=6, **common)
    path = tmp_path / "det.ckpt"
    model, _, opt_state, _ = _setup()
    fit(step, model, opt_state, _data, n_steps=3, checkpoint_path=path, **common)
    model, _, opt_state, _ = _setup()
    resumed = fit(
        step,
        model,
        opt_state,
        _data,
        n_steps=6,
        checkpoint_path=path,
        resume=True,
        **common,
    )
    assert_tree_allclose(resumed.model, full.model, rtol=0, atol=0)

    def own_step(model, opt_state, batch, key):
        return model, opt_state, {"loss": jnp.zeros(())}

    with pytest.raises(TypeError, match="`deterministic=True` needs a step with"):
        fit(own_step, model, opt_state, _data, n_steps=1, **common)
    # Without the option, a step of one's own runs as it is.
    fit(own_step, model, opt_state, _data, n_steps=1, key=jr.key(5), progress=False)


def test_resume_with_an_iterable_skips_consumed_batches(tmp_path):
    from transforms import fit, make_train_step

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(_loss, optimizer)
    full = fit(
        step,
        model,
        opt_state,
        (_data(i) for i in range(8)),
        n_steps=8,
        key=jr.key(2),
        progress=False,
    )
    model, _, opt_state, _ = _setup()
    path = tmp_path / "it.ckpt"
    fit(
        step,
        model,
        opt_state,
        (_data(i) for i in range(3)),
        n_steps=3,
        key=jr.key(2),
        checkpoint_path=path,
        progress=False,
    )
    model, _, opt_state, _ = _setup()
    resumed = fit(
        step,
        model,
        opt_state,
        (_data(i) for i in range(8)),
        n_steps=8,
        key=jr.key(2),
        checkpoint_path=path,
        resume=True,
        progress=False,
    )
    assert_tree_allclose(resumed.model, full.model, rtol=0, atol=0)
    model, _, opt_state, _ = _setup()
    with pytest.raises(ValueError, match="ran out of batches at step 2"):
        fit(
            step,
            model,
            opt_state,
            [_data(0), _data(1)],
            n_steps=3,
            key=jr.key(2),
            progress=False,
        )


def _finite(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from transforms import fit, load_checkpoint, make_train_step, NonFiniteLossError

    def poisoned(i):
        x, y = _data(i)
        return (x, y * jnp.nan) if i == 5 else (x, y)

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(_loss, optimizer)
    path = tmp_path / "nan.ckpt"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^fit: non-finite loss, gradient, parameters, optimiser state at step 5 "
        r"\(loss=nan, grad_norm=nan\); the last good checkpoint \(step 4\)",
    ) as info:
        fit(
            step,
            model,
            opt_state,
            poisoned,
            n_steps=10,
            key=jr.key(3),
            checkpoint_path=path,
            checkpoint_every=2,
            progress=False,
        )
    assert info.value.step == 5 and info.value.checkpoint_step == 4
    model, _, opt_state, _ = _setup()
    ckpt = load_checkpoint(path, model=model, opt_state=opt_state, key=jr.key(0))
    assert ckpt.step == 4
    assert _finite(ckpt.model) and _finite(ckpt.opt_state)


def _gated_loss(model, batch, key):
    x, y, gate = batch
    # sqrt has an infinite derivative at 0 and 0 * inf is NaN: with gate 0 the loss
    # is the finite MSE and every entry of the gradient is NaN.
    squares = sum(
        jnp.sum(p**2) for p in jax.tree.leaves(eqx.filter(model, eqx.is_array))
    )
    return _loss(model, (x, y), key) + 0.0 * jnp.sqrt(gate * squares)


def test_a_finite_loss_with_a_nan_gradient_stops_at_that_step(tmp_path):
    from transforms import fit, load_checkpoint, make_train_step, NonFiniteLossError

    def gated(i, bad=5):
        return (*_data(i), jnp.asarray(0.0 if i == bad else 1.0))

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(_gated_loss, optimizer)
    path = tmp_path / "grad.ckpt"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^fit: non-finite gradient, parameters, optimiser state at step 5 "
        r"\(loss=[0-9.e-]+, grad_norm=nan\); the last good checkpoint \(step 4\) is "
        r"kept at .*grad\.ckpt",
    ) as info:
        fit(
            step,
            model,
            opt_state,
            gated,
            n_steps=10,
            key=jr.key(3),
            checkpoint_path=path,
            checkpoint_every=2,
            progress=False,
        )
    error = info.value
    assert error.step == 5 and error.checkpoint_step == 4
    assert error.nonfinite == ("gradient", "parameters", "optimiser state")
    assert np.isfinite(error.metrics["loss"])

    # References: uninterrupted runs of 4 and 5 steps that never meet the bad batch.
    def clean(n):
        model, _, opt_state, _ = _setup()
        return fit(
            step,
            model,
            opt_state,
            lambda i: gated(i, bad=-1),
            n_steps=n,
            key=jr.key(3),
            progress=False,
        )

    model, _, opt_state, _ = _setup()
    kept = load_checkpoint(path, model=model, opt_state=opt_state, key=jr.key(0))
    assert kept.step == 4
    four, five = clean(4), clean(5)
    assert_tree_allclose(kept.model, four.model, rtol=0, atol=0)
    assert_tree_allclose(kept.opt_state, four.opt_state, rtol=0, atol=0)
    # The error holds the state before the failing step, though the step donated it.
    assert_tree_allclose(error.model, five.model, rtol=0, atol=0)
    assert_tree_allclose(error.opt_state, five.opt_state, rtol=0, atol=0)
    assert _finite(kept.model) and _finite(error.model)


def test_nan_updates_of_the_optimiser_are_caught_as_parameters(tmp_path):
    from transforms import fit, make_train_step, NonFiniteLossError

    model, _, _, _ = _setup()
    optimizer = optax.chain(optax.sgd(1e-2), optax.scale(jnp.nan))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    path = tmp_path / "never.ckpt"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^fit: non-finite parameters at step 0 \(loss=[0-9.e-]+, "
        r"grad_norm=[0-9.e-]+\); no checkpoint was written\.$",
    ) as info:
        fit(
            make_train_step(_loss, optimizer),
            model,
            opt_state,
            _data,
            n_steps=3,
            key=jr.key(0),
            checkpoint_path=path,
            checkpoint_every=1,
            progress=False,
        )
    assert info.value.nonfinite == ("parameters",)
    assert info.value.checkpoint_step is None and not path.exists()
    assert_tree_allclose(info.value.model, _setup()[0], rtol=0, atol=0)


def test_a_step_of_ones_own_is_guarded_too(tmp_path):
    from transforms import fit, NonFiniteLossError

    # No `nonfinite` and no `loss` among its metrics: fit checks the returned
    # parameters and optimiser state itself.
    def own_step(model, opt_state, scale, key):
        model = jax.tree.map(lambda p: p * scale, model)
        return model, {"s": opt_state["s"] * scale}, {"scale": scale}

    model = eqx.nn.Linear(2, 2, key=jr.key(0))
    path = tmp_path / "own.ckpt"
    with pytest.raises(
        NonFiniteLossError,
        match=r"^fit: non-finite parameters, optimiser state at step 2; the last "
        r"good checkpoint \(step 2\)",
    ) as info:
        fit(
            own_step,
            model,
            {"s": jnp.ones(())},
            lambda i: jnp.asarray(jnp.inf if i == 2 else 2.0),
            n_steps=4,
            checkpoint_path=path,
            checkpoint_every=1,
            progress=False,
        )
    assert info.value.nonfinite == ("parameters", "optimiser state")
    expected = jax.tree.map(lambda p: 4 * p, model)
    assert_tree_allclose(info.value.model, expected, rtol=0, atol=0)
    assert_tree_allclose(info.value.opt_state, {"s": jnp.asarray(4.0)}, rtol=0, atol=0)
    # A metric it reports can be watched by name.
    with pytest.raises(NonFiniteLossError, match=r"^fit: non-finite scale at step 1"):
        fit(
            lambda m, s, scale, key: (m, s, {"scale": scale}),
            model,
            {"s": jnp.ones(())},
            lambda i: jnp.asarray(jnp.nan if i == 1 else 2.0),
            n_steps=4,
            finite_metrics=("scale",),
            progress=False,
        )


def test_unknown_finite_metrics_are_refused_at_the_first_step(tmp_path):
    from transforms import fit, make_train_step

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(_loss, optimizer)
    path = tmp_path / "m.ckpt"
    with pytest.raises(
        ValueError,
        match=r"^fit: `finite_metrics` names \['los'\], which the step does not "
        r"report; its metrics are \['grad_norm', 'loss', 'nonfinite'\]\.$",
    ):
        fit(
            step,
            model,
            opt_state,
            _data,
            n_steps=2,
            key=jr.key(0),
            checkpoint_path=path,
            checkpoint_every=1,
            finite_metrics=("loss", "los"),
            progress=False,
        )
    assert not path.exists()
    with pytest.raises(TypeError, match=r"write \('loss',\)"):
        fit(step, model, opt_state, _data, n_steps=1, finite_metrics="loss")


def test_watched_metric_and_argument_errors():
    from transforms import fit, make_train_step, NonFiniteLossError

    def loss_with_diag(model, batch, key):
        loss = _loss(model, batch, key)
        return loss, {"diverged": jnp.where(loss > 0, jnp.inf, 0.0)}

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(loss_with_diag, optimizer, has_aux=True)
    with pytest.raises(NonFiniteLossError, match="diverged at step 0.*no checkpoint"):
        fit(
            step,
            model,
            opt_state,
            _data,
            n_steps=3,
            key=jr.key(0),
            finite_metrics=("loss", "diverged"),
            progress=False,
        )
    with pytest.raises(ValueError, match="n_steps"):
        fit(step, model, opt_state, _data, n_steps=-1, progress=False)
    with pytest.raises(ValueError, match="eval_fn"):
        fit(step, model, opt_state, _data, n_steps=1, eval_every=2, progress=False)
    with pytest.raises(ValueError, match="checkpoint_path"):
        fit(
            step, model, opt_state, _data, n_steps=1, checkpoint_every=2, progress=False
        )


def test_resume_checks_expected_metadata(tmp_path):
    from transforms import (
        CheckpointError,
        fit,
        make_train_step,
        read_checkpoint_metadata,
    )

    model, optimizer, opt_state, _ = _setup()
    step = make_train_step(_loss, optimizer)
    path = tmp_path / "meta.ckpt"
    kwargs = dict(key=jr.key(2), checkpoint_path=path, progress=False)
    stored = {"width": 16, "train": {"lr": 0.1, "steps": 2}}
    fit(step, model, opt_state, _data, n_steps=2, metadata=stored, **kwargs)
    changed = {"width": 32, "train": {"lr": 0.1, "steps": 4}}
    with pytest.raises(
        CheckpointError,
        match="(?s)^fit: .*width: expected 32, checkpoint has 16"
        r"\n  train\.steps: expected 4, checkpoint has 2$",
    ):
        fit(
            *(step, model, opt_state, _data),
            n_steps=4,
            resume=True,
            expected_metadata=changed,
            **kwargs,
        )
    model, _, opt_state, _ = _setup()
    resumed = fit(
        *(step, model, opt_state, _data),
        n_steps=4,
        resume=True,
        expected_metadata=stored,
        **kwargs,
    )
    assert resumed.step == 4
    assert [record["step"] for record in resumed.history] == [2, 3]

    # With the override the run goes on with the new configuration and records it;
    # `on_resume` sees the restored state (the checkpoint's, not the templates).
    restored = []

    def on_resume(model, opt_state):
        restored.append(
            jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, model)
        )
        return model, opt_state

    model, _, opt_state, _ = _setup()
    longer = fit(
        *(step, model, opt_state, _data),
        n_steps=6,
        resume=True,
        metadata=changed,
        expected_metadata=changed,
        allow_config_change=True,
        on_resume=on_resume,
        **kwargs,
    )
    assert [record["step"] for record in longer.history] == [4, 5]
    assert len(restored) == 1
    assert_tree_allclose(restored[0], resumed.model, rtol=0, atol=0)
    assert read_checkpoint_metadata(path)["metadata"] == changed


def test_metadata_json_cannot_hold_is_refused_before_any_step(tmp_path):
    from transforms import fit

    model, _, opt_state, _ = _setup()
    steps = []

    def step(model, opt_state, batch, key):
        steps.append(key)
        return model, opt_state, {"loss": jnp.zeros(())}

    with pytest.raises(TypeError, match=r"^fit: `metadata` .*\['lr'\] is of type"):
        fit(
            step,
            model,
            opt_state,
            _data,
            n_steps=3,
            checkpoint_path=tmp_path / "m.ckpt",
            metadata={"lr": jnp.float32(0.1)},
            progress=False,
        )
    assert steps == [] and not (tmp_path / "m.ckpt").exists()


_PROGRESS = textwrap.dedent(
    """
    import fcntl, os, pty, struct, sys, termios

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import optax

    from transforms import fit, make_train_step

    def loss(model, batch, key):
        x, y = batch
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    optimizer = optax.sgd(0.1)
    step = make_train_step(loss, optimizer)
    data = lambda i: (jnp.ones((4, 2)), jnp.zeros((4, 1)))

    def run(**kwargs):
        # A fresh model each time: the step donates its inputs.
        model = eqx.nn.Linear(2, 1, key=jr.key(0))
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        fit(step, model, opt_state, data, n_steps=3, **kwargs)

    run()
    print("<forced>", file=sys.stderr, flush=True)
    run(progress=True)
    print("<terminal>", file=sys.stderr, flush=True)
    primary, secondary = pty.openpty()
    # A new terminal is 0 columns wide, in which tqdm draws an empty bar.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    stderr, sys.stderr = sys.stderr, os.fdopen(secondary, "w")
    run()
    sys.stderr.close()
    sys.stderr = stderr
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # EIO once the closed terminal is drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    print(b"".join(chunks).decode(errors="replace"), file=sys.stderr)
    """
)


def test_progress_bar_is_quiet_unless_on_a_terminal():
    # The default follows tqdm's `disable=None`: the bar is drawn only when its stream
    # (standard error) is a terminal, so a redirected run logs no `\r` frames.
    root = pathlib.Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _PROGRESS],
        capture_output=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    # Bytes, not text: universal newlines would turn the `\r` looked for into `\n`.
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    redirected, rest = stderr.split("<forced>\n")
    forced, terminal = rest.split("<terminal>\n")
    assert "\r" not in redirected + stdout and "fit" not in redirected
    assert "\r" in forced and "3/3" in forced
    assert "fit" in terminal and "3/3" in terminal
