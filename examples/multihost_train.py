"""The multimodal LM trained by several processes that form one JAX runtime.

Each process calls `jax.distributed.initialize` with the coordinator's address, the
number of processes and its own index; after that `jax.devices()` lists the devices
of every process, one mesh spans them, and `eqx_models.multimodal.train` runs
unchanged: data parallelism, then fully sharded data parallelism
(`transforms.ParameterSharding`), with XLA's collectives between the processes.

Usage, one process per host (here two hosts; `--cpu-devices` only for CPUs):

    python examples/multihost_train.py --coordinator host0:1234 --processes 2 \\
        --process-id 0   # on host0
    python examples/multihost_train.py --coordinator host0:1234 --processes 2 \\
        --process-id 1   # on host1

Without `--coordinator` (`python examples/multihost_train.py [--smoke]`) it
demonstrates the same on this machine: it starts two local processes of two CPU
devices each (a coordinator on a free local port; CPU collectives over gloo),
then one process of four CPU devices that trains the same, and checks that
the two runs give the same loss at every step. The summary reports the largest
relative difference.
"""

import os
import time

from _common import parse_args, save_summary
from _processes import add_flags, collect, join, report, start


def _flags(parser):
    add_flags(parser)
    parser.add_argument("--steps", type=int, default=None)


def train_layouts(n_steps: int) -> dict[str, list[float]]:
    """Train the LM with data parallelism and with FSDP over every device that
    the runtime lists; the loss of each step, per layout."""
    # Imported here: the worker configures JAX before anything starts its runtime,
    # and the launcher never starts one.
    import jax
    import jax.random as jr

    from eqx_models.multimodal import (
        CausalTransformerLM,
        make_synthetic_data,
        MultimodalLoss,
        MultimodalTrainConfig,
        pad_batch,
        train,
    )
    from transforms import ParameterSharding

    # Every process builds the same data, model and key, and `data(i)` returns the
    # same global batch everywhere: each device then takes its own rows of it.
    data = make_synthetic_data(jr.key(0), 64, fit_on=64, spectrum_groups=("blue",))
    length = max(len(s.tokens) for s in data.sequences)
    batch_size = 2 * jax.device_count()
    model = CausalTransformerLM(
        data.layout, d_model=32, n_layers=2, n_heads=2, max_len=length, key=jr.key(1)
    )
    loss = MultimodalLoss(data.codebooks)
    config = MultimodalTrainConfig(n_steps=n_steps, learning_rate=3e-3, warmup_steps=1)

    def batches(i):
        start = (i * batch_size) % (len(data.sequences) - batch_size)
        return pad_batch(data.sequences[start : start + batch_size], length=length)

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    layouts = {
        "data parallel": None,
        "fsdp": ParameterSharding(fsdp_axis="data", min_size=256),
    }
    losses = {}
    for name, layout in layouts.items():
        result = train(
            model,
            loss,
            batches,
            config,
            key=jr.key(2),
            mesh=mesh,
            parameter_sharding=layout,
            progress=False,
        )
        losses[name] = [float(record["loss"]) for record in result.history]
    return losses


def worker(args) -> None:
    """One process of the runtime: join it, train, report the losses."""
    join(args)
    # Imported once `join` has configured JAX.
    import jax

    losses = train_layouts(args.steps)
    report(
        {
            "process": jax.process_index(),
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "losses": losses,
        }
    )


def largest_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main(argv=None):
    args = parse_args(__doc__, argv, extra=_flags)
    if args.steps is None:
        args.steps = 3 if args.smoke else 20
    if args.coordinator is not None or args.processes == 1:
        worker(args)
        return
    t0 = time.perf_counter()
    # Two processes of two devices, then one of four. One after the other: side by
    # side on a 2-core machine, a device thread of the four-device process could
    # wait past XLA's 40 s rendezvous limit for a collective, which aborts it.
    command = [os.path.abspath(__file__), "--steps", str(args.steps)]
    together = collect(start(command, 2, 2))
    (alone,) = collect(start(command, 1, 4))
    elapsed = time.perf_counter() - t0
    for result in together:
        assert result["devices"] == 4 and result["local_devices"] == 2, result
        assert result["processes"] == 2, result
    differences = {
        name: max(
            largest_relative_difference(result["losses"][name], alone["losses"][name])
            for result in together
        )
        for name in alone["losses"]
    }
    summary = {
        "processes": 2,
        "devices": 4,
        "steps": args.steps,
        "max_rel_diff_data_parallel": f"{differences['data parallel']:.1e}",
        "max_rel_diff_fsdp": f"{differences['fsdp']:.1e}",
        "final_loss": round(alone["losses"]["fsdp"][-1], 4),
        "seconds": round(elapsed, 1),
    }
    save_summary("multihost_train", summary)
    # Float32 sums over devices in another order: agreement to rounding, not bits.
    worst = max(differences.values())
    if worst > 1e-5:
        raise SystemExit(
            f"two processes and one process disagree: largest relative loss "
            f"difference {worst:.2e} (data parallel and FSDP: {differences})"
        )


if __name__ == "__main__":
    main()
