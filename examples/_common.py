"""What every example script shares: its command line and where it writes."""

import argparse
import json
import os


OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def parse_args(description: str | None, argv=None, extra=None) -> argparse.Namespace:
    """`--smoke` (a run of seconds, used by the tour in CI) plus the script's own flags.

    `extra(parser)` may add flags.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: a run of seconds"
    )
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def out_path(name: str) -> str:
    """A path under `examples/out/` (created on demand)."""
    os.makedirs(OUT, exist_ok=True)
    return os.path.join(OUT, name)


def save_summary(example: str, summary: dict) -> None:
    """Print the example's headline numbers and store them for the tour's table."""
    for key, value in summary.items():
        print(f"  {key}: {value}")
    with open(out_path(f"{example}.summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
