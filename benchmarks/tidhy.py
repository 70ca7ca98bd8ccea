"""TiDHy: compiled inner loops against a PyTorch implementation with a Python loop.

Usage: `python benchmarks/tidhy.py [--size cpu|gpu] [--torch-steps K]`. The size
defaults to the platform: `gpu` is the paper's workload (D = 20, r = 10, r2 = 5,
M = 15, windows of 200 steps with stride 20 over 200 000 training steps, i.e. 9 991
windows; inference up to 2 000 iterations with tol = 0.01); `cpu` is a reduced one.

Measured, for `eqx_models.tidhy` and for the PyTorch peer (`_tidhy_torch.py`, the
same equations with the original's Python inner loop, on CUDA when available):

- one inference call (one time step of every window, the reference batching) with
  the paper's stopping rule, and with a fixed 200 iterations: iterations per second;
- one training epoch (one full-batch step over all windows: inference at every time
  step, losses, backward, AdamW). The PyTorch epoch runs the whole window on the
  `gpu` size; with `--torch-steps K` (the default on the `cpu` size) it runs the
  first K time steps and is extrapolated linearly to the whole window (its cost per
  time step is its inner loop's);
- `evaluate_record` over the whole test set (50 000 steps as windows of 200, stride
  20; the library's default per-window batching).

XLA's loop comes twice, with `check_every=1` (the stopping rule tested after every
inner iteration) and with 16 iterations per test (the per-window mode's default on
an accelerator): the results are the same, only the number of tests differs. On an
accelerator a third row runs the loop as Pallas kernels
(`InferenceConfig(implementation="pallas")`: one launch per time step in the per-
window mode, two per iteration in the reference mode). The library's default for the
device comes first and is marked: the kernels on one GPU that holds the model's
weights (`implementation="auto"`), else XLA's loop at its `check_every`. The
training epoch is timed in the reference mode (the paper's semantics, the PyTorch
peer's) and in the per-window mode (the library's default). On a GPU every test of a
`lax.while_loop` predicate is a copy to the host and a wait, so the benchmark also
states that floor: the time per trip of a `while_loop` whose body does almost
nothing, per iteration when the body runs a chunk of such iterations (rolled, as
`check_every` does, or unrolled), per iteration of a `scan` with a static trip count
(no predicate at all), and per iteration of `scan_optimize` itself on a trivial
objective. A profiler trace of the inference call gives its device kernels per inner
iteration and the time they keep the device busy, to set against the wall time per
iteration.

Both implementations start from the same parameters and see the same data.
"""

import argparse
import dataclasses
import math
import tempfile
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _harness import Results, time_callable, time_jax

from eqx_models import tidhy
from eqx_models.tidhy._evaluate import _evaluate
from eqx_models.tidhy._fused import default_on_this_device
from eqx_models.tidhy._inference import (
    AUTO_CHECK_EVERY,
    frozen,
    infer_first_step_impl,
    infer_impl,
)
from transforms import make_train_step, scan_optimize


# `torch_steps=None`: the PyTorch epoch runs the whole window (about 50 s on an
# H200). `floor_trips`: trips of the latency-floor loops.
SIZES = {
    "cpu": dict(
        train=4_000, test=2_000, length=50, stride=25, torch_steps=4, floor_trips=2_000
    ),
    "gpu": dict(
        train=200_000,
        test=50_000,
        length=200,
        stride=20,
        torch_steps=None,
        floor_trips=20_000,
    ),
}
REFERENCE = tidhy.InferenceConfig(max_iter=2000, tol=0.01, batch_mode="reference")
FIXED = tidhy.InferenceConfig(max_iter=200, tol=0.0, batch_mode="reference")
PER_WINDOW = tidhy.InferenceConfig(max_iter=2000, tol=0.01)
TRAIN = tidhy.TiDHyTrainConfig(grad_norm=False)


def _torch_inference_kwargs(config):
    lr_r, lr_r2 = config.learning_rates
    return dict(lr_r=lr_r, lr_r2=lr_r2, max_iter=config.max_iter, tol=config.tol)


def _check_every_values(config: tidhy.InferenceConfig) -> list[int]:
    """`check_every=1` and 16, the default of `config` on this platform first (the
    rendered summary compares the first library row of a workload)."""
    default = config.iterations_per_check
    return [default] + [k for k in (1, AUTO_CHECK_EVERY) if k != default]


def _impl(k: int, config: tidhy.InferenceConfig, xla_default: bool = True) -> str:
    default = " (default)" if xla_default and k == config.iterations_per_check else ""
    return f"eqx_models (while_loop, check_every={k}{default})"


def _variants(
    base: tidhy.InferenceConfig, fused_default: bool = False
) -> list[tuple[str, tidhy.InferenceConfig]]:
    """The library's rows of a workload, `(label, config)`, the default first: the
    XLA loop at each `check_every` and, on an accelerator, the Pallas kernels (on
    a CPU they run in Pallas' interpreter, a test path, not a fast one).
    `fused_default`: whether `implementation="auto"` picks the kernels here."""
    xla = dataclasses.replace(base, implementation="xla")
    rows = [
        (_impl(k, xla, not fused_default), dataclasses.replace(xla, check_every=k))
        for k in _check_every_values(xla)
    ]
    if jax.default_backend() != "cpu":
        pallas = dataclasses.replace(base, implementation="pallas")
        k = pallas.iterations_per_check
        label = (
            "one launch per time step"
            if base.batch_mode == "per_window"
            else (f"two launches per iteration, check_every={k}")
        )
        default = " (default)" if fused_default else ""
        row = (f"eqx_models (Pallas kernels, {label}){default}", pallas)
        rows = [row, *rows] if fused_default else [*rows, row]
    return rows


def _executed(n: int, k: int) -> int:
    """Inner iterations run, the masked ones of the last chunk included."""
    return math.ceil(n / k) * k


def _kernel_profile(results, run, workload, impl, sizes, n_iter, k, median_s):
    """Device kernels and copies per inner iteration of one compiled call, from a
    profiler trace (a GPU's device events; nothing nests in them)."""
    import _profile

    with tempfile.TemporaryDirectory() as trace_dir:
        _profile.capture(run, 2, trace_dir)
        events = _profile._kernels(trace_dir)
    copies = [e for e in events if "memcpy" in e["name"].lower()]
    executed = _executed(n_iter, k)
    results.add(
        workload=workload,
        impl=impl,
        sizes=sizes,
        iterations=n_iter,
        iterations_executed=executed,
        kernels_per_iteration=(len(events) - len(copies)) / 2 / executed,
        copies_per_iteration=len(copies) / 2 / executed,
        busy_us_per_iteration=sum(e["dur"] for e in events) / 2 / executed,
        wall_us_per_iteration=median_s * 1e6 / executed,
    )


def _latency_floor(results, trips: int, chunk: int) -> None:
    """The per-trip and per-iteration cost of loops whose body does almost nothing."""
    x = jnp.zeros(16)
    # A run-time bound: XLA cannot know the trip count, so it tests the predicate.
    bound = jnp.asarray(trips, jnp.int32)

    def tiny(x):
        return x * 0.5 + 1.0

    def plain(x, bound):
        return jax.lax.while_loop(
            lambda c: c[0] < bound,
            lambda c: (c[0] + 1, tiny(c[1])),
            (jnp.zeros((), jnp.int32), x),
        )

    def chunked(x, bound, unroll):
        def body(c):
            y, _ = jax.lax.scan(
                lambda y, _: (tiny(y), None), c[1], None, length=chunk, unroll=unroll
            )
            return c[0] + chunk, y

        return jax.lax.while_loop(
            lambda c: c[0] < bound, body, (jnp.zeros((), jnp.int32), x)
        )

    def fixed(x):
        return jax.lax.scan(lambda y, _: (tiny(y), None), x, None, length=trips)[0]

    cases = [
        ("while_loop, trivial body", jax.jit(plain), (x, bound), 1),
        (
            f"while_loop, trivial body in rolled chunks of {chunk}",
            jax.jit(lambda x, b: chunked(x, b, False)),
            (x, bound),
            chunk,
        ),
        (
            f"while_loop, trivial body in unrolled chunks of {chunk}",
            jax.jit(lambda x, b: chunked(x, b, True)),
            (x, bound),
            chunk,
        ),
        ("scan, trivial body (static trip count)", jax.jit(fixed), (x,), trips),
    ]
    for name, fn, args, per_trip in cases:
        timing = time_jax(fn, *args, warmup=1, repeats=5)
        n_trips = math.ceil(trips / per_trip)
        results.add(
            workload=f"latency floor: {name}",
            impl="jax",
            iterations=trips,
            trips=n_trips,
            us_per_trip=timing["median_s"] * 1e6 / n_trips,
            us_per_iteration=timing["median_s"] * 1e6 / trips,
            **timing,
        )

    # `scan_optimize` itself on a trivial objective: the relative change of
    # gradient descent on ||x||^2 / 2 is the learning rate, so it never converges.
    for k in _check_every_values(PER_WINDOW):
        solver = scan_optimize(
            lambda x: 0.5 * jnp.sum(x**2),
            optax.sgd(1e-3),
            max_steps=trips,
            tol=1e-6,
            check_every=k,
        )
        step = jax.jit(lambda x, solver=solver: solver(x))
        timing = time_jax(step, jnp.ones(16), warmup=1, repeats=5)
        n = int(step(jnp.ones(16))[1].n_steps)
        results.add(
            workload="latency floor: scan_optimize, trivial objective",
            impl=_impl(k, PER_WINDOW),
            iterations=n,
            trips=math.ceil(n / k),
            us_per_trip=timing["median_s"] * 1e6 / math.ceil(n / k),
            us_per_iteration=timing["median_s"] * 1e6 / n,
            **timing,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument(
        "--torch-steps",
        type=int,
        default=None,
        help="time steps of the PyTorch epoch, extrapolated to the whole window "
        "(default: the whole window on the gpu size, 4 on the cpu size)",
    )
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("cpu" if platform == "cpu" else "gpu")
    cfg = dict(SIZES[size])
    results = Results(
        "tidhy",
        "TiDHy: compiled inference and training against a PyTorch Python loop",
        "Inference iterations per second, time per full-batch training epoch and "
        "`evaluate_record` over the test set, for `eqx_models.tidhy` (inner loops in "
        "`lax.while_loop` testing the stopping rule every `check_every` iterations, "
        "time in `lax.scan`, one compiled step) and a plain PyTorch implementation "
        "of the same equations with the original's Python inner loop; and the "
        "latency floor of a `while_loop` trip on the device.",
    )

    system = tidhy.SwitchingLDS(key=jr.key(10))
    sample = system.sample(cfg["train"] + cfg["test"], key=jr.key(11))
    windows = tidhy.stack_windows(
        sample.observations[: cfg["train"]], cfg["length"], cfg["stride"]
    )
    test = tidhy.stack_windows(
        sample.observations[cfg["train"] :], cfg["length"], cfg["stride"]
    )
    B, T, D = windows.shape
    k_torch = min(args.torch_steps or cfg["torch_steps"] or T - 1, T - 1)
    model = tidhy.TiDHy(D, key=jr.key(0))
    fused_default = default_on_this_device(model, jnp.float32)
    sizes = dict(
        windows=B, steps=T, D=D, r=model.r_dim, r2=model.r2_dim, M=model.mix_dim
    )
    print(f"{size}: {B} training windows of {T} steps, {test.shape[0]} test windows")

    # The state at t = 1 of the training forward with first-step inference, so that
    # the timed call has a non-zero r_prev (r2 then has a gradient).
    r_prev, _ = jax.jit(lambda m, x: infer_first_step_impl(frozen(m), x, REFERENCE))(
        model, windows[:, 0]
    )
    r2_prev = jnp.zeros((B, model.r2_dim))
    x1 = windows[:, 1]

    import _tidhy_torch as peer
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Tiny tensors: one thread is PyTorch's fastest setting (no pool overhead).
        torch.set_num_threads(1)
    sync = (
        (lambda _: torch.cuda.synchronize())
        if device.type == "cuda"
        else (lambda _: None)
    )
    to_torch = lambda a: torch.tensor(np.asarray(a), device=device)
    torch_model = peer.TorchTiDHy(model, device)

    profiled = []
    for name, base in (
        ("paper stopping (tol 0.01)", REFERENCE),
        ("200 fixed iterations", FIXED),
    ):
        workload = f"inference step, {name}"
        for impl, config in _variants(base, fused_default):
            k = config.iterations_per_check
            step = jax.jit(
                lambda m, x, a, b, c=config: infer_impl(frozen(m), x, a, b, c)
            )
            timing = time_jax(step, model, x1, r_prev, r2_prev, repeats=5)
            _, _, stats = step(model, x1, r_prev, r2_prev)
            n_jax = int(stats.n_iter[0])
            results.add(
                workload=workload,
                impl=impl,
                sizes=sizes,
                iterations=n_jax,
                iterations_executed=_executed(n_jax, k),
                iterations_per_s=n_jax / timing["median_s"],
                us_per_iteration=timing["median_s"] * 1e6 / n_jax,
                **timing,
            )
            if base is REFERENCE:
                profiled.append((step, impl, k, n_jax, timing["median_s"]))
        holder = {}

        def run_torch(config=base):
            holder["out"] = torch_model.infer(
                to_torch(x1),
                to_torch(r_prev),
                to_torch(r2_prev),
                **_torch_inference_kwargs(config),
            )
            return holder["out"]

        timing = time_callable(run_torch, sync=sync, warmup=1, repeats=3)
        n_torch = holder["out"][2]
        results.add(
            workload=workload,
            impl=f"torch {torch.__version__} (Python loop, {device.type})",
            sizes=sizes,
            iterations=n_torch,
            iterations_per_s=n_torch / timing["median_s"],
            us_per_iteration=timing["median_s"] * 1e6 / n_torch,
            **timing,
        )

    # One training epoch: one full-batch step.
    optimizer = tidhy.make_optimizer(tidhy.Learner(model=model, gradnorm=None), TRAIN)
    jax_epochs = {}
    epochs = [("", v) for v in _variants(REFERENCE, fused_default)]
    # The library's default batching too (each window stops on its own).
    epochs += [
        (", per-window inference", v) for v in _variants(PER_WINDOW, fused_default)
    ]
    for mode, (impl, inference) in epochs:
        step = make_train_step(
            lambda learner, batch, key, inference=inference: tidhy.training_loss(
                learner, batch, key, inference=inference, train=TRAIN
            ),
            optimizer,
            has_aux=True,
        )
        state = {}

        def fresh():
            learner = tidhy.Learner(
                model=jax.tree.map(lambda a: jnp.array(a, copy=True), model),
                gradnorm=None,
            )
            state["learner"] = learner
            state["opt"] = optimizer.init(eqx.filter(learner, eqx.is_inexact_array))

        def run_epoch(step=step, state=state, fresh=fresh):
            fresh()  # every timed epoch starts from the same parameters
            state["learner"], state["opt"], state["metrics"] = step(
                state["learner"], state["opt"], windows, None
            )
            return state["metrics"]

        t0 = time.perf_counter()
        jax.block_until_ready(run_epoch())
        first = time.perf_counter() - t0
        timing = time_callable(run_epoch, warmup=0, repeats=2 if size == "gpu" else 3)
        # Read once the epochs are done: a host read inside would time a sync.
        iters = float(state["metrics"]["inference_iters_mean"])
        if not mode:
            jax_epochs[impl] = timing["median_s"]
            reference_iters = iters
        results.add(
            workload="training epoch (full batch" + mode + ")",
            impl=impl.replace("while_loop", "make_train_step"),
            sizes=sizes,
            inner_iterations_mean=iters,
            us_per_inner_iteration=timing["median_s"] * 1e6 / (iters * (T - 1)),
            first_step_with_compile_s=first,
            **timing,
        )

    torch_opt = peer.make_optimizer(torch_model)
    X = to_torch(windows[:, : k_torch + 1])
    # One call: the inference calls above have warmed PyTorch up, and the whole
    # window takes about 50 s on an H200.
    t0 = time.perf_counter()
    torch_iters = peer.train_step(
        torch_model, torch_opt, X, inference=_torch_inference_kwargs(REFERENCE)
    )
    sync(None)
    measured = time.perf_counter() - t0
    extrapolated = k_torch < T - 1
    torch_epoch = measured / k_torch * (T - 1)
    results.add(
        workload="training epoch (full batch)",
        impl=f"torch {torch.__version__} (Python loop, {device.type})"
        + (", extrapolated" if extrapolated else ""),
        sizes=sizes,
        inner_iterations_mean=float(np.mean(torch_iters)),
        us_per_inner_iteration=measured * 1e6 / float(np.sum(torch_iters)),
        timed_time_steps=k_torch,
        median_s=torch_epoch,
        measured_s=measured,
        repeats=1,
    )
    if extrapolated:
        results.note(
            f"PyTorch epoch: {k_torch} of {T - 1} time steps timed "
            f"({measured:.3g} s) and extrapolated linearly; its mean inner "
            f"iterations were {np.mean(torch_iters):.1f} against {reference_iters:.1f} "
            "for the whole JAX epoch, so the per-iteration costs are the fairer "
            "comparison."
        )
    else:
        results.note(
            f"PyTorch epoch: the whole window ({T - 1} time steps after the first), "
            f"one call of {measured:.3g} s; mean inner iterations "
            f"{np.mean(torch_iters):.1f} (PyTorch) and {reference_iters:.1f} (JAX)."
        )
    for impl, epoch in jax_epochs.items():
        results.note(
            f"Epoch speed-up {impl} / torch: {torch_epoch / epoch:.1f}x ({size} "
            f"size, {platform}; torch on {device.type})."
        )

    # evaluate_record over the whole test set.
    for impl, config in _variants(PER_WINDOW, fused_default):
        evaluate = jax.jit(lambda m, X, c=config: _evaluate(m, X, c))
        timing = time_jax(evaluate, model, test, repeats=3)
        record = evaluate(model, test)
        results.add(
            workload="evaluate_record, test set",
            impl=impl.replace("while_loop", "per-window batching"),
            sizes=dict(windows=test.shape[0], steps=T, D=D),
            inner_iterations_mean=float(jnp.mean(record.n_iter)),
            **timing,
        )
    results.note(
        "Training uses the plain loss (GradNorm off) in both implementations; the "
        "inner loop dominates either way."
    )
    results.note(
        "check_every changes no result (the iterations of a chunk after the "
        "stopping point are no-ops): the rows with different values differ in "
        "time only. iterations_executed counts the masked iterations too."
    )

    _latency_floor(results, cfg["floor_trips"], AUTO_CHECK_EVERY)
    if platform == "cpu":
        # A CPU's trace holds XLA's thunks as host events, nested (a while loop's
        # event spans its body's) and slowed by the tracing: not device kernels.
        results.save()
        return
    # Saved before the profiler runs, so that a failing trace loses only its rows.
    results.save()
    for step, impl, k, n_iter, median_s in profiled:
        _kernel_profile(
            results,
            lambda step=step: step(model, x1, r_prev, r2_prev),
            "kernel profile: inference step, paper stopping (tol 0.01)",
            impl,
            sizes,
            n_iter,
            k,
            median_s,
        )
    results.note(
        "Kernel profile: device kernels and copies (the while loop's predicate "
        "goes to the host by a copy) per inner iteration executed, and the time "
        "they keep the device busy, from a profiler trace; the wall time per "
        "iteration beyond the busy time is launch and synchronisation latency."
    )
    results.save()


if __name__ == "__main__":
    main()
