"""benchmarks/_profile.py: kernel time attributed to the functions that produced it."""

import os
import re

import jax
import jax.numpy as jnp

from .helpers import load_benchmark


_profile = load_benchmark("_profile")


def _table(tmp_path, lines):
    """`_instructions` of one dumped module of these lines."""
    (tmp_path / "m.after_optimizations.txt").write_text("\n".join(lines))
    table, _ = _profile._instructions(str(tmp_path))
    return table


def _normalise(x):
    return (x - x.mean(axis=-1, keepdims=True)) * jax.lax.rsqrt(
        x.var(axis=-1, keepdims=True) + 1e-5
    )


def _project(x, w):
    return jnp.tanh(x @ w)


def _step(x, w):
    return _normalise(_project(x, w)).sum()


def test_breakdown_names_the_functions_that_spent_the_time(tmp_path):
    step = jax.jit(_step)
    x, w = jnp.ones((256, 128)), jnp.ones((128, 128))
    compiled = step.lower(x, w).compile()
    dump = tmp_path / "hlo"
    dump.mkdir()
    # What `--xla_dump_to` writes, for the module that runs.
    (dump / "module_0001.jit__step.cpu_after_optimizations.txt").write_text(
        compiled.as_text()
    )
    jax.block_until_ready(step(x, w))
    _profile.capture(lambda: step(x, w), 2, str(tmp_path / "trace"))
    here = os.path.basename(__file__)
    parts = [
        ("projection", here, ("_project",)),
        ("normalisation", here, ("_normalise",)),
    ]
    out = _profile.breakdown(str(tmp_path / "trace"), str(dump), 2, parts)
    seen = set(out["parts"])
    assert {"projection", "normalisation"} <= {p.split(":")[0] for p in seen}, seen
    total = sum(v["ms_per_step"] for v in out["parts"].values())
    assert abs(total - out["kernel_ms_per_step"]) < 1e-9
    assert all(0 <= v["share"] <= 1 for v in out["parts"].values())
    # The instructions charged the most bytes are named, by the dump's names.
    named = [k for v in out["parts"].values() for k in v["top_bytes"]]
    assert named
    text = compiled.as_text()
    assert all(f"%{k.split(' ')[0]} = " in text for k in named), named
    # The log's summary names the functions that took each part's time.
    summary = _profile.summary("(a) step", out).splitlines()
    assert (
        summary[0]
        == f"profile of (a) step: {out['kernel_ms_per_step']:.2f} ms per call"
    )
    for part, function in (("projection", "_project"), ("normalisation", "_normalise")):
        # The part itself and its ": matmul" share (on a CPU, dots are apart).
        lines = [x for x in summary if x.split(":")[0] == f"  {part}"]
        assert any(f"{here}:{function} (" in x for x in lines), summary
    # The heaviest instructions, by their dump names, heaviest first, with what
    # each fusion computes as read from its body in the dump.
    heaviest = out["heaviest"]
    assert 0 < len(heaviest) <= _profile.HEAVIEST
    times = [k["ms_per_step"] for k in heaviest]
    assert times == sorted(times, reverse=True)
    assert sum(times) <= out["kernel_ms_per_step"] + 1e-9
    for k in heaviest:
        assert f"%{k['instruction']} = " in text
        assert k["part"] in out["parts"]
    fusions = [k for k in heaviest if k["body"]]
    assert fusions, heaviest
    for k in fusions:
        called = re.search(
            rf"%{re.escape(k['instruction'])} = .*calls=%([\w.\-]+)", text
        ).group(1)
        body = text.split(f"%{called} ")[1].split("\n}")[0]
        for opcode in re.findall(r"([a-z][\w\-]*)(?:×\d+)?(?:, |$)", k["body"]):
            assert f" {opcode}(" in body, (opcode, body)
    assert summary.index("  heaviest instructions:") > 0
    assert any(f"    {heaviest[0]['instruction']} " in x for x in summary)


def test_instructions_read_tuple_results_and_operands(tmp_path):
    table = _table(
        tmp_path,
        [
            "HloModule jit_f, entry_computation_layout={()->f32[2]}",
            "",
            "ENTRY %main.1 () -> f32[2] {",
            "  %a = f32[2,3]{1,0} parameter(0)",
            "  %b = bf16[4]{0} parameter(1)",
            "  %t = (f32[2]{0}, bf16[4]{0}) fusion(%a, %b), kind=kInput, calls=%c",
            '  ROOT %g = f32[2]{0} custom-call(%a), custom_call_target="__cublas$gemm"',
            "}",
        ],
    )
    # The tuple's 8 + 8 bytes, plus its operands' 24 + 8.
    assert table[("jit_f", "t")]["kind"] == "fusion:"
    assert table[("jit_f", "t")]["bytes"] == 8 + 8 + 24 + 8
    assert table[("jit_f", "g")]["kind"] == "__cublas$gemm"
    assert table[("jit_f", "g")]["bytes"] == 8 + 24


def test_slices_and_in_place_updates_count_only_their_piece(tmp_path):
    # A scanned loop's body reads one layer of a buffer stacked over 12 layers and
    # writes one layer back in place: 1 KiB each way, not the 12 KiB buffer.
    table = _table(
        tmp_path,
        [
            "HloModule jit_g, entry_computation_layout={()->f32[12,256]}",
            "",
            "%sliced (p0: f32[12,256], p1: s32[]) -> f32[1,256] {",
            "  %p0 = f32[12,256]{1,0} parameter(0)",
            "  %p1 = s32[] parameter(1)",
            "  %z = s32[] constant(0)",
            "  %ds = f32[1,256]{1,0} dynamic-slice(%p0, %p1, %z), "
            "dynamic_slice_sizes={1,256}",
            "  ROOT %neg = f32[1,256]{1,0} negate(%ds)",
            "}",
            "",
            "%updated (q0: f32[12,256], q1: f32[1,256], q2: s32[]) -> f32[12,256], "
            'execution_thread="main" {',
            "  %q0 = f32[12,256]{1,0} parameter(0)",
            "  %q1 = f32[1,256]{1,0} parameter(1)",
            "  %q2 = s32[] parameter(2)",
            "  %z2 = s32[] constant(0)",
            "  %e = f32[1,256]{1,0} exponential(%q1)",
            "  ROOT %dus = f32[12,256]{1,0} dynamic-update-slice(%q0, %e, %q2, %z2)",
            "}",
            "",
            "ENTRY %main (a: f32[12,256], i: s32[]) -> f32[12,256] {",
            "  %a = f32[12,256]{1,0} parameter(0)",
            "  %i = s32[] parameter(1)",
            "  %s = f32[1,256]{1,0} fusion(%a, %i), kind=kLoop, calls=%sliced",
            "  ROOT %u = f32[12,256]{1,0} fusion(%a, %s, %i), kind=kLoop, "
            "calls=%updated",
            "  %d = f32[1,256]{1,0} dynamic-slice(%a, %i, %i), "
            "dynamic_slice_sizes={1,256}",
            "  %r = s32[1,1]{1,0} reshape(%i)",
            "  %sc = f32[12,256]{1,0} scatter(%a, %r, %s), update_window_dims={1}, "
            "to_apply=%add",
            "}",
        ],
    )
    layer, index = 256 * 4, 4
    # Reads one layer and the index, writes one layer.
    assert table[("jit_g", "s")]["bytes"] == layer + index + layer
    # Reads the update's input and the index; writes the update in place.
    assert table[("jit_g", "u")]["bytes"] == layer + index + layer
    assert table[("jit_g", "d")]["bytes"] == 2 * layer
    assert table[("jit_g", "sc")]["bytes"] == 2 * layer


def test_an_element_of_a_tuple_counts_alone_inside_a_fusion(tmp_path):
    # A fusion in a loop's body given the loop's whole state (a tuple) reads the
    # one element it takes, and of that only the layer it slices: 1 KiB, not the
    # 12 KiB buffer or the 4 MB of the state's other element.
    table = _table(
        tmp_path,
        [
            "HloModule jit_h, entry_computation_layout={()->f32[1,256]}",
            "",
            "%taken (t: (f32[12,256], f32[1000,1000]), i: s32[]) -> f32[1,256] {",
            "  %t = (f32[12,256]{1,0}, f32[1000,1000]{1,0}) parameter(0)",
            "  %i = s32[] parameter(1)",
            "  %g = f32[12,256]{1,0} get-tuple-element(%t), index=0",
            "  %z = s32[] constant(0)",
            "  %ds = f32[1,256]{1,0} dynamic-slice(%g, %i, %z), "
            "dynamic_slice_sizes={1,256}",
            "  ROOT %neg = f32[1,256]{1,0} negate(%ds)",
            "}",
            "",
            "ENTRY %main (s: (f32[12,256], f32[1000,1000]), i: s32[]) -> f32[1,256] {",
            "  %s = (f32[12,256]{1,0}, f32[1000,1000]{1,0}) parameter(0)",
            "  %i = s32[] parameter(1)",
            "  ROOT %f = f32[1,256]{1,0} fusion(%s, %i), kind=kLoop, calls=%taken",
            "}",
        ],
    )
    layer, index = 256 * 4, 4
    assert table[("jit_h", "f")]["bytes"] == layer + index + layer


def test_tuple_elements_named_by_index_and_bitcast_updates_count_alone(tmp_path):
    # Newer XLA (a GPU's dump) names element i of a tuple `%t#i` instead of through
    # a get-tuple-element, and updates a stacked buffer in place through bitcasts:
    # the fusion reads the 1 KiB it writes into element 1 and the index, and writes
    # 1 KiB, not the 12 KiB buffer or the 4 MB of element 2.
    table = _table(
        tmp_path,
        [
            "HloModule jit_k, entry_computation_layout={()->f32[12,256]}",
            "",
            "%into (p0: s32[], p1: f32[12,256], p2: f32[1,256]) -> f32[12,1,256] {",
            "  %p1 = f32[12,256]{1,0} parameter(1)",
            "  %b1 = f32[12,1,256]{2,1,0} bitcast(%p1)",
            "  %p2 = f32[1,256]{1,0} parameter(2)",
            "  %e = f32[1,256]{1,0} exponential(%p2)",
            "  %b2 = f32[1,1,256]{2,1,0} bitcast(%e)",
            "  %p0 = s32[] parameter(0)",
            "  %z = s32[] constant(0)",
            "  %dus = f32[12,1,256]{2,1,0} dynamic-update-slice(%b1, %b2, %p0, %z, %z)",
            "  ROOT %out = f32[12,256]{1,0} bitcast(%dus)",
            "}",
            "",
            "%nested (q: (s32[], (f32[12,256], f32[1000,1000])), i: s32[]) -> "
            "f32[1,256] {",
            "  %q = (s32[], (f32[12,256]{1,0}, f32[1000,1000]{1,0})) parameter(0)",
            "  %i = s32[] parameter(1)",
            "  %z3 = s32[] constant(0)",
            "  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%q#1#0, %i, %z3), "
            "dynamic_slice_sizes={1,256}",
            "}",
            "",
            "ENTRY %main (t: (s32[], f32[12,256], f32[1000,1000]), u: f32[1,256]) -> "
            "f32[12,256] {",
            "  %t = (s32[], f32[12,256]{1,0}, /*index=2*/f32[1000,1000]{1,0}) "
            "parameter(0)",
            "  %u = f32[1,256]{1,0} parameter(1)",
            "  ROOT %f = f32[12,256]{1,0} fusion(%t#0, %t#1, %u), kind=kLoop, "
            "calls=%into",
            "  %n = f32[1000,1000]{1,0} negate(%t#2)",
            "  %w = (s32[], (f32[256]{0}, f32[1000,1000]{1,0})) parameter(2)",
            "  %m = f32[256]{0} negate(%w#1#0)",
            "  %j = s32[] parameter(3)",
            "  %v = (s32[], (f32[12,256]{1,0}, f32[1000,1000]{1,0})) parameter(4)",
            "  %g = f32[1,256]{1,0} fusion(%v, %j), kind=kLoop, calls=%nested",
            "}",
        ],
    )
    layer, index, big = 256 * 4, 4, 1000 * 1000 * 4
    assert table[("jit_k", "f")]["bytes"] == index + layer + layer
    # An element named by index counts alone outside a fusion too, nested or not.
    assert table[("jit_k", "n")]["bytes"] == 2 * big
    assert table[("jit_k", "m")]["bytes"] == 2 * layer
    # Inside a fusion, a nested element of a tuple parameter: the layer it slices.
    assert table[("jit_k", "g")]["bytes"] == layer + index + layer


def test_elements_splits_a_tuple_at_its_top_level():
    assert _profile._elements("f32[2,3]{1,0}") == ["f32[2,3]{1,0}"]
    elements = _profile._elements("(s32[], (f32[2]{0}, bf16[4]{0}), /*index=2*/u8[3])")
    assert [e.strip() for e in elements] == [
        "s32[]",
        "(f32[2]{0}, bf16[4]{0})",
        "/*index=2*/u8[3]",
    ]


def test_a_rule_names_a_file_or_a_folder():
    assert _profile._in("/x/site-packages/optax/_src/alias.py", "optax/")
    assert not _profile._in("/x/site-packages/myoptax/alias.py", "optax/")
    assert _profile._in("/r/eqx_models/multimodal/_model.py", "multimodal/_model.py")
    assert _profile._in("/r/eqx_models/multimodal/_model.py", "multimodal/")
    assert not _profile._in("/r/eqx_models/multimodal/_model.py", "_loss.py")
    assert not _profile._in(None, "optax/")


def _twice(x, w):
    # One function called in two named scopes: only the scope tells them apart.
    with jax.named_scope("first_pass"):
        y = _project(x, w)
    with jax.named_scope("second_pass"):
        return _project(y, w).sum()


def test_a_scope_rule_separates_calls_of_one_function(tmp_path):
    step = jax.jit(jax.grad(_twice, argnums=1))
    x, w = jnp.ones((256, 128)), jnp.ones((128, 128))
    dump = tmp_path / "hlo"
    dump.mkdir()
    (dump / "module_0001.jit__twice.cpu_after_optimizations.txt").write_text(
        step.lower(x, w).compile().as_text()
    )
    jax.block_until_ready(step(x, w))
    _profile.capture(lambda: step(x, w), 2, str(tmp_path / "trace"))
    parts = [("first", "scope:first_pass", None), ("second", "scope:second_pass", None)]
    out = _profile.breakdown(str(tmp_path / "trace"), str(dump), 2, parts)
    seen = {p.split(":")[0] for p in out["parts"]}
    # The forward and the gradient's kernels of both scopes.
    assert {"first", "second"} <= seen, seen


def test_a_scope_rule_matches_whole_names_under_transformations():
    info = {"op_name": "jit(step)/transpose(jvp(first_pass))/dot_general", "file": None}
    assert _profile._matches(info, "scope:first_pass", None)
    assert not _profile._matches(info, "scope:first", None)
    assert not _profile._matches(info, "scope:pass", None)


def test_an_impossible_bandwidth_is_left_out_and_its_bytes_named(monkeypatch):
    harness = load_benchmark("_harness")
    part = {"ms_per_step": 1.0, "share": 0.5, "kernels_per_step": 2.0, "top": {}}
    out = {
        "kernel_ms_per_step": 2.0,
        "unmatched_ms_per_step": {},
        "heaviest": [],
        "parts": {
            "model": dict(
                part, gb_per_s=3e5, top_bytes={"fusion.3 (fusion:kLoop)": 3e11}
            ),
            "optimizer": dict(part, gb_per_s=900.0, top_bytes={}),
        },
        "ambiguous_modules": ["jit__lambda"],
    }
    monkeypatch.setattr(_profile, "capture", lambda run, steps, trace_dir: None)
    monkeypatch.setattr(_profile, "breakdown", lambda *args: out)
    results = harness.Results("t", "T")
    _profile.add_rows(results, "(a) step", lambda: None, "dump", [])
    rows = {r["part"]: r for r in results.rows}
    assert rows["model"]["gb_per_s"] is None
    assert rows["optimizer"]["gb_per_s"] == 900.0
    assert results.notes == [
        "(a) step, model: achieved bandwidth left out; the bytes charged to its "
        "kernels give 300 TB/s, more than any device's memory moves. Most bytes per "
        "call: fusion.3 (fusion:kLoop): 300 GB.",
        "(a) step: the kernels of jit__lambda are under 'other': several programs "
        "of the process compiled to modules of that name, and a kernel names its "
        "module only by name.",
    ]


def test_modules_of_one_name_are_left_out_and_named_programs_are_not(tmp_path):
    # Two programs from functions of one name (here: lambdas), as ghost.py's norms
    # by two routes were: their modules cannot be told apart by a kernel's
    # `hlo_module`, so their kernels go to "other" and the breakdown says why.
    x, w = jnp.ones((64, 32)), jnp.ones((32, 32))
    first = jax.jit(lambda x, w: _step(x, w))
    second = jax.jit(lambda x, w: _project(x, w).sum())
    mine = jax.jit(_profile.named(_step, "(a) step, B = 64"))
    dump = tmp_path / "hlo"
    dump.mkdir()
    names = []
    # `mine` twice: the same program compiled again dumps the same text.
    for i, fn in enumerate((first, second, mine, mine)):
        compiled = fn.lower(x, w).compile()
        name = re.search(r"^HloModule\s+([\w.\-]+)", compiled.as_text(), re.M)[1]
        names.append(name)
        (dump / f"module_{i:04d}.{name}.cpu_after_optimizations.txt").write_text(
            compiled.as_text()
        )
    assert names[0] == names[1] == "jit__lambda"
    assert names[2] == names[3]
    assert names[2].startswith("jit_profiled_") and names[2].endswith("_a_step_B_64")
    table, ambiguous = _profile._instructions(str(dump))
    assert ambiguous == {"jit__lambda"}
    assert {module for module, _ in table} == {names[2]}

    for fn in (first, mine):
        jax.block_until_ready(fn(x, w))
    _profile.capture(lambda: (first(x, w), mine(x, w)), 2, str(tmp_path / "trace"))
    here = os.path.basename(__file__)
    parts = [("step", here, ("_step", "_project", "_normalise"))]
    out = _profile.breakdown(str(tmp_path / "trace"), str(dump), 2, parts)
    assert out["ambiguous_modules"] == ["jit__lambda"]
    assert any(p.startswith("step") for p in out["parts"]), out["parts"]
