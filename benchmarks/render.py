"""Render `docs/benchmarks.md` and its plots from `benchmarks/results/*.json`.

Usage: `python benchmarks/render.py` (after running one or more benchmarks). Needs
matplotlib for the plots (`pip install -e ".[examples]"`).

The page answers one question per benchmark first: how this library compares with
each peer measured on the same device in the same run, and with the target the
benchmark was written for. That summary is one short table per benchmark, built by a
function of `SUMMARIES` that knows which rows are this library's and which are peers'.
Everything else a result file holds follows in compact detail tables: rows of one kind
together, empty columns dropped, columns equal in every row stated once above the
table, and a table that would still be too wide split into several that repeat the
identifying columns. Minimum, maximum, interquartile range and repeat counts stay in
the JSON files.
"""

import dataclasses
import glob
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
IMAGES = os.path.join(os.path.dirname(HERE), "docs", "img", "benchmarks")

# A detail table holds at most this many columns and this many characters per line
# (the widest cell of each column, plus three for the separators). Measured on the
# built site (the page hides navigation and table of contents): a 150-character
# table is about 1110 px wide, and the content column of a 1400 px window 1220 px.
MAX_COLUMNS = 9
MAX_CHARACTERS = 150

# Left in the JSON files: the spread of the timings and bookkeeping. A row's `note`
# is written below its tables.
HIDDEN = frozenset({"min_s", "max_s", "iqr_s", "repeats", "device", "torch", "note"})
# Columns that say which run a row is (rather than what it measured): repeated in
# every table when a wide table is split.
IDENTITY = frozenset(
    {
        "workload",
        "impl",
        "target",
        "size",
        "d",
        "N",
        "T",
        "sequences",
        "batch",
        "seq",
        "length",
    }
)

# Workloads that sweep one size (written by `ghost.py --sweep-batch` and `dp.py
# --sweep-batch`, at one length per sweep, and `chmm.py --sweep-lengths` and
# `--sweep-blocks`): drawn in
# the plots and listed in the details, not summarised.
SWEEPS = ("batch sweep/", "length sweep/", "block sweep/", "matmul floor/")

ORDER = [
    "multimodal",
    "ghost",
    "attribution",
    "dp",
    "layer_stack",
    "chmm",
    "tidhy",
    "tidhy_pallas",
    "tidhy_pallas_tuning",
    "tidhy_stream",
    "causal",
    "causal_latency",
    "compile_options",
    "interop",
    "train_step",
    "determinism",
    "scaling",
    "sharded_memory",
]

HEADER = """\
---
hide:
  - navigation
  - toc
---

# Benchmarks

Every number on this page comes from a script in `benchmarks/` and its JSON file in
`benchmarks/results/`; the page and its plots are generated from those files by
`python benchmarks/render.py`. Timings are medians of repeated calls after warm-up,
with compilation timed separately and every call ended by `block_until_ready` (or
`torch.cuda.synchronize` for PyTorch peers). Peers run on the same device in the same
run; the PyTorch peers of the LM training step and of the ghost engines (and the JAX
runs of the former) each in a process of their own, so that none shares a memory pool
with another. CPU numbers come from a 2-core development machine and mean
something only as ratios to the peer measured beside them; absolute figures are from
the GPU runs.

How to read the summaries: **eqx-models** is this library's figure, **peer** the figure
of the implementation it is compared with in the same run, and **ratio** says how many
times faster (or slower, or lighter on memory) this library is. **Target** is the goal
the benchmark was written for, and whether this run met it. Detail tables below each
summary use the units in their headers: times in µs, ms or s, memory in MB or GB
(10⁶ and 10⁹ bytes: `temp` is the compiled executable's scratch memory from XLA's memory
analysis, `peak` the allocator's high-water mark), rates per second. The spread of the
timings (minimum, maximum, interquartile range) is in the JSON files.
"""


# ---------------------------------------------------------------------------------
# Numbers and units


def _digits(x: float, significant: int = 3) -> str:
    """`x` to `significant` digits, without an exponent from 10⁻⁶ up; numbers
    from 1000 up as integers grouped by thin spaces."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if x == 0:
        return "0"
    if isinstance(x, int) and abs(x) < 1000:
        return str(x)
    if not math.isfinite(x):
        return str(x)
    magnitude = abs(x)
    if magnitude >= 10 ** (significant - 1) and magnitude >= 1000:
        return f"{round(x):,}".replace(",", "\u202f")
    if magnitude < 1e-6:
        return f"{x:.{significant - 1}e}"
    decimals = max(0, significant - 1 - math.floor(math.log10(magnitude)))
    return f"{x:.{decimals}f}"


_TIME_UNITS = (("µs", 1e-6), ("ms", 1e-3), ("s", 1.0), ("min", 60.0))
_BYTE_UNITS = (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9))
_FLOP_UNITS = (("MFLOP", 1e6), ("GFLOP", 1e9), ("TFLOP", 1e12))


def _time_unit(seconds: float) -> tuple[str, float]:
    magnitude = abs(seconds)
    if magnitude < 1e-3:
        return _TIME_UNITS[0]
    if magnitude < 1.0:
        return _TIME_UNITS[1]
    if magnitude < 120.0:
        return _TIME_UNITS[2]
    return _TIME_UNITS[3]


def _scaled_unit(value: float, units) -> tuple[str, float]:
    chosen = units[0]
    for unit in units:
        if abs(value) >= unit[1]:
            chosen = unit
    return chosen


def time_text(seconds: float) -> str:
    """A duration with its unit chosen for it: `4.83 ms`, `1.58 µs`, `3.2 min`."""
    unit, scale = _time_unit(seconds)
    return f"{_digits(seconds / scale)} {unit}"


def bytes_text(n: float) -> str:
    """A size in bytes with its unit chosen for it: `4 B`, `31.9 GB`."""
    unit, scale = _scaled_unit(n, _BYTE_UNITS)
    if unit == "B":
        return f"{round(n)} B"
    return f"{_digits(n / scale)} {unit}"


@dataclasses.dataclass(frozen=True)
class Quantity:
    """How one JSON key is shown: its column header and the unit of its values."""

    label: str
    kind: str  # time | bytes | flops | percent | rate | ratio | plain
    unit: str = ""
    scale: float = 1.0  # multiplies the stored value into the kind's base unit


_FRACTIONS = frozenset({"scaling_efficiency"})
_RATE_UNITS = {
    "tasks": "tasks/s",
    "tokens": "tokens/s",
    "examples": "examples/s",
    "iterations": "iterations/s",
    "gflop": "GFLOP/s",
    "gbyte": "GB/s",
    "tflops": "TFLOP/s",
}
_LABELS = {
    "median": "median",
    "compile": "compile",
    "first_call": "first call",
    "first_step": "first step",
    "first_step_with_compile": "first step + compile",
    "per_task": "per task",
    "step": "step",
    "train_wall": "training wall time",
    "warm_up": "warm-up",
    "measured": "measured part",
    "temp": "temp memory",
    "argument": "arguments",
    "output": "outputs",
    "peak": "peak memory",
    "accessed": "memory traffic",
}


def quantity(key: str) -> Quantity:
    """The column header and unit of a result key.

    Keys follow the benchmark scripts' conventions: `*_s` seconds, `*_per_s` and
    `*_per_sec` rates (not times), `us_per_step` microseconds, `*_bytes` bytes,
    `*_fraction`, `mfu*` and `scaling_efficiency` fractions of one.
    """
    for suffix in ("_per_sec", "_per_s"):
        if key.endswith(suffix):
            what = key[: -len(suffix)]
            unit = _RATE_UNITS.get(what, f"{what.replace('_', ' ')}/s")
            return Quantity(unit, "rate", unit)
    if key == "us_per_step":
        return Quantity("per step", "time", scale=1e-6)
    if key.endswith("_s"):
        stem = key[:-2]
        return Quantity(_LABELS.get(stem, stem.replace("_", " ")), "time")
    if key.endswith("_bytes"):
        stem = key[:-6]
        return Quantity(_LABELS.get(stem, stem.replace("_", " ")), "bytes")
    if key == "flops":
        return Quantity("work", "flops")
    if key.startswith("flops_per_token"):
        rest = key[len("flops_per_token") :].replace("_", " ").strip()
        return Quantity(f"GFLOP/token {rest}".strip(), "plain", scale=1e-9)
    if key.endswith("_fraction") or key.startswith("mfu") or key in _FRACTIONS:
        label = key.replace("_fraction", "").replace("_", " ")
        label = "MFU" + label[3:] if label.startswith("mfu") else label
        return Quantity(f"{label} (%)", "percent", scale=100.0)
    if key == "time_ratio":
        return Quantity("time ratio (×)", "ratio")
    return Quantity(key.replace("_", " "), "plain")


def _numbers(values) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _column(q: Quantity, values: Sequence[Any]) -> tuple[str, Callable[[Any], str]]:
    """The header of a column of `values` and how to write each of its cells.

    One unit for the column, chosen from the median of its values, unless the values
    span more than a factor of 1000: then every time or size carries its own unit.
    """
    numbers = [abs(v) * q.scale for v in _numbers(values)]
    if not numbers:
        return q.label, lambda v: _cell(v, limit=60)
    if q.kind in ("time", "bytes") and min(numbers) * 1000 < max(numbers):
        own = time_text if q.kind == "time" else bytes_text
        return (
            q.label,
            lambda v: own(v * q.scale) if _numbers([v]) else _cell(v, limit=60),
        )
    typical = statistics.median(numbers)
    divisor = 1.0 / q.scale
    header = q.label
    if q.kind == "time":
        unit, scale = _time_unit(typical)
        header, divisor = f"{q.label} ({unit})", scale / q.scale
    elif q.kind in ("bytes", "flops"):
        units = _BYTE_UNITS[1:] if q.kind == "bytes" else _FLOP_UNITS
        unit, scale = _scaled_unit(typical, units)
        header, divisor = f"{q.label} ({unit})", scale
    return header, lambda v: _cell(v, divisor if _numbers([v]) else 1.0, limit=60)


def _value(key: str, value: Any) -> Any:
    """A count stored as a float (`tasks: 64.0`) as the integer it is."""
    integral = isinstance(value, float) and value.is_integer()
    return int(value) if integral and quantity(key).kind == "plain" else value


def _literal_brackets(text: str) -> str:
    """`text` with its square brackets outside code spans escaped: in a message such
    as XLA's `[executable_name='f'] [tf-allocator-allocation-error='']` Markdown
    reads `[a] [b]` as a reference link (and `mkdocs --strict` fails on it)."""
    pieces = text.split("`")
    for i in range(0, len(pieces), 2):
        pieces[i] = pieces[i].replace("[", "\\[").replace("]", "\\]")
    return "`".join(pieces)


def _cell(value: Any, divisor: float = 1.0, limit: int | None = None) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return _digits(value if divisor == 1 else value / divisor)
    if isinstance(value, dict):
        return ", ".join(f"{k} = {_cell(v)}" for k, v in value.items())
    text = str(value).replace("|", "\\|").replace("\n", " ")
    if limit is not None and len(text) > limit:
        # A long message (an error): its start is enough here; the JSON keeps the
        # rest.
        text = text[: limit - 1].rstrip() + "…"
    return _literal_brackets(text)


# ---------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass
class Table:
    """A Markdown table: header cells, rows of cells and a line stated above it."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""

    def width(self) -> int:
        """Characters of the widest line of the rendered table, as a reader sees it."""
        widths = [
            max([len(c)] + [len(r[i]) for r in self.rows])
            for i, c in enumerate(self.columns)
        ]
        return sum(widths) + 3 * len(widths) + 1

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + " --- |" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


def _flatten(row: dict) -> dict:
    """A row with its `sizes` dict spread into columns and hidden keys removed."""
    flat = {}
    for key, value in row.items():
        if key in HIDDEN:
            continue
        if key == "sizes" and isinstance(value, dict):
            for k, v in value.items():
                flat.setdefault(k, _value(k, v))
        else:
            flat[key] = _value(key, value)
    return flat


def _kind(row: dict) -> str:
    return str(row.get("workload", "")).split("/")[0]


def _build(rows: list[dict], *, hoist: bool = True) -> Table:
    """One table from flattened rows: empty columns dropped, constants hoisted."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    keys = [k for k in keys if any(row.get(k) not in (None, "") for row in rows)]
    constant = []
    if hoist and len(rows) > 1:
        for k in keys:
            values = {json.dumps(row.get(k), sort_keys=True) for row in rows}
            if len(values) == 1:
                constant.append(k)
    keys = [k for k in keys if k not in constant]
    parts = []
    if "workload" in keys and len({_kind(r) for r in rows}) == 1:
        # `large/forward` in a table of `large` rows: the prefix is the caption's.
        if any("/" in str(r["workload"]) for r in rows):
            parts.append(f"workload = {_kind(rows[0])}/…")
        rows = [{**r, "workload": str(r["workload"]).split("/", 1)[-1]} for r in rows]
    columns, cells = [], [[] for _ in rows]
    for k in keys:
        header, write = _column(quantity(k), [r.get(k) for r in rows])
        columns.append(header)
        for r, out in zip(rows, cells):
            out.append(write(r.get(k)))
    for k in constant:
        header, write = _column(quantity(k), [rows[0][k]])
        parts.append(f"{header} = {write(rows[0][k])}")
    caption = "Every row: " + "; ".join(parts) + "." if parts else ""
    return Table(columns, cells, caption)


def _fits(table: Table) -> bool:
    return len(table.columns) <= MAX_COLUMNS and table.width() <= MAX_CHARACTERS


def _split_wide(rows: list[dict]) -> list[Table]:
    """Tables of at most `MAX_COLUMNS` columns and `MAX_CHARACTERS` characters that
    together show every column of `rows`, each repeating the identifying columns."""
    table = _build(rows)
    if _fits(table):
        return [table]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    identity = [k for k in keys if k in IDENTITY or isinstance(rows[0].get(k), str)]
    measured = [k for k in keys if k not in identity]
    # Measurements of one kind stay together: times, memory, rates, the rest.
    order = {"time": 0, "bytes": 1, "flops": 2, "rate": 3, "percent": 3}
    measured.sort(key=lambda k: order.get(quantity(k).kind, 4))
    tables, chunk = [], []
    for k in measured:
        trial = _build([{i: r.get(i) for i in identity + chunk + [k]} for r in rows])
        if chunk and not _fits(trial):
            tables.append(
                _build([{i: r.get(i) for i in identity + chunk} for r in rows])
            )
            chunk = []
        chunk.append(k)
    if chunk:
        tables.append(_build([{i: r.get(i) for i in identity + chunk} for r in rows]))
    # Constant columns were stated once above the first table of the group.
    for t in tables[1:]:
        t.caption = ""
    return tables


def detail_tables(rows: list[dict]) -> list[Table]:
    """The detail tables of one result file's measured rows.

    Rows are grouped by the kind of workload (the part of `workload` before a `/`), in
    order of first appearance; groups share a table when the merged table still fits.
    Rows that record a failure (an `error`) or a peer that was not run (`skipped`)
    are left to `failures`.
    """
    groups: dict[str, list[dict]] = {}
    for row in map(_flatten, rows):
        if "error" not in row and "skipped" not in row:
            groups.setdefault(_kind(row), []).append(row)
    merged: list[list[dict]] = []
    for group in groups.values():
        if merged and _fits(_build(merged[-1] + group)):
            merged[-1] = merged[-1] + group
        else:
            merged.append(group)
    tables, singles = [], []
    for group in merged:
        if len(group) == 1 and not _fits(_build(group)):
            # One wide row reads better as a column: neighbours of this kind share
            # a table with one column each.
            singles.append(group[0])
            continue
        if singles:
            tables += _transposed(singles)
            singles = []
        tables += _split_wide(group)
    if singles:
        tables += _transposed(singles)
    return tables


def _transposed(rows: list[dict]) -> list[Table]:
    """Rows as columns: one line per key, one column per row (named by workload)."""
    names = [str(r.get("workload", "")) for r in rows]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "workload"]
    lines = []
    for k in keys:
        values = [r.get(k) for r in rows]
        if all(v in (None, "") for v in values):
            continue
        header, write = _column(quantity(k), values)
        cells = [write(v) for v in values]
        lines.append([header] + cells)
    return [Table(["quantity"] + names, lines)]


def _where(row: dict) -> str:
    """`impl (workload)`, and the batch and length of a row that records them."""
    s = row.get("sizes") or {}
    sizes = f", B = {s['batch']}, T = {s['length']}" if "length" in s else ""
    return f"{row.get('impl', '')} ({row.get('workload', '')}{sizes})"


def failures(rows: list[dict]) -> list[str]:
    """One line per row that records a failed run, or a peer not run, instead of a
    measurement."""
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"Failed: {_where(row)}: {_cell(row['error'], limit=160)}")
        elif "skipped" in row:
            lines.append(f"Not run: {_where(row)}: {_cell(row['skipped'], limit=160)}")
    return lines


def row_notes(rows: list[dict]) -> list[str]:
    """One line per note that rows carry (`note`), each note once."""
    seen: dict[str, str] = {}
    for row in rows:
        if row.get("note"):
            name = row.get("impl") or row.get("workload", "")
            seen.setdefault(str(row["note"]), str(name))
    return [f"Note on {impl}: {_cell(note)}" for note, impl in seen.items()]


# ---------------------------------------------------------------------------------
# Summaries: this library against each peer


@dataclasses.dataclass
class Comparison:
    """One line of a summary table."""

    device: str
    workload: str
    ours: str
    peer: str
    ratio: str
    target: str = "–"


SUMMARY_COLUMNS = ["device", "workload", "eqx-models", "peer (same run)", "ratio"]


def faster(ours_time: float, peer_time: float) -> str:
    """`2.5× faster` when this library takes 1/2.5 of the peer's time."""
    r = peer_time / ours_time
    return f"{_digits(r)}× faster" if r >= 1 else f"{_digits(1 / r)}× slower"


def higher_rate(ours_rate: float, peer_rate: float) -> str:
    return faster(1.0 / ours_rate, 1.0 / peer_rate)


def lighter(ours_bytes: float, peer_bytes: float) -> str:
    r = peer_bytes / ours_bytes
    if r >= 1:
        return f"{_digits(r)}× less memory"
    return f"{_digits(1 / r)}× more memory"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _device(result: dict) -> str:
    env = result["environment"]
    if env["platform"] == "cpu":
        return f"CPU ({env['cpu_count']} cores)"
    return env["device"]


def _failed(row: dict) -> str:
    first = str(row["error"]).split(".")[0]
    return f"failed: {first}"


def _is_sweep(row: dict) -> bool:
    return str(row.get("workload", "")).startswith(SWEEPS)


def _summary_chmm(result: dict) -> list[Comparison]:
    rows, out = [r for r in result["rows"] if not _is_sweep(r)], []
    gpu = result["environment"]["platform"] != "cpu"
    # Targets of the issues that commissioned the benchmark (also in the notes): on
    # a GPU, issue 19's (which tightened the first issue's 5 ms and 50 ms).
    targets = (
        {
            "large/forward": ("parallel", 3.5e-3),
            "large/posteriors": ("parallel", 10e-3),
            "large/em_iteration": ("parallel", 10e-3),
        }
        if gpu
        else {"large/forward": ("scan", 0.1)}
    )
    for peer in (r for r in rows if r["impl"].startswith("dynamax")):
        ours = [
            r
            for r in rows
            if r["workload"] == peer["workload"]
            and r["impl"].startswith("eqx_models")
            and r["N"] == peer["N"]
            and r["sequences"] == peer["sequences"]
        ]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["us_per_step"])
        strategy = best["impl"].removeprefix("eqx_models ")
        if best["T"] == peer["T"]:
            ours_text = f"{time_text(best['median_s'])} ({strategy})"
            peer_text = f"{peer['impl']}: {time_text(peer['median_s'])}"
            ratio = faster(best["median_s"], peer["median_s"])
        else:
            # Both are linear in T: compare the time per step, and say so.
            ours_text = (
                f"{time_text(best['us_per_step'] * 1e-6)}/step ({strategy}, "
                f"T = {_digits(best['T'])})"
            )
            peer_text = (
                f"{peer['impl']}: {time_text(peer['us_per_step'] * 1e-6)}/step "
                f"(T = {_digits(peer['T'])})"
            )
            ratio = faster(best["us_per_step"], peer["us_per_step"]) + " per step"
        target = "–"
        if peer["workload"] in targets:
            name, limit = targets[peer["workload"]]
            row = next(
                (r for r in ours if r["impl"] == f"eqx_models {name}"),
                None,
            )
            if row is not None:
                at = "" if row is best else f" ({time_text(row['median_s'])})"
                target = (
                    f"{name} ≤ {time_text(limit)}"
                    f"{', T = ' + _digits(row['T']) if row['T'] != peer['T'] else ''}"
                    f": {_met(row['median_s'] <= limit)}{at}"
                )
        out.append(
            Comparison(
                _device(result), peer["workload"], ours_text, peer_text, ratio, target
            )
        )
    peers = {r["workload"] for r in rows if r["impl"].startswith("dynamax")}
    for workload, (name, limit) in targets.items():
        if workload not in peers:
            out += _summary_chmm_without_peer(rows, workload, name, limit, result)
    if gpu:
        out += _summary_chmm_compile(rows, _device(result))
    return out + _summary_chmm_scale(result["rows"], _device(result))


def _summary_chmm_without_peer(
    rows: list[dict], workload: str, name: str, limit: float, result: dict
) -> list[Comparison]:
    """A targeted workload of a run without the dynamax peer: the strategy the
    target names against the scan of the same run."""
    timed = {r["impl"]: r for r in rows if r["workload"] == workload}
    row = timed.get(f"eqx_models {name}")
    if row is None:
        return []
    scan = timed.get("eqx_models scan")
    peer_text, ratio = "– (dynamax not in this run)", "–"
    if scan is not None and row is not scan:
        peer_text = f"the scan (this library): {time_text(scan['median_s'])}"
        ratio = faster(row["median_s"], scan["median_s"])
    return [
        Comparison(
            _device(result),
            workload,
            f"{time_text(row['median_s'])} ({name})",
            peer_text,
            ratio,
            f"{name} ≤ {time_text(limit)}: {_met(row['median_s'] <= limit)}",
        )
    ]


# Issue 19's target for compiling each parallel workload of the large model.
_CHMM_COMPILE_LIMIT = 10.0


def _summary_chmm_compile(rows: list[dict], device: str) -> list[Comparison]:
    """Lowering plus compilation of each parallel workload of the large model,
    against the target; the scan's, compiled in the same run, as the peer."""
    out = []
    for row in rows:
        workload = str(row["workload"])
        if not (workload.startswith("compile/large/") and "compile_s" in row):
            continue
        if row["impl"] != "eqx_models parallel":
            continue
        seconds = row["compile_s"] + row.get("lower_s", 0.0)
        scan = next(
            (
                r
                for r in rows
                if r["workload"] == workload and r["impl"] == "eqx_models scan"
            ),
            None,
        )
        peer_text, ratio = "–", "–"
        if scan is not None:
            scan_seconds = scan["compile_s"] + scan.get("lower_s", 0.0)
            peer_text = f"the scan (this library): {time_text(scan_seconds)}"
            ratio = faster(seconds, scan_seconds)
        out.append(
            Comparison(
                device,
                f"{workload.removeprefix('compile/')}, compile time",
                f"{time_text(seconds)} (parallel)",
                peer_text,
                ratio,
                f"≤ {time_text(_CHMM_COMPILE_LIMIT)}: "
                f"{_met(seconds <= _CHMM_COMPILE_LIMIT)}",
            )
        )
    return out


# Issue 22's target for one streaming EM pass over T = 10⁶ at 10⁴ clones.
_CHMM_SCALE_EM_LIMIT = 5.0


def _summary_chmm_scale(rows: list[dict], device: str) -> list[Comparison]:
    """The block-sparse model's memory against the dense tensor's, and its fastest
    streaming EM iteration against the target (full size only)."""
    out = []
    for memory in (r for r in rows if str(r["workload"]).endswith("/memory")):
        size = memory["workload"].split("/")[0]
        sizes = f"N = {_digits(memory['N'])}, T = {_digits(memory['T'])}"
        out.append(
            Comparison(
                device,
                f"{size}: model memory, {sizes}",
                f"{bytes_text(memory['model_bytes'])} ({memory['blocks']} blocks)",
                f"dense transition tensor: {bytes_text(memory['dense_T_bytes'])}",
                f"{_digits(memory['dense_T_bytes'] / memory['model_bytes'])}× smaller",
            )
        )
        passes = [
            r
            for r in rows
            if r["workload"] == f"{size}/streaming_em_iteration" and "median_s" in r
        ]
        if not passes:
            continue
        best = min(passes, key=lambda r: r["median_s"])
        method = best["impl"].rsplit(" ", 1)[-1]
        target = "–"
        if size == "scale-full":
            ok = best["median_s"] <= _CHMM_SCALE_EM_LIMIT
            target = f"≤ {time_text(_CHMM_SCALE_EM_LIMIT)}: {_met(ok)}"
        out.append(
            Comparison(
                device,
                f"{size}: one streaming EM iteration, {sizes}",
                f"{time_text(best['median_s'])} ({method}, chunks of "
                f"{_digits(best['chunk_size'])}"
                + (
                    f", {best['chunks_per_call']} per device call"
                    if isinstance(best.get("chunks_per_call"), int)
                    else ""
                )
                + (
                    f", peak {bytes_text(best['peak_device_bytes'])})"
                    if best.get("peak_device_bytes")
                    else ")"
                ),
                "–",
                "–",
                target,
            )
        )
    return out


def _ghost_size(row: dict) -> str:
    s = row.get("sizes", {})
    params = s.get("params")
    size = f"{_digits(params / 1e6)} M params, " if params else ""
    return f"{size}B = {s.get('batch')}, T = {s.get('length')}"


def ghost_regimes(result: dict) -> dict[tuple, dict[str, dict]]:
    """The rows of a ghost result outside its sweeps, by regime `(B, T)` and then
    implementation, in order of first appearance.

    A row without sizes (written before every row carried them) joins the first
    regime.
    """
    regimes: dict[tuple, dict[str, dict]] = {}
    loose = []
    for row in result["rows"]:
        # A profile row carries the label of the program it breaks down; keyed by
        # that label it would hide the measured row of that program.
        if _is_sweep(row) or row.get("workload") == "profile":
            continue
        sizes = row.get("sizes")
        if not sizes:
            loose.append(row)
            continue
        regime = (sizes.get("batch"), sizes.get("length"))
        regimes.setdefault(regime, {})[row["impl"]] = row
    if regimes:
        first = next(iter(regimes.values()))
        for row in loose:
            first.setdefault(row["impl"], row)
    return regimes


# The PyTorch peers of `ghost.py`, by the tag their rows' labels start with (older
# files spell the labels differently).
GHOST_PEERS = {"(e)": "torch.func vmap(grad)", "(f)": "Opacus ghost clipping"}


def _ghost_peers(by: dict[str, dict]) -> list[tuple[str, dict]]:
    """The PyTorch peers of a regime and their names."""
    return [
        (GHOST_PEERS[impl[:3]], row)
        for impl, row in by.items()
        if impl[:3] in GHOST_PEERS
    ]


def _ghost_peer_text(name: str, row: dict) -> tuple[str, bool]:
    """A peer's figure for the summary, and whether it has one."""
    if "error" in row:
        return f"{name}: {_failed(row)}", False
    if "skipped" in row:
        return f"{name}: not run ({row['skipped']})", False
    text = f"{name}: {time_text(row['median_s'])}"
    diff = row.get("max_rel_diff_vs_jax")
    if diff is not None and diff > 0.01:
        text += f" (norms differ by up to {_digits(100 * diff)} %, see the note)"
    return text, True


def _summary_ghost(result: dict) -> list[Comparison]:
    out = []
    for by in ghost_regimes(result).values():
        out += _summary_ghost_regime(_device(result), by)
    return out


def _work_and_traffic(row: dict, base: dict) -> str:
    """`row`'s arithmetic and memory traffic (XLA's estimates) as fractions of
    `base`'s: the ratios its time would have if both ran at the same efficiency."""
    parts = [
        f"{what} {_digits(row[key] / base[key], 2)}×"
        for key, what in (("flops", "work"), ("accessed_bytes", "traffic"))
        if row.get(key) and base.get(key)
    ]
    return f"; {', '.join(parts)} the step's" if parts else ""


class _GhostTargets(NamedTuple):
    attribution: float  # time, the attribution step / a plain step on 2B examples
    norms: float  # time, per-sample norms / a plain step on B
    norms_memory: float  # peak memory, the norms / the plain step on B
    norms_vs_vmap_memory: float | None  # peak memory, the norms / vmap(grad)'s


# Many short examples (B sequences of T tokens), where issues 18 (ghost engines) and
# 20 (DP steps) set their targets.
_TARGET_REGIME = (256, 128)

# The ghost engines' first issue set limits for every regime; issue 18 set tighter
# ones for many short examples (B = 256, T = 128), where the engines matter most.
_GHOST_TARGETS = _GhostTargets(1.15, 1.3, 1.2, None)
_GHOST_TARGETS_MANY_SHORT = _GhostTargets(1.10, 0.75, 1.2, 0.5)


def _ghost_targets(row: dict) -> _GhostTargets:
    sizes = row.get("sizes", {})
    many_short = (sizes.get("batch"), sizes.get("length")) == _TARGET_REGIME
    return _GHOST_TARGETS_MANY_SHORT if many_short else _GHOST_TARGETS


def _summary_ghost_regime(device: str, by: dict[str, dict]) -> list[Comparison]:
    plain, plain_2b = by.get("(a) plain step, B"), by.get("(a) plain step, 2B")
    norms = by.get("(c) per-sample norms, ghost")
    step = by.get("(b) attribution step, ghost")
    plain, plain_2b, norms, step = (
        r if r is not None and "median_s" in r else None
        for r in (plain, plain_2b, norms, step)
    )
    peers = _ghost_peers(by)
    out = []
    if norms is not None:
        limits = _ghost_targets(norms)
        workload = f"per-sample norms, time ({_ghost_size(norms)})"
        ours = f"{time_text(norms['median_s'])} (ghost)"
        if plain is not None:
            ratio = norms["median_s"] / plain["median_s"]
            out.append(
                Comparison(
                    device,
                    workload,
                    ours + _work_and_traffic(norms, plain),
                    f"plain training step, same batch: {time_text(plain['median_s'])}",
                    faster(norms["median_s"], plain["median_s"]),
                    f"≤ {limits.norms:g}× the plain step: "
                    f"{_met(ratio <= limits.norms)}",
                )
            )
        vmap = by.get("(d) per-sample norms, vmap(grad)")
        if vmap is not None:
            if "median_s" in vmap:
                peer = f"vmap(grad) (this library): {time_text(vmap['median_s'])}"
                ratio = faster(norms["median_s"], vmap["median_s"])
            else:
                peer, ratio = f"vmap(grad) (this library): {_failed(vmap)}", "–"
            out.append(Comparison(device, workload, ours, peer, ratio))
        for name, row in peers:
            peer, measured = _ghost_peer_text(name, row)
            ratio = faster(norms["median_s"], row["median_s"]) if measured else "–"
            out.append(Comparison(device, workload, ours, peer, ratio))
        if norms.get("peak_bytes"):
            workload = f"per-sample norms, peak memory ({_ghost_size(norms)})"
            ours = bytes_text(norms["peak_bytes"])
            if plain is not None and plain.get("peak_bytes"):
                ratio = norms["peak_bytes"] / plain["peak_bytes"]
                out.append(
                    Comparison(
                        device,
                        workload,
                        ours,
                        f"plain training step: {bytes_text(plain['peak_bytes'])}",
                        lighter(norms["peak_bytes"], plain["peak_bytes"]),
                        f"≤ {limits.norms_memory:g}× the plain step: "
                        f"{_met(ratio <= limits.norms_memory)}",
                    )
                )
            others = [("vmap(grad) (this library)", vmap)]
            others += [(f"{name} (allocator peak)", row) for name, row in peers]
            for name, row in others:
                if row is not None and row.get("peak_bytes"):
                    target = "–"
                    limit = limits.norms_vs_vmap_memory
                    if row is vmap and limit is not None:
                        ratio = norms["peak_bytes"] / row["peak_bytes"]
                        target = f"≤ {limit:g}× vmap(grad)'s: {_met(ratio <= limit)}"
                    out.append(
                        Comparison(
                            device,
                            workload,
                            ours,
                            f"{name}: {bytes_text(row['peak_bytes'])}",
                            lighter(norms["peak_bytes"], row["peak_bytes"]),
                            target,
                        )
                    )
    if step is not None:
        workload = f"attribution step ({_ghost_size(step)}, validation B)"
        ours = f"{time_text(step['median_s'])} (ghost)"
        if plain_2b is not None:
            limit = _ghost_targets(step).attribution
            ratio = step["median_s"] / plain_2b["median_s"]
            out.append(
                Comparison(
                    device,
                    workload,
                    ours + _work_and_traffic(step, plain_2b),
                    f"plain step on 2B examples: {time_text(plain_2b['median_s'])}",
                    faster(step["median_s"], plain_2b["median_s"]),
                    f"≤ {limit:g}× the plain 2B step: {_met(ratio <= limit)}",
                )
            )
        for impl, name in (
            ("(d) attribution step, vmap(grad)", "vmap(grad) (this library)"),
            ("attribution step, jvp", "jvp (this library)"),
        ):
            row = by.get(impl)
            if row is None:
                continue
            if "median_s" in row:
                peer = f"{name}: {time_text(row['median_s'])}"
                ratio = faster(step["median_s"], row["median_s"])
            else:
                peer, ratio = f"{name}: {_failed(row)}", "–"
            out.append(Comparison(device, workload, ours, peer, ratio))
    return out


def _summary_tidhy(result: dict) -> list[Comparison]:
    rows, out = result["rows"], []
    for peer in (r for r in rows if r["impl"].startswith("torch")):
        ours = next(
            (
                r
                for r in rows
                if r["workload"] == peer["workload"]
                and r["impl"].startswith("eqx_models")
            ),
            None,
        )
        if ours is None:
            continue
        s = ours.get("sizes", {})
        workload = f"{peer['workload']} ({s.get('windows')} windows × {s.get('steps')})"
        name = "PyTorch loop"
        if "extrapolated" in peer["impl"]:
            name += f" (extrapolated from {peer.get('timed_time_steps')} time steps)"
        if "iterations_per_s" in ours and "iterations_per_s" in peer:
            unit = "iterations/s"
            ours_text = f"{_digits(ours['iterations_per_s'])} {unit}"
            peer_text = f"{name}: {_digits(peer['iterations_per_s'])} {unit}"
            ratio = higher_rate(ours["iterations_per_s"], peer["iterations_per_s"])
        else:
            ours_text = time_text(ours["median_s"])
            peer_text = f"{name}: {time_text(peer['median_s'])}"
            ratio = faster(ours["median_s"], peer["median_s"])
        out.append(Comparison(_device(result), workload, ours_text, peer_text, ratio))
    return out


def _summary_multimodal(result: dict) -> list[Comparison]:
    rows, out = result["rows"], []
    peers = [r for r in rows if r["impl"].startswith("torch")]
    ours_rows = [
        r for r in rows if r["impl"].startswith("jax") and "tokens_per_sec" in r
    ]
    for peer in peers:
        s = peer.get("sizes", {})
        params = peer.get("parameters")
        workload = (
            f"training step (L = {s.get('seq')}, B = {s.get('batch_per_device')}"
            + (f", {_digits(params / 1e6)} M params" if params else "")
            + ")"
        )
        for ours in ours_rows:
            if ours.get("sizes") != peer.get("sizes"):
                continue
            mfu = f", MFU {_digits(100 * ours['mfu'])} %" if ours.get("mfu") else ""
            variant = ours["impl"].removeprefix("jax ")
            out.append(
                Comparison(
                    _device(result),
                    workload,
                    f"{_digits(ours['tokens_per_sec'])} tokens/s ({variant}{mfu})",
                    f"{peer['impl']}: {_digits(peer['tokens_per_sec'])} tokens/s",
                    higher_rate(ours["tokens_per_sec"], peer["tokens_per_sec"]),
                )
            )
    return out


def _pairs(
    result: dict, ours_prefix: str, name: str, label: Callable[[dict], str]
) -> list[Comparison]:
    """Each row whose impl starts with `ours_prefix` against the other rows of its
    workload, by median time."""
    rows, out = result["rows"], []
    for ours in (r for r in rows if r["impl"].startswith(ours_prefix)):
        for peer in rows:
            if peer is ours or peer["workload"] != ours["workload"]:
                continue
            if peer["impl"].startswith(ours_prefix):
                continue
            out.append(
                Comparison(
                    _device(result),
                    label(ours),
                    f"{time_text(ours['median_s'])} ({name})",
                    f"{peer['impl']}: {time_text(peer['median_s'])}",
                    faster(ours["median_s"], peer["median_s"]),
                )
            )
    return out


def _summary_interop(result: dict) -> list[Comparison]:
    def label(row: dict) -> str:
        s = row.get("sizes", {})
        return (
            f"CHMM log-likelihood + posteriors, forward and backward (B = "
            f"{s.get('batch')}, T = {s.get('length')}, N = {s.get('n_states')}, "
            f"{s.get('method')})"
        )

    return _pairs(result, "TorchCHMM", "TorchCHMM, called from torch", label)


def _summary_train_step(result: dict) -> list[Comparison]:
    def label(row: dict) -> str:
        s = row.get("sizes", {})
        return (
            f"MLP regression step (width {s.get('width')}, depth {s.get('depth')}, "
            f"batch {s.get('batch')})"
        )

    return _pairs(result, "make_train_step", "make_train_step", label)


def _summary_determinism(result: dict) -> list[Comparison]:
    rows, out = result["rows"], []
    for ours in rows:
        if ours["impl"] == "jax, default":
            continue
        base = next(
            (
                r
                for r in rows
                if r["workload"] == ours["workload"] and r["impl"] == "jax, default"
            ),
            None,
        )
        if base is None:
            continue
        same = "bit-identical" if ours.get("bit_identical") else "**not** identical"
        out.append(
            Comparison(
                _device(result),
                f"{ours['workload']} ("
                + ", ".join(f"{k} = {v}" for k, v in ours.get("sizes", {}).items())
                + ")",
                f"{time_text(ours['median_s'])} "
                f"({ours['impl'].removeprefix('jax, ')}; reruns {same})",
                f"default compilation: {time_text(base['median_s'])}",
                faster(ours["median_s"], base["median_s"]),
            )
        )
    return out


_CAUSAL_TARGETS = {"kl": 0.25, "top1_agreement": 0.85, "map_f1": 0.90}


def _summary_causal(result: dict) -> list[Comparison]:
    rows, out = result["rows"], []
    device = _device(result)
    for row in rows:
        if row["workload"] != "eval (pooled over N)" or row.get("target") != "sink":
            continue
        # Rows before the bfloat16 evaluation have no precision: float32.
        precision = row.get("precision", "float32")
        ok = (
            row["kl"] <= _CAUSAL_TARGETS["kl"]
            and row["top1_agreement"] >= _CAUSAL_TARGETS["top1_agreement"]
            and row["map_f1"] >= _CAUSAL_TARGETS["map_f1"]
        )
        out.append(
            Comparison(
                device,
                f"held-out sink targets, d = {row['d']}"
                + ("" if precision == "float32" else f", {precision}"),
                f"KL {_digits(row['kl'], 2)}, "
                f"top-1 {_digits(row['top1_agreement'], 2)}, "
                f"parent F1 {_digits(row['map_f1'], 2)}",
                "exact posterior's MAP set: "
                f"parent F1 {_digits(row['exact_map_f1'], 2)}",
                "–",
                f"KL ≤ 0.25, top-1 ≥ 0.85, F1 ≥ 0.9: {_met(ok)}",
            )
        )

    # "model" in older files, "model float32" and "model bfloat16" since.
    def is_model(r):
        return r["workload"] == "inference" and r["impl"].split()[0] == "model"

    for model in filter(is_model, rows):
        expert = next(
            (
                r
                for r in rows
                if r["workload"] == "inference"
                and not is_model(r)
                and r.get("sizes") == model.get("sizes")
            ),
            None,
        )
        if expert is None:
            continue
        s = model.get("sizes", {})
        out.append(
            Comparison(
                device,
                f"inference per task (d = {s.get('d')}, N = {s.get('N')}, "
                f"K = {s.get('K')})",
                f"{time_text(model['per_task_s'])} "
                f"(surrogate{model['impl'].removeprefix('model')})",
                f"{expert['impl']} (its teacher): {time_text(expert['per_task_s'])}",
                faster(model["per_task_s"], expert["per_task_s"]),
            )
        )
    return out


def _summary_dp(result: dict) -> list[Comparison]:
    """`dp.py`: each DP step against the plain step of its regime (time and memory,
    with the issue's targets, which it set for B = 256, T = 128), and the one-pass step
    against Opacus."""
    device, out = _device(result), []
    # The same grouping as the ghost benchmark's (dp.py saves through it), by tag.
    regimes = {
        regime: {impl[:3]: row for impl, row in by.items()}
        for regime, by in ghost_regimes(result).items()
    }
    for (B, T), by in regimes.items():
        plain = by.get("(a)")
        if plain is None or "median_s" not in plain:
            continue
        for tag, method in (("(b)", "one pass"), ("(c)", "two passes")):
            ours = by.get(tag)
            if ours is None or "median_s" not in ours:
                continue
            ratio = ours["median_s"] / plain["median_s"]
            limit = 1.1 if tag == "(b)" else 1.25
            text = f"{_digits(ratio)}× the time"
            target = f"time <= {limit}× ({_met(ratio <= limit)})"
            if ours.get("peak_bytes") and plain.get("peak_bytes"):
                m = ours["peak_bytes"] / plain["peak_bytes"]
                text += f", {_digits(m)}× the memory"
                target += f", memory <= 1.1× ({_met(m <= 1.1)})"
            out.append(
                Comparison(
                    device,
                    f"DP step, {method} (B = {B}, T = {T})",
                    time_text(ours["median_s"]),
                    f"plain step: {time_text(plain['median_s'])}",
                    text,
                    target if (B, T) == _TARGET_REGIME else "–",
                )
            )
        one, peer = by.get("(b)"), by.get("(e)")
        if one and peer and "median_s" in one and "median_s" in peer:
            out.append(
                Comparison(
                    device,
                    f"DP step (B = {B}, T = {T})",
                    f"{time_text(one['median_s'])} (one pass)",
                    f"Opacus ghost clipping: {time_text(peer['median_s'])}",
                    faster(one["median_s"], peer["median_s"]),
                    f"faster ({_met(one['median_s'] < peer['median_s'])})",
                )
            )
    return out


def _summary_attribution(result: dict) -> list[Comparison]:
    """`attribution.py`: projected gradients per example against a plain forward and
    backward pass (target: at most 1.5×), the queries (target: 1 000 queries against
    10⁶ rows in under 10 s) and dattri's TracIn where it ran."""
    device, out = _device(result), []
    rows = result["rows"]
    plain = next((r for r in rows if r["workload"].startswith("(a)")), None)
    for row in rows:
        tag = row["workload"].split(" ")[0]
        if tag == "(b)" and plain and "examples_per_s" in row:
            ratio = plain["examples_per_s"] / row["examples_per_s"]
            out.append(
                Comparison(
                    device,
                    f"projected gradients, k = {row['k']} ({row['dim']} per example)",
                    f"{_digits(row['examples_per_s'])} examples/s",
                    f"forward+backward: {_digits(plain['examples_per_s'])}",
                    f"{_digits(ratio)}× the time",
                    f"<= 1.5× ({_met(ratio <= 1.5)})",
                )
            )
        if tag == "(d)" and "seconds_per_1000_queries" in row:
            s = row["seconds_per_1000_queries"]
            full = row.get("rows", 0) >= 10**6
            out.append(
                Comparison(
                    device,
                    f"top-k queries over {row['rows']} rows of {row['dim']}",
                    f"{time_text(s)} per 1 000 queries",
                    "–",
                    "–",
                    f"< 10 s for 10⁶ rows ({_met(s < 10)})" if full else "–",
                )
            )
        if tag == "(e)" and "examples_per_s" in row:
            ours = next(
                (
                    r
                    for r in rows
                    if r["workload"].startswith("(b)") and r.get("k") == row.get("k")
                ),
                None,
            )
            if ours and "examples_per_s" in ours:
                out.append(
                    Comparison(
                        device,
                        f"projected gradients, k = {row['k']}",
                        f"{_digits(ours['examples_per_s'])} examples/s",
                        f"dattri TracIn: {_digits(row['examples_per_s'])}",
                        higher_rate(ours["examples_per_s"], row["examples_per_s"]),
                    )
                )
    return out


# Issue 19's targets for the causal surrogate on a GPU: a bucket's first step
# (sampler and train step, compilation included) and inference per task at d = 20,
# N = 500.
_CAUSAL_FIRST_STEP_LIMIT = 15.0
_CAUSAL_PER_TASK_LIMIT = 100e-6


def _summary_causal_latency(result: dict) -> list[Comparison]:
    """Each bucket's first step against the target, and the model's inference per
    task against the exact expert of the same run."""
    rows, device, out = result["rows"], _device(result), []
    gpu = result["environment"]["platform"] != "cpu"
    for row in rows:
        if row.get("workload") != "compile bucket":
            continue
        seconds = row["first_step_s"]
        out.append(
            Comparison(
                device,
                f"first step, bucket d = {row['d']}, N = {row['N']}",
                f"{time_text(seconds)} (XLA compiling the step "
                f"{time_text(row['step_xla_compile_s'])}, the sampler "
                f"{time_text(row['sampler_xla_compile_s'])})",
                f"a warm step: {time_text(row['step_s'])}",
                "–",
                f"≤ {time_text(_CAUSAL_FIRST_STEP_LIMIT)}: "
                f"{_met(seconds <= _CAUSAL_FIRST_STEP_LIMIT)}"
                if gpu
                else "–",
            )
        )
    inference = [r for r in rows if r.get("workload") == "inference"]
    for row in inference:
        if not row["impl"].startswith("model"):
            continue
        sizes = row.get("sizes") or {}
        expert = next(
            (
                r
                for r in inference
                if r["impl"] == "exact expert" and (r.get("sizes") or {}) == sizes
            ),
            None,
        )
        per_task = row["per_task_s"]
        target = "–"
        if gpu and sizes.get("d") == 20 and sizes.get("N") == 500:
            target = (
                f"≤ {time_text(_CAUSAL_PER_TASK_LIMIT)}: "
                f"{_met(per_task <= _CAUSAL_PER_TASK_LIMIT)}"
            )
        floors = f"roofline {time_text(row['roofline_per_task_s'])}"
        if "traffic_floor_per_task_s" in row:
            floors += f", traffic floor {time_text(row['traffic_floor_per_task_s'])}"
        out.append(
            Comparison(
                device,
                f"inference per task, d = {sizes.get('d')}, N = {sizes.get('N')}",
                f"{time_text(per_task)} ({row['impl']}, {floors})",
                "–"
                if expert is None
                else f"exact expert: {time_text(expert['per_task_s'])}",
                "–" if expert is None else faster(per_task, expert["per_task_s"]),
                target,
            )
        )
    return out


def _summary_compile_options(result: dict) -> list[Comparison]:
    """Each set of compiler options against XLA's defaults: compile and run time."""
    rows, device, out = result["rows"], _device(result), []
    default = {r["workload"]: r for r in rows if r["impl"] == "default"}
    for row in rows:
        base = default.get(row["workload"])
        if row["impl"] == "default" or base is None:
            continue
        if "error" in row or "error" in base:
            continue
        out.append(
            Comparison(
                device,
                f"{row['workload']}, {row['impl']}",
                f"compile {time_text(row['compile_s'])}, run "
                f"{time_text(row['median_s'])}",
                f"defaults: compile {time_text(base['compile_s'])}, run "
                f"{time_text(base['median_s'])}",
                f"compile {faster(row['compile_s'], base['compile_s'])}, run "
                f"{faster(row['median_s'], base['median_s'])}",
            )
        )
    return out


def _summary_layer_stack(result: dict) -> list[Comparison]:
    """`layer_stack.py`: each step unrolled against the same step rolled (time, memory
    and compile time), then each ghost pass against the plain step of the same loss
    on its examples (B, or 2B for the attribution step), per size."""
    device, out = _device(result), []
    by = {
        (row["workload"], row["impl"], _size_label(row["sizes"])): row
        for row in result["rows"]
        if "median_s" in row
    }
    for (workload, impl, size), row in by.items():
        rolled = by.get((workload, "rolled", size))
        if impl != "unrolled" or rolled is None:
            continue
        text = (
            f"time {faster(row['median_s'], rolled['median_s'])}, compile "
            f"{faster(row['compile_s'], rolled['compile_s'])}"
        )
        if row.get("peak_bytes") and rolled.get("peak_bytes"):
            text += f", {lighter(row['peak_bytes'], rolled['peak_bytes'])}"
        out.append(
            Comparison(
                device,
                f"{workload} ({size})",
                f"unrolled: {time_text(row['median_s'])}",
                f"rolled: {time_text(rolled['median_s'])}",
                text,
            )
        )
    for (workload, impl, size), row in by.items():
        if workload.startswith("plain step"):
            continue
        examples = "2B" if workload.startswith("attribution") else "B"
        # Each row names its loss's own scan (`layer_stack.SETTINGS`).
        loss = row["loss"]
        plain = by.get((f"plain step, {examples}", loss, size))
        if plain is None:
            continue
        text = f"{row['median_s'] / plain['median_s']:.2f}× the plain step's time"
        if row.get("peak_bytes") and plain.get("peak_bytes"):
            ratio = row["peak_bytes"] / plain["peak_bytes"]
            text += f", {ratio:.2f}× its peak memory"
        out.append(
            Comparison(
                device,
                f"{workload} [{impl}] vs plain step on {examples} [loss {loss}] "
                f"({size})",
                f"{impl}: {time_text(row['median_s'])}",
                f"plain step: {time_text(plain['median_s'])}",
                text,
            )
        )
    return out


def _size_label(sizes: dict) -> str:
    return (
        f"{sizes['layers']} layers, d = {sizes['dim']}, B = {sizes['batch']}, "
        f"T = {sizes['length']}"
    )


SUMMARIES: dict[str, Callable[[dict], list[Comparison]]] = {
    "causal_latency": _summary_causal_latency,
    "compile_options": _summary_compile_options,
    "attribution": _summary_attribution,
    "chmm": _summary_chmm,
    "ghost": _summary_ghost,
    "tidhy": _summary_tidhy,
    "tidhy_pallas": _summary_tidhy,
    "multimodal": _summary_multimodal,
    "multimodal_L2048": _summary_multimodal,
    "interop": _summary_interop,
    "train_step": _summary_train_step,
    "determinism": _summary_determinism,
    "causal": _summary_causal,
    "dp": _summary_dp,
    "layer_stack": _summary_layer_stack,
}


def summary_table(comparisons: Sequence[Comparison]) -> Table:
    with_target = any(c.target != "–" for c in comparisons)
    columns = SUMMARY_COLUMNS + (["target"] if with_target else [])
    rows, previous = [], ("", "")
    for c in comparisons:
        # The device and workload of a run of rows are written once, at its top.
        same = (c.device, c.workload) == previous
        row = ["", ""] if same else [c.device, c.workload]
        row += [c.ours, c.peer, c.ratio] + ([c.target] if with_target else [])
        rows.append([_cell(x) for x in row])
        previous = (c.device, c.workload)
    return Table(columns, rows)


# ---------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLOURS = {
    "eqx": "#3b5ba5",
    "eqx2": "#7fa2e0",
    "eqx3": "#a9c3ef",
    "peer": "#d1603d",
    "peer2": "#e8a33d",
    "plain": "#8c8c8c",
}


_LABEL_BOX = dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5)


@dataclasses.dataclass
class Plot:
    """A written figure and its caption."""

    path: str
    caption: str


def _results_of(groups: dict[str, list[dict]], *names: str) -> list[dict]:
    return [r for rs in groups.values() for r in rs if r["benchmark"] in names]


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_ghost(groups, img_dir: str) -> Plot | None:
    """Per-sample norms: time and peak memory relative to a plain training step."""
    points = []
    swept = set()
    for result in _results_of(groups, "ghost"):
        swept |= {
            r.get("sizes", {}).get("length") for r in result["rows"] if _is_sweep(r)
        }
        for (batch, length), by in ghost_regimes(result).items():
            plain = by.get("(a) plain step, B")
            if plain is None or "median_s" not in plain:
                continue
            peers = dict(_ghost_peers(by))
            entries = {
                "ghost (this library)": by.get("(c) per-sample norms, ghost"),
                "vmap(grad) (this library)": by.get("(d) per-sample norms, vmap(grad)"),
                **{name: peers.get(name) for name in GHOST_PEERS.values()},
            }
            sizes = plain.get("sizes", {})
            label = f"{_device(result)}\nB = {batch}, T = {length}"
            if sizes.get("params"):
                label += f"\n{_digits(sizes['params'] / 1e6)} M params"
            gpu = result["environment"]["platform"] != "cpu"
            points.append((not gpu, batch or 0, label, plain, entries))
    if not points:
        return None
    points.sort(key=lambda p: p[:2])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 3.2 * len(points)), 4.4))
    names = list(points[0][4])
    colours = [COLOURS["eqx"], COLOURS["eqx2"], COLOURS["peer"], COLOURS["peer2"]]
    width = 0.8 / len(names)
    for ax, key, title, limit_of in (
        (axes[0], "median_s", "time", lambda t: t.norms),
        (axes[1], "peak_bytes", "peak memory", lambda t: t.norms_memory),
    ):
        top = 2.0
        for i, (_, _, _, plain, entries) in enumerate(points):
            for j, (name, colour) in enumerate(zip(names, colours)):
                row = entries[name]
                x = i + (j - (len(names) - 1) / 2) * width
                if row is None:
                    continue
                if "error" in row or "skipped" in row:
                    why = _failed(row) if "error" in row else "not run"
                    ax.text(
                        x,
                        0.05,
                        f"{name}:\n{why}",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=colour,
                        rotation=90,
                    )
                    continue
                if not row.get(key) or not plain.get(key):
                    continue
                value = row[key] / plain[key]
                ax.bar(x, min(value, top), width, color=colour, label=name)
                absolute = (
                    time_text(row[key]) if key == "median_s" else bytes_text(row[key])
                )
                text = f"{_digits(value)}×, {absolute}"
                if value > top:
                    text = f"↑ {text}"
                ax.text(
                    x,
                    min(value, top) + 0.03,
                    text,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    bbox=_LABEL_BOX,
                )
        ax.axhline(1.0, color=COLOURS["plain"], lw=1, label="plain step (1×)")
        # The targets differ by regime (issue 18 set tighter ones for B = 256,
        # T = 128), so each regime gets its own dashed segment, named under it.
        ticks = []
        for i, (_, _, label, plain, _) in enumerate(points):
            limit = limit_of(_ghost_targets(plain))
            ax.hlines(
                limit, i - 0.45, i + 0.45, color="black", ls="--", lw=1, label="target"
            )
            ticks.append(f"{label}\ntarget ≤ {limit:g}×")
        ax.set_xticks(range(len(points)), ticks, fontsize=8)
        ax.set_ylim(0, top + 1.0)
        ax.set_ylabel(f"{title} / plain training step on the same batch")
        ax.set_title(f"Per-sample gradient norms: {title}")
    # One legend for both panels, under them: inside, it covered the first
    # regime's labels.
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique.update(zip(labels, handles))
    fig.tight_layout()
    fig.legend(
        unique.values(),
        unique.keys(),
        fontsize=8,
        loc="upper center",
        ncols=len(unique),
        bbox_to_anchor=(0.5, 0.0),
    )
    path = os.path.join(img_dir, "ghost_norms.png")
    _save(fig, path)
    caption = (
        "Per-sample gradient norms of a GPT (tied head) by the ghost path, by "
        "vmap(grad), by torch.func and by Opacus' ghost clipping (whose norms leave "
        "out the tied head's share), as multiples of a plain training step on the "
        "same batch, in each regime of B sequences of T tokens (grey line: 1×; "
        "dashed: each regime's target); labels give the multiple and the absolute "
        "figure, ↑ marks a bar cut at 2×. PyTorch's memory is the allocator's peak, "
        "not measured on the CPU. "
    )
    if len(swept) == 1:
        caption += "The next figure sweeps the batch size."
    elif swept:
        caption += "The next figures sweep the batch size, one per sequence length."
    else:
        caption += "No batch-size sweep has been measured yet."
    return Plot(path, caption)


def plot_ghost_sweep(groups, img_dir: str) -> list[Plot]:
    """Per-sample norms and a plain step: time and memory against the batch size, one
    figure per swept sequence length."""
    lengths: set[int] = set()
    for result in _results_of(groups, "ghost"):
        lengths |= {r["sizes"]["length"] for r in result["rows"] if _is_sweep(r)}
    return [_plot_ghost_sweep(groups, img_dir, T) for T in sorted(lengths)]


def _plot_ghost_sweep(groups, img_dir: str, length: int) -> Plot:
    def swept(row: dict) -> bool:
        return _is_sweep(row) and row["sizes"]["length"] == length

    results = [r for r in _results_of(groups, "ghost") if any(map(swept, r["rows"]))]
    results.sort(key=lambda r: r["environment"]["platform"] == "cpu")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {
        "plain step": (COLOURS["plain"], "s", "plain training step"),
        "per-sample norms, ghost": (COLOURS["eqx"], "o", "ghost norms"),
        "per-sample norms, vmap(grad)": (COLOURS["eqx2"], "^", "vmap(grad) norms"),
    }
    dashes = ["-", "--", ":"]
    batches, sizes = set(), {}
    # device -> curve name -> batch sizes that ran out of memory
    failed: dict[str, dict[str, list[int]]] = {}
    for result, ls in zip(results, dashes):
        device = _device(result)
        for impl, (colour, marker, name) in styles.items():
            rows = [r for r in result["rows"] if swept(r) and r["impl"] == impl]
            points = {}
            for row in rows:
                batch = row["sizes"]["batch"]
                sizes.setdefault(device, row["sizes"])
                if "error" in row:
                    failed.setdefault(device, {}).setdefault(name, []).append(batch)
                    continue
                points[batch] = row
            if not points:
                continue
            bs = sorted(points)
            batches |= set(bs)
            for ax, key, scale in (
                (axes[0], "median_s", 1e3),
                (axes[1], "peak_bytes", 1e-9),
            ):
                xs = [b for b in bs if points[b].get(key)]
                if xs:
                    ys = [points[b][key] * scale for b in xs]
                    ax.plot(xs, ys, color=colour, marker=marker, ls=ls, ms=6)
    for ax, ylabel, title in (
        (axes[0], "time per call (ms, log scale)", "time"),
        (axes[1], "peak memory (GB, log scale)", "peak memory"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(batches), [str(b) for b in sorted(batches)])
        ax.minorticks_off()
        ax.set_xlabel(f"batch size B (sequences of T = {length} tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Per-sample norms against batch size, T = {length}: {title}")
        ax.grid(True, which="major", alpha=0.3)
    handles = [
        Line2D([], [], color=c, marker=m, label=name) for c, m, name in styles.values()
    ]
    if len(results) > 1:
        handles += [
            Line2D([], [], color="black", ls=ls, label=_device(r))
            for r, ls in zip(results, dashes)
        ]
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    path = os.path.join(img_dir, f"ghost_norms_vs_batch_T{length}.png")
    _save(fig, path)
    described = "; ".join(
        device
        + (f": {_digits(s['params'] / 1e6)} M params" if s.get("params") else "")
        + (f", {s['compute']} compute" if s.get("compute") else "")
        for device, s in sizes.items()
    )
    caption = (
        "Per-sample gradient norms of the same GPT by the ghost path and by "
        "vmap(grad), and a plain training step on the same batch, against the batch "
        f"size at T = {length} ({described}); time per call and the compiled "
        "executable's memory footprint, both on log scales."
    )
    for device, names in failed.items():
        caption += f" Out of memory on {device}: " + "; ".join(
            f"{name} at B = {', '.join(map(str, sorted(bs)))}"
            for name, bs in names.items()
        )
        caption += "."
    return Plot(path, caption)


def plot_chmm(groups, img_dir: str) -> Plot | None:
    """CHMM forward (log-likelihood) time against sequence length."""
    results = _results_of(groups, "chmm")
    if not results:
        return None
    results.sort(key=lambda r: r["environment"]["platform"] == "cpu")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(
        1, len(results), figsize=(5.6 * len(results), 4.4), squeeze=False
    )
    colours = {
        "scan": COLOURS["eqx"],
        "parallel": COLOURS["eqx2"],
        "dynamax (dense HMM)": COLOURS["peer"],
    }
    marker_of: dict[int, str] = {}
    unswept = []
    for ax, result in zip(axes[0], results):
        # (implementation, N) -> {T: time}: a sweep's row replaces a workload's row
        # at the same T (it comes later in the file).
        series: dict[tuple[str, int], dict[int, float]] = {}
        for row in result["rows"]:
            if not row["workload"].endswith("/forward") or row.get("sequences") != 1:
                continue
            impl = row["impl"]
            if impl.startswith("dynamax"):
                name = "dynamax (dense HMM)"
            elif impl in ("eqx_models scan", "eqx_models parallel"):
                name = impl.removeprefix("eqx_models ")
            else:
                continue
            series.setdefault((name, row["N"]), {})[row["T"]] = row["median_s"]
        lengths = set()
        if all(len(points) == 1 for points in series.values()):
            unswept.append(_device(result))
        for (name, n), by_length in sorted(series.items()):
            points = sorted(by_length.items())
            marker = marker_of.setdefault(n, "os^dv"[len(marker_of) % 5])
            ts, times = zip(*points)
            lengths |= set(ts)
            ax.plot(
                ts,
                [1e3 * t for t in times],
                marker=marker,
                color=colours[name],
                ls="-" if len(points) > 1 else "none",
                ms=8,
            )
            for t, time in points:
                ax.annotate(
                    time_text(time),
                    (t, 1e3 * time),
                    xytext=(7, -3),
                    textcoords="offset points",
                    fontsize=7,
                )
        if result["environment"]["platform"] != "cpu":
            ax.axhline(5.0, color="black", ls="--", lw=1)
            ax.text(
                0.01,
                5.0,
                " target: parallel, N = 280, T = 50 000: ≤ 5 ms",
                transform=ax.get_yaxis_transform(),
                va="bottom",
                fontsize=7,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        # `50k` rather than `50 000`: neighbours of a sweep sit close on a log axis.
        ticks = sorted(lengths)
        ax.set_xticks(ticks, [f"{t / 1000:g}k" if t >= 1000 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlim(min(lengths) / 1.6, max(lengths) * 1.9)
        ax.set_xlabel("sequence length T (steps; k = 1000)")
        ax.set_ylabel("log-likelihood (forward pass) time (ms)")
        ax.set_title(f"Cloned HMM forward pass on {_device(result)}")
        ax.grid(True, which="major", alpha=0.3)
        handles = [
            Line2D([], [], color=c, marker="o", ls="none", label=name)
            for name, c in colours.items()
        ] + [
            Line2D([], [], color="grey", marker=m, ls="none", label=f"N = {n} states")
            for n, m in sorted(marker_of.items())
        ]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(img_dir, "chmm_time_vs_length.png")
    _save(fig, path)
    caption = (
        "Cloned-HMM log-likelihood time against sequence length: the sequential "
        "scan, the parallel-in-time strategy, and dynamax's HMM filter on the "
        "equivalent dense chain (one sequence; colour: implementation, marker shape: "
        "number of hidden states N). "
    )
    if len(unswept) == len(results):
        caption += (
            "No sweep over T at a fixed model has been measured yet: the points are "
            "the workloads in the result files, which differ in N as well as in T "
            "(on the CPU the parallel strategy and dynamax ran the large model at "
            "T = 5 000 only)."
        )
    elif unswept:
        caption += (
            f"No sweep over T has been measured on {' or '.join(unswept)}: its points "
            "are the workloads of its result file, which differ in N as well as in T."
        )
    return Plot(path, caption)


def plot_lm(groups, img_dir: str) -> Plot | None:
    """Multimodal LM training throughput against the PyTorch peer."""
    panels: dict[str, list[tuple[str, dict]]] = {}
    for result in _results_of(groups, "multimodal", "multimodal_L2048"):
        for row in result["rows"]:
            if "tokens_per_sec" not in row:
                continue
            seq = row.get("sizes", {}).get("seq")
            panels.setdefault(_device(result), []).append((f"L = {seq}", row))
    if not panels:
        return None
    plt = _pyplot()
    devices = sorted(panels, key=lambda d: d.startswith("CPU"))
    fig, axes = plt.subplots(
        1, len(devices), figsize=(5.2 * len(devices), 4.2), squeeze=False
    )
    impls = ["jax scan", "jax unrolled", "torch.compile"]
    colours = [COLOURS["eqx"], COLOURS["eqx2"], COLOURS["peer"]]
    names = [
        "eqx-models, scan over layers",
        "eqx-models, unrolled layers",
        "PyTorch, torch.compile",
    ]
    for ax, device in zip(axes[0], devices):
        lengths = sorted(
            {label for label, _ in panels[device]}, key=lambda s: int(s.split("= ")[1])
        )
        width = 0.8 / len(impls)
        for j, (impl, colour, name) in enumerate(zip(impls, colours, names)):
            for i, length in enumerate(lengths):
                row = next(
                    (
                        r
                        for lab, r in panels[device]
                        if lab == length and r["impl"] == impl
                    ),
                    None,
                )
                if row is None:
                    continue
                x = i + (j - 1) * width
                value = row["tokens_per_sec"] / 1e3
                ax.bar(x, value, width, color=colour, label=name)
                text = _digits(value)
                if row.get("mfu"):
                    text += f" · MFU {100 * row['mfu']:.0f} %"
                ax.text(
                    x,
                    value,
                    text,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                    bbox=_LABEL_BOX,
                )
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("training throughput (thousand tokens/s)")
        ax.set_title(f"Multimodal LM training step on {device}")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(
        unique.values(),
        unique.keys(),
        loc="lower center",
        ncol=3,
        fontsize=8,
        bbox_to_anchor=(0.5, -0.04),
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = os.path.join(img_dir, "lm_tokens_per_s.png")
    _save(fig, path)
    caption = (
        "Training throughput of the multimodal LM (forward, backward and AdamW) "
        "against the same model and loss in PyTorch with torch.compile, on the same "
        "batch in the same run; MFU against the matmul ceiling measured in that run."
    )
    return Plot(path, caption)


def plot_tidhy(groups, img_dir: str) -> Plot | None:
    """TiDHy training epoch time and inference speed against the PyTorch loop."""
    results = _results_of(groups, "tidhy")
    if not results:
        return None
    results.sort(key=lambda r: r["environment"]["platform"] == "cpu")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    extrapolated = False
    labels = []
    for i, result in enumerate(results):
        rows = result["rows"]
        labels.append(_device(result))
        for key, ax in (("training epoch", axes[0]), ("inference step", axes[1])):
            picked = [r for r in rows if r["workload"].startswith(key)]
            ours = [r for r in picked if r["impl"].startswith("eqx_models")]
            peers = [r for r in picked if r["impl"].startswith("torch")]
            for j, (row, colour, name) in enumerate(
                [(r, COLOURS["eqx"], "eqx-models (compiled)") for r in ours[:1]]
                + [(r, COLOURS["peer"], "PyTorch, Python loop") for r in peers[:1]]
            ):
                x = i + (j - 0.5) * 0.35
                if key == "training epoch":
                    value = row["median_s"]
                else:
                    value = row["iterations_per_s"]
                hatch = "//" if "extrapolated" in row["impl"] else None
                extrapolated |= hatch is not None
                ax.bar(
                    x,
                    value,
                    0.35,
                    color=colour,
                    hatch=hatch,
                    edgecolor="white" if hatch else None,
                    label=name if i == 0 else None,
                )
                text = time_text(value) if key == "training epoch" else _digits(value)
                ax.text(x, value, text, ha="center", va="bottom", fontsize=8)
    for ax, ylabel, title in (
        (
            axes[0],
            "time per training epoch (s, log scale)",
            "TiDHy training epoch (full batch)",
        ),
        (
            axes[1],
            "inference iterations per second (log scale)",
            "TiDHy latent inference (paper stopping rule)",
        ),
    ):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        ax.set_yscale("log")
        ax.margins(y=0.2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(img_dir, "tidhy_epoch.png")
    _save(fig, path)
    caption = (
        "TiDHy: one full-batch training epoch (left, lower is better) and latent "
        "inference speed (right, higher is better), eqx-models against a PyTorch "
        "implementation of the same equations with the original's Python inner loop, "
        "on the same device in the same run (the sizes differ between devices; see "
        "the tables)."
    )
    if extrapolated:
        caption += (
            " Hatched: the PyTorch epoch is extrapolated from the time steps it ran."
        )
    return Plot(path, caption)


# (benchmark, plot): each plot goes to the section of its benchmark, in this order; a
# function returns one figure, several, or none.
PLOTS: list[tuple[str, Callable[[dict, str], Plot | list[Plot] | None]]] = [
    ("ghost", plot_ghost),
    ("ghost", plot_ghost_sweep),
    ("chmm", plot_chmm),
    ("multimodal", plot_lm),
    ("tidhy", plot_tidhy),
]


# ---------------------------------------------------------------------------------
# The page


def _environment(env: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    return (
        f"*{env['date']} · {env['device']} ({env['platform']}, "
        f"{env['device_count']} device(s), {env['cpu_count']} CPU cores) · "
        f"Python {env['python']} · {versions}*"
    )


def load(results_dir: str) -> dict[str, list[dict]]:
    """Result files grouped by title (one section per title), GPU runs first."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        result["file"] = os.path.basename(path)
        groups.setdefault(result["title"], []).append(result)
    for results in groups.values():
        results.sort(key=lambda r: (r["environment"]["platform"] == "cpu", r["file"]))

    def rank(title: str) -> int:
        name = groups[title][0]["benchmark"]
        return ORDER.index(name) if name in ORDER else len(ORDER)

    return {title: groups[title] for title in sorted(groups, key=rank)}


def _plain_numbers(text: str) -> str:
    """`6.292e+05` in a note written by a script as `629 200`."""
    return re.sub(
        r"\d+(?:\.\d+)?e[+-]\d+", lambda m: _digits(float(m.group(0)), 4), text
    )


def _section(title: str, results: list[dict], plots: list[Plot], page_dir: str) -> str:
    parts = [f"## {title}\n"]
    description = next((r["description"] for r in results if r.get("description")), "")
    if description:
        parts.append(description.strip() + "\n")
    comparisons = []
    for result in results:
        summarise = SUMMARIES.get(result["benchmark"])
        if summarise is not None:
            comparisons += summarise(result)
    if comparisons:
        parts.append(summary_table(comparisons).markdown() + "\n")
    else:
        parts.append("No peer is measured in this benchmark; the figures follow.\n")
    for plot in plots:
        rel = os.path.relpath(plot.path, page_dir).replace(os.sep, "/")
        name = os.path.splitext(os.path.basename(plot.path))[0]
        parts.append(f"![{name}]({rel})\n")
        parts.append(f"*{plot.caption}*\n")
    for result in results:
        env = result["environment"]
        where = "CPU" if env["platform"] == "cpu" else env["device"]
        parts.append(f"### Details: {where}, `{result['file']}`\n")
        parts.append(_environment(env) + "\n")
        for table in detail_tables(result["rows"]):
            parts.append(table.markdown() + "\n")
        for line in failures(result["rows"]) + row_notes(result["rows"]):
            parts.append(line + "\n")
        for note in result.get("notes", []):
            parts.append(f"- {_literal_brackets(_plain_numbers(note))}")
        if result.get("notes"):
            parts.append("")
    return "\n".join(parts)


def render(
    results_dir: str = os.path.join(HERE, "results"),
    out: str = DOCS,
    img_dir: str = IMAGES,
) -> str:
    """Write the benchmarks page to `out` and its plots to `img_dir`.

    **Returns:**

    The path of the page.
    """
    groups = load(results_dir)
    os.makedirs(img_dir, exist_ok=True)
    plots: dict[str, list[Plot]] = {}
    for benchmark, draw in PLOTS:
        drawn = draw(groups, img_dir)
        if not drawn:
            continue
        for title, results in groups.items():
            if any(r["benchmark"] == benchmark for r in results):
                plots.setdefault(title, []).extend(
                    drawn if isinstance(drawn, list) else [drawn]
                )
                break
    parts = [HEADER]
    if not groups:
        parts.append("No benchmark has been run yet.\n")
    page_dir = os.path.dirname(os.path.abspath(out))
    for title, results in groups.items():
        parts.append(_section(title, results, plots.get(title, []), page_dir))
    text = "\n".join(parts).rstrip() + "\n"
    with open(out, "w") as f:
        f.write(text)
    return out


if __name__ == "__main__":
    print(f"wrote {render()}")
