"""`benchmarks/render.py` on a small set of result files written here."""

import json
import pathlib
import re

import pytest

from .helpers import load_benchmark


NNBSP = "\u202f"  # the thin space that groups digits


@pytest.fixture(scope="module")
def render():
    return load_benchmark("render")


def _environment(platform):
    return {
        "date": "2026-01-01",
        "platform": platform,
        "device": "NVIDIA H200" if platform == "gpu" else "cpu",
        "device_count": 1,
        "cpu_count": 2,
        "python": "3.11.0",
        "versions": {"jax": "0.10.2"},
    }


def _result(benchmark, title, platform, rows, notes=()):
    return {
        "benchmark": benchmark,
        "title": title,
        "description": f"What {benchmark} measures.",
        "environment": _environment(platform),
        "rows": rows,
        "notes": list(notes),
    }


def _timing(median, **extra):
    return {"median_s": median, "min_s": median, "max_s": median, "repeats": 3, **extra}


def _chmm_row(workload, impl, median, T=1000, **extra):
    return {
        "workload": workload,
        "impl": impl,
        "N": 20,
        "T": T,
        "sequences": 1,
        "compile_s": 1.5,
        "us_per_step": 1e6 * median / T,
        **_timing(median),
        "temp_bytes": 3_000_000,
        **extra,
    }


def _ghost_sweep_row(
    workload, impl, batch, median=None, peak=None, error=None, length=64
):
    row = {
        "workload": f"batch sweep/{workload}",
        "impl": impl,
        "sizes": {"batch": batch, "length": length, "params": 1_000_000},
    }
    if error is not None:
        return {**row, "error": error}
    return {**row, "compile_s": 2.0, "peak_bytes": peak, **_timing(median)}


# Rows of `ghost.py --sweep-batch` (at T = 64, and at T = 16 up to B = 8) and
# `chmm.py --sweep-lengths`, merged into the GPU files after the full runs' rows;
# `_without_sweeps` takes them out again.
GHOST_SWEEP = (
    [
        row
        for batch in (1, 2, 4)
        for row in (
            _ghost_sweep_row(
                "train step", "plain step", batch, 0.01 * batch, 1e8 * batch
            ),
            _ghost_sweep_row(
                "per-sample norms", "per-sample norms, ghost", batch, 0.012 * batch, 9e7
            ),
        )
    ]
    + [
        _ghost_sweep_row(
            "per-sample norms", "per-sample norms, vmap(grad)", 1, 0.02, 2e8
        ),
        _ghost_sweep_row(
            "per-sample norms", "per-sample norms, vmap(grad)", 2, 0.04, 4e8
        ),
        _ghost_sweep_row(
            "per-sample norms",
            "per-sample norms, vmap(grad)",
            4,
            error="RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GB.",
        ),
    ]
    + [
        _ghost_sweep_row(workload, impl, batch, 0.003 * batch, 2e7 * batch, length=16)
        for batch in (2, 8)
        for workload, impl in (
            ("train step", "plain step"),
            ("per-sample norms", "per-sample norms, ghost"),
            ("per-sample norms", "per-sample norms, vmap(grad)"),
        )
    ]
)


def _ghost_row(workload, impl, batch, length, median, peak, **extra):
    sizes = {"batch": batch, "length": length, "params": 1_000_000}
    return {
        "workload": workload,
        "impl": impl,
        "sizes": sizes,
        "peak_bytes": peak,
        **_timing(median),
        **extra,
    }


OPACUS_NOTE = "Opacus leaves out the tied head."
# `ghost.py --regimes`: B = 16, T = 64 and B = 64, T = 16 in one file, each with its
# PyTorch peers (a failure, a peer not installed, two measured).
GHOST_REGIMES = [
    _ghost_row("train step", "(a) plain step, B", 16, 64, 0.1, 2e9),
    _ghost_row("per-sample norms", "(c) per-sample norms, ghost", 16, 64, 0.12, 1.8e9),
    {
        "workload": "per-sample norms",
        "impl": "(e) torch.func vmap(grad)",
        "sizes": {"batch": 16, "length": 64, "params": 1_000_000},
        "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB.",
    },
    {
        "workload": "per-sample norms",
        "impl": "(f) Opacus ghost clipping",
        "sizes": {"batch": 16, "length": 64, "params": 1_000_000},
        "skipped": "opacus is not installed",
    },
    _ghost_row(
        "train step",
        "(a) plain step, B",
        64,
        16,
        0.2,
        3e9,
        flops=4e12,
        accessed_bytes=5e10,
    ),
    _ghost_row(
        "per-sample norms",
        "(c) per-sample norms, ghost",
        64,
        16,
        0.1,
        2e9,
        flops=2.92e12,
        accessed_bytes=4.15e10,
    ),
    _ghost_row(
        "per-sample norms", "(d) per-sample norms, vmap(grad)", 64, 16, 0.4, 9e9
    ),
    _ghost_row(
        "per-sample norms",
        "(e) torch.func vmap(grad)",
        64,
        16,
        0.5,
        8e9,
        max_rel_diff_vs_jax=1e-3,
    ),
    _ghost_row(
        "per-sample norms",
        "(f) Opacus ghost clipping",
        64,
        16,
        0.3,
        4e9,
        max_rel_diff_vs_jax=0.02,
        note=OPACUS_NOTE,
    ),
]
CHMM_SWEEP = [
    {**_chmm_row("length sweep/forward", impl, scale * T, T=T), "N": 280}
    for T in (1000, 10_000, 100_000)
    for impl, scale in (
        ("eqx_models scan", 2e-6),
        ("eqx_models parallel", 5e-8),
        ("dynamax (transition_fn)", 8e-6),
    )
]
# Rows of `chmm.py --sweep-blocks`: the parallel passes at two block counts.
CHMM_BLOCK_SWEEP = [
    {
        **_chmm_row(f"block sweep/{workload}", "eqx_models parallel", 5e-3, T=50_000),
        "N": 280,
        "blocks": blocks,
        "steps_per_block": -(-49_999 // blocks),
        "default": blocks == 1021,
    }
    for blocks in (1021, 2048)
    for workload in ("forward", "posteriors", "gradient")
]

# Rows of `chmm.py --scale --scale-size full`: the model's memory and one streaming
# EM iteration per strategy (the parallel one over the 5 s target).
CHMM_SCALE = [
    {
        "workload": "scale-full/memory",
        "impl": "eqx_models SparseCHMM",
        "N": 10_000,
        "T": 1_000_000,
        "sequences": 1,
        "blocks": 4000,
        "model_bytes": 160_000_000,
        "dense_T_bytes": 1_600_000_000,
    },
    *(
        {
            **_chmm_row(
                "scale-full/streaming_em_iteration",
                f"eqx_models SparseCHMM {method}",
                median,
                T=1_000_000,
                chunk_size=10_000,
                peak_device_bytes=2e9,
            ),
            "N": 10_000,
            "blocks": 4000,
        }
        for method, median in (("scan", 4.2), ("parallel", 6.0))
    ),
]

FILES = {
    "chmm-gpu.json": _result(
        "chmm",
        "Cloned HMM",
        "gpu",
        [
            _chmm_row("large/forward", "eqx_models scan", 0.02, gflop_per_s=3.5),
            _chmm_row("large/forward", "eqx_models parallel", 0.005),
            _chmm_row("large/forward", "dynamax (dense)", 0.4),
            # `chmm.py`'s compile rows: lowering plus compilation, once per function.
            *(
                {
                    "workload": f"compile/large/{workload}",
                    "impl": f"eqx_models {method}",
                    "N": 280,
                    "T": 50_000,
                    "lower_s": 0.5,
                    "compile_s": seconds,
                }
                for workload, method, seconds in (
                    ("forward", "scan", 0.5),
                    ("forward", "parallel", 3.5),
                    ("posteriors", "parallel", 12.0),
                )
            ),
            *CHMM_SWEEP,
            *CHMM_BLOCK_SWEEP,
            *CHMM_SCALE,
        ],
    ),
    "chmm-cpu.json": _result(
        "chmm",
        "Cloned HMM",
        "cpu",
        [
            _chmm_row("large/forward", "eqx_models scan", 0.05, T=10_000),
            _chmm_row("large/forward", "dynamax (dense)", 0.1, T=1000),
        ],
    ),
    "causal-gpu.json": _result(
        "causal",
        "Causal surrogate",
        "gpu",
        [
            {
                "workload": "train bucket",
                "d": 5,
                "N": 100,
                "batch": 524,
                "first_step_s": 76.09,
                "step_s": 0.0557,
                "tasks_per_s": 9404.97,
            },
            {
                "workload": "train bucket",
                "d": 10,
                "N": 100,
                "batch": 262,
                "first_step_s": 68.7,
                "step_s": 0.0544,
                "tasks_per_s": 4813.3,
            },
            {
                "workload": "eval (pooled over N)",
                "d": 5,
                "target": "sink",
                "kl": 0.03,
                "top1_agreement": 0.95,
                "map_f1": 0.97,
                "exact_map_f1": 0.96,
            },
            {
                "workload": "eval (pooled over N)",
                "d": 5,
                "target": "sink",
                "precision": "bfloat16",
                "kl": 0.04,
                "top1_agreement": 0.93,
                "map_f1": 0.88,
                "exact_map_f1": 0.96,
            },
        ],
    ),
    "lm-gpu.json": _result(
        "multimodal",
        "LM training step",
        "gpu",
        [
            {
                "workload": "train step",
                "impl": "jax scan",
                "sizes": {"seq": 1024, "batch_per_device": 8},
                "tokens_per_sec": 500.0,
                "mfu": 0.4,
                "peak_bytes": 40e9,
                **_timing(16.4),
            },
            {
                "workload": "train step",
                "impl": "torch.compile",
                "sizes": {"seq": 1024, "batch_per_device": 8},
                "tokens_per_sec": 1000.0,
                "peak_bytes": 50e9,
                **_timing(8.2),
            },
        ],
    ),
    # A second file with the same title: one section, not two.
    "lm_L2048-gpu.json": _result(
        "multimodal_L2048",
        "LM training step",
        "gpu",
        [
            {
                "workload": "train step",
                "impl": "jax unrolled",
                "sizes": {"seq": 2048, "batch_per_device": 4},
                "tokens_per_sec": 900.0,
                **_timing(9.1),
            },
            {
                "workload": "train step",
                "impl": "torch.compile",
                "sizes": {"seq": 2048, "batch_per_device": 4},
                "tokens_per_sec": 600.0,
                **_timing(13.6),
            },
        ],
    ),
    "ghost-gpu.json": _result(
        "ghost", "Ghost engines", "gpu", [*GHOST_REGIMES, *GHOST_SWEEP]
    ),
    "tidhy-gpu.json": _result(
        "tidhy",
        "TiDHy",
        "gpu",
        [
            {
                "workload": "training epoch (full batch)",
                "impl": "eqx_models (make_train_step)",
                "sizes": {"windows": 10, "steps": 20},
                "iterations_per_s": 12_000.0,
                **_timing(2.0),
            },
            {
                "workload": "training epoch (full batch)",
                "impl": "torch (Python loop), extrapolated",
                "sizes": {"windows": 10, "steps": 20},
                "timed_time_steps": 4,
                "median_s": 50.0,
            },
        ],
    ),
}


def _render(render, root, files):
    results = root / "results"
    results.mkdir()
    for name, result in files.items():
        (results / name).write_text(json.dumps(result))
    out = root / "docs" / "benchmarks.md"
    out.parent.mkdir()
    render.render(str(results), str(out), str(root / "docs" / "img" / "benchmarks"))
    return out


def _without_sweeps(files):
    sweeps = GHOST_SWEEP + CHMM_SWEEP
    return {
        name: {**r, "rows": [row for row in r["rows"] if row not in sweeps]}
        for name, r in files.items()
    }


@pytest.fixture(scope="module")
def page(render, tmp_path_factory):
    return _render(render, tmp_path_factory.mktemp("render"), FILES)


@pytest.fixture(scope="module")
def page_without_sweeps(render, tmp_path_factory):
    return _render(render, tmp_path_factory.mktemp("render"), _without_sweeps(FILES))


def _tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text` as rows of cells (header first, no rule)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_units_of_rates_times_and_memory(render, page):
    text = page.read_text()
    # `tasks_per_s` is a rate, not a time: 9404.97 tasks/s, not 9.405e+06 ms.
    assert "tasks/s" in text and f"9{NNBSP}405" in text
    assert "tasks_per" not in text and "tasks per (ms)" not in text
    assert "step (ms)" in text and "55.7" in text
    assert not re.search(r"\d\.\d+e[+-]\d", text), "a number in exponent notation"
    q = render.quantity
    assert q("gflop_per_s").label == "GFLOP/s"
    assert q("gbyte_per_s").label == "GB/s"
    assert q("iterations_per_s").label == "iterations/s"
    assert q("tokens_per_sec").label == "tokens/s"
    assert q("median_s").kind == "time" and q("peak_bytes").kind == "bytes"
    assert render.time_text(0.00483) == "4.83 ms"
    assert render.time_text(2.5e-6) == "2.50 µs"
    assert render.bytes_text(31.9e9) == "31.9 GB"


def test_summary_gives_the_ratio_to_each_peer(page):
    text = page.read_text()
    summaries = [t for t in _tables(text) if t[0][:2] == ["device", "workload"]]
    ratios = {(row[2], row[3]): row[4] for t in summaries for row in t[1:]}
    # Times: dynamax 0.4 s against the parallel strategy's 0.005 s.
    assert ratios[("5.00 ms (parallel)", "dynamax (dense): 400 ms")] == "80.0× faster"
    # Different T on the CPU: compared per step (50 000 / 10 000 µs per step ... )
    per_step = [r for (ours, _), r in ratios.items() if "/step" in ours]
    assert per_step == ["20.0× faster per step"]
    # Throughput: 500 against 1000 tokens/s is half the speed.
    assert "2.00× slower" in ratios.values()
    assert "1.50× faster" in ratios.values()
    # Targets are stated and judged: the parallel strategy's 5 ms misses <= 3.5 ms.
    assert any(t[0][-1] == "target" for t in summaries)
    assert "parallel ≤ 3.50 ms: **missed**" in text
    # Compile times (lowering included) against 10 s, the scan's beside them.
    rows = {row[1]: row[2:] for t in summaries for row in t[1:]}
    assert rows["large/forward, compile time"] == [
        "4.00 s (parallel)",
        "the scan (this library): 1.00 s",
        "4.00× slower",
        "≤ 10.0 s: met",
    ]
    assert rows["large/posteriors, compile time"][0] == "12.5 s (parallel)"
    assert rows["large/posteriors, compile time"][-1] == "≤ 10.0 s: **missed**"
    # A peer that failed, or was not run, is reported without a ratio.
    assert (
        "torch.func vmap(grad): failed: OutOfMemoryError: CUDA out of memory",
        "–",
    ) in {(row[3], row[4]) for t in summaries for row in t[1:]}
    assert "Opacus ghost clipping: not run (opacus is not installed)" in text
    # The block-sparse CHMM: its memory against the dense tensor's, and the fastest
    # streaming EM iteration judged against issue 22's 5 s.
    scale = {row[1]: row[2:] for t in summaries for row in t[1:]}
    sizes = "N = 10\u202f000, T = 1\u202f000\u202f000"  # thin spaces group digits
    memory = scale[f"scale-full: model memory, {sizes}"]
    assert memory[:3] == [
        "160 MB (4000 blocks)",
        "dense transition tensor: 1.60 GB",
        "10.0× smaller",
    ]
    em = scale[f"scale-full: one streaming EM iteration, {sizes}"]
    assert em[0] == "4.20 s (scan, chunks of 10\u202f000, peak 2.00 GB)"
    assert em[-1] == "≤ 5.00 s: met"
    # The causal surrogate's bfloat16 evaluation is a row of its own.
    assert "held-out sink targets, d = 5, bfloat16" in scale


def test_ghost_summary_has_each_regime_and_peer(page):
    summaries = [
        t for t in _tables(page.read_text()) if t[0][:2] == ["device", "workload"]
    ]
    rows = [row for t in summaries for row in t[1:]]
    workloads = {row[1] for row in rows if "per-sample norms, time" in row[1]}
    assert workloads == {
        "per-sample norms, time (1.00 M params, B = 16, T = 64)",
        "per-sample norms, time (1.00 M params, B = 64, T = 16)",
    }
    ratios = {row[3]: row[4] for row in rows}
    # B = 64, T = 16: ghost 0.1 s against vmap(grad) 0.4 s, torch.func 0.5 s and
    # Opacus 0.3 s, whose norms differ by 2 % (the note says why).
    assert ratios["vmap(grad) (this library): 400 ms"] == "4.00× faster"
    assert ratios["torch.func vmap(grad): 500 ms"] == "5.00× faster"
    opacus = (
        "Opacus ghost clipping: 300 ms (norms differ by up to 2.00 %, see the note)"
    )
    assert ratios[opacus] == "3.00× faster"
    # Memory: the allocators' peaks against ghost's 2 GB footprint.
    assert ratios["torch.func vmap(grad) (allocator peak): 8.00 GB"] == (
        "4.00× less memory"
    )
    assert ratios["Opacus ghost clipping (allocator peak): 4.00 GB"] == (
        "2.00× less memory"
    )
    # XLA's work and traffic of the ghost norms beside the step's: the time ratio
    # they would give at equal efficiency.
    ours = {row[2] for row in rows if "B = 64, T = 16" in row[1]}
    assert "100 ms (ghost); work 0.73×, traffic 0.83× the step's" in ours


def test_rows_without_sizes_join_the_first_regime(render):
    legacy = {"workload": "per-sample norms", "impl": "(e) torch.func", "error": "x"}
    result = {"rows": [*GHOST_REGIMES, legacy, *GHOST_SWEEP]}
    regimes = render.ghost_regimes(result)
    assert list(regimes) == [(16, 64), (64, 16)]
    assert regimes[16, 64]["(e) torch.func"] is legacy
    assert "plain step" not in regimes[16, 64]  # sweeps are apart


def test_profile_rows_do_not_hide_the_measured_rows(render):
    # A profile row carries the label of the program it breaks down and no time.
    profile = {
        "workload": "profile",
        "impl": "(a) plain step, B",
        "sizes": {"batch": 16, "length": 64},
        "part": "model",
    }
    regimes = render.ghost_regimes({"rows": [*GHOST_REGIMES, profile]})
    assert regimes[16, 64]["(a) plain step, B"] is GHOST_REGIMES[0]


def test_peer_notes_and_skips_are_listed_once(page):
    text = page.read_text()
    assert text.count(f"Note on (f) Opacus ghost clipping: {OPACUS_NOTE}") == 1
    assert (
        "Not run: (f) Opacus ghost clipping (per-sample norms, B = 16, T = 64): "
        "opacus is not installed"
    ) in text


def test_tables_have_no_empty_columns_and_fit(render, page):
    tables = _tables(page.read_text())
    assert tables
    for table in tables:
        header, rows = table[0], table[1:]
        assert rows, f"a table without rows: {header}"
        for i, column in enumerate(header):
            assert any(row[i] for row in rows), f"empty column {column!r} in {header}"
        if header[:2] == ["device", "workload"]:
            assert len(header) <= 6
            continue
        width = sum(max(len(r[i]) for r in table) for i in range(len(header)))
        assert len(header) <= render.MAX_COLUMNS
        assert width + 3 * len(header) + 1 <= render.MAX_CHARACTERS, header


def test_one_section_per_title(page):
    headings = re.findall(r"^## (.+)$", page.read_text(), re.MULTILINE)
    assert len(headings) == len(set(headings))
    assert headings.count("LM training step") == 1
    assert set(headings) == {r["title"] for r in FILES.values()}


PLOTS = {"ghost_norms", "chmm_time_vs_length", "lm_tokens_per_s", "tidhy_epoch"}
# One figure per swept length.
GHOST_SWEEP_PLOTS = {"ghost_norms_vs_batch_T16", "ghost_norms_vs_batch_T64"}


@pytest.mark.parametrize(
    "which, expected",
    [("page", PLOTS | GHOST_SWEEP_PLOTS), ("page_without_sweeps", PLOTS)],
)
def test_plots_are_written_and_linked(request, which, expected):
    page = request.getfixturevalue(which)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())
    assert {pathlib.Path(link).stem for link in links} == expected
    for link in links:
        png = page.parent / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
        assert png.stat().st_size > 10_000


def test_captions_say_what_was_swept(page, page_without_sweeps):
    # Each plot says what it shows, and what it lacks.
    text = page_without_sweeps.read_text()
    assert "No batch-size sweep has been measured yet" in text
    assert "No sweep over T at a fixed model" in text
    text = page.read_text()
    assert "No batch-size sweep" not in text
    assert "next figures sweep the batch size, one per sequence length" in text
    assert "against the batch size at T = 16 (NVIDIA H200" in text
    # The GPU file has a sweep over T, the CPU file none.
    assert "No sweep over T at a fixed model" not in text
    assert "No sweep over T has been measured on CPU (2 cores)" in text
    assert "Out of memory on NVIDIA H200: vmap(grad) norms at B = 4." in text


def test_sweeps_are_in_the_details_not_the_summaries(page):
    tables = _tables(page.read_text())
    summaries = [t for t in tables if t[0][:2] == ["device", "workload"]]
    assert not any("sweep" in row[1] for t in summaries for row in t[1:])
    # One detail row per swept point: (implementation, T) and (implementation, B).
    rows = [row for t in tables for row in t[1:]]
    assert sum(row[0] == "length sweep/forward" for row in rows) == len(CHMM_SWEEP)
    # The block sweep: one table under its prefix, a row per (workload, blocks).
    (block_table,) = [t for t in tables if t[0][:2] == ["workload", "blocks"]]
    assert len(block_table) - 1 == len(CHMM_BLOCK_SWEEP)
    assert "Every row: workload = block sweep/…;" in page.read_text()
    assert any(f"100{NNBSP}000" in cell for row in rows for cell in row)
    # The sweep's rows have a table of their own, whose caption gives the prefix.
    text = page.read_text()
    assert "Every row: workload = batch sweep/…;" in text
    names = {"plain step", "per-sample norms, ghost", "per-sample norms, vmap(grad)"}
    swept = [row for row in rows if row[1] in names]
    assert len(swept) == len(GHOST_SWEEP) - 1  # the failure is listed apart
    assert (
        "Failed: per-sample norms, vmap(grad) (batch sweep/per-sample norms, B = 4, "
        "T = 64)"
    ) in page.read_text()


def test_square_brackets_of_messages_are_literal_outside_code(render):
    # XLA's `... [executable_name='f'] [tf-allocator-allocation-error='']` read as
    # Markdown is a reference link, which `mkdocs build --strict` refuses.
    message = "OOM [executable_name='f'] [error=''] in `x[t]`"
    expected = "OOM \\[executable_name='f'\\] \\[error=''\\] in `x[t]`"
    assert render._literal_brackets(message) == expected
    assert render._cell(message) == expected


def test_causal_inference_rows_of_either_naming_are_summarised(render):
    def inference(impl, seconds, d):
        sizes = {"d": d, "K": 3, "N": 100}
        return {"workload": "inference", "impl": impl, "sizes": sizes,
                "per_task_s": seconds}  # fmt: skip

    old = _result("causal", "Causal", "gpu", [
        inference("model", 6e-4, 20), inference("exact expert", 6e-6, 20),
    ])  # fmt: skip
    new = _result("causal", "Causal", "cpu", [
        inference("model float32", 2e-2, 20), inference("model bfloat16", 3e-2, 20),
        inference("exact expert", 2e-4, 20), inference("exact expert", 1e-3, 50),
    ])  # fmt: skip
    rows = [(c.ours, c.peer, c.ratio) for c in render._summary_causal(old)]
    assert rows == [
        ("600 µs (surrogate)", "exact expert (its teacher): 6.00 µs", "100× slower")
    ]
    rows = [(c.ours, c.ratio) for c in render._summary_causal(new)]
    # Each precision against the expert of its own sizes; d = 50 has no model row.
    assert rows == [
        ("20.0 ms (surrogate float32)", "100× slower"),
        ("30.0 ms (surrogate bfloat16)", "150× slower"),
    ]


def test_ghost_targets_are_issue_18s_for_many_short_examples(render):
    def regime(batch, length):
        return {
            "(a) plain step, B": _ghost_row(
                "train step", "(a) plain step, B", batch, length, 0.1, 2e9
            ),
            "(a) plain step, 2B": _ghost_row(
                "train step", "(a) plain step, 2B", batch, length, 0.2, 4e9
            ),
            "(c) per-sample norms, ghost": _ghost_row(
                "per-sample norms", "(c) per-sample norms, ghost", batch, length,
                0.08, 2e9,
            ),
            "(d) per-sample norms, vmap(grad)": _ghost_row(
                "per-sample norms", "(d) per-sample norms, vmap(grad)", batch, length,
                0.1, 3e9,
            ),
            "(b) attribution step, ghost": _ghost_row(
                "train step + dots", "(b) attribution step, ghost", batch, length,
                0.226, 4e9,
            ),
        }  # fmt: skip

    def targets(batch, length):
        rows = render._summary_ghost_regime("cpu", regime(batch, length))
        return [c.target for c in rows if c.target != "–"]

    # Attribution 1.13x the 2B step, norms 0.8x the B step, memory 1x the step's
    # and 0.67x vmap(grad)'s: within the first limits, outside issue 18's.
    assert targets(16, 64) == [
        "≤ 1.3× the plain step: met",
        "≤ 1.2× the plain step: met",
        "≤ 1.15× the plain 2B step: met",
    ]
    assert targets(256, 128) == [
        "≤ 0.75× the plain step: **missed**",
        "≤ 1.2× the plain step: met",
        "≤ 0.5× vmap(grad)'s: **missed**",
        "≤ 1.1× the plain 2B step: **missed**",
    ]


def test_dp_summary_sets_targets_at_issue_20s_regime_only(render):
    def step(impl, batch, median, peak):
        return _ghost_row("train step", impl, batch, 128, median, peak)

    rows = []
    for batch in (256, 64):
        rows += [
            step("(a) plain step", batch, 0.10, 1e9),
            step("(b) DP step, one_pass", batch, 0.105, 1.05e9),
            step("(c) DP step, two_pass", batch, 0.13, 1.2e9),
        ]
    rows += [
        step("(e) Opacus ghost clipping, DP step", 256, 0.21, 0.9e9),
        # A profile row names the program it breaks down and has no time of its own.
        {"workload": "profile", "impl": "(a) plain step", "part": "model",
         "sizes": {"batch": 256, "length": 128}},
        {**step("(a) plain step", 512, 0.2, 2e9), "workload": "batch sweep/train step"},
    ]  # fmt: skip
    got = [
        (c.workload, c.ratio, c.target)
        for c in render._summary_dp(_result("dp", "DP", "gpu", rows))
    ]
    assert got == [
        (
            "DP step, one pass (B = 256, T = 128)",
            "1.05× the time, 1.05× the memory",
            "time <= 1.1× (met), memory <= 1.1× (met)",
        ),
        (
            "DP step, two passes (B = 256, T = 128)",
            "1.30× the time, 1.20× the memory",
            "time <= 1.25× (**missed**), memory <= 1.1× (**missed**)",
        ),
        ("DP step (B = 256, T = 128)", "2.00× faster", "faster (met)"),
        (
            "DP step, one pass (B = 64, T = 128)",
            "1.05× the time, 1.05× the memory",
            "–",
        ),
        (
            "DP step, two passes (B = 64, T = 128)",
            "1.30× the time, 1.20× the memory",
            "–",
        ),
    ]
