"""Amortised causal surrogate: train on a wall-clock budget, check the quality
targets on held-out tasks, and time inference against the exact expert.

Usage:

    python benchmarks/causal.py [--size small|full] [--minutes M]
        [--checkpoint PATH] [--results-dir DIR] [--data-parallel]
        [--[no-]parallel-compile] [--seed S]

`--size full` (the default on a GPU) trains one `ParentSetPredictionModel` on tasks
with d ∈ {5, 10, 20}, N ∈ {100, 500}, 10–40 % interventional rows and all five
graph families, for `--minutes` of wall-clock time counted from the start of
training (compilation included; default 6.5, within the issue's limit of 8 and
leaving room for the evaluation in a 10-minute device call); `--size small` (the
default on a CPU) trains on d = 5, N = 50 only. Each task shape is its own bucket
with its own batch size (about the same number of cells per batch) and compiles
once; the curriculum moves from the cheapest bucket and chain/fork/collider graphs
to all buckets (weighted towards large d) and all families over the first quarter
of the run.

The first steps visit every bucket to compile it and measure its step time; the run
length is then fixed so that the expected time of the remaining steps (under the
curriculum's bucket mix) fits the budget, and written into the optimiser state (the
cosine schedule is laid out over it) without recompiling. Training runs through
`transforms.fit` in chunks, each ending with a checkpoint at `--checkpoint`, and
stops at the budget even if the estimate was off.

Then, per d, on held-out tasks (half N = 100, half N = 500): sink targets (the
targets of the issue) and general targets: mean KL(exact ‖ model), total variation,
top-1 agreement with the exact MAP set, F1 of the model's MAP set against the true
parents (and of the exact MAP set, the ceiling), edge AUROC. Finally the per-task
inference time of the model and of the exact expert at d = 20 and d = 50 (K = 3),
batched, and the training throughput in tasks per second.

`--nonlinear` runs the rows of issue 24 instead: a model trained (for `--minutes`,
through `eqx_models.causal.train`) on a mixture of linear, MLP and RFF tasks at
d ∈ {5, 10, 20} (every bucket's step compiled and timed first; the learning-rate
schedule and the curriculum, as the linear run's, laid out over the steps that fit
the budget), evaluated per mechanism at d ∈ {5, 10, 20} against the exact
expert, linear and additive cubic (`evaluate_by_mechanism`: MAP F1, edge AUROC,
top-1 against the truth, ECE) and at d = 50 through the shortlist (model, linear and
cubic expert on the shortlist, with the shortlist's recall of the true set); the
per-task inference time of the shortlist posterior at d = 50 and 100 (K = 3,
L = 12, model, linear and cubic expert); and the rounds per second of the
intervention-design loop at d = 20 (one task, and a batch under `jax.vmap`).
`--nonlinear --tiny` runs all of it at toy sizes on a CPU (minutes on two shared
cores, mostly compilation; the numbers check the pipeline only).

`--latency` measures only what issue 19 asks of the surrogate's speed: the compile
time of each training bucket (sampler and train step, one after another, split into
tracing, lowering and XLA compilation) and the inference time per task in float32
and bfloat16 with the model's FLOPs and roofline time, and its traffic floor (the
bytes XLA's cost analysis says the compiled program moves, at the bandwidth measured
in the same run), on an untrained model.

`--latency --profile` also traces the inference of the first timing size (float32
and bfloat16) and the train step of the largest bucket, and adds rows (workload
`profile`) with the kernel time per call of each part of the model (the named scopes
of `ParentSetPredictionModel`: the attention over the samples and over the
variables, the MLPs, the rest of the encoder, the set scores, the input checks; the
loss and the optimiser by file; `benchmarks/_profile.py`).

`--data-parallel` shards every training batch over all devices along a `data` mesh
axis (`make_train_step(..., mesh=...)`); the "train bucket" rows then give the step
time and tasks per second of each task shape at the global batch size.
"""

import argparse
import concurrent.futures
import json
import math
import os
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _harness import (
    bandwidth_ceiling,
    matmul_ceiling,
    measure,
    measure_unless_out_of_memory,
    Results,
    RESULTS_DIR,
    time_jax,
)

from eqx_models.causal import (
    BehaviouralCloningLoss,
    candidate_parent_sets,
    Curriculum,
    design_interventions,
    evaluate_by_mechanism,
    evaluate_surrogate,
    exact_parent_posterior,
    make_optimizer,
    ParentSetPredictionModel,
    sample_task,
    sample_training_batch,
    set_run_length,
    TaskConfig,
    TaskStream,
    train as train_surrogate,
)
from eqx_models.causal._shortlist import _shortlist
from transforms import cast_floating, fit, make_train_step, with_fallback


K = 3
TARGETS = {"kl": 0.25, "top1_agreement": 0.85, "map_f1": 0.90}
SIZES = {
    "small": dict(
        dims=(5,),
        samples=(50,),
        cells=16 * 50 * 5,
        width=32,
        layers=2,
        heads=4,
        minutes=4.0,
        peak_lr=5e-3,
        warmup=30,
        eval_tasks=64,
        timing=((20, 100, 8), (50, 100, 2)),
    ),
    "full": dict(
        dims=(5, 10, 20),
        samples=(100, 500),
        cells=262_144,
        width=64,
        layers=4,
        heads=4,
        minutes=6.5,
        peak_lr=1e-3,
        warmup=300,
        eval_tasks=128,
        timing=((20, 500, 64), (50, 500, 16)),
    ),
}


def build_model(cfg: dict, key) -> ParentSetPredictionModel:
    """The surrogate of a size's configuration (`K` = 3)."""
    return ParentSetPredictionModel(
        K, width=cfg["width"], n_layers=cfg["layers"], n_heads=cfg["heads"], key=key
    )


def _batch_size(d: int, n: int, cells: int, multiple: int) -> int:
    size = max(8, min(1024, round(cells / (d * n))))
    return max(multiple, size // multiple * multiple)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy() if eqx.is_array(x) else x, tree)


def _size_curriculum(configs: list[TaskConfig]) -> Curriculum:
    """From the cheapest buckets (`d·N`) to weights proportional to `d` (the large
    tasks are the hard ones), over the first quarter of the run."""
    costs = [c.n_vars * c.n_samples for c in configs]
    start = tuple(1.0 if cost == min(costs) else 0.0 for cost in costs)
    return Curriculum(start, tuple(float(c.n_vars) for c in configs), ramp=0.25)


def _expected_step_time(
    curriculum: Curriculum, times: list[float], start: float = 0.0
) -> float:
    """Mean step time over the progress interval [start, 1] of the curriculum."""
    grid = np.linspace(start, 1.0, 201)
    return float(np.mean([curriculum.weights(s)[0] @ np.asarray(times) for s in grid]))


def train(cfg, args, key):
    mesh = None
    multiple = 1
    if args.data_parallel:
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        multiple = jax.device_count()
    shapes = [(d, n) for d in cfg["dims"] for n in cfg["samples"]]
    buckets = [
        (TaskConfig(n_vars=d, n_samples=n), _batch_size(d, n, cfg["cells"], multiple))
        for d, n in shapes
    ]
    curriculum = _size_curriculum([config for config, _ in buckets])
    model = build_model(cfg, jr.fold_in(key, 0))
    optimizer = make_optimizer(
        10**6, peak_learning_rate=cfg["peak_lr"], warmup_steps=cfg["warmup"]
    )
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    loss = BehaviouralCloningLoss(weight_decay=1e-4)
    step = with_fallback(make_train_step(loss, optimizer, has_aux=True, mesh=mesh))
    data_key = jr.fold_in(key, 1)
    stream = TaskStream(buckets, K, 1, curriculum, data_key)
    budget = 60.0 * args.minutes
    t_start = time.perf_counter()

    # Compile every bucket's sampler and step at once, from threads (XLA compiles
    # without holding the GIL), each on a throw-away copy of the model.
    def warm_up(b):
        config, batch_size = buckets[b]
        t0 = time.perf_counter()
        batch = sample_training_batch(jr.key(0), config, batch_size, K)
        jax.block_until_ready(step(_copy(model), _copy(opt_state), batch, None))
        return time.perf_counter() - t0

    compile_s: list[float | None] = [None] * len(buckets)
    if args.parallel_compile:
        with concurrent.futures.ThreadPoolExecutor(len(buckets)) as pool:
            compile_s = list(pool.map(warm_up, range(len(buckets))))
    warm_up_s = time.perf_counter() - t_start
    print(f"compiled {len(buckets)} buckets in {warm_up_s:.1f} s", flush=True)

    # Calibration: three real (warm-up) steps per bucket; without the parallel
    # compilation above, the first compiles.
    calibration = []
    history = []
    for b, (config, batch_size) in enumerate(buckets):
        times = []
        for j in range(3):
            t0 = time.perf_counter()
            batch = sample_training_batch(
                jr.fold_in(data_key, 10**7 + 3 * b + j), config, batch_size, K
            )
            model, opt_state, metrics = jax.block_until_ready(
                step(model, opt_state, batch, None)
            )
            elapsed = time.perf_counter() - t0
            if j == 0 and compile_s[b] is None:
                compile_s[b] = elapsed
            else:
                times.append(elapsed)
            record = {k: float(v) for k, v in metrics.items()}
            history.append(record | {"step": len(history), "step_time": elapsed})
        calibration.append(
            {
                "d": config.n_vars,
                "N": config.n_samples,
                "batch": batch_size,
                "first_step_s": compile_s[b],
                "step_s": float(np.median(times)),
                "tasks_per_s": batch_size / float(np.median(times)),
            }
        )
        print(json.dumps(calibration[-1]), flush=True)
    n_calibration = len(history)
    step_times = [c["step_s"] for c in calibration]
    # Host overhead of the loop (metrics to floats, batch dispatch): a few ms.
    expected = _expected_step_time(curriculum, step_times) + 0.002
    remaining = budget - (time.perf_counter() - t_start)
    n_steps = max(1, int(0.93 * remaining / expected))
    stream.n_steps = n_steps
    opt_state = set_run_length(opt_state, n_calibration + n_steps)
    print(
        f"calibrated: {n_steps} steps of about {1e3 * expected:.1f} ms in "
        f"{remaining:.0f} s",
        flush=True,
    )

    done = 0
    chunk = max(20, n_steps // 12)
    while done < n_steps:
        this = min(chunk, n_steps - done)
        offset = done
        t_chunk = time.perf_counter()
        result = fit(
            step,
            model,
            opt_state,
            lambda i, o=offset: stream(o + i),
            n_steps=this,
            key=None,
            checkpoint_path=args.checkpoint,
            metadata={
                "steps_before_this_chunk": n_calibration + offset,
                "width": cfg["width"],
                "n_layers": cfg["layers"],
                "n_heads": cfg["heads"],
                "max_parents": K,
            },
            progress=False,
        )
        model, opt_state = result.model, result.opt_state
        for record in result.history:
            record["step"] += n_calibration + offset
        history.extend(result.history)
        done += this
        now = time.perf_counter()
        last = result.history[-1]
        print(
            f"step {n_calibration + done}: kl={last['kl']:.3f} "
            f"top1={last['top1_agreement']:.2f} lr={last['learning_rate']:.2e} "
            f"({now - t_start:.0f} s)",
            flush=True,
        )
        # Re-plan from the measured pace (another process on the machine, or a
        # biased estimate): shorten or lengthen the rest of the cosine so that it
        # still ends at the budget.
        predicted = sum(
            step_times[stream.bucket_and_families(offset + i)[0]] + 0.002
            for i in range(this)
        )
        slowdown = (now - t_chunk) / predicted
        left = budget - (now - t_start)
        if done < n_steps:
            per_step = slowdown * (
                _expected_step_time(curriculum, step_times, done / n_steps) + 0.002
            )
            n_steps = done + max(0, int(0.97 * left / per_step))
            stream.n_steps = n_steps
            opt_state = set_run_length(opt_state, n_calibration + n_steps)
        if left <= 0:
            break
    train_s = time.perf_counter() - t_start
    main = history[n_calibration:]
    tasks = sum(r["tasks"] for r in main)
    step_s = sum(r["step_time"] for r in main)
    summary = {
        "train_wall_s": train_s,
        "warm_up_s": warm_up_s,
        "steps": len(history),
        "planned_steps": n_calibration + n_steps,
        "tasks_seen": int(sum(r["tasks"] for r in history)),
        "tasks_per_s": tasks / step_s,
        "skipped_tasks": int(sum(r["skipped"] for r in history)),
        "final_train_kl": float(np.mean([r["kl"] for r in main[-50:]])),
    }
    if args.checkpoint:
        curve = {}
        for r in history:
            curve.setdefault(
                f"d={int(r['n_vars'])},N={int(r['n_samples'])}", []
            ).append([r["step"], r["kl"], r["top1_agreement"]])
        with open(args.checkpoint + ".history.json", "w") as f:
            json.dump({"calibration": calibration, "curve": curve}, f)
    return model, calibration, summary


def evaluate(model, cfg, key, results, parallel, targets=("sink", "any")):
    """Held-out metrics per (d, target, N) and pooled over N; the model's precision
    (its weights' dtype) is in every row, so that a bfloat16 copy evaluated on the
    same tasks (same `key`) reads beside the float32 rows."""
    precision = jnp.dtype(model.blocks.w_qkv.dtype).name
    combos = [
        (d, target, n)
        for d in cfg["dims"]
        for target in targets
        for n in cfg["samples"]
    ]

    def run(combo):
        d, target, n = combo
        config = TaskConfig(n_vars=d, n_samples=n, target=target)
        keys = jr.split(jr.fold_in(key, 1000 * d + n), cfg["eval_tasks"])
        tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(keys)
        return evaluate_surrogate(model, tasks)

    if parallel:
        with concurrent.futures.ThreadPoolExecutor(len(combos)) as pool:
            metrics = dict(zip(combos, pool.map(run, combos)))
    else:
        metrics = {combo: run(combo) for combo in combos}
    by_d = {}
    for d in cfg["dims"]:
        for target in targets:
            parts = [metrics[(d, target, n)] for n in cfg["samples"]]
            for n, part in zip(cfg["samples"], parts):
                results.add(
                    workload="eval",
                    d=d,
                    N=n,
                    target=target,
                    precision=precision,
                    **part,
                )
            pooled = {
                k: float(np.mean([p[k] for p in parts]))
                for k in (
                    "kl",
                    "tv",
                    "top1_agreement",
                    "map_f1",
                    "exact_map_f1",
                    "auroc",
                )
            }
            row = {
                "workload": "eval (pooled over N)",
                "d": d,
                "target": target,
                "precision": precision,
                **pooled,
            }
            if target == "sink":
                row["meets_targets"] = all(
                    pooled[k] <= v if k == "kl" else pooled[k] >= v
                    for k, v in TARGETS.items()
                )
                row["kl_over_0.05"] = pooled["kl"] / 0.05
            results.add(**row)
            by_d[(d, target)] = pooled
    return by_d


def forward_flops(model: ParentSetPredictionModel, d: int, n: int) -> int:
    """FLOPs of the model's forward pass on one task of `n` rows and `d` variables
    (a multiply-add counts two), from its shapes: the matmuls and the attention
    products; elementwise work, gathers and softmaxes are left out."""
    w = model.width
    hidden = model.blocks.w_up.shape[-1]
    stats = model.w_stat_a.shape[-1]
    cells = n * d
    sets = len(candidate_parent_sets(d, model.max_parents).sizes)
    per_layer = (
        2 * (2 * cells * w * 3 * w + 2 * cells * w * w)  # two attentions' maps
        + 4 * d * n * n * w  # scores and weighted values over the samples
        + 4 * n * d * d * w  # ... and over the variables
        + 2 * 4 * cells * w * hidden  # two MLPs
    )
    embed = 2 * cells * w * w_embed_features(model)
    pooled = 2 * 2 * cells * w * stats + 2 * n * d * d * stats
    member = d * (2 * (2 * w + stats) * 2 * w + 2 * 2 * w * w)
    pair = d * d * (2 * (3 * w + stats) * 2 * w + 2 * 2 * w * w)
    score = sets * (2 * w * 2 * w + 2 * 2 * w)
    return model.n_layers * per_layer + embed + pooled + member + pair + score


def w_embed_features(model: ParentSetPredictionModel) -> int:
    return model.w_embed.shape[0]


def time_inference(model, cfg, key, results):
    """Per-task inference time at d = 20 and 50 (K = 3) of the model in float32
    and in bfloat16 (cast copy; on a GPU its attention over the samples is cuDNN's
    fused kernel) and of the exact expert, with the model's FLOPs per task and its
    roofline time against the matmul ceiling of that dtype measured in this run,
    and its traffic floor: the bytes the compiled program moves (XLA's cost
    analysis) at the memory bandwidth measured in this run. Where the time follows
    the traffic floor and not the roofline, fewer bytes (fusion), not faster
    arithmetic, is what would make the model faster."""
    ceilings = {
        dtype: matmul_ceiling(dtype)["flops_per_sec"]
        for dtype in (jnp.float32, jnp.bfloat16)
    }
    bandwidth = bandwidth_ceiling()["bytes_per_sec"]
    for d, n, batch in cfg["timing"]:
        config = TaskConfig(n_vars=d, n_samples=n, target="any")
        tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(
            jr.split(jr.fold_in(key, d), batch)
        )
        flops = forward_flops(model, d, n)

        def expert_fn(data):
            return jax.vmap(
                lambda x: exact_parent_posterior(x, K, on_degenerate="flag").log_probs
            )(data)

        sizes = {"d": d, "K": K, "N": n, "batch": batch}
        runs = []
        for dtype in (jnp.float32, jnp.bfloat16):
            params, static = eqx.partition(cast_floating(model, dtype), eqx.is_array)

            def model_fn(params, data, static=static):
                return jax.vmap(eqx.combine(params, static))(data)

            runs.append((f"model {jnp.dtype(dtype).name}", model_fn, params, dtype))
        for impl, fn, params, dtype in runs:
            timing, _ = measure(fn, params, tasks.data, repeats=10)
            per_task = timing["median_s"] / batch
            roofline = flops / ceilings[dtype]
            traffic = {}
            if "accessed_bytes" in timing:
                floor = timing.pop("accessed_bytes") / batch / bandwidth
                traffic = dict(
                    traffic_floor_per_task_s=floor,
                    fraction_of_traffic_floor=floor / per_task,
                    bandwidth_gb_per_s=bandwidth / 1e9,
                )
            results.add(
                workload="inference",
                impl=impl,
                sizes=sizes,
                per_task_s=per_task,
                gflop_per_task=flops / 1e9,
                roofline_per_task_s=roofline,
                fraction_of_roofline=roofline / per_task,
                matmul_ceiling_tflops=ceilings[dtype] / 1e12,
                **traffic,
                # One FLOP count per row: the count from the shapes, which the
                # roofline uses (XLA's own count is left out).
                **{k: v for k, v in timing.items() if k != "flops"},
            )
        timing = time_jax(expert_fn, tasks.data, repeats=10)
        results.add(
            workload="inference",
            impl="exact expert",
            sizes=sizes,
            per_task_s=timing["median_s"] / batch,
            **timing,
        )


# Parts of the model for `--profile`, tried in order: the block's scopes first
# (they lie inside the encoder's), by the named scopes of `eqx_models/causal/_model.py`.
PROFILE_PARTS = [
    ("attention over samples", "scope:attention_over_samples", None),
    ("attention over variables", "scope:attention_over_variables", None),
    ("MLPs", "scope:mlp_after_samples", None),
    ("MLPs", "scope:mlp_after_variables", None),
    ("encoder, rest (embedding, LayerNorm, pooling)", "scope:encoder", None),
    ("set scores", "scope:set_scores", None),
    ("input checks", "scope:input_checks", None),
    ("loss", "causal/_loss.py", None),
    ("optimizer", "optax/", None),
    ("optimizer", "transforms/_train/", None),
]
PROFILED_CALLS = 3


def profile_latency(model, cfg, results, dump_dir):
    """Kernel time per part of the model: inference at the first timing size in
    float32 and bfloat16, and one train step of the last bucket."""
    import _profile

    d, n, batch = cfg["timing"][0]
    config = TaskConfig(n_vars=d, n_samples=n, target="any")
    tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(
        jr.split(jr.key(5), batch)
    )
    calls = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params, static = eqx.partition(cast_floating(model, dtype), eqx.is_array)
        label = f"inference, {jnp.dtype(dtype).name} (d = {d}, N = {n}, B = {batch})"
        # A name of its own, for its kernels to be read against its own HLO.
        forward = jax.jit(
            _profile.named(
                lambda params, data, static=static: jax.vmap(
                    eqx.combine(params, static)
                )(data),
                label,
            )
        )
        calls[label] = (forward, (params, tasks.data))
    d, n = cfg["dims"][-1], cfg["samples"][-1]
    batch_size = _batch_size(d, n, cfg["cells"], 1)
    optimizer = make_optimizer(10**6)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(
        BehaviouralCloningLoss(weight_decay=1e-4), optimizer, has_aux=True
    )
    training = sample_training_batch(
        jr.key(6), TaskConfig(n_vars=d, n_samples=n), batch_size, K
    )
    label = f"train step (d = {d}, N = {n}, B = {batch_size})"
    # The step donates the model and the optimiser state: each call continues
    # from the last one's.
    state = [_copy(model), _copy(opt_state)]

    def train_step():
        state[0], state[1], metrics = step(state[0], state[1], training, None)
        return metrics

    calls[label] = (train_step, ())
    for label, (fn, args) in calls.items():
        jax.block_until_ready(fn(*args))
        out = _profile.add_rows(
            results,
            label,
            lambda: fn(*args),
            dump_dir,
            PROFILE_PARTS,
            steps=PROFILED_CALLS,
        )
        results.note(
            f"Profile: {label} spends {out['kernel_ms_per_step']:.2f} ms per call in "
            "kernels; parts by the model's named scopes (benchmarks/_profile.py)."
        )


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (XLA) during a call, from
    its monitoring events."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace_s",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
        "/jax/core/compile/backend_compile_duration": "xla_compile_s",
    }

    def __init__(self):
        self.active = False
        self.seconds = dict.fromkeys(self.EVENTS.values(), 0.0)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration_secs: float, **_: str | int) -> None:
        if self.active and event in self.EVENTS:
            self.seconds[self.EVENTS[event]] += duration_secs

    def first_call(self, part: str, row: dict, run):
        """`run()`'s result; adds to `row` its wall time and the parts of it spent
        compiling, as `{part}_first_call_s`, `{part}_trace_s` etc."""
        self.seconds = dict.fromkeys(self.EVENTS.values(), 0.0)
        self.active = True
        t0 = time.perf_counter()
        try:
            out = jax.block_until_ready(run())
        finally:
            self.active = False
        row[f"{part}_first_call_s"] = time.perf_counter() - t0
        row |= {f"{part}_{k}": v for k, v in self.seconds.items()}
        return out


def compile_buckets(cfg, results):
    """Per bucket of the training run, one after another (no other compilation
    running): the first call of the task sampler (its exact expert included) and
    the first train step, each split into JAX's tracing, lowering and XLA's
    compilation, and a warm step for comparison."""
    model = build_model(cfg, jr.key(0))
    optimizer = make_optimizer(10**6)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_train_step(
        BehaviouralCloningLoss(weight_decay=1e-4), optimizer, has_aux=True
    )
    clock = CompileClock()
    for d in cfg["dims"]:
        for n in cfg["samples"]:
            config = TaskConfig(n_vars=d, n_samples=n)
            batch_size = _batch_size(d, n, cfg["cells"], 1)
            row = {"d": d, "N": n, "batch": batch_size}
            batch = clock.first_call(
                "sampler",
                row,
                lambda: sample_training_batch(jr.key(0), config, batch_size, K),
            )
            clock.first_call(
                "step", row, lambda: step(_copy(model), _copy(opt_state), batch, None)
            )
            t0 = time.perf_counter()
            jax.block_until_ready(step(_copy(model), _copy(opt_state), batch, None))
            row["step_s"] = time.perf_counter() - t0
            row["first_step_s"] = row["sampler_first_call_s"] + row["step_first_call_s"]
            results.add(workload="compile bucket", **row)
            print(json.dumps(row), flush=True)


NONLINEAR = {
    "tiny": dict(
        dims=(4,),
        big=(12, 16),
        samples=30,
        width=16,
        layers=1,
        heads=2,
        steps=20,
        batch=4,
        eval_tasks=8,
        shortlist=4,
        timing_batch=2,
        rounds=2,
        design=(4, 10, 3),
        design_hypotheses=4,
        design_batch=3,
        design_candidate_batch=2,
    ),
    "full": dict(
        dims=(5, 10, 20),
        big=(50, 100),
        samples=200,
        width=64,
        layers=4,
        heads=4,
        steps=None,
        batch=32,
        eval_tasks=128,
        shortlist=12,
        timing_batch=32,
        rounds=10,
        # d = 20 as the issue asks: C = 1 160 candidate sets at K = 3, of which the
        # 32 most probable are simulated for the information gain.
        design=(20, 100, 10),
        design_hypotheses=32,
        design_batch=64,
        # The model's posteriors of 4 candidates × 32 sets × 4 draws at a time
        # (all 38 candidates at once would hold ~10x the memory).
        design_candidate_batch=4,
    ),
}
MECHANISM_CONFIGS = {
    "linear": dict(),
    "mlp": dict(mechanism="mlp"),
    "rff": dict(mechanism="rff", noise="heteroscedastic"),
}


def _shortlist_scorers(model):
    """`(name, model or None, degree)` of each way the shortlist is scored."""
    return (
        ("model", model, 1),
        ("exact expert", None, 1),
        ("cubic expert", None, 3),
    )


def _shortlist_quality(model, tasks, size):
    """MAP F1 / truth mass / recall of the shortlist posterior (the model, the
    linear and the cubic expert)."""
    d = tasks.data.shape[2]
    rows = []
    for impl, scorer, degree in _shortlist_scorers(model):
        f1, mass, recall = [], [], []
        for b in range(tasks.data.shape[0]):
            out = _shortlist(tasks.data[b], K, size, scorer, degree)
            truth = set(np.flatnonzero(np.asarray(tasks.true_parents[b])).tolist())
            listed = np.asarray(out.shortlist).tolist()
            recall.append(truth <= set(listed))
            probs = np.exp(np.asarray(out.log_probs, np.float64))
            if not np.isfinite(probs).all():
                continue
            best = int(np.argmax(probs))
            table = candidate_parent_sets(size + 1, K)
            members = {
                listed[int(r)]
                for r, m in zip(table.members[best], table.mask[best])
                if m
            }
            hits = len(members & truth)
            total = len(members) + len(truth)
            f1.append(1.0 if total == 0 else 2 * hits / total)
            sets = [
                {listed[int(r)] for r, m in zip(table.members[c], table.mask[c]) if m}
                for c in range(table.n_sets)
            ]
            mass.append(sum(p for p, s_ in zip(probs, sets) if s_ == truth))
        rows.append(
            dict(
                impl=impl,
                d=d,
                map_f1=float(np.mean(f1)) if f1 else float("nan"),
                truth_mass=float(np.mean(mass)) if mass else float("nan"),
                shortlist_recall=float(np.mean(recall)),
            )
        )
    return rows


# The learning rate's warmup of a nonlinear run on a budget: fixed in advance, as it
# is static in the compiled step, which the calibration shares with the run.
BUDGET_WARMUP = 100


def _warmup_steps(cfg: dict) -> int:
    return BUDGET_WARMUP if cfg["steps"] is None else max(1, cfg["steps"] // 20)


def _budgeted_run_length(model, buckets, curriculum, budget_s: float):
    """Compile and time the train step of every bucket (as `train` will run it,
    so the run reuses the compilations), and return the number of steps whose
    expected time under the curriculum's bucket mix fills the rest of the budget,
    with the step time of each bucket."""
    t0 = time.perf_counter()
    loss = BehaviouralCloningLoss(weight_decay=1e-4)
    optimizer = make_optimizer(10**6, warmup_steps=BUDGET_WARMUP)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = with_fallback(make_train_step(loss, optimizer, has_aux=True))
    step_times = []
    key = jr.key(0)
    for config, batch_size in buckets:
        times = []
        for j in range(3):  # the first compiles
            start = time.perf_counter()
            # A step as `train` runs it: a batch drawn and labelled, then the step
            # (with a key: a step without one is another program).
            batch = sample_training_batch(jr.key(j), config, batch_size, K)
            jax.block_until_ready(step(_copy(model), _copy(opt_state), batch, key))
            times.append(time.perf_counter() - start)
        step_times.append(min(times[1:]))
    # Host overhead per step (metrics to floats, the batch's dispatch).
    expected = _expected_step_time(curriculum, step_times) + 0.002
    left = budget_s - (time.perf_counter() - t0)
    # At least two warmups: a budget too short for them runs over it.
    return max(2 * BUDGET_WARMUP, int(0.9 * left / expected)), step_times


def nonlinear_rows(args, results):
    size = "tiny" if args.tiny else "full"
    cfg = NONLINEAR[size]
    key = jr.key(args.seed)
    model = build_model(cfg, jr.fold_in(key, 0))
    buckets = [
        (TaskConfig(n_vars=d, n_samples=cfg["samples"], **extra), cfg["batch"])
        for d in cfg["dims"]
        for extra in MECHANISM_CONFIGS.values()
    ]
    curriculum = _size_curriculum([config for config, _ in buckets])
    t0 = time.perf_counter()
    if cfg["steps"] is None:
        # A run on a wall-clock budget: the schedule and the curriculum must be
        # laid out over the steps that fit in it (laid out over a guess, a short
        # run would end still warming up, on the cheapest buckets alone).
        n_steps, step_times = _budgeted_run_length(
            model, buckets, curriculum, 60 * args.minutes
        )
        results.note(
            "nonlinear training: every bucket's step compiled and timed first "
            f"({time.perf_counter() - t0:.0f} s; steps of "
            + ", ".join(f"{1e3 * s:.0f}" for s in step_times)
            + f" ms), then {n_steps} steps laid out to fill the budget."
        )
    else:
        n_steps = cfg["steps"]
    optimizer = make_optimizer(n_steps, warmup_steps=_warmup_steps(cfg))
    # Train in chunks, each ending with a checkpoint, and stop at the budget even
    # if the estimate was off.
    done, chunk = 0, max(20, n_steps // 10)
    checkpoint = os.path.join(tempfile.gettempdir(), f"causal-nonlinear-{size}.ckpt")
    while done < n_steps:
        fitted = train_surrogate(
            model,
            buckets,
            n_steps=n_steps,
            key=jr.fold_in(key, 1),
            curriculum=curriculum,
            optimizer=optimizer,
            stop_after=min(done + chunk, n_steps),
            checkpoint_path=checkpoint,
            checkpoint_every=chunk,
            resume=done > 0,
            progress=False,
        )
        model, done = fitted.model, min(done + chunk, n_steps)
        if time.perf_counter() - t0 > 60 * args.minutes:
            break
    train_s = time.perf_counter() - t0
    results.add(
        workload="nonlinear train",
        size=size,
        steps=done,
        planned_steps=n_steps,
        seconds=train_s,
    )
    for d in cfg["dims"]:
        tasks = {}
        for name, extra in MECHANISM_CONFIGS.items():
            config = TaskConfig(n_vars=d, n_samples=cfg["samples"], **extra)
            keys = jr.split(jr.fold_in(key, 100 + d), cfg["eval_tasks"])
            tasks[name] = jax.jit(jax.vmap(lambda k, c=config: sample_task(k, c)))(keys)
        # The exact expert as it is (linear) and as an additive cubic model, a
        # non-amortised nonlinear baseline.
        for expert, degree in (("linear", 1), ("cubic", 3)):
            report = evaluate_by_mechanism(model, tasks, expert_degree=degree)
            for name, metrics in report.items():
                results.add(
                    workload="nonlinear eval",
                    mechanism=name,
                    d=d,
                    expert=expert,
                    **metrics,
                )
    if args.quality_only:
        results.note(
            f"nonlinear rows ({size}, quality only): {done} training steps in "
            f"{train_s:.0f} s on a mixture of linear, MLP and RFF (heteroscedastic) "
            "tasks."
        )
        return
    for d in cfg["big"][:1]:
        for name, extra in MECHANISM_CONFIGS.items():
            config = TaskConfig(n_vars=d, n_samples=cfg["samples"], **extra)
            tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(
                jr.split(jr.fold_in(key, 200 + d), min(cfg["eval_tasks"], 32))
            )
            for row in _shortlist_quality(model, tasks, cfg["shortlist"]):
                results.add(
                    workload="nonlinear eval (shortlist)", mechanism=name, **row
                )
    params, static = eqx.partition(model, eqx.is_array)
    for d in cfg["big"]:
        config = TaskConfig(n_vars=d, n_samples=cfg["samples"], mechanism="mlp")
        tasks = jax.jit(jax.vmap(lambda k: sample_task(k, config)))(
            jr.split(jr.fold_in(key, 300 + d), cfg["timing_batch"])
        )
        for impl, _, degree in _shortlist_scorers(model):

            def fn(params, data, impl=impl, degree=degree):
                scorer = eqx.combine(params, static) if impl == "model" else None
                return jax.vmap(
                    lambda x: (
                        _shortlist(x, K, cfg["shortlist"], scorer, degree).log_probs
                    )
                )(data)

            timing = time_jax(fn, params, tasks.data, repeats=5)
            results.add(
                workload="inference (shortlist)",
                impl=impl,
                sizes={
                    "d": d,
                    "K": K,
                    "L": cfg["shortlist"],
                    "N": cfg["samples"],
                    "batch": cfg["timing_batch"],
                },
                per_task_s=timing["median_s"] / cfg["timing_batch"],
                **timing,
            )
    d, n0, rows = cfg["design"]
    config = TaskConfig(n_vars=d, n_samples=n0, interventional_fraction=(0.0, 0.0))
    task = sample_task(jr.fold_in(key, 400), config)
    design_sizes = {
        "d": d,
        "K": K,
        "N0": n0,
        "rows": rows,
        "rounds": cfg["rounds"],
        "hypotheses": cfg["design_hypotheses"],
    }
    for strategy in ("designed", "random"):
        for posterior in ("exact", model):

            def once(key, strategy=strategy, posterior=posterior):
                return design_interventions(
                    key,
                    task.scm,
                    task.data,
                    rounds=cfg["rounds"],
                    rows_per_round=rows,
                    strategy=strategy,
                    posterior=posterior,
                    max_parents=K,
                    n_hypotheses=cfg["design_hypotheses"],
                    candidate_batch=None
                    if posterior == "exact"
                    else cfg["design_candidate_batch"],
                ).truth_mass

            timing, _ = measure_unless_out_of_memory(once, jr.key(1), repeats=3)
            results.add(
                workload="design loop",
                strategy=strategy,
                posterior="exact" if posterior == "exact" else "model",
                sizes=design_sizes,
                rounds_per_s=cfg["rounds"] / timing["median_s"]
                if "median_s" in timing
                else None,
                **timing,
            )
    # Many tasks at once: the loop under `jax.vmap`, one program for the batch
    # (the exact posterior; the model's per-task row above bounds its rate).
    batch = cfg["design_batch"]
    tasks = jax.vmap(lambda k: sample_task(k, config))(
        jr.split(jr.fold_in(key, 401), batch)
    )

    def batched(keys, scm, data):
        def one(key, scm, data):
            return design_interventions(
                key,
                scm,
                data,
                rounds=cfg["rounds"],
                rows_per_round=rows,
                max_parents=K,
                n_hypotheses=cfg["design_hypotheses"],
            ).truth_mass

        return jax.vmap(one)(keys, scm, data)

    timing, _ = measure_unless_out_of_memory(
        batched, jr.split(key, batch), tasks.scm, tasks.data, repeats=3
    )
    results.add(
        workload="design loop (batch of tasks)",
        strategy="designed",
        posterior="exact",
        sizes={**design_sizes, "tasks": batch},
        task_rounds_per_s=batch * cfg["rounds"] / timing["median_s"]
        if "median_s" in timing
        else None,
        **timing,
    )
    results.note(
        f"nonlinear rows ({size}): {done} training steps in {train_s:.0f} s on a "
        "mixture of linear, MLP and RFF (heteroscedastic) tasks."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="where to write the trained model (default: the temp directory); the "
        "learning curve goes next to it as PATH.history.json",
    )
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--data-parallel", action="store_true")
    parser.add_argument(
        "--parallel-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the buckets and the evaluations from threads (default: on "
        "for the full size)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nonlinear", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--quality-only",
        action="store_true",
        help="with --nonlinear: train and evaluate the quality per mechanism only "
        "(no shortlist or design-loop timings; for a CPU)",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="only the compile time of each training bucket and the inference "
        "time per task, on an untrained model",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --latency: the kernel time of each part of the model "
        "(benchmarks/_profile.py)",
    )
    args = parser.parse_args(argv)
    if args.profile and not args.latency:
        parser.error("--profile goes with --latency")
    if args.quality_only and not args.nonlinear:
        parser.error("--quality-only goes with --nonlinear")
    dump_dir = None
    if args.profile:
        import _profile

        # Before JAX starts its backend: the optimised HLO the profile reads.
        dump_dir = tempfile.mkdtemp(prefix="causal-hlo-")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {_profile.dump_flags(dump_dir)}".strip()
    if args.latency:
        size = args.size or ("small" if jax.devices()[0].platform == "cpu" else "full")
        cfg = SIZES[size]
        results = Results(
            "causal_latency",
            "Causal surrogate: compile time per bucket and inference per task",
            "Per training bucket, compiled one after another: the task sampler's "
            "and the train step's first calls, split into JAX tracing, lowering and "
            "XLA compilation. Per task: the forward pass of a (untrained) "
            "`ParentSetPredictionModel` in float32 and in bfloat16 against its "
            "roofline at the matmul ceiling and its traffic floor at the memory "
            "bandwidth, both measured in the same run, and the exact expert.",
        )
        compile_buckets(cfg, results)
        model = build_model(cfg, jr.key(0))
        time_inference(model, cfg, jr.key(2), results)
        if dump_dir is not None:
            profile_latency(model, cfg, results, dump_dir)
        results.save(args.results_dir)
        return
    if args.nonlinear:
        if args.minutes is None:
            args.minutes = 0.5 if args.tiny else 6.0
        results = Results(
            "causal_nonlinear",
            "Causal surrogate on nonlinear tasks, large d and intervention design",
            "A `ParentSetPredictionModel` trained on a mixture of linear and nonlinear "
            "tasks (truth labels for the nonlinear ones), against the exact linear "
            "expert per mechanism; shortlist posteriors at d = 50 and 100; the "
            "rounds per second of the intervention-design loop.",
        )
        nonlinear_rows(args, results)
        results.save(args.results_dir)
        return
    size = args.size or ("small" if jax.devices()[0].platform == "cpu" else "full")
    cfg = dict(SIZES[size])
    if args.minutes is None:
        args.minutes = cfg["minutes"]
    if args.parallel_compile is None:
        args.parallel_compile = size == "full"
    if args.checkpoint is None:
        args.checkpoint = os.path.join(tempfile.gettempdir(), f"causal-{size}.ckpt")
    results = Results(
        "causal",
        "Amortised causal surrogate",
        "A `ParentSetPredictionModel` trained by behavioural cloning of the exact "
        "g-prior expert for a fixed wall-clock budget (compilation included), then "
        "evaluated on held-out tasks against the exact posterior and the true "
        "parents; inference time per task of the model and the exact expert.",
    )
    key = jr.key(args.seed)
    model, calibration, summary = train(cfg, args, jr.fold_in(key, 0))
    for row in calibration:
        results.add(workload="train bucket", **row)
    results.add(
        workload="train",
        size=size,
        minutes=args.minutes,
        width=cfg["width"],
        layers=cfg["layers"],
        **summary,
    )
    t0 = time.perf_counter()
    by_d = evaluate(model, cfg, jr.fold_in(key, 1), results, args.parallel_compile)
    # The trained model in bfloat16 on the same sink tasks: what half-precision
    # inference (the faster one on a GPU, see --latency) costs in quality.
    half = cast_floating(model, jnp.bfloat16)
    by_d_half = evaluate(
        half, cfg, jr.fold_in(key, 1), results, args.parallel_compile, ("sink",)
    )
    print(f"evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    time_inference(model, cfg, jr.fold_in(key, 2), results)
    sink = {d: by_d[(d, "sink")] for d in cfg["dims"]}
    sink_half = {d: by_d_half[(d, "sink")] for d in cfg["dims"]}
    results.note(
        f"{size} size, {args.minutes} min budget: sink-target KL per d "
        + ", ".join(f"d={d}: {m['kl']:.3f}" for d, m in sink.items())
        + "; top-1 "
        + ", ".join(f"{m['top1_agreement']:.3f}" for m in sink.values())
        + "; MAP F1 "
        + ", ".join(f"{m['map_f1']:.3f}" for m in sink.values())
        + f" (targets KL ≤ {TARGETS['kl']}, top-1 ≥ {TARGETS['top1_agreement']}, "
        f"F1 ≥ {TARGETS['map_f1']}). In bfloat16: KL "
        + ", ".join(f"{m['kl']:.3f}" for m in sink_half.values())
        + "; MAP F1 "
        + ", ".join(f"{m['map_f1']:.3f}" for m in sink_half.values())
        + f". Checkpoint: {args.checkpoint}."
    )
    if not math.isfinite(summary["final_train_kl"]):
        raise SystemExit("training diverged")
    results.save(args.results_dir)


if __name__ == "__main__":
    main()
