"""Run every part's example and print one line per example.

Usage: `python examples/tour.py [--smoke] [--list] [--jobs N]`. Each example runs in
its own process on the CPU (or whatever JAX finds), writes its figures to
`examples/out/` and a summary that this script collects. `--smoke` passes `--smoke`
on (a run of seconds each). An example whose optional extras are not installed is
skipped, and its line names the command that installs them; `--list` prints that
plan and runs nothing.

Each example ends with one line: part, script, status, seconds and its headline
numbers. On a terminal the examples' own output (progress bars included) shows as it
runs; otherwise (a log file, a pipe, CI) it goes to `examples/out/<script>.log` and
only the tour's lines are printed, with the end of the log of an example that fails.

`--jobs N` runs up to N examples at a time (their output then always goes to the
logs); the lines still come in the order below. The multi-host example runs alone,
after the others: its processes meet at a rendezvous that XLA times out after 40 s,
which a busy machine can miss.
"""

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))

# (part, script, extras): the examples the tour knows, in the order of the README, and
# the extras of pyproject.toml that each one needs.
EXAMPLES = [
    ("training transforms", "training_basics.py", ("examples",)),
    ("cloned HMM (chmm)", "chmm_room.py", ("examples",)),
    ("cloned HMM on text (chmm, sparse)", "chmm_text.py", ("examples",)),
    ("cloned HMM in a large maze (chmm)", "chmm_maze.py", ("examples", "graph")),
    ("TiDHy", "tidhy_slds.py", ("examples",)),
    ("TiDHy sessions", "tidhy_sessions.py", ("examples",)),
    ("ghost engines", "data_attribution.py", ("examples",)),
    ("differential privacy", "dp_finetune.py", ("examples", "dp")),
    ("causal surrogate", "causal_surrogate.py", ("examples",)),
    ("causal intervention design", "causal_design.py", ("examples",)),
    ("multimodal LM", "multimodal_lm.py", ("examples",)),
    ("multi-host training (two processes)", "multihost_train.py", ()),
    ("torch interop (hybrid CHMM)", "hybrid_chmm.py", ("examples", "torch")),
]

# Examples that run alone under `--jobs` (see the module docstring).
ALONE = {"multihost_train.py"}

# extra: (the module that shows it is installed, what to know before installing it).
EXTRAS = {
    "examples": ("matplotlib", ""),
    "dp": ("dp_accounting", ""),
    "graph": ("networkx", ""),
    "torch": (
        "torch",
        "without a GPU, install a CPU build of torch first, or pip pulls the CUDA "
        "build: pip install torch --index-url https://download.pytorch.org/whl/cpu",
    ),
}


def missing_extras(extras: tuple[str, ...]) -> list[str]:
    """The extras among `extras` that are not installed.

    Looks the modules up without importing them, so that listing is cheap.
    """
    return [e for e in extras if importlib.util.find_spec(EXTRAS[e][0]) is None]


def install_command(extras: list[str]) -> str:
    """The command, run from the repository root, that installs `extras`."""
    return f'pip install -e ".[{",".join(extras)}]"'


def headline(summary: dict, n: int = 3) -> str:
    """The first `n` entries of an example's summary, as `key=value; ...`."""
    return "; ".join(f"{k}={v}" for k, v in list(summary.items())[:n])


def tail(path: str, n: int = 20) -> str:
    """The last `n` lines of the file at `path`, indented."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()[-n:]
    return "\n".join("    " + line for line in lines)


def run_example(script: str, smoke: bool, stream: bool) -> tuple[str, float, str]:
    """Run one example; return its status, wall-clock seconds and note.

    With `stream` the example writes to this process's terminal; otherwise to
    `examples/out/<script>.log`, whose tail the note holds if the example fails.
    """
    command = [sys.executable, os.path.join(HERE, script)]
    command += ["--smoke"] if smoke else []
    t0 = time.perf_counter()
    if stream:
        returncode = subprocess.run(command).returncode
        log = None
    else:
        os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
        log = os.path.join(HERE, "out", script[:-3] + ".log")
        with open(log, "w") as f:
            returncode = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT
            ).returncode
    elapsed = time.perf_counter() - t0
    if returncode != 0:
        note = f"exit {returncode}"
        if log is not None:
            note += f", log {os.path.relpath(log)}; its end:\n{tail(log)}"
        return "FAILED", elapsed, note
    summary_path = os.path.join(HERE, "out", script[:-3] + ".summary.json")
    with open(summary_path) as f:
        return "ok", elapsed, headline(json.load(f))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="fast runs (seconds)")
    parser.add_argument(
        "--list",
        action="store_true",
        help="say what would run or be skipped; run nothing",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run up to N examples at a time (default 1)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    # Widths fixed up front, so that lines printed as the examples finish line up.
    widths = [max(len(e[i]) for e in EXAMPLES) for i in (0, 1)] + [9, 8]
    stream = sys.stdout.isatty() and args.jobs == 1

    def line(part, script, status, seconds, note):
        cells = [part, script, status, seconds]
        text = "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
        return (text + "  " + note).rstrip()

    def not_run(part, script, extras):
        """The row of an example that does not run (missing, skipped, `--list`),
        else None."""
        if not os.path.exists(os.path.join(HERE, script)):
            return (part, script, "missing", "", "not written yet")
        if missing := missing_extras(extras):
            skipped.extend(e for e in missing if e not in skipped)
            note = f"needs {' and '.join(missing)}: {install_command(missing)}"
            return (part, script, "SKIPPED", "", note)
        if args.list:
            return (part, script, "would run", "", "")
        return None

    def run(script):
        if stream:
            print(f"== {script}", flush=True)
        return run_example(script, args.smoke, stream)

    rows, failed, skipped = [], [], []
    t_start = time.perf_counter()
    plan = [
        (part, script, not_run(part, script, extras))
        for part, script, extras in EXAMPLES
    ]
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    # Submitted up front, collected in order; an ALONE example waits for all of them.
    shared = {
        script: pool.submit(run, script)
        for _, script, row in plan
        if row is None and script not in ALONE
    }
    for part, script, row in plan:
        if row is None:
            if script in shared:
                status, elapsed, note = shared[script].result()
            else:
                concurrent.futures.wait(shared.values())
                status, elapsed, note = run(script)
            if status == "FAILED":
                failed.append(script)
            row = (part, script, status, f"{elapsed:6.1f} s", note)
        rows.append(row)
        if not args.list:
            print(line(*row), flush=True)
    pool.shutdown()
    if args.list:
        print("Plan (--list: nothing run)")
        for row in rows:
            print(line(*row))
    else:
        if stream:
            # The examples' own output came in between: the lines again, together.
            print("\nSummary")
            for part, script, status, seconds, note in rows:
                print(line(part, script, status, seconds, note.split("\n")[0]))
        ran = sum(r[2] in ("ok", "FAILED") for r in rows)
        print(
            f"{ran} run, {len(failed)} failed, {len(rows) - ran} not run, in "
            f"{time.perf_counter() - t_start:.0f} s; figures"
            + ("" if stream else ", summaries and logs")
            + " in examples/out/"
        )
    if skipped:
        # Skipping is not failing: the tour runs what the installed extras allow.
        command = install_command(skipped)
        print(f"Skipped (extras not installed); to run them: {command}")
        for extra in skipped:
            if EXTRAS[extra][1]:
                print(f"  ({extra}: {EXTRAS[extra][1]})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
