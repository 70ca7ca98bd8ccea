"""`benchmarks/dp.py`'s command line and its Opacus peer without torch; the script
itself runs at `--size tiny` on a CPU (its docstring)."""

import jax.numpy as jnp
import jax.random as jr
import pytest

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def dp():
    return load_benchmark("dp")


def test_command_line(dp, capsys):
    assert dp.parse([], "cpu").size == "tiny"
    assert dp.parse([], "gpu").size == "gpt2"
    args = dp.parse(["--size", "gpt2", "--sweep-batch", "64", "256"], "cpu")
    assert args.sweep_batch == [64, 256]
    for argv, message in [
        (["--sweep-batch", "8", "--batch", "4"], "--sweep-batch runs the sweep alone"),
        (["--length", "300"], "--length 300 is longer than the context 256"),
        (["--batch", "0"], "must be a positive integer"),
        (["--sweep-batch", "8", "--profile"], "--profile traces the B = --batch"),
    ]:
        with pytest.raises(SystemExit):
            dp.parse(argv, "cpu")
        assert message in capsys.readouterr().err


def test_without_torch_the_peer_says_so(dp, monkeypatch):
    monkeypatch.setattr(dp, "not_installed", lambda module: module == "torch")
    model = dp.GPT(vocab=32, dim=16, heads=2, layers=2, context=16, key=jr.key(0))
    tokens = jr.randint(jr.key(1), (2, 9), 0, 32)
    assert dp.opacus_peer(model, 2, "f32", "cpu", tokens, 1, 60) == {
        "skipped": "torch is not installed"
    }


def test_every_step_trains_on_the_same_batch(dp):
    import equinox as eqx
    import optax

    model = dp.GPT(vocab=16, dim=8, heads=2, layers=1, context=8, key=jr.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    candidates = dp.steps(dp.make_loss(jnp.float32), optimizer, static)
    assert list(candidates) == [
        "(a) plain step",
        "(b) DP step, one_pass",
        "(c) DP step, two_pass",
        "(d) DP step, vmap",
    ]
    tokens = jr.randint(jr.key(1), (2, 5), 0, 16)
    losses = {
        label: float(fn(params, opt_state, (tokens,), jr.key(2))[2])
        for label, fn in list(candidates.items())[:2]
    }
    # The DP step reports the mean loss of the batch, as the plain step does.
    assert losses["(a) plain step"] == pytest.approx(losses["(b) DP step, one_pass"])
