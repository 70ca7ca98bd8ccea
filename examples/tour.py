"""Run every part's example and print a summary table.

Usage: `python examples/tour.py [--smoke] [--list]`. Each example runs in its own
process on the CPU (or whatever JAX finds), writes its figures to `examples/out/` and a
summary that this script collects. `--smoke` passes `--smoke` on (a run of seconds
each). An example whose optional extras are not installed is skipped, and the table
names the command that installs them; `--list` prints that plan and runs nothing.
"""

import argparse
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
    ("TiDHy", "tidhy_slds.py", ("examples",)),
    ("ghost engines", "data_attribution.py", ("examples",)),
    ("causal surrogate", "causal_surrogate.py", ("examples",)),
    ("multimodal LM", "multimodal_lm.py", ("examples",)),
    ("torch interop (hybrid CHMM)", "hybrid_chmm.py", ("examples", "torch")),
]

# extra: (the module that shows it is installed, what to know before installing it).
EXTRAS = {
    "examples": ("matplotlib", ""),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="fast runs (seconds)")
    parser.add_argument(
        "--list",
        action="store_true",
        help="say what would run or be skipped; run nothing",
    )
    args = parser.parse_args(argv)
    rows, failed, skipped = [], [], []
    for part, script, extras in EXAMPLES:
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            rows.append((part, script, "missing", "", "not written yet"))
            continue
        missing = missing_extras(extras)
        if missing:
            skipped += [e for e in missing if e not in skipped]
            note = f"needs {' and '.join(missing)}: {install_command(missing)}"
            rows.append((part, script, "SKIPPED", "", note))
            continue
        if args.list:
            rows.append((part, script, "would run", "", ""))
            continue
        print(f"== {part}: {script}", flush=True)
        t0 = time.perf_counter()
        command = [sys.executable, path] + (["--smoke"] if args.smoke else [])
        result = subprocess.run(command)
        elapsed = f"{time.perf_counter() - t0:.1f} s"
        if result.returncode != 0:
            failed.append(script)
            rows.append((part, script, "FAILED", elapsed, f"exit {result.returncode}"))
            continue
        summary_path = os.path.join(HERE, "out", script[:-3] + ".summary.json")
        with open(summary_path) as f:
            summary = json.load(f)
        headline = "; ".join(f"{k}={v}" for k, v in list(summary.items())[:4])
        rows.append((part, script, "ok", elapsed, headline))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    print(
        "\nPlan (--list: nothing run)"
        if args.list
        else "\nSummary (figures in examples/out/)"
    )
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row[:4], widths)]
        print("  " + "  ".join(cells) + "  " + row[4])
    unwritten = [r[1] for r in rows if r[2] == "missing"]
    if unwritten:
        print(f"\nNot written yet: {', '.join(unwritten)}")
    if skipped:
        # Skipping is not failing: the tour runs what the installed extras allow.
        print(
            f"\nSkipped (extras not installed); to run them: {install_command(skipped)}"
        )
        for extra in skipped:
            if EXTRAS[extra][1]:
                print(f"  ({extra}: {EXTRAS[extra][1]})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
