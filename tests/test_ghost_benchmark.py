"""`benchmarks/ghost.py`'s command line, its merging of runs into one result file, and
its PyTorch peer in a child process, on models small enough for the CPU."""

import importlib.util
import json

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from transforms import per_sample_grad_norms

from .helpers import load_benchmark


@pytest.fixture(scope="module")
def ghost():
    return load_benchmark("ghost")


@pytest.fixture(scope="module")
def small(ghost):
    """A GPT of the benchmark's layout, small enough for a test, and its loss."""
    model = ghost.GPT(vocab=32, dim=16, heads=2, layers=2, context=16, key=jr.key(0))
    return model, ghost.make_loss(jnp.float32)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--length", "0"], "argument --length: must be a positive integer, got 0"),
        (["--batch", "x"], "argument --batch: not an integer: 'x'"),
        (["--sweep-batch", "4", "-1"], "must be a positive integer, got -1"),
        (
            ["--size", "gpt2", "--length", "2048"],
            "--length 2048 is longer than the gpt2 model's context of 1024 positions",
        ),
        (["--sweep-batch", "8", "--sweep-length", "300"], "context of 256 positions"),
        (["--regimes", "--batch", "4"], "--regimes measures its own sizes"),
        (["--sweep-batch", "4", "--regimes"], "--sweep-batch runs the sweep alone"),
        (["--sweep-length", "16"], "--sweep-length needs --sweep-batch"),
    ],
)
def test_bad_sizes_are_argparse_errors(ghost, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        ghost.parse(argv, "cpu")
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_size_follows_the_platform(ghost):
    assert ghost.parse([], "cpu").size == "tiny"
    assert ghost.parse([], "gpu").size == "gpt2"
    args = ghost.parse(["--size", "gpt2", "--batch", "256", "--length", "128"], "cpu")
    assert (args.size, args.batch, args.length) == ("gpt2", 256, 128)


def _row(impl, batch, length, median, workload="per-sample norms"):
    sizes = {"batch": batch, "length": length}
    return {"workload": workload, "impl": impl, "sizes": sizes, "median_s": median}


def _run(ghost, rows, notes):
    results = ghost.Results("ghost", "Ghost engines")
    for row in rows:
        results.add(**row)
    for note in notes:
        results.note(note)
    return results


def test_runs_merge_by_regime_and_sweep(ghost, tmp_path, capsys):
    default = (16, 1024)
    sweep = "batch sweep/per-sample norms"
    # A file written before rows carried their sizes: a row without them and
    # free-form notes were about the default regime.
    legacy = {"workload": "per-sample norms", "impl": "(e) torch.func", "error": "x"}
    first = _run(
        ghost,
        [
            _row("(c) ghost", 16, 1024, 1.0),
            legacy,
            _row("ghost", 4, 1024, 0.1, sweep),
        ],
        ["(c)/(a, B) time 1.1", "Batch-size sweep (B = 4; T = 1024, ...): measured"],
    )
    path = ghost.save(first, str(tmp_path), default)
    # Another regime joins the file.
    second = _run(ghost, [_row("(c) ghost", 256, 128, 2.0)], ["B = 256, T = 128: x"])
    ghost.save(second, str(tmp_path), default)
    # The default regime measured again replaces its rows and notes, legacy ones too.
    third = _run(
        ghost,
        [
            _row("(c) ghost", 16, 1024, 3.0),
            _row("(e) torch.func vmap(grad)", 16, 1024, 4),
        ],
        ["B = 16, T = 1024: y"],
    )
    capsys.readouterr()
    ghost.save(third, str(tmp_path), default)
    # The legacy row was not measured again: the run says it drops it.
    dropped = [
        line for line in capsys.readouterr().out.splitlines() if "dropped" in line
    ]
    assert len(dropped) == 1
    assert "(e) torch.func at ('regime', 16, 1024) was not measured again" in dropped[0]
    # A sweep at another length adds rows; at a swept point again, replaces them.
    fourth = _run(
        ghost,
        [_row("ghost", 4, 128, 0.2, sweep), _row("ghost", 8, 128, 0.3, sweep)],
        ["Batch-size sweep, T = 128: B = 4, 8"],
    )
    ghost.save(fourth, str(tmp_path), default)
    fifth = _run(
        ghost, [_row("ghost", 8, 128, 0.4, sweep)], ["Batch-size sweep, T = 128: B = 8"]
    )
    ghost.save(fifth, str(tmp_path), default)
    # A sweep run in parts: the part at other batch sizes keeps the first's note.
    sixth = _run(
        ghost,
        [_row("ghost", 16, 128, 0.5, sweep)],
        ["Batch-size sweep, T = 128: B = 16; Out of memory: none"],
    )
    ghost.save(sixth, str(tmp_path), default)

    with open(path) as f:
        saved = json.load(f)
    got = [
        (
            r["workload"],
            r["impl"],
            r["sizes"]["batch"],
            r["sizes"]["length"],
            r["median_s"],
        )
        for r in saved["rows"]
    ]
    # Regimes first, in the order measured, then sweeps by length and largest batch
    # first (as one run goes), whichever run measured them; each (kind, B, T) once,
    # with its latest figure.
    assert got == [
        ("per-sample norms", "(c) ghost", 256, 128, 2.0),
        ("per-sample norms", "(c) ghost", 16, 1024, 3.0),
        ("per-sample norms", "(e) torch.func vmap(grad)", 16, 1024, 4),
        (sweep, "ghost", 16, 128, 0.5),
        (sweep, "ghost", 8, 128, 0.4),
        (sweep, "ghost", 4, 128, 0.2),
        (sweep, "ghost", 4, 1024, 0.1),
    ]
    assert saved["notes"] == [
        "Batch-size sweep (B = 4; T = 1024, ...): measured",
        "B = 256, T = 128: x",
        "B = 16, T = 1024: y",
        "Batch-size sweep, T = 128: B = 8",
        "Batch-size sweep, T = 128: B = 16; Out of memory: none",
    ]


def test_a_run_on_another_device_replaces_the_file(ghost, tmp_path):
    first = _run(ghost, [_row("(c) ghost", 16, 1024, 1.0)], ["B = 16, T = 1024: x"])
    first.environment = dict(first.environment, device="GPU one")
    path = ghost.save(first, str(tmp_path), (16, 1024))
    second = _run(ghost, [_row("(c) ghost", 256, 128, 2.0)], ["B = 256, T = 128: y"])
    second.environment = dict(second.environment, device="GPU two")
    ghost.save(second, str(tmp_path), (16, 1024))
    with open(path) as f:
        saved = json.load(f)
    assert saved["environment"]["device"] == "GPU two"
    assert [r["sizes"]["batch"] for r in saved["rows"]] == [256]
    assert saved["notes"] == ["B = 256, T = 128: y"]


@pytest.mark.torch
def test_torch_state_fits_the_torch_model(ghost, small, highest_precision):
    import torch

    ghost_torch = load_benchmark("_ghost_torch")
    model, loss_fn = small
    # `load_state_dict` is strict: every name and shape must match.
    torch_model = ghost_torch.from_state(ghost.torch_state(model), n_heads=2)
    tokens = jr.randint(jr.key(1), (9,), 0, 32)
    x = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    with torch.no_grad():
        logits = torch_model(x[:-1])
        loss = torch.nn.functional.cross_entropy(logits, x[1:])
    # float32 on both sides (full float32 matmuls in JAX, where a GPU would use
    # TF32), the same operations in a different order.
    np.testing.assert_allclose(float(loss), float(loss_fn(model, tokens)), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.torch
def test_torch_peers_agree_with_the_ghost_norms(ghost, small, highest_precision):
    model, loss_fn = small
    tokens = jr.randint(jr.key(2), (3, 9), 0, 32)
    expected = per_sample_grad_norms(loss_fn, method="ghost")(model, (tokens,))
    results = ghost.torch_peers(model, 2, "f32", "cpu", {(3, 8): tokens}, 1, 120)
    torch_func = results[3, 8]["torch.func"]
    assert torch_func["device"] == "cpu" and torch_func["repeats"] == 1
    row = ghost._peer_row(torch_func, expected)
    assert "norms" not in row
    # float32 on both sides (full float32 matmuls in JAX, where a GPU would use
    # TF32): the same norms up to rounding.
    assert row["max_rel_diff_vs_jax"] < 1e-5
    opacus = results[3, 8]["opacus"]
    if importlib.util.find_spec("opacus") is None:
        assert opacus["skipped"].startswith("opacus is not installed")
    else:
        # Its hooks miss the tied head's share of the embedding's gradient: the
        # norms come out smaller, and the row says why.
        assert "tied head" in opacus["note"]
        assert np.all(np.asarray(opacus["norms"]) < np.asarray(expected))


def test_a_failed_child_is_a_row(ghost, tmp_path):
    missing = str(tmp_path / "missing.npz")
    argv = ["--peer", "torch.func", "--weights", missing, "--tokens", missing]
    result = ghost._spawn([*argv, "--heads", "2"], timeout=120)
    assert result["error"].startswith("exit 1: ")


def test_without_torch_the_peers_say_so(ghost, small, monkeypatch):
    monkeypatch.setattr(ghost, "not_installed", lambda module: module == "torch")
    tokens = jr.randint(jr.key(2), (3, 9), 0, 32)
    results = ghost.torch_peers(small[0], 2, "f32", "cpu", {(3, 8): tokens}, 1, 60)
    assert results == {
        (3, 8): {peer: {"skipped": "torch is not installed"} for peer in ghost.PEERS}
    }


@pytest.mark.parametrize(
    "preallocate, says",
    [
        ("false", "memory pool grown on demand up to 0.95 of the device"),
        ("true", "memory pool of 0.95 of the device taken at the start"),
    ],
)
def test_a_gpu_note_names_the_memory_pool(ghost, monkeypatch, preallocate, says):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preallocate)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    env = {"date": "2026-12-07", "device": "H", "versions": {"jax": "0.11.2"}}
    assert ghost._provenance(dict(env, platform="gpu")) == (
        f"measured 2026-12-07 on H, jax 0.11.2, {says}"
    )
    # On a CPU there is no such pool.
    assert ghost._provenance(dict(env, platform="cpu")) == (
        "measured 2026-12-07 on H, jax 0.11.2"
    )


@pytest.mark.parametrize(
    "file, function, part",
    [
        # The GPT's loss is optax's softmax cross-entropy: the model's, though
        # its file lies under optax/ as AdamW's do.
        (
            "/venv/optax/losses/_classification.py",
            "softmax_cross_entropy_with_integer_labels",
            "model",
        ),
        ("/venv/optax/_src/update.py", "apply_updates", "optimizer"),
        ("/repo/transforms/_train/_train_step.py", "keep_if_finite", "optimizer"),
        ("/repo/transforms/_grad/_ghost_eval.py", "bind", "ghost engine"),
        ("/repo/benchmarks/_gpt.py", "Block.__call__", "model"),
        ("/venv/equinox/nn/_linear.py", "Linear.__call__", "model"),
        ("/venv/equinox/nn/_normalisation.py", "LayerNorm.__call__", "model"),
    ],
)
def test_profile_parts_charge_the_layers_and_loss_to_the_model(
    ghost, file, function, part
):
    _profile = load_benchmark("_profile")
    info = {"file": file, "function": function, "op_name": ""}
    assert _profile.part_of(info, ghost.PARTS) == part
