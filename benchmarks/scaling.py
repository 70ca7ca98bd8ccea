"""Data-parallel scaling over the devices present (weak scaling: a fixed batch per
device).

Usage:

    python benchmarks/scaling.py [--size small|full] [--counts 1 2 4 8]
        [--workloads lm ghost causal memory]

For every device count n in `--counts` that the machine has, each workload runs with
a `jax.sharding.Mesh` over the first n devices (the library's own sharding:
`make_train_step(mesh=...)`, `make_attribution_step(mesh=...)`; no hand-written
communication):

- `lm`: one training step of the multimodal LM (`benchmarks/multimodal.py`'s
  worker, in its own subprocess; `full` is the GPT-2-small shape of about 107M
  parameters with 131 072 tokens per device and step). Reported: tokens per second
  and the scaling efficiency `tps(n) / (n · tps(1))`.
- `ghost`: the attribution step (ghost dot products) on the GPT of
  `benchmarks/_gpt.py`; the dot products of the sharded step are compared with the
  single-device step on the same global batch (largest relative difference).
- `causal`: one behavioural-cloning step of the parent-set model on expert-labelled
  tasks; the loss of the sharded step is compared with the single-device one.
- `memory`: bytes per device of the multimodal LM's training step under each
  parameter layout (replicated, FSDP over the data axis, FSDP with tensor
  parallelism over a model axis of 2): the parameters and AdamW state each device
  holds (from the placed arrays' shards) and XLA's compiled memory analysis of the
  step as `train` runs it, donating its state and with a key (arguments, outputs,
  temporaries per device; the temporaries also without donation). The step is
  compiled, not run, so fake CPU devices give the figures a GPU would hold (the
  same shapes and shardings; a GPU's temporaries can differ with its fusions).

`small` (the default on a CPU) runs tiny shapes; on a CPU, set
`XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu` to exercise
the sharded paths on eight fake devices (times are then meaningless, the
comparisons are not).
"""

import argparse
import os
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _harness import Results, time_callable


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.make_mesh(
        (n,),
        ("data",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:n],
    )


def _copy(tree):
    # The steps donate their inputs; every run starts from its own copy.
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, tree)


def lm(results: Results, counts: list[int], size_name: str, args) -> None:
    import multimodal

    size = multimodal.SIZES["gpt2" if size_name == "full" else "small"]
    seq = size["seqs"][0]
    batch = max(1, size["tokens_per_step"] // seq)
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.npz")
        multimodal.make_data(size, batch, seq, path)
        for n in counts:
            argv = [multimodal.__file__, "--worker", "jax", "--seq", str(seq)]
            argv += ["--data", path, "--devices", str(n), "--repeats", "10"]
            argv += ["--size", "gpt2" if size_name == "full" else "small"]
            out = multimodal._spawn(argv, args.timeout)
            sizes = {"devices": n, "seq": seq, "batch_per_device": batch}
            if "error" in out:
                results.add(workload="lm", impl="jax", sizes=sizes, error=out["error"])
                continue
            tokens_per_sec = n * batch * seq / out["median_s"]
            base = tokens_per_sec if n == 1 else base
            results.add(
                workload="lm train step",
                impl="jax",
                sizes=dict(sizes, parameters=out["parameters"]),
                median_s=out["median_s"],
                iqr_s=out["iqr_s"],
                tokens_per_sec=tokens_per_sec,
                scaling_efficiency=None
                if base is None
                else tokens_per_sec / (n * base),
            )


def ghost(results: Results, counts: list[int], size_name: str, args) -> None:
    from _gpt import GPT, make_loss, SIZES

    from transforms import make_attribution_step

    cfg = SIZES["gpt2" if size_name == "full" else "tiny"]
    gpu = jax.devices()[0].platform == "gpu"
    loss_fn = make_loss(jnp.bfloat16 if gpu else jnp.float32)
    model = GPT(
        cfg["vocab"], cfg["dim"], cfg["heads"], cfg["layers"], cfg["length"], jr.key(0)
    )
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    reference = None
    for n in counts:
        B = cfg["batch"] * n
        tokens = jr.randint(jr.key(1), (2 * B, cfg["length"] + 1), 0, cfg["vocab"])
        train, val = (tokens[:B],), (tokens[B:],)
        single = make_attribution_step(loss_fn, optimizer)
        sharded = make_attribution_step(loss_fn, optimizer, mesh=_mesh(n))
        _, _, _, expected = single(_copy(model), _copy(opt_state), train, val)
        _, _, _, dots = sharded(_copy(model), _copy(opt_state), train, val)
        expected, dots = np.asarray(expected), np.asarray(dots)
        scale = np.max(np.abs(expected))
        state = {"model": _copy(model), "opt": _copy(opt_state)}

        def run():
            state["model"], state["opt"], _, out = sharded(
                state["model"], state["opt"], train, val
            )
            return out

        timing = time_callable(run, warmup=2, repeats=args.repeats)
        examples_per_sec = B / timing["median_s"]
        reference = examples_per_sec if n == 1 else reference
        results.add(
            workload="ghost attribution step",
            impl="jax",
            sizes={"devices": n, "batch_per_device": cfg["batch"], **cfg},
            median_s=timing["median_s"],
            iqr_s=timing["iqr_s"],
            examples_per_sec=examples_per_sec,
            scaling_efficiency=None
            if reference is None
            else examples_per_sec / (n * reference),
            max_rel_diff_vs_one_device=float(np.max(np.abs(dots - expected)) / scale),
        )


def causal(results: Results, counts: list[int], size_name: str, args) -> None:
    from eqx_models.causal import (
        BehaviouralCloningLoss,
        make_optimizer,
        ParentSetPredictionModel,
        sample_training_batch,
        TaskConfig,
    )
    from transforms import make_train_step

    full = size_name == "full"
    config = TaskConfig(n_vars=20 if full else 5, n_samples=200 if full else 40)
    per_device = 32 if full else 4
    model = ParentSetPredictionModel(
        3, width=64 if full else 16, n_layers=4 if full else 1, key=jr.key(0)
    )
    loss = BehaviouralCloningLoss(weight_decay=1e-4)
    optimizer = make_optimizer(1000)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    reference = None
    for n in counts:
        batch = sample_training_batch(jr.key(2), config, per_device * n, 3)
        single = make_train_step(loss, optimizer, has_aux=True)
        sharded = make_train_step(loss, optimizer, has_aux=True, mesh=_mesh(n))
        _, _, expected = single(_copy(model), _copy(opt_state), batch, jr.key(3))
        _, _, metrics = sharded(_copy(model), _copy(opt_state), batch, jr.key(3))
        state = {"model": _copy(model), "opt": _copy(opt_state)}

        def run():
            state["model"], state["opt"], out = sharded(
                state["model"], state["opt"], batch, jr.key(3)
            )
            return out

        timing = time_callable(run, warmup=2, repeats=args.repeats)
        tasks_per_sec = per_device * n / timing["median_s"]
        reference = tasks_per_sec if n == 1 else reference
        results.add(
            workload="causal train step",
            impl="jax",
            sizes={
                "devices": n,
                "tasks_per_device": per_device,
                "n_vars": config.n_vars,
                "n_samples": config.n_samples,
            },
            median_s=timing["median_s"],
            iqr_s=timing["iqr_s"],
            tasks_per_sec=tasks_per_sec,
            scaling_efficiency=None
            if reference is None
            else tasks_per_sec / (n * reference),
            loss_rel_diff_vs_one_device=abs(
                float(metrics["loss"]) - float(expected["loss"])
            )
            / abs(float(expected["loss"])),
        )


def memory(results: Results, counts: list[int], size_name: str, args) -> None:
    from eqx_models import multimodal as mm
    from transforms import make_train_step, ParameterSharding, replicate, shard_batch
    from transforms._train._train_step import _compiled

    # GPT-2-small's width and head count at 6 layers on the full size: its
    # replicated state on 8 fake devices must fit in a CPU machine's memory.
    d_model, n_layers, n_heads, seq, batch_per_device = (
        (768, 6, 12, 1024, 4) if size_name == "full" else (128, 2, 4, 64, 2)
    )
    data = mm.make_synthetic_data(jr.key(0), 8, fit_on=8)
    model = mm.CausalTransformerLM(
        data.layout,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        max_len=seq,
        dropout=0.0,
        init="gpt",
        key=jr.key(1),
    )
    loss = mm.MultimodalLoss(data.codebooks)
    config = mm.MultimodalTrainConfig(n_steps=10, learning_rate=1e-3)
    optimizer = mm.make_optimizer(config)
    parameters = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    key = jr.key(2)
    for n in counts:
        batch = mm.pad_batch(
            (data.sequences * (n * batch_per_device))[: n * batch_per_device],
            length=seq,
        )
        meshes = {
            "replicated": (jax.make_mesh((n,), ("data",)), None),
            "fsdp": (
                jax.make_mesh((n,), ("data",)),
                ParameterSharding(fsdp_axis="data"),
            ),
        }
        if n >= 2:
            meshes["fsdp + tensor parallel (model axis 2)"] = (
                jax.make_mesh((n // 2, 2), ("data", "model")),
                ParameterSharding(
                    fsdp_axis="data", tensor_parallel=mm.TensorParallelRule("model")
                ),
            )
        for name, (mesh, layout) in meshes.items():
            mesh = jax.sharding.Mesh(
                np.array(jax.devices()[: mesh.size]).reshape(mesh.devices.shape),
                mesh.axis_names,
            )
            step = make_train_step(
                loss, optimizer, has_aux=True, mesh=mesh, parameter_sharding=layout
            )
            opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
            state = step.place(model, opt_state)
            held = sum(
                x.addressable_shards[0].data.nbytes
                for x in jax.tree.leaves(eqx.filter(state, eqx.is_array))
            )
            assert step.mesh is not None  # the step's own (Auto-axes) mesh
            inputs = (step, shard_batch(batch, step.mesh), replicate(key, step.mesh))
            # As `train` runs it: donating the state (its buffers become the
            # outputs), with a key (dropout and sampled positions).
            analysis, undonated = (
                _compiled[donate, False]
                .lower(inputs, *state)
                .compile()
                .compiled.memory_analysis()
                for donate in (True, False)
            )
            results.add(
                workload="lm memory per device",
                impl=name,
                sizes={
                    "devices": n,
                    "d_model": d_model,
                    "n_layers": n_layers,
                    "parameters": int(parameters),
                    "seq": seq,
                    "batch_per_device": batch_per_device,
                },
                state_bytes=held,
                argument_bytes=analysis.argument_size_in_bytes,
                output_bytes=analysis.output_size_in_bytes,
                temp_bytes=analysis.temp_size_in_bytes,
                undonated_temp_bytes=undonated.temp_size_in_bytes,
            )
            del state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["small", "full"], default=None)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["lm", "ghost", "causal", "memory"],
        default=["lm", "ghost", "causal"],
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("small" if platform == "cpu" else "full")
    counts = [n for n in args.counts if n <= jax.device_count()]
    results = Results(
        "scaling",
        "Data-parallel scaling",
        f"Weak scaling over {counts} devices of this machine with the library's "
        "sharding (a `jax.sharding.Mesh` over the batch axis): the multimodal LM "
        "training step, the ghost attribution step and the causal surrogate "
        "training step; efficiency is throughput on n devices / (n x one device). "
        "The sharded results are checked against the single-device step.",
    )
    timed = [name for name in args.workloads if name != "memory"]
    for name in timed:
        {"lm": lm, "ghost": ghost, "causal": causal}[name](results, counts, size, args)
    if timed:
        results.save()
    if "memory" in args.workloads:
        # Its own file: the figures come from compiling, not timing, and fake CPU
        # devices give them as well as GPUs.
        held = Results(
            "sharded_memory",
            "Memory per device under each parameter layout",
            f"The multimodal LM's training step on meshes of {counts} devices, "
            "compiled (not run) for each layout of its parameters and AdamW state "
            "(`transforms.ParameterSharding`) as `train` runs it (donating its "
            "state, with a key): the state each device holds and XLA's memory "
            "analysis of the compiled step per device (temporaries also without "
            "donation).",
        )
        memory(held, counts, size, args)
        held.save()


if __name__ == "__main__":
    main()
