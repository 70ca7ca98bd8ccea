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
  step, losses, backward, AdamW). The PyTorch epoch is timed on the first
  `--torch-steps` time steps and extrapolated linearly to the whole window (its cost
  per time step is its inner loop's), as the notes say;
- `evaluate_record` over the whole test set (50 000 steps as windows of 200, stride
  20; the library's default per-window batching).

Both implementations start from the same parameters and see the same data.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _harness import Results, time_callable, time_jax

from eqx_models import tidhy
from eqx_models.tidhy._evaluate import _evaluate
from eqx_models.tidhy._inference import frozen, infer_first_step_impl, infer_impl
from transforms import make_train_step


SIZES = {
    "cpu": dict(train=4_000, test=2_000, length=50, stride=25, torch_steps=4),
    "gpu": dict(train=200_000, test=50_000, length=200, stride=20, torch_steps=10),
}
REFERENCE = tidhy.InferenceConfig(max_iter=2000, tol=0.01, batch_mode="reference")
FIXED = tidhy.InferenceConfig(max_iter=200, tol=0.0, batch_mode="reference")
PER_WINDOW = tidhy.InferenceConfig(max_iter=2000, tol=0.01)
TRAIN = tidhy.TiDHyTrainConfig(grad_norm=False)


def _torch_inference_kwargs(config):
    lr_r, lr_r2 = config.learning_rates
    return dict(lr_r=lr_r, lr_r2=lr_r2, max_iter=config.max_iter, tol=config.tol)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--torch-steps", type=int, default=None)
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("cpu" if platform == "cpu" else "gpu")
    cfg = dict(SIZES[size])
    k_torch = args.torch_steps or cfg["torch_steps"]
    results = Results(
        "tidhy",
        "TiDHy: compiled inference and training against a PyTorch Python loop",
        "Inference iterations per second, time per full-batch training epoch and "
        "`evaluate_record` over the test set, for `eqx_models.tidhy` (inner loops in "
        "`lax.while_loop`, time in `lax.scan`, one compiled step) and a plain PyTorch "
        "implementation of the same equations with the original's Python inner loop.",
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
    model = tidhy.TiDHy(D, key=jr.key(0))
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

    for name, config in (
        ("paper stopping (tol 0.01)", REFERENCE),
        ("200 fixed iterations", FIXED),
    ):
        step = jax.jit(lambda m, x, a, b, c=config: infer_impl(frozen(m), x, a, b, c))
        timing = time_jax(step, model, x1, r_prev, r2_prev, repeats=5)
        _, _, stats = step(model, x1, r_prev, r2_prev)
        n_jax = int(stats.n_iter[0])
        results.add(
            workload=f"inference step, {name}",
            impl="eqx_models (while_loop)",
            sizes=sizes,
            iterations=n_jax,
            iterations_per_s=n_jax / timing["median_s"],
            **timing,
        )
        holder = {}

        def run_torch(config=config):
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
            workload=f"inference step, {name}",
            impl=f"torch {torch.__version__} (Python loop, {device.type})",
            sizes=sizes,
            iterations=n_torch,
            iterations_per_s=n_torch / timing["median_s"],
            **timing,
        )

    # One training epoch: one full-batch step.
    optimizer = tidhy.make_optimizer(tidhy.Learner(model=model, gradnorm=None), TRAIN)
    step = make_train_step(
        lambda learner, batch, key: tidhy.training_loss(
            learner, batch, key, inference=REFERENCE, train=TRAIN
        ),
        optimizer,
        has_aux=True,
    )
    state = {}

    def fresh():
        learner = tidhy.Learner(
            model=jax.tree.map(lambda a: jnp.array(a, copy=True), model), gradnorm=None
        )
        state["learner"] = learner
        state["opt"] = optimizer.init(eqx.filter(learner, eqx.is_inexact_array))

    def run_epoch():
        fresh()  # every timed epoch starts from the same parameters
        state["learner"], state["opt"], state["metrics"] = step(
            state["learner"], state["opt"], windows, None
        )
        return state["metrics"]

    t0 = time.perf_counter()
    jax.block_until_ready(run_epoch())
    first = time.perf_counter() - t0
    timing = time_callable(run_epoch, warmup=0, repeats=2 if size == "gpu" else 3)
    iters = float(state["metrics"]["inference_iters_mean"])
    jax_epoch = timing["median_s"]
    results.add(
        workload="training epoch (full batch)",
        impl="eqx_models (make_train_step)",
        sizes=sizes,
        inner_iterations_mean=iters,
        first_step_with_compile_s=first,
        **timing,
    )

    torch_opt = peer.make_optimizer(torch_model)
    X = to_torch(windows[:, : k_torch + 1])
    holder = {}

    def run_torch_epoch():
        holder["iters"] = peer.train_step(
            torch_model, torch_opt, X, inference=_torch_inference_kwargs(REFERENCE)
        )
        return holder["iters"]

    timing = time_callable(run_torch_epoch, sync=sync, warmup=0, repeats=1)
    per_step = timing["median_s"] / k_torch
    torch_epoch = per_step * (T - 1)
    results.add(
        workload="training epoch (full batch)",
        impl=f"torch {torch.__version__} (Python loop, {device.type}), extrapolated",
        sizes=sizes,
        inner_iterations_mean=float(np.mean(holder["iters"])),
        timed_time_steps=k_torch,
        median_s=torch_epoch,
        measured_s=timing["median_s"],
    )
    results.note(
        f"PyTorch epoch: {k_torch} of {T - 1} time steps timed "
        f"({timing['median_s']:.3g} s) and extrapolated linearly; its mean inner "
        f"iterations were {np.mean(holder['iters']):.1f} against {iters:.1f} for the "
        "whole JAX epoch, "
        "so the per-iteration costs are the fairer comparison (rows above)."
    )
    results.note(
        f"Epoch speed-up eqx_models / torch: {torch_epoch / jax_epoch:.1f}x "
        f"({size} size, {platform}; torch on {device.type})."
    )

    # evaluate_record over the whole test set.
    evaluate = jax.jit(lambda m, X: _evaluate(m, X, PER_WINDOW))
    timing = time_jax(evaluate, model, test, repeats=3)
    record = evaluate(model, test)
    results.add(
        workload="evaluate_record, test set",
        impl="eqx_models (per-window batching)",
        sizes=dict(windows=test.shape[0], steps=T, D=D),
        inner_iterations_mean=float(jnp.mean(record.n_iter)),
        **timing,
    )
    results.note(
        "Training uses the plain loss (GradNorm off) in both implementations; the "
        "inner loop dominates either way."
    )
    results.save()


if __name__ == "__main__":
    main()
