"""DP-SGD steps on a GPT: each clipping method against a plain step and Opacus.

Usage: `python benchmarks/dp.py [--size tiny|gpt2] [--batch B] [--length T]
[--no-torch] [--repeats N] [--profile] [--results-dir DIR]`, or for the batch-size sweep
`python benchmarks/dp.py [--size ...] --sweep-batch B [B ...] [--length T]`. The
model is `benchmarks/_gpt.py`'s: GPT-2 small (124M parameters, head tied to the
token embedding, scan over layers, bfloat16 compute with float32 master weights) by
default on a GPU, a tiny float32 GPT on the CPU. The default regime is the issue's:
B = 256 sequences of T = 128 tokens for gpt2, B = 8 of T = 16 for tiny. Results go to
`results/dp-<platform>.json` beside this script, or to `--results-dir`.

Rows of a regime, all AdamW on the same model and batch:

- (a) a plain training step (mean loss, no clipping, no noise);
- (b) the DP step (`make_dp_train_step`), method `"one_pass"`;
- (c) the DP step, method `"two_pass"`;
- (d) the DP step, method `"vmap"` (per-example gradients formed);
- (e) Opacus' DP-SGD step with ghost clipping (`opacus-dp` of `_ghost_torch.py`), in
  a child process of its own on the same device, when `import opacus` works there.
  Its hooks do not see the tied head, so its clip factors come from norms that
  leave out the head's share of the embedding's gradient (the row's note says so).

Every DP step clips to C = 1 with noise multiplier 1, the whole batch counting (a
Poisson batch padded to B costs the same). The issue's targets, at B = 256: (b) at
most 1.25x the time and 1.1x the memory of (a), and at most 1.1x its time where the
one-pass method applies; (b) faster than (e).

With `--profile`, (a), (b) and (c) are also traced, and rows (workload `profile`)
give the kernel time per call of each part: the ghost engine's contractions, the DP
clipping and noise, the model, the optimiser, and cuBLAS and cuDNN kernels by kind
(as `ghost.py --profile` does).

With `--sweep-batch`, (a) to (d) at each batch size at one length (workloads `batch
sweep/...`), largest first; a size that runs out of memory is recorded, and smaller
ones are still tried. JAX's programs run largest first, as in `ghost.py`. Runs merge
into the result file as `ghost.py`'s do (by regime and swept point). Memory is XLA's
compiled footprint (arguments + outputs + temporaries - aliased) for JAX, the CUDA
allocator's peak during one call for PyTorch.
"""

import argparse
import os
import sys
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax


# The model is `_gpt.py`'s, and runs are measured and merged as `ghost.py`'s are
# (which also sets XLA's allocator so that the PyTorch child finds the GPU's memory
# free).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpt import COMPUTE, DTYPES, GPT, make_loss, SIZES, torch_state  # noqa: E402
from _harness import (  # noqa: E402
    measure_largest_first,
    not_installed,
    positive_int,
    Results,
)
from ghost import (  # noqa: E402
    _provenance,
    _ratio,
    _spawn,
    ask_for_profile,
    batch_sweep,
    PARTS,
    profile_calls,
    save,
)

from transforms import make_dp_train_step, MaskedBatch  # noqa: E402


REGIME = {"tiny": (8, 16), "gpt2": (256, 128)}
CLIP_NORM, NOISE = 1.0, 1.0
METHODS = {"one_pass": "(b)", "two_pass": "(c)", "vmap": "(d)"}
# `--profile`'s parts beyond the ghost benchmark's: the clipping and the noise.
DP_PARTS = [("DP clipping", "transforms/_privacy/", None)]
OPACUS = "(e) Opacus ghost clipping, DP step"


def parse(argv, platform: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--batch", type=positive_int, metavar="B")
    parser.add_argument("--length", type=positive_int, metavar="T")
    parser.add_argument("--sweep-batch", type=positive_int, nargs="+", metavar="B")
    parser.add_argument("--no-torch", action="store_true", help="skip Opacus (e)")
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--torch-timeout", type=positive_int, default=600, metavar="S")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace (a), (b) and (c) and report where their device time goes "
        "(benchmarks/_profile.py)",
    )
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if platform == "cpu" else "gpt2")
    if args.sweep_batch and args.batch:
        parser.error("--sweep-batch runs the sweep alone: leave out --batch")
    if args.sweep_batch and args.profile:
        parser.error("--profile traces the B = --batch steps: leave out --sweep-batch")
    context = SIZES[args.size]["context"]
    if args.length is not None and args.length > context:
        parser.error(f"--length {args.length} is longer than the context {context}")
    return args


def opacus_peer(model, heads, compute, platform, tokens, repeats, timeout) -> dict:
    """Opacus' DP step on `tokens` `(B, T + 1)`, in a child process."""
    if not_installed("torch"):
        return {"skipped": "torch is not installed"}
    device = "cuda" if platform == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        weights, path = os.path.join(tmp, "weights.npz"), os.path.join(tmp, "x.npy")
        np.savez(weights, **torch_state(model))  # pyright: ignore[reportArgumentType]
        np.save(path, np.asarray(tokens, dtype=np.int32))
        argv = ["--peer", "opacus-dp", "--weights", weights, "--tokens", path]
        argv += ["--heads", str(heads), "--compute", compute, "--device", device]
        argv += ["--repeats", str(repeats), "--clip-norm", str(CLIP_NORM)]
        argv += ["--noise-multiplier", str(NOISE)]
        return _spawn(argv, timeout)


def steps(loss_fn, optimizer, static, unroll_layers="auto"):
    """The plain step and the DP step of each method, as functions of arrays;
    `unroll_layers` is the DP steps' (see `make_dp_train_step`)."""

    def plain(params, opt_state, batch, key):
        del key

        def mean_loss(params):
            model = eqx.combine(params, static)
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(model, *batch))

        value, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def private(method):
        step = make_dp_train_step(
            loss_fn,
            optimizer,
            clip_norm=CLIP_NORM,
            noise_multiplier=NOISE,
            method=method,
            donate=False,
            unroll_layers=unroll_layers,
        )

        def run(params, opt_state, batch, key):
            B = batch[0].shape[0]
            full = MaskedBatch(batch, jnp.ones(B, bool), jnp.asarray(B, jnp.float32))
            model, opt_state, metrics = step(
                eqx.combine(params, static), opt_state, full, key
            )
            return eqx.filter(model, eqx.is_array), opt_state, metrics["loss"]

        return run

    out = {"(a) plain step": plain}
    for method, tag in METHODS.items():
        out[f"{tag} DP step, {method}"] = private(method)
    return out


def _batch_last(step):
    """`step(params, opt_state, batch, key)` as a function of `(params, opt_state,
    key, batch)`: `ghost.batch_sweep` passes the batch last."""
    return lambda params, opt_state, key, batch: step(params, opt_state, batch, key)


def main(argv=None):
    dump_dir = ask_for_profile(argv)  # before the backend starts
    platform = jax.devices()[0].platform
    args = parse(argv, platform)
    cfg = SIZES[args.size]
    repeats = args.repeats or (5 if args.size == "gpt2" else 10)
    compute = DTYPES[COMPUTE[args.size]]
    results = Results(
        "dp",
        "DP-SGD steps on a GPT",
        f"The ghost benchmark's GPT-2-layout model (tied head, scan over layers), "
        f"{COMPUTE[args.size]} compute, AdamW. (a) plain step; DP steps clipping to "
        f"C = {CLIP_NORM} with noise multiplier {NOISE}: (b) one pass, (c) two "
        "passes, (d) vmap(grad); (e) Opacus' DP step with ghost clipping in PyTorch, "
        "in a process of its own. Batch sweeps: (a) to (d) against B at one T.",
    )
    model = GPT(
        cfg["vocab"], cfg["dim"], cfg["heads"], cfg["layers"], cfg["context"], jr.key(0)
    )
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    fixed = {k: v for k, v in cfg.items() if k not in ("batch", "length")}
    sizes = dict(fixed, compute=COMPUTE[args.size], params=n_params)
    loss_fn = make_loss(compute)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    candidates = steps(loss_fn, optimizer, static)
    key = jr.key(1)
    default = REGIME[args.size]
    length = args.length or default[1]

    if args.sweep_batch:
        swept = {
            label: ("train step", _batch_last(fn), (params, opt_state, key))
            for label, fn in candidates.items()
        }
        batch_sweep(results, swept, cfg, sizes, args.sweep_batch, length, repeats)
        save(results, args.results_dir, default)
        return

    B = args.batch or default[0]
    tokens = jr.randint(jr.key(2), (B, length + 1), 0, cfg["vocab"])
    point = dict(sizes, batch=B, length=length)
    peer = None
    if not args.no_torch:
        # Before JAX grows its memory pool on the device.
        peer = opacus_peer(
            model,
            cfg["heads"],
            COMPUTE[args.size],
            platform,
            tokens,
            repeats,
            args.torch_timeout,
        )
    state = (params, opt_state, (tokens,), key)
    measured = measure_largest_first(
        {label: (fn, state) for label, fn in candidates.items()}, repeats=repeats
    )
    rows = {
        label[:3]: results.add(
            workload="train step", impl=label, sizes=point, **measured[label][0]
        )
        for label in candidates
    }
    if peer is not None:
        rows["(e)"] = results.add(
            workload="train step", impl=OPACUS, sizes=point, **peer
        )
    plain, one = rows["(a)"], rows["(b)"]
    text = (
        f"B = {B}, T = {length}: DP step / plain step, time: one pass "
        f"{_ratio(one, plain)}, two passes {_ratio(rows['(c)'], plain)}, vmap "
        f"{_ratio(rows['(d)'], plain)}; memory: one pass "
        f"{_ratio(one, plain, 'peak_bytes')}, two passes "
        f"{_ratio(rows['(c)'], plain, 'peak_bytes')}, vmap "
        f"{_ratio(rows['(d)'], plain, 'peak_bytes')}. Targets: time <= 1.25 (one "
        "pass <= 1.1), memory <= 1.1."
    )
    if "(e)" in rows:
        text += f" Opacus / one pass, time: {_ratio(rows['(e)'], one)}."
    results.note(
        f"{text} {n_params / 1e6:.3g}M parameters, {COMPUTE[args.size]} compute; "
        f"{_provenance(results.environment)}."
    )
    if dump_dir is not None:
        traced = [label for label in candidates if label[:3] in ("(a)", "(b)", "(c)")]
        calls = {label: (candidates[label], state) for label in traced}
        profile_calls(results, calls, point, dump_dir, PARTS + DP_PARTS)
    save(results, args.results_dir, default)


if __name__ == "__main__":
    main()
