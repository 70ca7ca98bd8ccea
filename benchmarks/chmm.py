"""Cloned HMM inference and learning: every strategy, with dynamax as the peer.

Usage: `python benchmarks/chmm.py [--size cpu|gpu] [--sweep-lengths T [T ...]
[--sweep-model large|medium]] [--sweep-blocks K [K ...]] [--matmul-floor]
[--results-dir DIR]` (size default: by the platform).

Workloads (the issue's sizes; `--size cpu` shortens what would take minutes on a
2-core machine and says so in each row):

- large: 4 symbols x 70 clones (N = 280), 4 actions, one sequence of T = 50 000;
- medium: 8 symbols x 20 clones (N = 160), 4 actions, T = 10 000;
- batch: the medium model, 64 sequences of T = 1 000.

For each: the log-likelihood (`forward`), smoothed posteriors (`posteriors`) and one
EM iteration (E-step by `expected_counts`, then the M-step), with the strategies
`scan` (sequential `lax.scan`), `parallel` (products of step matrices in blocks) and,
for the batch, `vmap` of either over the sequences or `lax.map` of the scan (one
sequence after another). Each of these also has a compile row (workload
`compile/<workload>`): lowering and compiling a freshly traced function, timed apart
from its runs, and the size of the optimised graph (HLO instructions, while loops).
The peer is dynamax's HMM filter / smoother with time-varying dense transition
matrices (`T[a[t]]` for every step, materialised as `[T-1, N, N]` when that fits in
the memory budget, else given as `transition_fn`); it runs when `import dynamax`
works and is recorded as not installed otherwise.

With `--sweep-lengths 1000 10000 100000`, the script measures only the log-likelihood
of one sequence of each length T on one model (`--sweep-model`, default the large
one) with the scan, the parallel strategy and the dynamax peer (workload
`length sweep/forward`), and merges those rows into the existing result file (rows of
a length measured again are replaced, the rest kept), so run the full benchmark
first.

With `--sweep-blocks 512 2048 4096`, only the parallel passes of the large model
(log-likelihood, posteriors, and the log-likelihood's gradient) with about each of
those block counts and with the cost model's own (workload `block sweep/...`, column
`default`), merged the same way: what decides the cost model's constant.

With `--matmul-floor`, only phase 1 of the parallel passes (the products within the
blocks) at the large workload's block shape, at 70 clones and padded to 72, 80, 96
and 128 (workload `matmul floor/phase 1`, merged the same way): the floor of the
log-likelihood's time, and whether a padded layout would multiply faster.

With `--scale`, only the rows of issue 22 (merged into the result file the same
way): a `SparseCHMM` of 100 symbols x 100 clones (N = 10 000), 4 actions, each
symbol allowed 10 successors per action (4 000 blocks), on one sequence of
T = 1 000 000 drawn by a random walk over the allowed triples: the model's memory
against the dense tensor's, the log-likelihood (scan and parallel), and one
streaming EM iteration (`streaming_em`, chunks of 10 000 steps) with the device's
peak memory. `--scale-size tiny` (the default on a CPU) runs the same rows on
10 x 10 clones, T = 10 000, in seconds.
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _harness import peak_device_bytes, Results, time_callable, time_jax

from eqx_models.chmm import (
    CHMM,
    expected_counts,
    log_likelihood,
    posteriors,
    SparseCHMM,
    streaming_em,
)
from eqx_models.chmm._chain import make_chain
from eqx_models.chmm._parallel import (
    block_shape,
    parallel_log_likelihood,
    parallel_smooth,
)


WORKLOADS = {
    "large": dict(n_obs=4, clones=70, n_actions=4, batch=None, length=50_000),
    "medium": dict(n_obs=8, clones=20, n_actions=4, batch=None, length=10_000),
    "batch": dict(n_obs=8, clones=20, n_actions=4, batch=64, length=1_000),
}
# On the CPU the parallel strategy (M times the arithmetic of the scan) and the dense
# peer run on shorter sequences; the scan always runs the full size.
CPU_PARALLEL_LENGTH = {"large": 5_000, "medium": 10_000, "batch": 1_000}
CPU_PEER_LENGTH = {"large": 5_000, "medium": 10_000, "batch": 1_000}
# Peak figures of the H200 (SXM): FP32 without tensor cores, and HBM3e bandwidth.
H200_PEAK = {"flops": 67e12, "bytes_per_s": 4.8e12}
MEMORY_BUDGET = {"cpu": 1.5e9, "gpu": 40e9}


def make_data(cfg, length, key):
    n_states = cfg["n_obs"] * cfg["clones"]
    model = CHMM.random([cfg["clones"]] * cfg["n_obs"], cfg["n_actions"], key=key)
    # Sequences sampled from a sparse "room-like" model would be more realistic, but
    # the cost of inference does not depend on the values; uniform ids exercise
    # every block.
    shape = (length,) if cfg["batch"] is None else (cfg["batch"], length)
    kx, ka = jr.split(jr.fold_in(key, 1))
    x = jr.randint(kx, shape, 0, cfg["n_obs"])
    a = jr.randint(ka, shape, 0, cfg["n_actions"])
    return model, x, a, n_states


def em_iteration(model, x, a, method):
    counts, lnl = expected_counts(model, x, a, method=method)
    total = counts + 1e-3
    return total / total.sum(-1, keepdims=True), lnl


def ours(workload, method, strategy):
    """The function timed for (workload, method) under a batch strategy."""
    single = {
        "forward": lambda m, x, a: log_likelihood(m, x, a, method=method),
        "posteriors": lambda m, x, a: posteriors(m, x, a, method=method).smoothed,
        "em_iteration": lambda m, x, a: em_iteration(m, x, a, method),
    }[workload]
    if strategy == "single":
        return jax.jit(single)
    if workload == "em_iteration":
        # expected_counts takes the batch itself (vmap over sequences inside).
        return jax.jit(single)
    if strategy == "vmap":
        return jax.jit(lambda m, x, a: jax.vmap(single, in_axes=(None, 0, 0))(m, x, a))
    return jax.jit(lambda m, x, a: jax.lax.map(lambda xa: single(m, *xa), (x, a)))


def flops_bytes(workload, method, M, length, sequences=1, itemsize=4):
    """Approximate arithmetic and memory traffic of one call (see the notes)."""
    if method == "scan":
        per_step = {
            "forward": (2 * M * M + 3 * M, M * M * itemsize),
            "posteriors": (6 * M * M + 10 * M, 2 * M * M * itemsize),
            "em_iteration": (10 * M * M + 10 * M, 4 * M * M * itemsize),
        }[workload]
        return per_step[0] * length * sequences, per_step[1] * length * sequences
    # The blocked products (eqx_models/chmm/_parallel.py): K blocks of L steps, the
    # L steps of every block multiplied in turn (K * L products), a product tree
    # over the K + 2 elements across the blocks (ceil(log2(K + 2)) levels of
    # (K + 2) / 2 products, padded to one shape), walked down with vectors for the
    # prefixes (and, for smoothing and the gradient, the suffixes), then the
    # per-step messages inside the blocks (K * L vector-block steps each way).
    blocks, steps = block_shape(length - 1, M)
    products = blocks * steps + (blocks + 1).bit_length() * -(-(blocks + 2) // 2)
    across = 0 if workload == "forward" else 2 * (blocks + 2)
    vector_steps = across + (0 if workload == "forward" else 2 * blocks * steps)
    flops = products * (2 * M**3 + 4 * M * M) + vector_steps * (2 * M * M + 3 * M)
    traffic = products * 3 * M * M * itemsize + vector_steps * M * M * itemsize
    if workload == "em_iteration":
        # The gradient of every step, written and summed into the transition blocks.
        flops += (length - 1) * 3 * M * M
        traffic += (length - 1) * 2 * M * M * itemsize
    return flops * sequences, traffic * sequences


def compile_cost(fn, *args):
    """Lowering and compiling `fn` (a jitted function not yet called): the seconds of
    each, and the size of the optimised graph."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    return {
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "hlo_instructions": len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, re.M)),
        "while_loops": len(re.findall(r" while\(", text)),
    }


def dynamax_functions(budget, n_states, length):
    """dynamax's filter / smoother on the dense time-varying chain, or None."""
    try:
        from dynamax.hidden_markov_model import (  # pyright: ignore[reportMissingImports]
            hmm_backward_filter,
            hmm_filter,
            hmm_smoother,
        )
    except ImportError as error:
        return None, f"not importable ({error})"
    materialise = (length - 1) * n_states * n_states * 4 * 2 <= budget

    def chain(model, x, a):
        symbol = jnp.asarray(model.state_symbol)
        log_lik = jnp.where(symbol[None, :] == x[:, None], 0.0, -jnp.inf)
        if materialise:
            return dict(transition_matrix=model.T[a[:-1]]), log_lik
        return dict(
            transition_matrix=None, transition_fn=lambda t: model.T[a[t]]
        ), log_lik

    def forward(model, x, a):
        kwargs, log_lik = chain(model, x, a)
        return hmm_filter(model.Pi, log_likelihoods=log_lik, **kwargs).marginal_loglik

    def smoothed(model, x, a):
        # dynamax's two-filter smoother without the transition probabilities (its
        # `compute_trans_probs` flag cannot be made static from outside).
        kwargs, log_lik = chain(model, x, a)
        filtered = hmm_filter(
            model.Pi, log_likelihoods=log_lik, **kwargs
        ).filtered_probs
        _, backward = hmm_backward_filter(log_likelihoods=log_lik, **kwargs)
        smoothed = filtered * backward
        return smoothed / smoothed.sum(-1, keepdims=True)

    def em_step(model, x, a):
        kwargs, log_lik = chain(model, x, a)
        post = hmm_smoother(model.Pi, log_likelihoods=log_lik, **kwargs)
        actions = jax.nn.one_hot(a[:-1], model.n_actions, dtype=model.T.dtype)
        counts = jnp.einsum("tu,tij->uij", actions, post.trans_probs) + 1e-3
        return counts / counts.sum(-1, keepdims=True), post.marginal_loglik

    how = "materialised [T-1, N, N]" if materialise else "transition_fn"
    return dict(forward=forward, posteriors=smoothed, em_iteration=em_step), how


def timed(fn, *args):
    # One call first: slow entries (a sequential scan on a GPU) get fewer repeats,
    # and a call of seconds is its own measurement (the scale rows' scan over 10^6
    # steps takes 8 s on a GPU: five calls would spend most of a device session).
    first = time_jax(fn, *args, warmup=0, repeats=1)
    if first["median_s"] > 2.0:
        return first
    repeats = 3 if first["median_s"] > 0.3 else 10
    result = time_jax(fn, *args, warmup=1, repeats=repeats)
    result["compile_s"] = first["compile_s"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["cpu", "gpu"], default=None)
    parser.add_argument(
        "--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS)
    )
    parser.add_argument(
        "--sweep-lengths",
        type=int,
        nargs="+",
        metavar="T",
        help="only the log-likelihood at these lengths, merged into the file",
    )
    parser.add_argument(
        "--sweep-model",
        choices=[name for name, cfg in WORKLOADS.items() if cfg["batch"] is None],
        default="large",
        help="the model of the sweep over T (default: large)",
    )
    parser.add_argument(
        "--sweep-blocks",
        type=int,
        nargs="+",
        metavar="K",
        help="only the parallel passes of the large model at about these block "
        "counts (and the default's), merged into the file",
    )
    parser.add_argument(
        "--matmul-floor",
        action="store_true",
        help="only the floor of the parallel passes' products (phase 1 alone at the "
        "large workload's block shape, and with the clone count padded), merged "
        "into the file",
    )
    parser.add_argument(
        "--results-dir", default=None, help="where to write (default: results/)"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only the SparseCHMM scale rows (issue 22), merged into the file",
    )
    parser.add_argument(
        "--scale-size",
        choices=list(SCALE),
        default=None,
        help="the scale workload (default: tiny on a CPU, full elsewhere)",
    )
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("cpu" if platform == "cpu" else "gpu")
    results = Results(
        "chmm",
        "Cloned HMM: log-likelihood, posteriors and one EM iteration",
        "Block-sparse cloned-HMM inference (`eqx_models.chmm`) with a sequential "
        "`lax.scan`, `vmap` over sequences and the parallel-in-time strategy, against "
        "dynamax's HMM filter/smoother on the equivalent dense chain with "
        "time-varying transition matrices. Workloads: large = 4 x 70 clones (N = "
        "280), T = 50 000; medium = 8 x 20 clones (N = 160), T = 10 000; batch = the "
        "medium model, 64 sequences of 1 000. `em_iteration` is the E-step "
        "(`expected_counts`) plus the M-step.",
    )
    if args.scale:
        scale_size = args.scale_size or ("tiny" if platform == "cpu" else "full")
        scale_rows(results, scale_size)
        results.save(args.results_dir, merge_key=_sweep_key)
        return
    if args.matmul_floor:
        matmul_floor(results, size)
        results.save(args.results_dir, merge_key=_sweep_key)
        return
    if args.sweep_blocks:
        block_sweep(results, args.sweep_blocks, size)
        results.save(args.results_dir, merge_key=_sweep_key)
        return
    if args.sweep_lengths:
        length_sweep(results, args.sweep_model, args.sweep_lengths, size)
        results.save(args.results_dir, merge_key=_sweep_key)
        return
    on_h200 = "H200" in results.environment["device"]
    peer_note = None
    key = jr.key(0)
    for name in args.workloads:
        cfg = WORKLOADS[name]
        M = cfg["clones"]
        for method in ("scan", "parallel"):
            length = cfg["length"]
            if size == "cpu" and method == "parallel":
                length = CPU_PARALLEL_LENGTH[name]
            model, x, a, n_states = make_data(cfg, length, key)
            strategies = ["single"] if cfg["batch"] is None else ["vmap", "map"]
            if method == "parallel" and cfg["batch"] is not None:
                strategies = ["vmap"]
            for strategy in strategies:
                for workload in ("forward", "posteriors", "em_iteration"):
                    if workload == "em_iteration" and strategy == "map":
                        continue
                    fn = ours(workload, method, strategy)
                    label = method if strategy == "single" else f"{strategy}({method})"
                    n_steps = length * (cfg["batch"] or 1)
                    flops, traffic = flops_bytes(
                        workload, method, M, length, cfg["batch"] or 1
                    )
                    # A fresh function: this is its only compilation, and the runs
                    # below reuse it (their own `compile_s` would be a cache hit).
                    results.add(
                        workload=f"compile/{name}/{workload}",
                        impl=f"eqx_models {label}",
                        N=n_states,
                        T=length,
                        **compile_cost(fn, model, x, a),
                    )
                    timing = timed(fn, model, x, a)
                    del timing["compile_s"]
                    row = dict(
                        workload=f"{name}/{workload}",
                        impl=f"eqx_models {label}",
                        N=n_states,
                        T=length,
                        sequences=cfg["batch"] or 1,
                        **timing,
                        us_per_step=1e6 * timing["median_s"] / n_steps,
                        flops=flops,
                        traffic_bytes=traffic,
                        gflop_per_s=flops / timing["median_s"] / 1e9,
                        gbyte_per_s=traffic / timing["median_s"] / 1e9,
                    )
                    if on_h200:
                        row["flop_fraction"] = (
                            row["gflop_per_s"] * 1e9 / H200_PEAK["flops"]
                        )
                        row["bandwidth_fraction"] = (
                            row["gbyte_per_s"] * 1e9 / H200_PEAK["bytes_per_s"]
                        )
                    results.add(**row)
        # The peer.
        length = cfg["length"] if size == "gpu" else CPU_PEER_LENGTH[name]
        model, x, a, n_states = make_data(cfg, length, key)
        functions, how = dynamax_functions(MEMORY_BUDGET[size], n_states, length)
        if functions is None:
            peer_note = f"dynamax: {how} (pip install dynamax to add the peer)."
            continue
        for workload in ("forward", "posteriors", "em_iteration"):
            f = functions[workload]
            if cfg["batch"] is not None:
                f = jax.vmap(f, in_axes=(None, 0, 0))
            timing = timed(jax.jit(f), model, x, a)
            n_steps = length * (cfg["batch"] or 1)
            results.add(
                workload=f"{name}/{workload}",
                impl=f"dynamax ({how})" + (" vmap" if cfg["batch"] else ""),
                N=n_states,
                T=length,
                sequences=cfg["batch"] or 1,
                **timing,
                us_per_step=1e6 * timing["median_s"] / n_steps,
            )
    _notes(results, size, peer_note)
    results.save(args.results_dir)


# Sizes of the scale rows; `length` steps in chunks of `chunk` for streaming EM.
SCALE_LENGTH = {"full": (1_000_000, 10_000), "tiny": (10_000, 1_000)}
# Chunks per device call for the host-fed row: a tenth of the sequence per call.
SCALE_CHUNKS_PER_CALL = {"full": 10, "tiny": 2}
SCALE = {
    "full": dict(n_obs=100, clones=100, n_actions=4, successors=10),
    "tiny": dict(n_obs=10, clones=10, n_actions=4, successors=3),
}


def scale_data(cfg, key):
    """A random SparseCHMM over `successors` allowed next symbols per (action,
    symbol), and a random walk of `length` steps over the allowed triples."""
    n_obs, n_actions, k = cfg["n_obs"], cfg["n_actions"], cfg["successors"]
    rng = np.random.default_rng(0)
    successors = np.stack(
        [
            np.stack([rng.choice(n_obs, k, replace=False) for _ in range(n_obs)])
            for _ in range(n_actions)
        ]
    )  # [n_actions, n_obs, k]
    u, i, j = np.indices(successors.shape)
    keys = np.stack([u.ravel(), i.ravel(), successors.ravel()], axis=-1)
    model = SparseCHMM.random([cfg["clones"]] * n_obs, n_actions, key=key, allowed=keys)
    a = rng.integers(0, n_actions, cfg["length"])
    pick = rng.integers(0, k, cfg["length"])
    table = jnp.asarray(successors)

    def step(symbol, inputs):
        action, choice = inputs
        following = table[action, symbol, choice]
        return following, following

    _, rest = jax.lax.scan(
        step, jnp.asarray(0), (jnp.asarray(a[:-1]), jnp.asarray(pick[:-1]))
    )
    x = np.concatenate([[0], np.asarray(rest)]).astype(np.int32)
    return model, x, a.astype(np.int32)


def scale_rows(results, scale_size):
    """Memory, log-likelihood and one streaming EM iteration of a large SparseCHMM."""
    length, chunk = SCALE_LENGTH[scale_size]
    cfg = dict(
        SCALE[scale_size],
        length=length,
        chunk=chunk,
        chunks_per_call=SCALE_CHUNKS_PER_CALL[scale_size],
    )
    model, x, a = scale_data(cfg, jr.key(0))
    n_states, length = model.n_states, cfg["length"]
    common = dict(N=n_states, T=length, sequences=1, blocks=model.n_blocks)
    itemsize = model.blocks.dtype.itemsize
    model_bytes = sum(
        int(v.size) * v.dtype.itemsize
        for v in (model.blocks, model.keys, model.index, model.Pi)
    )
    results.add(
        workload=f"scale-{scale_size}/memory",
        impl="eqx_models SparseCHMM",
        model_bytes=model_bytes,
        dense_T_bytes=cfg["n_actions"] * n_states**2 * itemsize,
        **common,
    )
    xs, acts = jnp.asarray(x), jnp.asarray(a)
    for method in ("scan", "parallel"):
        fn = jax.jit(
            lambda m, x, a, method=method: log_likelihood(m, x, a, method=method)
        )
        timing = timed(fn, model, xs, acts)
        results.add(
            workload=f"scale-{scale_size}/log_likelihood",
            impl=f"eqx_models SparseCHMM {method}",
            **common,
            **timing,
            us_per_step=1e6 * timing["median_s"] / length,
        )
    # The sequence on the device at once, then read from the host in groups of
    # chunks (`chunks_per_call`: what a sequence larger than the device needs).
    for method, per_call in (
        ("scan", None),
        ("parallel", None),
        ("parallel", cfg["chunks_per_call"]),
    ):

        def one_pass(method=method, per_call=per_call):
            trained, curve = streaming_em(
                model,
                x,
                a,
                n_iter=1,
                chunk_size=cfg["chunk"],
                method=method,
                chunks_per_call=per_call,
            )
            assert isinstance(trained, SparseCHMM)  # EM keeps the model's layout
            return trained.blocks, curve

        # The sequential pass over 10^6 steps takes tens of seconds a call.
        slow = method == "scan" and scale_size == "full"
        timing = time_callable(one_pass, warmup=1, repeats=1 if slow else 3)
        results.add(
            workload=f"scale-{scale_size}/streaming_em_iteration",
            impl=f"eqx_models SparseCHMM {method}",
            chunk_size=cfg["chunk"],
            chunks_per_call=per_call or "all",
            **common,
            **timing,
            us_per_step=1e6 * timing["median_s"] / length,
            peak_device_bytes=peak_device_bytes(),
        )
    results.note(
        f"scale-{scale_size}: a SparseCHMM of {cfg['n_obs']} symbols x "
        f"{cfg['clones']} clones (N = {n_states}), {cfg['n_actions']} actions, "
        f"{cfg['successors']} allowed successors per (action, symbol) "
        f"({model.n_blocks} blocks); one random walk of T = {length} over the allowed "
        "triples. `streaming_em_iteration` is one `streaming_em` iteration (forward "
        "sweep, backward sweep with the chunk E-steps, M-step, and the final "
        f"log-likelihood sweep) with chunks of {cfg['chunk']} steps, the sequence on "
        "the device at once (`chunks_per_call` all) or read from the host "
        f"{cfg['chunks_per_call']} chunks per device call; its first call includes "
        "compilation (`first_call_s`)."
    )


def _sweep_key(row):
    """What identifies a row when a sweep is merged into a result file."""
    keys = ("workload", "impl", "N", "T", "sequences", "blocks", "clones")
    return tuple(row.get(k) for k in keys)


def length_sweep(results, name, lengths, size):
    """Log-likelihood of one sequence of each length in `lengths` under the model of
    workload `name`: the scan, the parallel strategy and the dynamax peer."""
    cfg = WORKLOADS[name]
    key = jr.key(0)
    hows = set()
    for length in sorted(set(lengths)):
        model, x, a, n_states = make_data(cfg, length, key)
        row = dict(workload="length sweep/forward", N=n_states, T=length, sequences=1)
        for method in ("scan", "parallel"):
            timing = timed(ours("forward", method, "single"), model, x, a)
            flops, traffic = flops_bytes("forward", method, cfg["clones"], length)
            results.add(
                **row,
                impl=f"eqx_models {method}",
                **timing,
                us_per_step=1e6 * timing["median_s"] / length,
                flops=flops,
                traffic_bytes=traffic,
                gflop_per_s=flops / timing["median_s"] / 1e9,
                gbyte_per_s=traffic / timing["median_s"] / 1e9,
            )
        functions, how = dynamax_functions(MEMORY_BUDGET[size], n_states, length)
        hows.add(how)
        if functions is None:
            continue
        timing = timed(jax.jit(functions["forward"]), model, x, a)
        results.add(
            **row,
            impl=f"dynamax ({how})",
            **timing,
            us_per_step=1e6 * timing["median_s"] / length,
        )
    env = results.environment
    results.note(
        f"Sweep over T (T = {', '.join(map(str, sorted(set(lengths))))}) with the "
        f"{name} model (N = {cfg['n_obs'] * cfg['clones']}), one sequence, "
        f"log-likelihood only; dynamax: {', '.join(sorted(hows))}. Measured "
        f"{env['date']} on {env['device']}, jax {env['versions'].get('jax')}."
    )


def block_sweep(results, counts, size):
    """The parallel passes of the large model with about each block count in
    `counts`, beside the cost model's own choice: log-likelihood, posteriors and the
    log-likelihood's gradient (the E-step), each compiled in a fresh function."""
    cfg = WORKLOADS["large"]
    length = cfg["length"] if size == "gpu" else CPU_PARALLEL_LENGTH["large"]
    model, x, a, n_states = make_data(cfg, length, jr.key(0))
    chosen = block_shape(length - 1, cfg["clones"])[0]

    def passes(blocks):
        def chain(model):
            return make_chain(model, x, a)

        def gradient(model):
            c = chain(model)
            return jax.grad(
                lambda src: parallel_log_likelihood(c._replace(src=src), blocks)
            )(c.src)

        return {
            "forward": lambda m: parallel_log_likelihood(chain(m), blocks),
            "posteriors": lambda m: parallel_smooth(chain(m), blocks)[3],
            "gradient": gradient,
        }

    # Requests that give the same blocks run once.
    shapes = {block_shape(length - 1, cfg["clones"], k) for k in (*counts, chosen)}
    for blocks, steps in sorted(shapes):
        for workload, fn in passes(blocks).items():
            fn = jax.jit(fn)
            row = dict(
                workload=f"block sweep/{workload}",
                impl="eqx_models parallel",
                N=n_states,
                T=length,
                sequences=1,
                blocks=blocks,
                steps_per_block=steps,
                default=blocks == chosen,
            )
            cost = compile_cost(fn, model)
            timing = timed(fn, model)
            del timing["compile_s"]
            results.add(**row, **timing, **cost)
    env = results.environment
    results.note(
        f"Sweep over the block count K of the parallel strategy (about "
        f"{', '.join(map(str, sorted(set(counts))))} and the cost model's {chosen}) "
        f"with the large model (N = {cfg['n_obs'] * cfg['clones']}, T = {length:,}): "
        "log-likelihood, posteriors and the gradient of the log-likelihood; each "
        "function compiled once in the same process (`compile_s` is lower once a "
        "matrix-product shape has been tuned by an earlier row). Measured "
        f"{env['date']} on {env['device']}, jax {env['versions'].get('jax')}."
    )


# Clone counts the floor is measured at: the large workload's 70, and padded to
# multiples of 8, 16, 32 and 64 (the tiles matrix-product kernels work in).
FLOOR_SIZES = (70, 72, 80, 96, 128)


def matmul_floor(results, size):
    """Phase 1 of the parallel passes alone, at the large workload's block shape:
    `L` sequential steps, each a batched product of the `K` running products with
    the next step matrices at full float32 and a row normalisation. Its time is the
    floor of the log-likelihood (the products across the blocks and the windows'
    gathers come on top); with the clone count padded it says whether a padded
    layout would multiply faster."""
    cfg = WORKLOADS["large"]
    length = cfg["length"] if size == "gpu" else CPU_PARALLEL_LENGTH["large"]
    blocks, steps = block_shape(length - 1, cfg["clones"])
    for clones in FLOOR_SIZES:
        keys = jr.split(jr.key(clones))
        start = jr.uniform(keys[0], (blocks, clones, clones))
        windows = jr.uniform(keys[1], (steps, blocks, clones, clones))

        def phase_one(start, windows):
            def step(product, window):
                R = jnp.einsum(
                    "kij,kjl->kil", product, window, precision=jax.lax.Precision.HIGHEST
                )
                return R / R.sum(-1, keepdims=True), None

            return jax.lax.scan(step, start, windows)[0]

        timing = timed(jax.jit(phase_one), start, windows)
        flops = 2 * blocks * steps * clones**3
        useful = 2 * blocks * steps * cfg["clones"] ** 3
        results.add(
            workload="matmul floor/phase 1",
            impl="batched products, float32",
            N=cfg["n_obs"] * cfg["clones"],
            T=length,
            sequences=1,
            blocks=blocks,
            steps_per_block=steps,
            clones=clones,
            **timing,
            gflop_per_s=flops / timing["median_s"] / 1e9,
            useful_gflop_per_s=useful / timing["median_s"] / 1e9,
        )
    env = results.environment
    results.note(
        f"Floor of the parallel passes: phase 1 alone ({steps} sequential batched "
        f"products of {blocks} matrices, the large workload's block shape) at "
        f"{cfg['clones']} clones and padded to {', '.join(map(str, FLOOR_SIZES[1:]))}; "
        "`useful_gflop_per_s` counts the unpadded products. Measured "
        f"{env['date']} on {env['device']}, jax {env['versions'].get('jax')}."
    )


def _notes(results, size, peer_note):
    results.note(
        "FLOPs and bytes per step (float32, M = clones per symbol): the scan forward "
        "is one M x M block times a vector, 2M^2 FLOPs and M^2 x 4 bytes of T read "
        "(large: 9.8 kFLOP, 19.6 kB per step; the A*K^2 blocks, 1.25 MB, stay in "
        "cache, so the scan is latency-bound, not bandwidth-bound); posteriors add a "
        "backward pass (about 6M^2 FLOPs); an EM iteration about 10M^2 (forward, "
        "backward, and the chunked accumulation of the counts). The dense dynamax "
        "peer does 2N^2 FLOPs and reads N^2 x 4 bytes per step (large: 157 kFLOP, "
        "314 kB): 16x the block-sparse scan."
    )
    cfg = WORKLOADS["large"]
    M, length = cfg["clones"], cfg["length"]
    blocks, steps = block_shape(length - 1, M)
    counts = {
        w: flops_bytes(w, "parallel", M, length) for w in ("forward", "em_iteration")
    }
    results.note(
        "The parallel strategy multiplies M x M step matrices, 2M^3 FLOPs and at least "
        "3M^2 x 4 bytes (two read, one written) per product, in blocks: K blocks of L "
        "steps, the L steps of all blocks multiplied in turn (K L products), then "
        "a product tree across the blocks (ceil(log2(K + 2)) levels of (K + 2) / 2 "
        "products), whose total is the log-likelihood. The posteriors walk the tree "
        "down with vectors for the prefixes and suffixes and add the per-step "
        "messages inside the blocks (2K L vector-block steps); an EM iteration is the "
        "log-likelihood and its gradient by that forward-backward pass (each step's "
        f"gradient written and summed into the blocks). Large (T = {length:,}): K = "
        f"{blocks:,}, L = {steps}; log-likelihood "
        f"{counts['forward'][0] / 1e9:.1f} GFLOP and {counts['forward'][1] / 1e9:.1f} "
        f"GB, EM iteration {counts['em_iteration'][0] / 1e9:.1f} GFLOP and "
        f"{counts['em_iteration'][1] / 1e9:.1f} GB. Rows `compile/...` time lowering "
        "and compiling each function once, apart from its runs."
    )
    results.note(
        "`flops` / `traffic_bytes` are those counts for one call; `gflop_per_s` / "
        "`gbyte_per_s` apply them to the measured time; on "
        "an H200, `flop_fraction` and `bandwidth_fraction` compare them with 67 "
        "TFLOP/s (FP32, no tensor cores: the products run at HIGHEST precision) and "
        "4.8 TB/s."
    )
    if size == "cpu":
        results.note(
            "CPU run: the parallel strategy of the large workload and the dynamax "
            "peer of the large workload run T = 5 000 (column T); the scan runs the "
            "full T = 50 000. Targets (issues): CPU scan forward for large <= 0.1 s; "
            "on the H200, the large workload with the parallel strategy: "
            "log-likelihood <= 3.5 ms, posteriors and one EM iteration <= 10 ms each, "
            "and each compiled in <= 10 s."
        )
    else:
        results.note(
            "Targets (issues): on the H200, the large workload with the parallel "
            "strategy: log-likelihood <= 3.5 ms (first <= 5 ms), posteriors and one EM "
            "iteration <= 10 ms each (EM first <= 50 ms), and each compiled in <= 10 s."
        )
    if peer_note:
        results.note(peer_note)
    for row in results.rows:
        if row["impl"] == "eqx_models scan" and row["workload"] == "large/forward":
            if size == "cpu":
                results.note(
                    f"Large scan forward on this CPU: {row['median_s']:.3f} s "
                    "(target 0.1 s)."
                )
        if row["impl"] == "eqx_models parallel" and row["workload"].startswith("large"):
            if size == "gpu":
                results.note(
                    f"{row['workload']} with the parallel strategy: "
                    f"{1e3 * row['median_s']:.2f} ms."
                )
        if row["impl"] == "eqx_models parallel" and row["workload"].startswith(
            "compile/large"
        ):
            results.note(
                f"{row['workload'].removeprefix('compile/')} with the parallel "
                f"strategy compiles in {row['lower_s'] + row['compile_s']:.1f} s "
                f"(lowering {row['lower_s']:.1f} s; {row['hlo_instructions']} HLO "
                f"instructions, {row['while_loops']} while loops)."
            )


if __name__ == "__main__":
    main()
