"""Several processes that form one JAX runtime, on this machine: the flags a
worker takes, how it joins the runtime, and how a launcher starts the workers
and collects what each reports.

A worker is any script that adds `add_flags` to its parser, calls `join` before
creating an array and prints its report with `report`. `start` runs one copy per
process with the coordinator's address and that process's index; `collect`
waits for all of them and returns their reports. The multi-host example and the
multi-process tests both run on it.
"""

import json
import os
import socket
import subprocess
import sys


RESULT = "RESULT "  # the prefix of the line a worker prints its report on


def add_flags(parser) -> None:
    """The flags that place a worker in the runtime."""
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="run on this many CPU devices per process (no accelerator)",
    )


def join(args) -> None:
    """Configure JAX and join the runtime that `args` (from `add_flags`) names;
    call it before anything creates an array."""
    import jax

    if args.cpu_devices is not None:
        # Before the runtime starts: fake CPU devices, and collectives between
        # processes over gloo (the CPU backend has none by default).
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.processes > 1:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=120,
        )


def report(result: dict) -> None:
    """Print a worker's result (JSON) for `collect`."""
    print(RESULT + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(
    command: list[str],
    processes: int,
    devices_per_process: int,
    *,
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    """Start `processes` workers of `devices_per_process` CPU devices on this
    machine (one runtime when `processes > 1`); `collect` their reports.

    **Arguments:**

    - `command`: what follows `python` for every worker (a script and its own
        arguments, or `-c` and source); each gets `add_flags`' flags appended.
    - `processes`, `devices_per_process`: the runtime's shape.
    - `env`: variables to set in the workers' environment besides this one's.
    """
    port = _free_port()
    # CPU devices, also on a machine with a GPU (which JAX would pick first).
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    # Small programs: XLA's optimisations would cost more time than they save.
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    )
    workers = []
    for i in range(processes):
        flags = ["--processes", str(processes), "--process-id", str(i)]
        flags += ["--cpu-devices", str(devices_per_process)]
        flags += ["--coordinator", f"localhost:{port}"]
        workers.append(
            subprocess.Popen(
                [sys.executable, *command, *flags],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return workers


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"a process printed no result; its output ends:\n{output}")
    return json.loads(lines[-1][len(RESULT) :])


def collect(workers: list[subprocess.Popen], timeout: float = 300) -> list[dict]:
    """The reports of the workers `start` returned, once all have ended.

    **Raises:**

    `RuntimeError` naming the first process that failed or printed no report,
    with the end of its output; `subprocess.TimeoutExpired` if one runs past
    `timeout` seconds. Either way no worker is left running.
    """
    outputs = []
    try:
        for process in workers:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        # A worker that failed leaves the others waiting for it: end them.
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    for i, (process, output) in enumerate(zip(workers, outputs)):
        if process.returncode != 0:
            raise RuntimeError(
                f"process {i} of {len(workers)} exited with {process.returncode}; "
                f"its output ends:\n{output[-3000:]}"
            )
    return [_result(output) for output in outputs]
