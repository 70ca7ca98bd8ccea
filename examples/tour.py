"""Run every part's example and print a summary table.

Usage: `python examples/tour.py [--smoke]`. Each example runs in its own process on
the CPU (or whatever JAX finds), writes its figures to `examples/out/` and a summary
that this script collects. `--smoke` passes `--smoke` on (a run of seconds each).
"""

import argparse
import json
import os
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))

# (part, script): the examples the tour knows, in the order of the README.
EXAMPLES = [
    ("training transforms", "training_basics.py"),
    ("cloned HMM (chmm)", "chmm_room.py"),
    ("TiDHy", "tidhy_slds.py"),
    ("ghost engines", "data_attribution.py"),
    ("causal surrogate", "causal_surrogate.py"),
    ("multimodal LM", "multimodal_lm.py"),
    ("torch interop (hybrid CHMM)", "hybrid_chmm.py"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="fast runs (seconds)")
    args = parser.parse_args(argv)
    rows, failed = [], []
    for part, script in EXAMPLES:
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            rows.append((part, script, "missing", "", "not written yet"))
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
    print("\nSummary (figures in examples/out/)")
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row[:4], widths)]
        print("  " + "  ".join(cells) + "  " + row[4])
    missing = [r[1] for r in rows if r[2] == "missing"]
    if missing:
        print(f"\nNot written yet: {', '.join(missing)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
