"""Ghost engines on a GPT: attribution and per-sample norms against a plain step.

Usage: `python benchmarks/ghost.py [--size tiny|gpt2] [--batch B] [--length T]
[--regimes] [--no-torch] [--jvp] [--repeats N] [--results-dir DIR]`, or for the
batch-size sweep `python benchmarks/ghost.py [--size ...] --sweep-batch B [B ...]
[--sweep-length T]`. The default size is `gpt2` on a GPU (GPT-2 small: 124M
parameters with the head tied to the token embedding, d 768, 12 layers, 12 heads, a
context of 1024 positions, bfloat16 compute with float32 master weights) and `tiny`
on the CPU (float32, a context of 256). Results go to `results/ghost-<platform>.json`
beside this script, or to `--results-dir`.

A regime is a batch of B sequences of T tokens on that model: by default the size's
(B = 16, T = 1024 for gpt2; B = 8, T = 64 for tiny), or `--batch` and `--length`
(T at most the context). `--regimes` measures the size's two regimes in one run: for
gpt2 the issue's B = 16, T = 1024 (long sequences, where a per-example gradient is
cheap beside the activations) and B = 256, T = 128 (many short sequences, where
`vmap(grad)` holds B copies of the parameters); for tiny B = 8, T = 64 and B = 32,
T = 16. Rows of each regime, all on the same model and device:

- (a) a plain AdamW training step on the training batch (B) and on train + validation
  (2B examples: the same number of examples as (b));
- (b) the attribution step (`make_attribution_step`, ghost): update with the mean
  training gradient plus `<∇l_i, ḡ_val>` for every training example, validation batch B;
- (c) per-sample gradient norms by the ghost path (B examples);
- (d) the same quantities by `vmap(grad)`: the attribution step with `method="vmap"`
  and per-sample norms with `method="vmap"` (with `--jvp`, also the attribution step
  with `method="jvp"`);
- (e) per-sample gradient norms by `torch.func` (`vmap(grad)`) on the same model in
  PyTorch (CUDA on a GPU), weights copied from the JAX model;
- (f) per-sample gradient norms by Opacus' ghost clipping on that PyTorch model, when
  `import opacus` works there. Opacus' hooks do not see the tied head (it multiplies
  by the embedding matrix outside an `nn.Linear`), so its norms leave out the head's
  share of that matrix's gradient; the row says so in its `note`, and its agreement
  with the JAX norms shows by how much.

The PyTorch peers (e, f) run in child processes (`_ghost_torch.py`), one per peer and
regime, before JAX measures anything, on the device JAX runs on (CUDA or the CPU):
they share no memory pool with this process, which takes device memory only as it
needs it, up to 95 % of it (`XLA_PYTHON_CLIENT_PREALLOCATE=false`,
`XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`, unless set), and an out-of-memory failure there
is a row with the error, not a crash. The weights and tokens travel as `.npz` / `.npy`
files; the child inherits the environment, `PYTHONPATH` included. Each peer row holds
the child's timing (median over repeats, each call ended by `torch.cuda.synchronize`
on a GPU), `peak_bytes` and `max_rel_diff_vs_jax`, the largest relative difference
of its norms from the ghost norms of (c). Without torch (or opacus) the rows say it
is not installed; `--no-torch` leaves them out.

With `--profile`, each regime also traces three calls of (a, B), (b) and (c) and adds
rows (workload `profile`) with the kernel time per call of each part: the ghost
engine's own contractions, the model, the optimiser, and cuBLAS and cuDNN kernels by
kind (`benchmarks/_profile.py`, which reads the trace against XLA's optimised HLO).

With `--sweep-batch 16 32 64 128 256 512 --sweep-length 128`, the script measures only
a batch-size sweep at one length (default: `--length`, else the size's): the plain
step (a), ghost per-sample norms (c) and `vmap(grad)` norms (d) at each batch size
given (workloads `batch sweep/...`), largest batch first. A batch size that does not
fit in memory is recorded as a failure, and smaller ones are still tried.

JAX's programs are all compiled before any runs, and run largest first (in temporary
memory): without preallocation JAX's memory pool grows by regions it never merges, and
a large program run after smaller ones can fail although it fits on the device. Even
so, on an 80 GB H100 a program that XLA's analysis sizes within the device can fail in
a growing pool (B = 512 at T = 128 did); `XLA_PYTHON_CLIENT_PREALLOCATE=true` takes the
pool whole at the start (no PyTorch peer is run in a sweep). Each note names the pool.

Every row records its batch and length (`sizes`), and each run is merged into the
result file already there: it replaces the rows of what it measured (a regime (B, T),
or the swept (B, T) points) and the notes on them, and keeps the rest, so the
regimes and sweeps at several lengths live in one file. A file measured on another
device is replaced whole (the page names one device per file). The file's environment
is the last run's; each note says when and with which jax its numbers were measured.

Memory for the JAX rows is the compiled executable's footprint from XLA's memory
analysis (arguments + outputs + temporaries − aliased); for the PyTorch rows it is
the CUDA allocator's peak during one call minus the memory held before it
(`torch.cuda.max_memory_allocated`; not measured on the CPU). FLOPs are XLA's cost
analysis.
"""

import argparse
import os
import re
import sys
import tempfile


# The PyTorch peers run in child processes on the same GPU: JAX takes device memory
# as it needs it, rather than most of the device up front, so that they find it free.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _gpt import COMPUTE, DTYPES, GPT, make_loss, SIZES, torch_state
from _harness import (
    measure_largest_first,
    not_installed,
    out_of_memory_row,
    positive_int,
    Results,
    RESULTS_DIR,
    run_worker,
)

from transforms import make_attribution_step, per_sample_grad_norms


HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_ghost_torch.py")

# (B, T): few long sequences, many short ones.
REGIMES = {"tiny": [(8, 64), (32, 16)], "gpt2": [(16, 1024), (256, 128)]}
# The PyTorch peers: worker name and row label.
PEERS = {
    "torch.func": "(e) torch.func vmap(grad)",
    "opacus": "(f) Opacus ghost clipping",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument(
        "--batch", type=positive_int, metavar="B", help="sequences per batch"
    )
    parser.add_argument(
        "--length",
        type=positive_int,
        metavar="T",
        help="tokens per sequence, at most the size's context",
    )
    parser.add_argument(
        "--regimes",
        action="store_true",
        help="measure the size's two regimes (gpt2: B=16,T=1024 and B=256,T=128)",
    )
    parser.add_argument(
        "--no-torch", action="store_true", help="skip the PyTorch peers (e, f)"
    )
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument(
        "--attention",
        choices=["auto", "xla", "cudnn"],
        default="auto",
        help="implementation of jax.nn.dot_product_attention (auto: cuDNN on a GPU)",
    )
    parser.add_argument(
        "--jvp", action="store_true", help="also time the jvp attribution step"
    )
    parser.add_argument(
        "--sweep-batch",
        type=positive_int,
        nargs="+",
        metavar="B",
        help="only the batch-size sweep at these batch sizes",
    )
    parser.add_argument(
        "--sweep-length",
        type=positive_int,
        metavar="T",
        help="the sweep's sequence length (default: --length, else the size's)",
    )
    parser.add_argument(
        "--torch-timeout",
        type=positive_int,
        default=300,
        metavar="S",
        help="seconds each PyTorch child may run (default 300)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace (a, B), (b) and (c) of each regime and report where their "
        "device time goes (benchmarks/_profile.py)",
    )
    parser.add_argument(
        "--results-dir", default=None, help="where to write (default: results/)"
    )
    return parser


def parse(argv, platform: str) -> argparse.Namespace:
    """The command line, checked against the chosen size (which needs the platform)."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if platform == "cpu" else "gpt2")
    cfg = SIZES[args.size]
    if args.regimes and (args.batch or args.length):
        parser.error("--regimes measures its own sizes: leave out --batch and --length")
    if args.sweep_batch and (args.regimes or args.batch):
        parser.error("--sweep-batch runs the sweep alone: leave out --regimes, --batch")
    if args.sweep_length and not args.sweep_batch:
        parser.error("--sweep-length needs --sweep-batch")
    for flag, value in (
        ("--length", args.length),
        ("--sweep-length", args.sweep_length),
    ):
        if value is not None and value > cfg["context"]:
            parser.error(
                f"{flag} {value} is longer than the {args.size} model's context of "
                f"{cfg['context']} positions"
            )
    return args


def _row_key(row: dict, default: tuple[int, int]) -> tuple:
    """What a row measured: a regime `(B, T)` or a swept `(B, T)`.

    Rows written before every row carried its sizes belong to the default regime.
    """
    sizes = row.get("sizes") or {}
    kind = "sweep" if _is_sweep(row) else "regime"
    return kind, sizes.get("batch", default[0]), sizes.get("length", default[1])


def _note_key(note: str, default: tuple[int, int]) -> tuple:
    """What a note is about: a regime (`B = 16, T = 1024: ...`) or a sweep's length
    and batch sizes (`Batch-size sweep, T = 128: B = 16, 32; ...`); older free-form
    notes were about the default regime."""
    if match := re.match(r"Batch-size sweep\b.*?\bT = (\d+)", note):
        batches = re.search(r"\bB = (\d+(?:, \d+)*)", note)
        swept = frozenset(map(int, batches[1].split(", "))) if batches else frozenset()
        return "sweep", int(match[1]), swept
    if match := re.match(r"B = (\d+), T = (\d+):", note):
        return "regime", int(match[1]), int(match[2])
    return "regime", *default


def _replaces(new: tuple, old: tuple) -> bool:
    """Whether a note with key `new` replaces one with key `old`: the same regime, or
    a sweep at the same length through any of the same batch sizes (a sweep run in
    parts, to stay within a time limit, keeps each part's note)."""
    if new[0] == old[0] == "sweep":
        return new[1] == old[1] and bool(new[2] & old[2])
    return new == old


def _is_sweep(row: dict) -> bool:
    return str(row.get("workload", "")).startswith("batch sweep/")


def _file_order(row: dict) -> tuple:
    """Regimes first, in the order measured; then sweeps by length and, as a sweep
    runs, largest batch first (however many runs measured them)."""
    if not _is_sweep(row):
        return (False, 0, 0)
    return (True, row["sizes"]["length"], -row["sizes"]["batch"])


def save(results: Results, directory: str | None, default: tuple[int, int]) -> str:
    """Write `results`, merged into the result file already in `directory`.

    This run's rows replace the file's rows of the same regime or swept point, its
    notes those about the same regime or swept points (`_replaces`); the rest is
    kept, regimes before sweeps (`_file_order`). `default` is the `(B, T)` that rows
    and notes without sizes had. A file measured on another device is replaced.
    """
    directory = directory or RESULTS_DIR
    name = f"{results.name}-{results.environment['platform']}.json"
    path = os.path.join(directory, name)
    old = results.previous(path)
    if old is not None:
        rows = {_row_key(row, default) for row in results.rows}
        notes = [_note_key(note, default) for note in results.notes]
        kept = [r for r in old.get("rows", []) if _row_key(r, default) not in rows]
        # A regime measured again without a row it had (a peer left out with
        # --no-torch) loses that row: say so, as the page's comparison goes with it.
        ours = {(_row_key(r, default), r.get("impl")) for r in results.rows}
        for r in old.get("rows", []):
            key = _row_key(r, default)
            if key in rows and (key, r.get("impl")) not in ours:
                print(
                    f"{path}: {r.get('impl')} at {key} was not measured again: dropped"
                )
        results.rows = sorted(kept + results.rows, key=_file_order)
        results.notes = [
            n
            for n in old.get("notes", [])
            if not any(_replaces(new, _note_key(n, default)) for new in notes)
        ] + results.notes
    return results.save(directory)


def _spawn(argv: list[str], timeout: float) -> dict:
    """Run the PyTorch worker; its JSON line, or the reason there is none."""
    return run_worker([WORKER, *argv], timeout)


def torch_peers(model, heads, compute, platform, batches, repeats, timeout):
    """The PyTorch peers' results on each regime's training batch.

    `batches` maps a regime `(B, T)` to its tokens `(B, T + 1)`. Each peer runs in a
    child process of its own; call this before JAX has grown its memory pool.

    **Returns:**

    `{(B, T): {peer: result}}`, a result being the worker's JSON object.
    """
    if not_installed("torch"):
        skipped = {"skipped": "torch is not installed"}
        return {regime: {peer: skipped for peer in PEERS} for regime in batches}
    device = "cuda" if platform == "gpu" else "cpu"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **torch_state(model))  # pyright: ignore[reportArgumentType]
        for regime, tokens in batches.items():
            path = os.path.join(tmp, "tokens.npy")
            np.save(path, np.asarray(tokens, dtype=np.int32))
            common = ["--weights", weights, "--tokens", path, "--heads", str(heads)]
            common += ["--compute", compute, "--device", device]
            common += ["--repeats", str(repeats)]
            out[regime] = {
                peer: _spawn(["--peer", peer, *common], timeout) for peer in PEERS
            }
    return out


def _peer_row(result: dict, reference) -> dict:
    """A peer's row: its result, with its norms replaced by their agreement."""
    row = dict(result)
    norms = row.pop("norms", None)
    if norms is not None and reference is not None:
        got, expected = np.asarray(norms), np.asarray(reference, dtype=np.float64)
        row["max_rel_diff_vs_jax"] = float(np.max(np.abs(got - expected) / expected))
    return row


def _ratio(x, y, key="median_s") -> str:
    if any(r is None or "error" in r or not r.get(key) for r in (x, y)):
        return "n/a"
    return f"{x[key] / y[key]:.3f}"


def _provenance(env: dict) -> str:
    text = (
        f"measured {env['date']} on {env['device']}, jax {env['versions'].get('jax')}"
    )
    if env["platform"] == "gpu":
        # Which programs fit depends on it (see the module's docstring).
        fraction = os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
        if os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"].lower() in ("false", "0"):
            text += f", memory pool grown on demand up to {fraction} of the device"
        else:
            text += f", memory pool of {fraction} of the device taken at the start"
    return text


# Parts of a step for `--profile`: the source file and function each kernel's HLO
# instruction came from (`benchmarks/_profile.py`); cuBLAS and cuDNN kernels are
# named by kind.
PARTS = [
    ("ghost engine", "transforms/_grad/", None),
    ("model", "benchmarks/_gpt.py", None),
    # The GPT's layers and loss come from Equinox and optax (its softmax
    # cross-entropy lies under optax/ with AdamW).
    ("model", "equinox/nn/", None),
    ("model", "optax/losses/", None),
    ("optimizer", "optax/", None),
    ("optimizer", "transforms/_train/", None),
]
PROFILED_STEPS = 3


def ask_for_profile(argv) -> str | None:
    """With `--profile` in `argv` (else the command line): a fresh directory for
    XLA's optimised HLO, asked for in `XLA_FLAGS`; else None. XLA reads its flags
    when the backend starts (the first `jax.devices()`): call this before."""
    if "--profile" not in (sys.argv[1:] if argv is None else argv):
        return None
    import _profile

    dump_dir = tempfile.mkdtemp(prefix="ghost-hlo-")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} {_profile.dump_flags(dump_dir)}".strip()
    return dump_dir


def profile_calls(results, calls, sizes, dump_dir, parts=PARTS):
    """Trace each `label: (fn, args)` of `calls` and add a row per part of it (the
    `(part name, source path, functions)` of `parts`): the time per call and its
    share of the call's kernel time. A call that does not fit is a note."""
    import _profile

    where = f"B = {sizes['batch']}, T = {sizes['length']}"
    for label, (fn, args) in calls.items():
        # A name of its own, for its kernels to be read against its own HLO.
        compiled = jax.jit(_profile.named(fn, f"{label}, {where}"))
        try:
            jax.block_until_ready(compiled(*args))
        except RuntimeError as error:  # a program that does not fit: a note, go on
            failure = out_of_memory_row(error)["error"]
            results.note(
                f"{where}: {label} not profiled: {failure}; "
                f"{_provenance(results.environment)}."
            )
            continue
        out = _profile.add_rows(
            results,
            label,
            lambda: compiled(*args),
            dump_dir,
            parts,
            steps=PROFILED_STEPS,
            sizes=sizes,
        )
        results.note(
            f"{where}: {label} spends {out['kernel_ms_per_step']:.2f} ms per call in "
            f"kernels; {_provenance(results.environment)}."
        )


def profile_regime(results, fns, params, opt_state, tokens, sizes, dump_dir):
    """Trace (a, B), (b) and (c) of one regime (`profile_calls`)."""
    B = sizes["batch"]
    train, val = (tokens[:B],), (tokens[B:],)
    calls = {
        "(a) plain step, B": (fns["plain"], (params, opt_state, train)),
        "(b) attribution step, ghost": (
            fns["attribution"]["ghost"],
            (params, opt_state, train, val),
        ),
        "(c) per-sample norms, ghost": (fns["norms"]["ghost"], (params, train)),
    }
    profile_calls(results, calls, sizes, dump_dir)


def run_regime(results, fns, params, opt_state, tokens, sizes, repeats, jvp, peers):
    """Every row of one regime: `tokens` holds the training then validation batch."""
    B, T = sizes["batch"], sizes["length"]
    train, val, both = (tokens[:B],), (tokens[B:],), (tokens,)
    plain, attribution, norms = fns["plain"], fns["attribution"], fns["norms"]
    step, state = "train step + dots", (params, opt_state, train, val)
    # key: (label, workload, fn, args)
    programs = {
        "a": ("(a) plain step, B", "train step", plain, (params, opt_state, train)),
        "a2": ("(a) plain step, 2B", "train step", plain, (params, opt_state, both)),
        "b": ("(b) attribution step, ghost", step, attribution["ghost"], state),
        "c": (
            "(c) per-sample norms, ghost",
            "per-sample norms",
            norms["ghost"],
            (params, train),
        ),
        "d_step": (
            "(d) attribution step, vmap(grad)",
            step,
            attribution["vmap"],
            state,
        ),
    }
    if jvp:
        programs["jvp"] = ("attribution step, jvp", step, attribution["jvp"], state)
    programs["d_norms"] = (
        "(d) per-sample norms, vmap(grad)",
        "per-sample norms",
        norms["vmap"],
        (params, train),
    )
    measured = measure_largest_first(
        {key: (fn, args) for key, (_, _, fn, args) in programs.items()},
        repeats=repeats,
        keep=("c",),
    )
    rows = {
        key: results.add(workload=workload, impl=label, sizes=sizes, **measured[key][0])
        for key, (label, workload, _, _) in programs.items()
    }
    reference = measured["c"][1]
    for peer, result in peers.items():
        rows[peer] = results.add(
            workload="per-sample norms",
            impl=PEERS[peer],
            sizes=sizes,
            **_peer_row(result, reference),
        )

    text = (
        f"B = {B}, T = {T}: (b)/(a, 2B) time {_ratio(rows['b'], rows['a2'])}, "
        f"(b)/(a, B) time {_ratio(rows['b'], rows['a'])}. "
        f"(c)/(a, B) time {_ratio(rows['c'], rows['a'])}, peak "
        f"memory {_ratio(rows['c'], rows['a'], 'peak_bytes')} "
        "(the targets of each regime: the summary in docs/benchmarks.md). "
        f"vmap(grad)/ghost: step time {_ratio(rows['d_step'], rows['b'])}, step "
        f"memory {_ratio(rows['d_step'], rows['b'], 'peak_bytes')}; norms time "
        f"{_ratio(rows['d_norms'], rows['c'])}, norms memory "
        f"{_ratio(rows['d_norms'], rows['c'], 'peak_bytes')}."
    )
    for peer in peers:
        text += (
            f" {peer}/ghost norms: time {_ratio(rows[peer], rows['c'])}, memory "
            f"{_ratio(rows[peer], rows['c'], 'peak_bytes')}."
        )
    if peers:
        text += " (PyTorch memory: the allocator's peak.)"
    results.note(
        f"{text} {sizes['params'] / 1e6:.3g}M parameters, {sizes['compute']} "
        f"compute; {_provenance(results.environment)}."
    )


def batch_sweep(results, candidates, cfg, sizes, batches, length, repeats):
    """Time and footprint of each candidate at each batch size, on fresh tokens.

    `candidates` maps an implementation's name to `(workload, fn, args)`, measured as
    `fn(*args, batch)` with the batch `(tokens,)` of `B` sequences of `length` tokens.
    """
    failed = {}
    # Largest batch first, each batch's programs largest first: see
    # `measure_largest_first`. A program that does not fit is still tried smaller.
    for B in sorted(set(batches), reverse=True):
        tokens = jr.randint(jr.key(2), (B, length + 1), 0, cfg["vocab"])
        programs = {
            impl: (fn, (*args, (tokens,))) for impl, (_, fn, args) in candidates.items()
        }
        measured = measure_largest_first(programs, repeats=repeats)
        for impl, (workload, _, _) in candidates.items():
            row = measured[impl][0]
            if "error" in row:
                failed.setdefault(impl, []).append(B)
            results.add(
                workload=f"batch sweep/{workload}",
                impl=impl,
                sizes=dict(sizes, batch=B, length=length),
                **row,
            )
    note = (
        f"Batch-size sweep, T = {length}: B = "
        f"{', '.join(map(str, sorted(set(batches))))}; "
        f"{sizes['params'] / 1e6:.3g}M parameters, {sizes['compute']} compute; "
        f"{_provenance(results.environment)}."
    )
    if failed:
        note += " Out of memory: " + "; ".join(
            f"{impl} at B = {', '.join(map(str, sorted(Bs)))}"
            for impl, Bs in failed.items()
        )
        note += "."
    results.note(note)


def main(argv=None):
    # XLA reads its flags when the backend starts (the first `jax.devices()`): the
    # profile's HLO dump must be asked for before that.
    dump_dir = ask_for_profile(argv)
    platform = jax.devices()[0].platform
    args = parse(argv, platform)
    size = args.size
    cfg = SIZES[size]
    # Modest on the GPU, where a call of GPT-2 takes up to a second.
    if size == "gpt2":
        repeats = args.repeats or (3 if args.sweep_batch else 5)
    else:
        repeats = args.repeats or 10
    compute = DTYPES[COMPUTE[size]]
    results = Results(
        "ghost",
        "Ghost engines: attribution step and per-sample norms on a GPT",
        "A GPT-2-layout model (tied head, scan over layers) with float32 master "
        f"weights and {COMPUTE[size]} compute, measured in regimes of B sequences of "
        "T tokens. (a) plain AdamW step on B and on 2B examples, (b) attribution step "
        "(ghost) with a validation batch of B, (c) ghost per-sample gradient norms, "
        "(d) the same by vmap(grad) (and the jvp attribution step), (e) torch.func "
        "vmap(grad) and (f) Opacus ghost-clipping per-sample norms on the same model "
        "in PyTorch, each in a process of its own. Batch sweeps: (a), (c) and (d) "
        "against B at one T.",
    )
    attention = None if args.attention == "auto" else args.attention
    model = GPT(
        cfg["vocab"],
        cfg["dim"],
        cfg["heads"],
        cfg["layers"],
        cfg["context"],
        jr.key(0),
        attention,
    )
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    fixed = {k: v for k, v in cfg.items() if k not in ("batch", "length")}
    sizes = dict(fixed, compute=COMPUTE[size], params=n_params)
    loss_fn = make_loss(compute)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    # The optimiser state is an argument, not a closure: a closed-over array would
    # be compiled in as a constant.
    def plain_step(params, opt_state, batch):
        def mean_loss(params):
            m = eqx.combine(params, static)
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(m, *batch))

        value, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def attribution(method):
        step = make_attribution_step(loss_fn, optimizer, method=method, donate=False)

        def run(params, opt_state, train, val):
            model, opt_state, metrics, dots = step(
                eqx.combine(params, static), opt_state, train, val
            )
            return eqx.filter(model, eqx.is_array), opt_state, metrics, dots

        return run

    def norms(method):
        fn = per_sample_grad_norms(loss_fn, method=method)
        return lambda params, batch: fn(eqx.combine(params, static), batch)

    default = (cfg["batch"], cfg["length"])
    if args.sweep_batch:
        candidates = {
            "plain step": ("train step", plain_step, (params, opt_state)),
            "per-sample norms, ghost": ("per-sample norms", norms("ghost"), (params,)),
            "per-sample norms, vmap(grad)": (
                "per-sample norms",
                norms("vmap"),
                (params,),
            ),
        }
        length = args.sweep_length or args.length or cfg["length"]
        batch_sweep(results, candidates, cfg, sizes, args.sweep_batch, length, repeats)
        save(results, args.results_dir, default)
        return

    if args.regimes:
        regimes = REGIMES[size]
    else:
        regimes = [(args.batch or cfg["batch"], args.length or cfg["length"])]
    tokens = {
        (B, T): jr.randint(jr.key(1), (2 * B, T + 1), 0, cfg["vocab"])
        for B, T in regimes
    }
    peers = {}
    if not args.no_torch:
        peers = torch_peers(
            model,
            cfg["heads"],
            COMPUTE[size],
            platform,
            {(B, T): tokens[B, T][:B] for B, T in regimes},
            repeats,
            args.torch_timeout,
        )
    fns = {
        "plain": plain_step,
        "attribution": {
            m: attribution(m) for m in ["ghost", "vmap"] + (["jvp"] if args.jvp else [])
        },
        "norms": {m: norms(m) for m in ("ghost", "vmap")},
    }
    for B, T in regimes:
        run_regime(
            results,
            fns,
            params,
            opt_state,
            tokens[B, T],
            dict(sizes, batch=B, length=T),
            repeats,
            args.jvp,
            peers.get((B, T), {}),
        )
        if dump_dir is not None:
            profile_regime(
                results,
                fns,
                params,
                opt_state,
                tokens[B, T],
                dict(sizes, batch=B, length=T),
                dump_dir,
            )
    save(results, args.results_dir, default)


if __name__ == "__main__":
    main()
