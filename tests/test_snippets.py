"""Every ```python block of README.md and docs/*.md runs.

The conventions, for whoever writes documentation:

- The blocks of one page run in order, in one fresh Python process started in an
  empty temporary directory (checkpoints land there), so a block may use what an
  earlier block of the same page defined. A failure names the page and its line.
- Blocks that need an optional extra run in a process of their own per page and
  extra, only where the extra is installed (its marker, that is `import_optional`'s
  rule: skipped without it, a failure under `EQX_MODELS_REQUIRE_OPTIONAL=1`): torch
  for blocks that import it (`import torch`, `from torch ...`, or an
  `interop.torch` import), `dp` for blocks that account for privacy
  (`dp_epsilon`, `dp_noise_multiplier`, `PrivacyBudget`). Such a block cannot use
  what the page's other blocks define.
- A block that is an illustrative fragment (it shows signatures with `...`, or needs
  files the reader has and the test has not) is preceded by the line
  `<!-- snippet: skip (the reason) -->`. Every such block is listed in `SKIPPED`
  below, so that skipping one more is a visible change to this file.
- Sizes: pages show the sizes a reader would use; `SMALLER` lists, per page, text
  replaced before running (`n_steps=1000` becomes `n_steps=3`, say) so that the whole
  test takes a minute or two on two cores. Every occurrence is replaced, and each
  entry must match somewhere in its page's blocks, so that a stale entry fails
  instead of silently doing nothing.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
)
MARKER = re.compile(r"^<!-- snippet: skip \((?P<reason>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^```python\s*$")
USES_TORCH = re.compile(
    r"^\s*(import torch|from torch\b|from [\w.]*interop\.torch import)", re.MULTILINE
)
USES_DP = re.compile(r"\b(dp_epsilon|dp_noise_multiplier|PrivacyBudget)\b")
# The extras a block may need, each with the marker that `conftest.py` maps to it.
EXTRAS = {"torch": USES_TORCH, "dp": USES_DP}


def extra_of(code: str) -> str | None:
    """The optional extra a block needs, if any."""
    return next((name for name, uses in EXTRAS.items() if uses.search(code)), None)


# (page, first line of the block): why it does not run.
SKIPPED = {
    ("docs/gpu.md", "step = make_train_step(loss_fn, optimizer, deterministic=True)"): (
        "the keyword of each trainer, arguments elided"
    ),
    ("docs/interop.md", "import equinox as eqx, jax.random as jr, torch"): (
        "needs a checkpoint of the original PyTorch model"
    ),
}

# page: [(as written, as run)]; see the module docstring.
SMALLER = {
    "README.md": [
        ("n_steps=1000,\n    key=jr.key(1),", "n_steps=4,\n    key=jr.key(1),"),
        ("checkpoint_every=100,", "checkpoint_every=2,"),
        ("room_walk(room, 20_000,", "room_walk(room, 300,"),
        ("CHMM.random([30] * 4,", "CHMM.random([3] * 4,"),
        ("n_iter=150,", "n_iter=2,"),
        ("n_iter=20)", "n_iter=2)"),
        ("system.sample(20_000,", "system.sample(400,"),
        ("n_epochs=100,", "n_epochs=1,"),
        ("windows[:100]", "windows[:4]"),
        ("for i in range(100):", "for i in range(3):"),
        ("n_steps=500,", "n_steps=2,"),
        ("n_steps, q, delta = 200,", "n_steps, q, delta = 3,"),
        ("jr.split(jr.key(3), 128)", "jr.split(jr.key(3), 8)"),
        ("make_synthetic_data(jr.key(0), 2000)", "make_synthetic_data(jr.key(0), 64)"),
        (
            "MultimodalTrainConfig(n_steps=1000, warmup_steps=50)",
            "MultimodalTrainConfig(n_steps=2)",
        ),
        ("x[64 * (i % 31) : 64 * (i % 31 + 1)]", "x[8 * (i % 8) : 8 * (i % 8 + 1)]"),
    ],
    "docs/causal.md": [
        ("n_samples=200)", "n_samples=30)"),
        ("jr.split(jr.key(0), 64)", "jr.split(jr.key(0), 4)"),
        ("n_steps=500,", "n_steps=2,"),
        ("jr.split(jr.key(2), 128)", "jr.split(jr.key(2), 8)"),
        ("n_samples=200, mechanism", "n_samples=30, mechanism"),
        ("n_steps=10_000, key=jr.key(0))", "n_steps=2, key=jr.key(0))"),
        # Each (d, N) bucket compiles a step; d = 4 enumerates 8 parent sets a node.
        ("n_vars=10,", "n_vars=4,"),
        ("rounds=5,", "rounds=2,"),
    ],
    "docs/chmm.md": [
        ("room_walk(room, 20_000,", "room_walk(room, 300,"),
        ("CHMM.random([30] * 4,", "CHMM.random([3] * 4,"),
        ("n_iter=150,", "n_iter=2,"),
        ("n_iter=20)", "n_iter=2)"),
    ],
    "docs/ghost.md": [
        ("for step_index in range(300):", "for step_index in range(3):"),
    ],
    "docs/multimodal.md": [
        (
            "make_synthetic_data(jr.key(0), 3000, fit_on=2500)",
            "make_synthetic_data(jr.key(0), 96, fit_on=80)",
        ),
        ("pad_batch(data.sequences[:2500])", "pad_batch(data.sequences[:80])"),
        ("pad_batch(data.sequences[2500:],", "pad_batch(data.sequences[80:],"),
        ("jr.fold_in(jr.key(3), i), 2500, (64,)", "jr.fold_in(jr.key(3), i), 80, (8,)"),
        ("n_steps=2000,", "n_steps=4,"),
        ("warmup_steps=100,", "warmup_steps=1,"),
        ("eval_every=100,", "eval_every=2,"),
        ("checkpoint_every=500,", "checkpoint_every=2,"),
    ],
    "docs/tidhy.md": [
        ("system.sample(20_000,", "system.sample(400,"),
        ("n_epochs=1000,", "n_epochs=1,"),
        ("checkpoint_every=50,", "checkpoint_every=1,"),
        ("system.sample(3_000,", "system.sample(300,"),
        ("length=100, stride=50", "length=10, stride=5"),
        ("chunk_size=256", "chunk_size=4"),
        ("max_iter=200)", "max_iter=20)"),
    ],
    "docs/training.md": [
        ("n_steps=2000,", "n_steps=4,"),
        ("eval_every=100,", "eval_every=2,"),
        ("checkpoint_every=500,", "checkpoint_every=2,"),
    ],
}


def blocks(page: str) -> list[dict]:
    """The ```python blocks of a page: first line number, code, skip reason."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i + 1
            end = start
            while lines[end].rstrip() != "```":
                end += 1
            previous = next((x for x in reversed(lines[:i]) if x.strip()), "")
            marker = MARKER.match(previous)
            code = "\n".join(lines[start:end])
            found.append(
                {
                    "line": start + 1,
                    "code": code,
                    "first": code.strip().splitlines()[0] if code.strip() else "",
                    "skip": marker["reason"] if marker else None,
                }
            )
            i = end
        i += 1
    return found


def _runnable(page: str, extra: str | None) -> list[dict]:
    return [
        b for b in blocks(page) if b["skip"] is None and extra_of(b["code"]) == extra
    ]


def _cases():
    cases = []
    for page in PAGES:
        for extra in (None, *EXTRAS):
            if _runnable(page, extra):
                marks = [getattr(pytest.mark, extra)] if extra else []
                name = f"{page}[{extra}]" if extra else page
                cases.append(pytest.param(page, extra, id=name, marks=marks))
    return cases


_DRIVER = textwrap.dedent(
    """
    import json, sys, traceback

    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        # Padded so that a traceback's line numbers are the page's.
        source = "\\n" * (block["line"] - 1) + block["code"]
        try:
            exec(compile(source, block["page"], "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(
                f"SNIPPET FAILED: {block['page']}, the block at line {block['line']}",
                file=sys.stderr,
            )
            sys.exit(1)
    """
)


def _shrunk(page: str, runnable: list[dict]) -> list[dict]:
    runnable = [dict(b) for b in runnable]
    for old, new in SMALLER.get(page, []):
        for b in runnable:
            b["code"] = b["code"].replace(old, new)
    return runnable


@pytest.mark.slow
@pytest.mark.parametrize("page, extra", _cases())
def test_snippets_run(page, extra, tmp_path):
    runnable = _shrunk(page, _runnable(page, extra))
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps([{**b, "page": str(ROOT / page)} for b in runnable]))
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
        "MPLBACKEND": "Agg",
    }
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run(
        [sys.executable, str(driver), str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-6000:]


def test_every_replacement_matches():
    for page, replacements in SMALLER.items():
        code = "\n".join(b["code"] for b in blocks(page) if b["skip"] is None)
        for old, _ in replacements:
            assert old in code, f"SMALLER[{page!r}]: {old!r} is not in the page"


def test_skipped_blocks_are_the_listed_ones():
    markers = {}
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        for n, line in enumerate(lines):
            if "snippet:" in line:
                assert MARKER.match(line), f"{page}:{n + 1}: malformed marker {line!r}"
                following = next((x for x in lines[n + 1 :] if x.strip()), "")
                assert FENCE.match(following), f"{page}:{n + 1}: no python block"
        for b in blocks(page):
            if b["skip"] is not None:
                markers[(page, b["first"])] = b["skip"]
    assert markers == SKIPPED
