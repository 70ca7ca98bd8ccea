"""Render `docs/benchmarks.md` from the JSON files in `benchmarks/results/`.

Usage: `python benchmarks/render.py` (after running one or more benchmarks).
"""

import glob
import json
import os


HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")

HEADER = """# Benchmarks

Every number on this page comes from a script in `benchmarks/` and its JSON file in
`benchmarks/results/`; this page is generated from those files by
`python benchmarks/render.py`. Timings are the median of repeated calls after warm-up,
with compilation timed separately and every call ended by `block_until_ready` (or
`torch.cuda.synchronize` for PyTorch peers). Peers run in the same process on the same
device. CPU numbers come from the 2-core development machine and are meaningful only
as ratios to the peer measured beside them; absolute figures are from the GPU runs.

Columns ending in (ms) are times in milliseconds, (MiB) are memory in mebibytes
(`temp` is the compiled executable's scratch memory from XLA's memory analysis,
`peak` the device allocator's high-water mark where the backend reports it).
"""


def _format(key: str, value) -> tuple[str, str]:
    if isinstance(value, dict):
        return key, ", ".join(f"{k}={v}" for k, v in value.items())
    if value is None:
        return key, "–"
    if key.endswith("_s") and isinstance(value, (int, float)):
        return f"{key[:-2]} (ms)", f"{1e3 * value:.4g}"
    if key.endswith("_bytes") and isinstance(value, (int, float)):
        return f"{key[:-6]} (MiB)", f"{value / 2**20:.4g}"
    if isinstance(value, float):
        return key, f"{value:.4g}"
    return key, str(value)


def _table(rows: list[dict]) -> str:
    columns: list[str] = []
    cells = []
    for row in rows:
        formatted = dict(_format(k, v) for k, v in row.items())
        for column in formatted:
            if column not in columns:
                columns.append(column)
        cells.append(formatted)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for formatted in cells:
        lines.append("| " + " | ".join(formatted.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def _environment(env: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return (
        f"*{env['date']} · {env['device']} ({env['platform']}, "
        f"{env['device_count']} device(s), {env['cpu_count']} CPU cores) · "
        f"Python {env['python']} · {versions}*"
    )


def render(results_dir: str = os.path.join(HERE, "results"), out: str = DOCS) -> str:
    groups: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        groups.setdefault(result["benchmark"], []).append(result)
    parts = [HEADER]
    if not groups:
        parts.append("No benchmark has been run yet.\n")
    for results in groups.values():
        # GPU results first: they carry the absolute numbers.
        results.sort(key=lambda r: r["environment"]["platform"] == "cpu")
        parts.append(f"## {results[0]['title']}\n")
        if results[0].get("description"):
            parts.append(results[0]["description"].strip() + "\n")
        for result in results:
            parts.append(f"### {result['environment']['platform'].upper()}\n")
            parts.append(_environment(result["environment"]) + "\n")
            parts.append(_table(result["rows"]) + "\n")
            for note in result.get("notes", []):
                parts.append(f"- {note}")
            if result.get("notes"):
                parts.append("")
    text = "\n".join(parts).rstrip() + "\n"
    with open(out, "w") as f:
        f.write(text)
    return out


if __name__ == "__main__":
    print(f"wrote {render()}")
