"""Training throughput of the multimodal LM against a PyTorch implementation.

Usage:

    python benchmarks/multimodal.py [--size small|gpt2] [--seq 1024 2048]
        [--batch B] [--devices N] [--variants scan unrolled remat] [--no-torch]
        [--tag NAME]
    python benchmarks/multimodal.py --packed [--size ...] [--seq ...] [--batch ROWS]
    python benchmarks/multimodal.py --generate [--size ...] [--seq ...] [--batch B]
        [--no-uncached]

One training step of `eqx_models.multimodal` (`make_train_step` with
`MultimodalLoss`: chunked cross-entropy plus expected-value losses on sampled rows,
AdamW with a decay mask and clipping) against the same model and loss in PyTorch
(`benchmarks/multimodal_torch.py`: `torch.compile`, bfloat16 autocast,
`scaled_dot_product_attention`, fused AdamW), on the same token batch. On a GPU the
JAX step computes in bfloat16 with float32 master weights and cuDNN fused attention.

`gpt2` (the default on a GPU) is the GPT-2-small shape: d_model 768, 12 layers, 12
heads, vocabulary 13 317 (8 192 image, 1 024 scalar and 4 x 1 024 spectrum tokens;
with the untied head about 107M parameters), sequences of 1 024 and 2 048 tokens,
131 072 tokens per step and device. `--variants` compares the layer stack as the
model's default (`unroll="auto"`: fully unrolled on a GPU, a `lax.scan` on a CPU),
a rolled `lax.scan`, fully unrolled, or rematerialised. `--profile` also traces a
few steps of each JAX variant and reports where the device time goes, per part of
the model (`benchmarks/_profile.py`).
`small` (the default on a CPU) is a tiny model for a quick check.

`--packed` replaces the peer comparison by the same JAX step on rows filled two
ways from a catalogue whose objects differ in length (`make_catalogue`: images for
90 % of the objects, each spectrum group for half of them, covering half to all of
its segments): padded, one object per row, and packed, several objects per row
(`pack_sequences`); it reports useful (non-`PAD`) tokens per second
(`multimodal_packing-<platform>.json`). `--generate` times
`eqx_models.multimodal.generate` after a prompt of `BOS` and the image, with the
key/value cache (sampling with expected values, and greedy) and, unless
`--no-uncached`, a greedy loop that runs the full forward pass for every position
(`multimodal_generation-<platform>.json`).

Each measurement runs in its own subprocess (clean peak-memory figures, a failure
does not stop the others). Reported: median step time, tokens per second, peak
device memory, and MFU = model FLOPs per step (matmuls of the forward and backward
passes, `CausalTransformerLM.flops_per_token`) / step time / the bf16 matmul ceiling
measured here (`mfu`; `mfu_causal` counts only the causal half of attention, and
`mfu_spec` uses the datasheet peak instead). `--devices N` runs the JAX step
data-parallel over the first N devices (a `jax.sharding.Mesh`; the batch is per
device); the PyTorch peer always uses one device.
"""

import argparse
import json
import os
import tempfile


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    "small": dict(
        n_image=256,
        n_scalar=64,
        n_spectrum=64,
        groups=("bp", "rp"),
        d_model=128,
        n_layers=2,
        n_heads=4,
        seqs=(128,),
        tokens_per_step=2048,
        n_columns=16,
    ),
    "gpt2": dict(
        n_image=8192,
        n_scalar=1024,
        n_spectrum=1024,
        groups=("bp", "rp", "b", "r"),
        d_model=768,
        n_layers=12,
        n_heads=12,
        seqs=(1024, 2048),
        tokens_per_step=131072,
        n_columns=64,
    ),
}
# Parts of the step for the profile breakdown (`benchmarks/_profile.py`): the
# source file and function each kernel's HLO instruction came from.
PARTS = [
    ("attention projections", "multimodal/_model.py", ("attention",)),
    ("MLP", "multimodal/_model.py", ("mlp",)),
    ("block: residuals, dropout", "multimodal/_model.py",
     ("__call__", "block", "scanned", "_dropout", "_keep_masks")),
    ("embeddings, final norm", "multimodal/_model.py", None),
    ("GELU", "eqx_models/_layer_ops.py", ("gelu", "_gelu", "_gelu_fwd", "_gelu_bwd",
                                          "_gelu_terms")),
    ("layer norm", "eqx_models/_layer_ops.py", None),
    ("loss: cross-entropy and head", "transforms/_losses/_cross_entropy.py", None),
    ("loss: expected-value", "multimodal/_loss.py", None),
    ("loss: expected-value", "transforms/_losses/", None),
    ("optimizer", "optax/", None),
    ("optimizer", "transforms/_train/", None),
    ("optimizer", "eqx_models/multimodal/_train.py", None),
]  # fmt: skip
PROFILED_STEPS = 3
# Datasheet dense bf16 peak (H100/H200 SXM); the measured ceiling is the reference.
SPEC_PEAK = {"H100": 989.4e12, "H200": 989.4e12}
# The JAX step's learning-rate schedule (the PyTorch peer runs at 3e-4 throughout).
WARMUP_STEPS = 100


def _layout(size):
    from eqx_models.multimodal import VocabLayout

    return VocabLayout(
        n_image=size["n_image"],
        n_scalar=size["n_scalar"],
        n_spectrum=size["n_spectrum"],
        spectrum_groups=size["groups"],
    )


def catalogue_sizes(size, length: int) -> tuple[int, int, int]:
    """Image cells, scalar columns and segments per spectrum group of an object
    whose every part is present: it fills `length` tokens exactly."""
    n_groups = len(size["groups"])
    n_image = length * 9 // 16
    n_scalar = size["n_columns"]
    per_group = (length - n_image - n_scalar - 3 - n_groups - 1) // n_groups
    return n_image, n_scalar, per_group


def make_data(size, batch: int, length: int, path: str, seed: int = 0) -> None:
    """A batch of full-length sequences with the modality structure of a catalogue
    object (BOS, image, SEP, scalars, SEP, spectrum groups with separators, EOS) and
    random codebook indices, plus random codebooks; saved as .npz for both peers."""
    import numpy as np

    from eqx_models.multimodal import BOS, EOS, SEP

    layout = _layout(size)
    rng = np.random.default_rng(seed)
    n_image, n_scalar, per_group = catalogue_sizes(size, length)
    tokens, types, columns = [BOS], [0], [-1]

    def segment(ids, type_id, cols=None):
        tokens.extend(ids)
        types.extend([type_id] * len(ids))
        columns.extend(cols if cols is not None else [-1] * len(ids))

    template = [("image", n_image, 1), ("scalar", n_scalar, 2)]
    template += [
        (f"spectrum:{g}", per_group, 3 + i) for i, g in enumerate(size["groups"])
    ]
    for i, (name, count, type_id) in enumerate(template):
        start, stop = layout.slices()[name]
        segment(
            [start] * count, type_id, list(range(count)) if name == "scalar" else None
        )
        if i < len(template) - 1:
            segment([SEP], 0)
    segment([EOS] * (length - len(tokens)), 0)
    base = np.array(tokens)
    kinds = np.array(types)
    cols = np.array(columns)
    width = np.zeros(length, int)
    for name, (start, stop) in layout.slices().items():
        width[base == start] = stop - start
    offsets = rng.integers(0, 1 << 30, (batch, length)) % np.maximum(width, 1)
    batch_tokens = (base + np.where(width > 0, offsets, 0)).astype(np.int32)
    arrays = _tables(size, rng)
    arrays["tokens"] = batch_tokens
    arrays["type_ids"] = np.broadcast_to(kinds, (batch, length)).astype(np.int32)
    arrays["columns"] = np.broadcast_to(cols, (batch, length)).astype(np.int32)
    np.savez(path, **arrays)  # pyright: ignore[reportArgumentType]


def _tables(size, rng) -> dict:
    """Random codebooks for the layout of `size`, as .npz entries."""
    import numpy as np

    layout = _layout(size)
    tables = {
        "table:image": rng.normal(size=(layout.n_image, 16)),
        "table:scalar": np.sort(
            rng.normal(size=(size["n_columns"], layout.n_scalar)), axis=1
        ),
    }
    for g in layout.spectrum_groups:
        tables[f"table:spectrum:{g}"] = rng.normal(size=(layout.n_spectrum, 32))
    return {k: v.astype(np.float32) for k, v in tables.items()}


# The catalogue of the packing benchmark: every object has its scalar columns
# (10 % of them missing); an image with probability IMAGE_COVERAGE; each spectrum
# group, independently, with probability SPECTRUM_COVERAGE, and then a uniformly
# drawn part (half to all) of the group's segments, as spectra cover parts of the
# wavelength range. The segment counts are those of the padded benchmark's layout.
IMAGE_COVERAGE = 0.9
SPECTRUM_COVERAGE = 0.5


def make_catalogue(size, length: int, count: int, seed: int, *, full=False) -> list:
    """`count` objects' token sequences (`build_sequence`) with random codebook
    indices and the coverage described above (`full`: every part present)."""
    import numpy as np

    from eqx_models.multimodal import build_sequence

    layout = _layout(size)
    rng = np.random.default_rng(seed)
    n_image, n_scalar, per_group = catalogue_sizes(size, length)
    objects = []
    for _ in range(count):
        image = None
        if full or rng.random() < IMAGE_COVERAGE:
            image = rng.integers(0, layout.n_image, n_image)
        scalars = rng.integers(0, layout.n_scalar, n_scalar)
        if not full:
            scalars[rng.random(n_scalar) < 0.1] = -1
        spectra = {}
        for g in layout.spectrum_groups:
            if full:
                spectra[g] = rng.integers(0, layout.n_spectrum, per_group)
            elif rng.random() < SPECTRUM_COVERAGE:
                n = int(rng.integers(per_group // 2, per_group + 1))
                spectra[g] = rng.integers(0, layout.n_spectrum, n)
        objects.append(
            build_sequence(
                layout,
                image=image,
                scalars=scalars,
                scalar_values=rng.normal(size=n_scalar),
                spectra=spectra,
            )
        )
    return objects


def make_packing_data(size, rows: int, length: int, path: str, packed: bool) -> dict:
    """A batch of `rows` rows of `length` positions from the catalogue above,
    padded (one object per row) or packed (first fit by decreasing length over a
    buffer of twice the objects the rows hold on average; the objects left out
    would go to the next batch). Saved as .npz; returns what the batch holds."""
    import numpy as np

    from eqx_models.multimodal import pack_sequences, packing_plan, pad_batch

    if packed:
        pool = make_catalogue(size, length, 4 * rows, seed=1)
        mean = np.mean([len(s.tokens) for s in pool])
        pool = pool[: max(rows, int(2 * rows * length / mean))]
        placed, _ = packing_plan(
            [len(s.tokens) for s in pool], length=length, n_rows=rows
        )
        chosen = [s for s, row in zip(pool, placed) if row >= 0]
        batch = pack_sequences(chosen, length=length, n_rows=rows)
    else:
        chosen = make_catalogue(size, length, rows, seed=1)
        batch = pad_batch(chosen, length=length)
    arrays = _tables(size, np.random.default_rng(0))
    for field in ("tokens", "type_ids", "columns", "segment_ids", "positions"):
        value = getattr(batch, field)
        if value is not None:
            arrays[field] = np.asarray(value)
    np.savez(path, **arrays)  # pyright: ignore[reportArgumentType]
    useful = int(np.sum(arrays["tokens"] != 0))
    return {
        "objects": len(chosen),
        "fill": useful / arrays["tokens"].size,
        "mean_object_tokens": float(np.mean([len(s.tokens) for s in chosen])),
    }


def _model(size, seq: int, **options):
    """The benchmark's `CausalTransformerLM` of `size` for `seq` positions: no
    dropout, GPT-2's initialisation; `options` are further keywords of the model."""
    import jax.random as jr

    from eqx_models.multimodal import CausalTransformerLM

    return CausalTransformerLM(
        _layout(size),
        d_model=size["d_model"],
        n_layers=size["n_layers"],
        n_heads=size["n_heads"],
        max_len=seq,
        dropout=0.0,
        init="gpt",
        key=jr.key(0),
        **options,
    )


def _codebooks(size, tables):
    """The `Codebooks` of the .npz entries that `_tables` makes."""
    from eqx_models.multimodal import Codebooks

    layout = _layout(size)
    return Codebooks(
        layout,
        image=tables["table:image"],
        scalar=tables["table:scalar"],
        spectrum={g: tables[f"table:spectrum:{g}"] for g in layout.spectrum_groups},
    )


def worker_ceiling(args) -> dict:
    """The best bf16 (f32 on a CPU) matmul throughput over a few square sizes."""
    import jax
    import jax.numpy as jnp
    from _harness import matmul_ceiling

    gpu = jax.devices()[0].platform == "gpu"
    return matmul_ceiling(jnp.bfloat16 if gpu else jnp.float32)


def worker_jax(args) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from _harness import time_callable

    from eqx_models.multimodal import (
        make_optimizer,
        MultimodalLoss,
        MultimodalTrainConfig,
        TokenBatch,
    )
    from transforms import make_train_step

    size = SIZES[args.size]
    gpu = jax.devices()[0].platform == "gpu"
    data = np.load(args.data)
    model = _model(
        size,
        args.seq,
        attention=args.attention,
        **_UNROLL[args.variant](size["n_layers"]),
        remat=args.variant == "remat",
    )
    codebooks = _codebooks(size, data)
    loss = MultimodalLoss(
        codebooks,
        sample_k=1024,
        compute_dtype="bfloat16" if gpu else "float32",
        ce_chunk_size=8192,
    )
    config = MultimodalTrainConfig(
        n_steps=10_000, learning_rate=3e-4, warmup_steps=WARMUP_STEPS
    )
    optimizer = make_optimizer(config, model)
    mesh = None
    if args.devices > 1:
        devices = jax.devices()[: args.devices]
        mesh = jax.make_mesh(
            (args.devices,),
            ("data",),
            axis_types=(jax.sharding.AxisType.Auto,),
            devices=devices,
        )
    step = make_train_step(
        loss,
        optimizer,
        has_aux=True,
        mesh=mesh,
        deterministic=getattr(args, "deterministic", False),
    )
    reps = max(args.devices, 1)
    packed = "segment_ids" in data
    batch = TokenBatch(
        tokens=jnp.asarray(np.tile(data["tokens"], (reps, 1))),
        type_ids=jnp.asarray(np.tile(data["type_ids"], (reps, 1))),
        columns=jnp.asarray(np.tile(data["columns"], (reps, 1))),
        values=jnp.full((reps * data["tokens"].shape[0], args.seq), jnp.nan),
        segment_ids=(
            jnp.asarray(np.tile(data["segment_ids"], (reps, 1))) if packed else None
        ),
        positions=(
            jnp.asarray(np.tile(data["positions"], (reps, 1))) if packed else None
        ),
    )
    state = {
        "model": model,
        "opt": optimizer.init(eqx.filter(model, eqx.is_inexact_array)),
        "i": 0,
    }

    def run():
        state["i"] += 1
        state["model"], state["opt"], metrics = step(
            state["model"], state["opt"], batch, jr.fold_in(jr.key(1), state["i"])
        )
        return metrics

    timing = time_callable(run, warmup=args.warmup + 1, repeats=args.repeats)
    metrics = jax.block_until_ready(run())
    stats = jax.devices()[0].memory_stats() or {}
    profile = None
    if args.profile_dir:
        import _profile

        trace_dir = os.path.join(args.profile_dir, "trace")
        _profile.capture(run, PROFILED_STEPS, trace_dir)
        profile = _profile.breakdown(
            trace_dir, os.path.join(args.profile_dir, "hlo"), PROFILED_STEPS, PARTS
        )
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    return {
        **timing,
        "loss": float(metrics["loss"]),
        "device": jax.devices()[0].device_kind,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "flops_per_token": model.flops_per_token(args.seq),
        "flops_per_token_causal": model.flops_per_token(args.seq, causal=True),
        "parameters": int(n_params),
        "attention": args.attention,
        "useful_tokens": int(np.sum(np.asarray(batch.tokens) != 0)),
        **({"profile": profile} if profile else {}),
    }


def worker_generate(args) -> dict:
    """Generation after a prompt of `BOS` and the image: the cached decoding of
    `eqx_models.multimodal.generate` (sampling with expected values, and greedy)
    and, unless `--no-uncached`, a greedy loop without a cache that runs the full
    forward pass for every position."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import numpy as np
    from _harness import time_callable

    from eqx_models.multimodal import (
        cast_floating,
        generate,
        pad_batch,
    )

    size = SIZES[args.size]
    gpu = jax.devices()[0].platform == "gpu"
    model = _model(size, args.seq)
    if gpu:
        model = cast_floating(model, jnp.bfloat16)
    codebooks = _codebooks(size, _tables(size, np.random.default_rng(0)))
    objects = make_catalogue(size, args.seq, args.batch, seed=2, full=True)
    batch = pad_batch(objects, length=args.seq)
    n_image, _, _ = catalogue_sizes(size, args.seq)
    prompt = 1 + n_image
    calls = {"i": 0}

    def cached(greedy: bool):
        def run():
            calls["i"] += 1
            out = generate(
                model,
                batch,
                prompt_length=prompt,
                key=jr.fold_in(jr.key(1), calls["i"]),
                greedy=greedy,
                codebooks=None if greedy else codebooks,
            )
            return out.tokens

        return run

    layout_of_batch = generate(model, batch, prompt_length=prompt, greedy=True)
    drawn = int(np.sum(np.asarray(layout_of_batch.generated)))
    out = {
        "drawn_tokens": drawn,
        "prompt": prompt,
        "batch": args.batch,
        "parameters": int(
            sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        ),
        "device": jax.devices()[0].device_kind,
    }
    runs = {
        "cached, sampled, expected values": cached(False),
        "cached, greedy": cached(True),
    }
    if not args.no_uncached:
        runs["uncached, greedy"] = _uncached_generation(model, batch, prompt)
    for name, run in runs.items():
        # The loop without a cache costs a full forward pass per position: a few
        # calls say enough.
        slow = name.startswith("uncached")
        timing = time_callable(
            run,
            warmup=1 if slow else args.warmup + 1,
            repeats=min(args.repeats, 3) if slow else args.repeats,
        )
        out[name] = {
            **timing,
            "tokens_per_sec": drawn / timing["median_s"],
        }
    return out


def _uncached_generation(model, batch, prompt: int):
    """Greedy decoding without a cache: for every position, the full forward pass
    over the whole buffer (causal, so the positions after it play no part)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from eqx_models.multimodal import MISS

    layout = model.layout
    start = jnp.zeros(layout.n_types, jnp.int32)
    stop = jnp.zeros(layout.n_types, jnp.int32)
    names = ["image", "scalar"] + [f"spectrum:{g}" for g in layout.spectrum_groups]
    for type_id, name in enumerate(names, start=1):
        a, b = layout.slices()[name]
        start, stop = start.at[type_id].set(a), stop.at[type_id].set(b)

    @eqx.filter_jit
    def run(model, tokens, type_ids):
        vocab = jnp.arange(layout.vocab_size)
        length = tokens.shape[1]
        drawn = ((tokens >= 5) | (tokens == MISS)) & (jnp.arange(length) >= prompt)

        def step(tokens, t):
            h = model.features_batch(tokens, type_ids=type_ids)[:, t - 1]
            logits = h @ model.head_weight.T.astype(h.dtype)
            kind = type_ids[:, t]
            allowed = (vocab >= start[kind][:, None]) & (vocab < stop[kind][:, None])
            best = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
            new = jnp.where(drawn[:, t], best.astype(tokens.dtype), tokens[:, t])
            return tokens.at[:, t].set(new), None

        tokens, _ = jax.lax.scan(step, tokens, jnp.arange(prompt, length))
        return tokens

    return lambda: run(model, batch.tokens, batch.type_ids)


# The layer stack of each variant: `default` passes nothing (`unroll="auto"`: fully
# unrolled on a GPU, a rolled scan on a CPU), which is what a user gets.
_UNROLL = {
    "default": lambda n: {},
    "scan": lambda n: {"unroll": 1},
    "unrolled": lambda n: {"unroll": n},
    "remat": lambda n: {"unroll": 1},
}


def _spawn(argv: list[str], timeout: float, extra_env=None) -> dict:
    from _harness import run_worker

    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, HERE, env.get("PYTHONPATH", "")) if p
    )
    # One worker at a time has the GPU; the parent holds none of its memory.
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    return run_worker(argv, timeout, env=env, cwd=ROOT, tail=6)


def _train_step(results, label, args, size_name, seq, data, variant, devices, profile):
    """The JAX training step timed in a worker process on the batch saved at `data`,
    traced into the folder `profile` unless it is None.

    On a GPU, a worker that fails with cuDNN's fused attention runs again with XLA's,
    and a note on `label` says so.
    """
    argv = [__file__, "--worker", "jax", "--seq", str(seq), "--data", data]
    argv += ["--size", size_name, "--warmup", str(args.warmup)]
    argv += ["--repeats", str(args.repeats)]
    argv += ["--variant", variant, "--devices", str(devices)]
    env = {}
    if profile is not None:
        import _profile

        argv += ["--profile-dir", profile]
        env["XLA_FLAGS"] = _profile.dump_flags(os.path.join(profile, "hlo"))
    out = _spawn(argv, args.timeout, env)
    if "error" in out and results.environment["platform"] == "gpu":
        results.note(
            f"{label} L={seq} with cuDNN attention failed "
            f"({out['error'][:300]}); retried with XLA attention."
        )
        out = _spawn(argv + ["--attention", "xla"], args.timeout, env)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--seq", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per device")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(_UNROLL),
        help="layer-stack variants (default: default, and scan on a GPU)",
    )
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--tag",
        default=None,
        help="suffix of the results file (default: the device count when > 1)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--packed",
        action="store_true",
        help="instead of the peer comparison: the training step on packed rows "
        "against padded rows of a catalogue whose objects vary in length, in "
        "useful (non-PAD) tokens per second",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="instead of the peer comparison: generation tokens per second "
        "(cached decoding after a prompt of BOS and the image)",
    )
    parser.add_argument(
        "--no-uncached",
        action="store_true",
        help="with --generate: skip the loop without a cache",
    )
    parser.add_argument(
        "--worker", choices=["jax", "ceiling", "generate"], help=argparse.SUPPRESS
    )
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="scan", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace a few steps of each JAX variant and report where the "
        "device time goes (benchmarks/_profile.py)",
    )
    args = parser.parse_args(argv)

    if args.worker is not None:
        if args.size is None or args.seq is None:
            parser.error("workers need --size and --seq")
        args.seq = args.seq[0]
        work = {
            "jax": worker_jax,
            "ceiling": worker_ceiling,
            "generate": worker_generate,
        }[args.worker]
        print(json.dumps(work(args)), flush=True)
        return

    # The parent only reads the platform and versions: keep it off GPU memory.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    from _harness import Results

    platform = jax.devices()[0].platform
    size_name = args.size or ("small" if platform == "cpu" else "gpt2")
    size = SIZES[size_name]
    seqs = args.seq or list(size["seqs"])
    tag = args.tag or (f"{args.devices}dev" if args.devices > 1 else None)
    if args.packed:
        return run_packing(args, size_name, seqs, tag)
    if args.generate:
        return run_generation(args, size_name, seqs, tag)
    results = Results(
        "multimodal" + (f"_{tag}" if tag else ""),
        "Multimodal LM training step",
        "One training step (forward, backward, AdamW) of "
        "`eqx_models.multimodal.CausalTransformerLM` with `MultimodalLoss` "
        "(chunked cross-entropy + expected-value losses on sampled rows), against "
        "the same model and loss in PyTorch (`torch.compile`, bf16 autocast, SDPA, "
        "fused AdamW) on the same batch. MFU uses the bf16 matmul ceiling measured "
        "in the same run.",
    )
    ceiling = _spawn(
        [__file__, "--worker", "ceiling", "--size", size_name, "--seq", "0"],
        args.timeout,
    )
    peak = ceiling.pop("flops_per_sec", None)
    if peak is not None:
        ceiling["tflops_per_sec"] = peak / 1e12
    device = jax.devices()[0].device_kind
    spec = next((v for k, v in SPEC_PEAK.items() if k in device), None)
    results.add(workload="matmul ceiling", impl="jax", **ceiling)
    with tempfile.TemporaryDirectory() as tmp:
        for seq in seqs:
            batch = args.batch or max(1, size["tokens_per_step"] // seq)
            path = os.path.join(tmp, f"data-{seq}.npz")
            make_data(size, batch, seq, path)
            sizes = {
                "seq": seq,
                "batch_per_device": batch,
                "devices": args.devices,
                "d_model": size["d_model"],
                "n_layers": size["n_layers"],
                "vocab": _layout(size).vocab_size,
            }
            tokens = batch * seq * args.devices
            # On a GPU the default is the unrolled stack: the rolled scan is the
            # comparison; on a CPU the default is the scan.
            variants = args.variants or (
                ["default", "scan"] if platform == "gpu" else ["default"]
            )
            for variant in variants:
                impl = f"jax {variant}"
                profile = None
                if args.profile:
                    profile = os.path.join(tmp, f"profile-{variant}-{seq}")
                out = _train_step(
                    results,
                    impl,
                    args,
                    size_name,
                    seq,
                    path,
                    variant,
                    args.devices,
                    profile,
                )
                _add(results, impl, sizes, tokens, out, peak, spec, args)
            if args.no_torch:
                continue
            config = {
                "data": path,
                "vocab": _layout(size).vocab_size,
                "n_types": _layout(size).n_types,
                "d_model": size["d_model"],
                "n_layers": size["n_layers"],
                "n_heads": size["n_heads"],
                "pre_ln": False,
                "sample_k": 1024,
                "compile": True,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "slices": _layout(size).slices(),
            }
            torch_argv = [os.path.join(HERE, "multimodal_torch.py"), "--config"]
            out = _spawn(torch_argv + [json.dumps(config)], args.timeout)
            if args.devices > 1:
                results.note("The PyTorch peer ran on one device.")
            single = dict(sizes, devices=1)
            _add(results, "torch.compile", single, batch * seq, out, peak, spec, args)
    if not args.no_torch:
        steps = 1 + args.warmup + args.repeats
        results.note(
            f"The loss column is the last of {steps} steps on one batch. The JAX "
            f"optimiser warms its learning rate up over {WARMUP_STEPS} steps (at "
            f"{min(steps, WARMUP_STEPS)}/{WARMUP_STEPS} of its peak by then), the "
            "PyTorch peer runs at the peak from the first step, so its loss falls "
            "faster; the work of a step does not depend on the learning rate."
        )
    _compare(results)
    results.save()


def run_packing(args, size_name: str, seqs, tag):
    """Packed against padded rows of the same catalogue, same model and step."""
    from _harness import Results

    size = SIZES[size_name]
    results = Results(
        "multimodal_packing" + (f"_{tag}" if tag else ""),
        "Multimodal LM: packed against padded batches",
        "One training step (as in the peer comparison) on rows of the same length "
        "filled two ways from a catalogue whose objects differ in length: padded "
        "(one object per row) and packed (several per row, attention and losses "
        "kept within each object). Useful tokens are the non-PAD positions.",
    )
    n_image, n_scalar, per_group = catalogue_sizes(size, seqs[0])
    results.note(
        f"Catalogue: every object has its {n_scalar} scalar columns (10 % missing); "
        f"an image ({n_image} cells at {seqs[0]} tokens) with probability "
        f"{IMAGE_COVERAGE}; each of the {len(size['groups'])} spectrum groups with "
        f"probability {SPECTRUM_COVERAGE}, then covering a uniform half to all of "
        f"its {per_group} segments. Packing: first fit by decreasing length over a "
        "buffer of twice the objects the rows hold on average."
    )
    with tempfile.TemporaryDirectory() as tmp:
        for seq in seqs:
            rows = args.batch or max(1, size["tokens_per_step"] // seq)
            sizes = {
                "seq": seq,
                "rows": rows,
                "d_model": size["d_model"],
                "n_layers": size["n_layers"],
            }
            measured = {}
            for packed in (False, True):
                impl = "jax packed" if packed else "jax padded"
                path = os.path.join(tmp, f"{impl.split()[1]}-{seq}.npz")
                held = make_packing_data(size, rows, seq, path, packed)
                out = _train_step(
                    results, impl, args, size_name, seq, path, "default", 1, None
                )
                if "error" in out:
                    results.add(
                        workload="packed vs padded",
                        impl=impl,
                        sizes=sizes,
                        error=out["error"],
                    )
                    continue
                median = out["median_s"]
                row = results.add(
                    workload="packed vs padded",
                    impl=impl,
                    sizes=sizes,
                    first_call_s=out["first_call_s"],
                    median_s=median,
                    min_s=out["min_s"],
                    max_s=out["max_s"],
                    iqr_s=out["iqr_s"],
                    repeats=out["repeats"],
                    tokens_per_sec=rows * seq / median,
                    useful_tokens_per_sec=out["useful_tokens"] / median,
                    peak_bytes=out.get("peak_bytes"),
                    device=out.get("device"),
                    **held,
                )
                measured[impl] = row
            if len(measured) == 2:
                padded, packed_row = measured["jax padded"], measured["jax packed"]
                ratio = (
                    packed_row["useful_tokens_per_sec"]
                    / padded["useful_tokens_per_sec"]
                )
                results.note(
                    f"L={seq}: packed rows carry {packed_row['fill']:.0%} useful "
                    f"tokens ({packed_row['objects']} objects in {rows} rows), "
                    f"padded rows {padded['fill']:.0%}; packed "
                    f"{packed_row['useful_tokens_per_sec']:,.0f} useful tokens/s, "
                    f"{ratio:.2f}x the padded batch's, at "
                    f"{packed_row['median_s'] / padded['median_s']:.2f}x its step "
                    "time."
                )
    results.save()


def run_generation(args, size_name: str, seqs, tag):
    """Generation tokens per second, cached (sampled and greedy) and uncached."""
    from _harness import Results

    size = SIZES[size_name]
    results = Results(
        "multimodal_generation" + (f"_{tag}" if tag else ""),
        "Multimodal LM: generation",
        "`eqx_models.multimodal.generate` after a prompt of BOS and the image: "
        "the scalars and every spectrum group drawn one position at a time with a "
        "key/value cache (sampling with expected values at every drawn position, "
        "and greedy), against a greedy loop that runs the full forward pass for "
        "every position. Tokens per second count the drawn tokens of the whole "
        "batch; each call includes the prompt's forward pass.",
    )
    for seq in seqs:
        batch = args.batch or (64 if size_name == "gpt2" else 16)
        argv = [__file__, "--worker", "generate", "--seq", str(seq)]
        argv += ["--size", size_name, "--batch", str(batch)]
        argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
        if args.no_uncached:
            argv.append("--no-uncached")
        out = _spawn(argv, args.timeout)
        sizes = {
            "seq": seq,
            "batch": batch,
            "d_model": size["d_model"],
            "n_layers": size["n_layers"],
        }
        if "error" in out:
            results.add(workload="generation", impl="jax", sizes=sizes, **out)
            continue
        runs = {k: out.pop(k) for k in list(out) if isinstance(out[k], dict)}
        for name, timing in runs.items():
            results.add(
                workload="generation",
                impl=name,
                sizes=sizes,
                **timing,
                **{k: v for k, v in out.items() if k != "batch"},
            )
        cached = runs.get("cached, greedy")
        uncached = runs.get("uncached, greedy")
        if cached and uncached:
            speedup = cached["tokens_per_sec"] / uncached["tokens_per_sec"]
            results.note(
                f"L={seq}: cached greedy decoding {cached['tokens_per_sec']:,.0f} "
                f"tokens/s, {speedup:.1f}x the loop without a cache."
            )
    # Lengths run in calls of their own are folded into one file.
    results.save(merge_key=lambda row: (row["impl"], row["sizes"]["seq"]))


def _add(results, impl, sizes, tokens, out, peak, spec, args):
    if "error" in out:
        results.add(workload="train step", impl=impl, sizes=sizes, error=out["error"])
        return
    out.pop("useful_tokens", None)  # every position of these batches is a token
    timing = {k: out.pop(k) for k in ("median_s", "min_s", "max_s", "iqr_s", "repeats")}
    row = {
        "workload": "train step",
        "impl": impl,
        "sizes": sizes,
        "first_call_s": out.pop("first_call_s"),
        **timing,
        "tokens_per_sec": tokens / timing["median_s"],
        "peak_bytes": out.pop("peak_bytes", None),
    }
    devices = sizes["devices"]
    flops = out.pop("flops_per_token", None)
    causal = out.pop("flops_per_token_causal", None)
    if flops is None:
        # The PyTorch peer computes the same model: the same FLOPs.
        flops = results.rows[-1].get("flops_per_token") if results.rows else None
        causal = (
            results.rows[-1].get("flops_per_token_causal") if results.rows else None
        )
    if flops is not None:
        row["flops_per_token"] = flops
        row["flops_per_token_causal"] = causal
        achieved = flops * tokens / timing["median_s"]
        if peak:
            row["mfu"] = achieved / (peak * devices)
            row["mfu_causal"] = causal * tokens / timing["median_s"] / (peak * devices)
        if spec:
            row["mfu_spec"] = achieved / (spec * devices)
    profile = out.pop("profile", None)
    row.update(out)
    results.add(**row)
    if profile is not None:
        _add_profile(results, impl, sizes, tokens, row, profile, peak, args)


def _add_profile(results, impl, sizes, tokens, row, profile, peak, args):
    """One row per part of the step (`benchmarks/_profile.py`): its time and share,
    and for the matmuls and attention the achieved FLOP/s (from the model's FLOP
    count) against the measured matmul ceiling. The memory-bound parts' byte
    floors are worked out from the model in docs/multimodal.md, not taken from the
    profile's byte count (`gb_per_s`), which was first checked against a GPU's dump
    after the profile quoted there was measured."""
    seq, d = sizes["seq"], sizes["d_model"]
    # Attention's matmuls (scores and values, causal half, forward and backward)
    # against everything else the FLOP count holds.
    attention_flops = 3 * sizes["n_layers"] * 2 * seq * d * tokens
    matmul_flops = row.get("flops_per_token", 0) * tokens - 2 * attention_flops
    matmul_ms = sum(
        v["ms_per_step"] for k, v in profile["parts"].items() if k.endswith("matmul")
    )
    step_ms = 1e3 * row["median_s"]
    for part, v in profile["parts"].items():
        ms = v["ms_per_step"]
        extra = {}
        if part.endswith("matmul") and matmul_ms:
            # The parts share the matmul FLOPs in proportion to their time: one
            # achieved rate for all matmuls.
            extra["tflops_per_sec"] = matmul_flops / matmul_ms / 1e9
        elif part.startswith("attention (cuDNN)"):
            extra["tflops_per_sec"] = attention_flops / ms / 1e9
        if "tflops_per_sec" in extra and peak:
            extra["of_ceiling"] = extra["tflops_per_sec"] * 1e12 / peak
        results.add(
            workload="step profile",
            impl=impl,
            sizes=sizes,
            part=part,
            ms_per_step=ms,
            share_of_step=ms / step_ms,
            **extra,
        )
    results.note(
        f"{impl} L={seq}: kernels take {profile['kernel_ms_per_step']:.1f} ms of the "
        f"{step_ms:.1f} ms step (the rest is launch gaps and host work)."
    )


def _compare(results):
    rows = [
        r
        for r in results.rows
        if r.get("workload") == "train step" and "error" not in r
    ]
    for seq in sorted({r["sizes"]["seq"] for r in rows}):
        at = [r for r in rows if r["sizes"]["seq"] == seq]
        peer = [r for r in at if r["impl"] == "torch.compile"]
        ours = [r for r in at if r["impl"].startswith("jax")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_sec"])
        # The default's line only where another variant beat it.
        default = [r for r in ours if r["impl"] == "jax default" and r is not best]
        for label, r in [("best JAX", best)] + [("the default", r) for r in default]:
            line = f"L={seq}: {label} ({r['impl']}) {r['tokens_per_sec']:,.0f} tokens/s"
            if "mfu" in r:
                line += f", MFU {100 * r['mfu']:.1f}% of the measured ceiling"
            if peer and r["sizes"]["devices"] == 1:
                ratio = r["tokens_per_sec"] / peer[0]["tokens_per_sec"]
                line += f"; {ratio:.2f}x the PyTorch tokens/s"
                if r.get("peak_bytes") and peer[0].get("peak_bytes"):
                    memory = r["peak_bytes"] / peer[0]["peak_bytes"]
                    line += f", {memory:.2f}x its peak memory"
            results.note(line + ".")


if __name__ == "__main__":
    main()
