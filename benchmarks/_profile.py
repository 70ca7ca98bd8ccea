"""Where a compiled step's device time goes: a profiler trace read against XLA's
optimised HLO.

`capture(run, steps, trace_dir)` records a `jax.profiler` trace (with a perfetto
JSON) of `steps` calls of `run`. `breakdown(trace_dir, dump_dir, steps, ...)` reads
the device kernels of that trace and the optimised HLO that XLA dumped for the same
process (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`, set by the caller
before JAX starts: see `dump_flags`) and sums kernel time per part of the model:

- each kernel names the HLO instruction it runs (`hlo_op`, `hlo_module`); the
  instruction's line in the dump gives its kind (a matmul custom call or GEMM
  fusion, cuDNN attention, other fusions), its operand and result shapes (the bytes
  it reads and writes) and its source location (`source_file`, `source_line`);
- the source location names the function it came from (read from the file with
  `ast`), which is mapped to a part by `parts`, a list of
  `(part, file, function names or None)` rules tried in order, where `file` is the
  end of a path (`"multimodal/_model.py"`) or a folder (`"optax/"`), or
  `"scope:NAME"`: the instruction was traced inside `jax.named_scope(NAME)` (its
  `op_name`; for code whose parts share functions, such as two attentions);
- per part: milliseconds per step, share of the step's kernel time, and achieved
  bandwidth (bytes read and written over time) for the parts that are not matmuls
  or attention, to set against the memory roofline; the matmul parts' achieved
  FLOP/s come from the caller, who knows the model's FLOPs. A bandwidth no memory
  reaches (`IMPOSSIBLE_GB_PER_S`) is left out of `add_rows`' rows, and a note names
  the instructions charged the most bytes, so that the count can be mended.

Kernels whose instruction cannot be found in the dump (XLA's own copies, cuBLAS
workspace set-up) go to `"other"` with their kernel names kept in the summary. A
kernel names its module only by name, so a program to profile is jitted through
`named`, which gives it a module name of its own; the kernels of a module name that
several dumped modules bear go to `"other"` too, and the breakdown lists that name.
"""

import ast
import collections
import functools
import glob
import gzip
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any


def named(fn: Callable, label: str) -> Callable:
    """`fn` under a name no other program of this process has, for `jax.jit`: its
    module in the HLO dump is then the only one of its name, and its kernels can be
    read against it (`_instructions`). Jitted, it compiles anew."""

    def program(*args, **kwargs):
        return fn(*args, **kwargs)

    words = re.sub(r"\W+", "_", label).strip("_")
    program.__name__ = program.__qualname__ = f"profiled_{next(_PROGRAMS)}_{words}"
    return program


_PROGRAMS = itertools.count()


def dump_flags(dump_dir: str) -> str:
    """`XLA_FLAGS` that dump each module's optimised HLO as text into `dump_dir`."""
    return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text"


def capture(run: Callable[[], object], steps: int, trace_dir: str) -> None:
    """Trace `steps` calls of `run` (each blocked on) into `trace_dir`."""
    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(run())


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _tables(text: str) -> dict[int, tuple[str, str, int] | None]:
    """`stack frame id -> (file, function, line)` from a dump's frame tables (the
    format where instructions carry `stack_frame_id` instead of a source line)."""
    sections: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(line, {})
        elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            current = None
        elif current is not None:
            number, _, value = line.partition(" ")
            current[int(number)] = value.strip().strip('"')
    files, functions = sections.get("FileNames", {}), sections.get("FunctionNames", {})
    locations = {}
    for i, value in sections.get("FileLocations", {}).items():
        fields = dict(re.findall(r"(\w+)=(\d+)", value))
        locations[i] = (
            files.get(int(fields.get("file_name_id", 0)), "?"),
            functions.get(int(fields.get("function_name_id", 0)), "?"),
            int(fields.get("line", 0)),
        )
    return {
        i: locations.get(int(dict(re.findall(r"(\w+)=(\d+)", v))["file_location_id"]))
        for i, v in sections.get("StackFrames", {}).items()
    }


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_PARAMETER = re.compile(r"\bparameter\((\d+)\)")
# Instructions that read only their result's worth of their first operand, and
# those that write only their update (their second operand) into it in place.
_READS_A_PIECE = frozenset({"dynamic-slice", "slice", "gather"})
_UPDATES_IN_PLACE = frozenset({"dynamic-update-slice", "scatter"})


def _elements(result: str) -> list[str]:
    """The top-level elements of a tuple's result text (`(s32[], (f32[2], ...))`),
    or `[result]` for an array."""
    text = result.strip()
    if not text.startswith("("):
        return [text]
    elements, depth, start = [], 0, 1
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if (char == "," and depth == 1) or (char == ")" and depth == 0):
            elements.append(text[start:i])
            start = i + 1
    return [e for e in elements if e.strip()]


def _update(inst: dict) -> str | None:
    """The operand an in-place update writes: `dynamic-update-slice(buffer, update,
    indices...)`, `scatter(buffer, indices, updates)`."""
    operands = inst["operands"]
    if inst["opcode"] not in _UPDATES_IN_PLACE or len(operands) < 2:
        return None
    return operands[1] if inst["opcode"] == "dynamic-update-slice" else operands[-1]


def _traffic(inst: dict, instructions: dict, computations: dict) -> int:
    """Bytes an instruction reads and writes: its result and its operands', except
    that a slice reads only its piece and an in-place update reads and writes only
    the update, also inside a fusion, where an element taken from a tuple (by a
    get-tuple-element, or written `%t#i`) counts alone and a bitcast moves nothing.
    A scanned layer stack's loop body slices and updates buffers stacked over the
    layers; counting those whole overstated the traffic by the depth of the stack."""

    def size(ref: str) -> int:
        """Bytes of `name`, or of its element `name#i` (`name#i#j`: nested)."""
        name, *indices = ref.split("#")
        if name not in instructions:
            return 0
        if not indices:
            return instructions[name]["size"]
        result = instructions[name]["result"]
        for i in indices:
            elements = _elements(result)
            if int(i) >= len(elements):
                return 0
            result = elements[int(i)]
        return _bytes(result)

    opcode, operands = inst["opcode"], inst["operands"]
    if opcode in _READS_A_PIECE:
        return 2 * inst["size"]
    update = _update(inst)
    if update is not None:
        return 2 * size(update)
    fused = computations.get(inst["calls"] or "")
    if opcode != "fusion" or fused is None:
        return inst["size"] + sum(size(o) for o in operands)
    inner = fused["instructions"]
    users = collections.defaultdict(list)
    elements_used = collections.defaultdict(set)
    for i in inner.values():
        for o in i["operands"]:
            users[o].append(i)
            # `t#i#j` is element j of `t#i`, which is element i of `t`.
            parts = o.split("#")
            for n in range(1, len(parts)):
                elements_used["#".join(parts[:n])].add("#".join(parts[: n + 1]))

    def piece(value: str, whole: int) -> int:
        """What the fusion reads of `value` (a parameter, or an element of one)."""
        total = 0
        for user in users[value]:
            first = user["operands"][:1] == [value]
            if first and user["opcode"] in _READS_A_PIECE:
                total += user["size"]
            elif user["opcode"] in ("get-tuple-element", "bitcast"):
                # One element of a tuple (a loop's whole state, on a GPU), or the
                # same bytes seen in another shape: what is read of that.
                total += piece(user["name"], user["size"])
            elif not (first and user["opcode"] in _UPDATES_IN_PLACE):
                return whole
        # `value#i`: an element of a tuple, named without a get-tuple-element.
        for ref in elements_used.get(value, ()):
            total += piece(ref, size(ref))
        return min(total, whole)

    read = 0
    for parameter, index in fused["parameters"].items():
        read += piece(parameter, size(operands[index]) if index < len(operands) else 0)
    root = inner.get(fused["root"])
    if root is None:
        return read + inst["size"]
    outputs = [inner[o] for o in root["operands"] if o in inner]
    written = 0
    for out in outputs if root["opcode"] == "tuple" else [root]:
        # An update in place may reach the result through bitcasts (a GPU's
        # `bitcast(dynamic-update-slice(bitcast(buffer), ...))`).
        updated = out
        while updated["opcode"] == "bitcast" and updated["operands"][0] in inner:
            updated = inner[updated["operands"][0]]
        update = _update(updated)
        written += size(update) if update is not None else out["size"]
    return read + written


# Instructions that say nothing of what a fused kernel computes ("?": a line
# `_instructions` reads no opcode from, such as `constant(0)`).
_PLUMBING = frozenset(
    {"parameter", "bitcast", "constant", "tuple", "get-tuple-element", "?"}
)


def _body(computation: dict | None) -> str:
    """What a fusion computes, as the opcodes of its body by how often they occur
    (`"broadcast×2, select, add"`); "" for an instruction that calls nothing. A
    fusion takes its source line from its root, so its name and source can hide
    the work fused into it: a zero-fill that scatters into the zeros is named a
    broadcast of the caller's frame."""
    if computation is None:
        return ""
    counts = collections.Counter(
        i["opcode"]
        for i in computation["instructions"].values()
        if i["opcode"] not in _PLUMBING
    )
    return ", ".join(f"{op}×{n}" if n > 1 else op for op, n in counts.most_common(6))


def _instructions(dump_dir: str) -> tuple[dict[tuple[str, str], dict], set[str]]:
    """`(module, instruction) -> {op, kind, bytes, file, function, op_name, result,
    body}` from the dumped optimised HLO (every computation: a scanned layer's
    kernels live in a loop body), and the names of the modules left out because
    several different dumped modules bear them. `bytes` counts what the instruction
    reads and writes (`_traffic`); `result` is its shape without layouts, `body`
    what its fused computation does (`_body`).

    A kernel names its module only by name, and programs compiled from functions of
    the same name (two lambdas, one step at two batch sizes) dump modules of that
    name with instructions of the same names but other shapes and sources: reading
    one for the other charges kernels another program's bytes and parts. Such names
    cannot be told apart, so they are left out (see `named`)."""
    table = {}
    versions = collections.defaultdict(set)  # module name -> hashes of its texts
    for path in glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")):
        with open(path) as file:
            text = file.read()
        module = re.search(r"^HloModule\s+([\w.\-]+)", text, re.M)
        if module is None:
            continue
        name = module.group(1)
        versions[name].add(hash(text))
        frames = _tables(text)
        # Every instruction of the module by name, and every computation (its
        # instructions, parameters and root), so a fusion can be read inside.
        instructions: dict[str, dict] = {}
        computations: dict[str, dict] = {}
        here = None
        for line in text.splitlines():
            # A computation's header (`%name (p: f32[2]) -> f32[2] {`, possibly
            # with `execution_thread="..."`) is a line no instruction matches.
            header = _COMPUTATION.match(line)
            if header is not None and _INSTRUCTION.match(line) is None:
                here = {"instructions": {}, "parameters": {}, "root": ""}
                computations[header.group(1)] = here
                continue
            match = _INSTRUCTION.match(line)
            if match is None:
                continue
            op, rest = match.groups()
            head, _, meta = rest.partition("metadata={")
            # `f32[4,8]{1,0} fusion(%a, %b), kind=...` or, for a tuple result,
            # `(bf16[2]{0}, f32[2]{0}) fusion(...)`: the opcode is the word
            # before the operand list.
            call = re.search(r"\s([a-z][\w\-]*)\((?=%|\)|\w+\[)", " " + head)
            parameter = _PARAMETER.search(head)
            if call is not None:
                opcode, result = call.group(1), (" " + head)[: call.start()]
                listed = head[call.end() - 1 :].split("),")[0]
            else:
                opcode = "parameter" if parameter else "?"
                result, listed = head.split(" parameter(")[0], ""
            calls = re.search(r"calls=%([\w.\-]+)", rest)
            if "custom_call_target=" in rest:
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                kind = target.group(1) if target else "custom-call"
            elif opcode == "fusion":
                backend = re.search(r'"kind":"(\w+)"', rest)
                kind = "fusion:" + (backend.group(1) if backend else "")
            else:
                kind = opcode
            scope = re.search(r'op_name="([^"]*)"', meta)
            frame = re.search(r"stack_frame_id=(\d+)", meta)
            source = re.search(r'source_file="([^"]+)" source_line=(\d+)', meta)
            located = frames.get(int(frame.group(1))) if frame else None
            if located is not None:
                file, function, _ = located
            elif source is not None:
                file = source.group(1)
                function = _function(file, int(source.group(2)))
            else:
                file = function = None
            instructions[op] = {
                "name": op,
                "opcode": opcode,
                # `%name`, or `%name#i` for element i of a tuple (newer XLA
                # writes that for a get-tuple-element).
                "operands": re.findall(r"%([\w.\-]+(?:#\d+)*)", listed),
                "result": result,
                "size": _bytes(result),
                "calls": calls.group(1) if calls else None,
                "kind": kind,
                "file": file,
                "function": function,
                "op_name": scope.group(1) if scope else "",
            }
            if here is not None:
                here["instructions"][op] = instructions[op]
                if line.lstrip().startswith("ROOT"):
                    here["root"] = op
                if opcode == "parameter" and parameter is not None:
                    here["parameters"][op] = int(parameter.group(1))
        for op, inst in instructions.items():
            table[(name, op)] = {
                "op": op,
                "kind": inst["kind"],
                "bytes": _traffic(inst, instructions, computations),
                "file": inst["file"],
                "function": inst["function"],
                "op_name": inst["op_name"],
                "result": re.sub(r"\{[^{}]*\}", "", inst["result"]).strip(),
                "body": _body(computations.get(inst["calls"] or "")),
            }
    # The same program compiled twice dumps the same text twice: no doubt there.
    ambiguous = {name for name, found in versions.items() if len(found) > 1}
    table = {key: info for key, info in table.items() if key[0] not in ambiguous}
    return table, ambiguous


@functools.cache
def _functions(path: str) -> list[tuple[int, int, str]]:
    """`(first line, last line, name)` of every function defined in `path`."""
    try:
        with open(path) as file:
            tree = ast.parse(file.read())
    except (OSError, SyntaxError):
        return []
    return [
        (node.lineno, node.end_lineno or node.lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def _function(path: str | None, line: int | None) -> str | None:
    if path is None or line is None:
        return None
    inside = [f for f in _functions(path) if f[0] <= line <= f[1]]
    # The innermost function: the one that starts last.
    return max(inside)[2] if inside else None


def _kernels(trace_dir: str) -> list[dict]:
    paths = glob.glob(
        os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True
    )
    if not paths:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir!r}")
    with gzip.open(max(paths, key=os.path.getmtime)) as file:
        data = json.load(file)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in processes.items() if "/device:" in name}
    return [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("dur")
        # On a CPU the thunks that run HLO instructions are host events.
        and (e.get("pid") in device or (not device and "hlo_op" in e.get("args", {})))
    ]


def _in(file: str | None, where: str) -> bool:
    """Whether `file` is the file `where` ends with, or lies in the folder `where`
    (ending in `/`) names."""
    if file is None:
        return False
    return f"/{where}" in f"/{file}" if where.endswith("/") else file.endswith(where)


def _matches(info: dict, where: str, functions: Sequence[str] | None) -> bool:
    """Whether an instruction falls under the rule `(where, functions)`."""
    if where.startswith("scope:"):
        # `jit(step)/transpose(jvp(attention))/dot_general`: a whole name in the
        # stack of scopes, under any transformation.
        name = re.escape(where.removeprefix("scope:"))
        return re.search(rf"(?<![\w]){name}(?![\w])", info["op_name"]) is not None
    if not _in(info["file"], where):
        return False
    # Qualified names (`_Block.attention.<locals>.<genexpr>`) match a rule naming
    # any of their parts.
    names = set((info["function"] or "").split("."))
    return functions is None or bool(names & set(functions))


def part_of(info: dict, parts: Sequence[tuple[str, str, Sequence[str] | None]]) -> str:
    """The first of `parts` (`(name, where, functions)` rules) whose rule an
    instruction's `info` falls under, else "other"."""
    return next(
        (name for name, where, fns in parts if _matches(info, where, fns)), "other"
    )


def _library_part(kernel: str) -> str:
    """The part of a kernel that no HLO instruction is named after, by its name."""
    lowered = kernel.lower()
    if any(m in lowered for m in ("nvjet", "gemm", "cutlass", "xmma", "cublas")):
        return "matmuls (cuBLAS, in command buffers): matmul"
    if any(m in lowered for m in ("cudnn", "sdpa", "fmha", "flash")):
        return "attention (cuDNN)"
    if lowered.startswith("memcpy") or lowered.startswith("memset"):
        return "copies"
    return "other"


# Instructions whose events enclose those of the computations they run.
_CONTROL_FLOW = frozenset({"while", "conditional", "call", "async-start", "async-done"})

# How many instructions `breakdown` names as the heaviest of a call.
HEAVIEST = 8


def breakdown(
    trace_dir: str,
    dump_dir: str,
    steps: int,
    parts: Sequence[tuple[str, str, Sequence[str] | None]],
) -> dict:
    """Kernel time per part of the step (see the module docstring)."""
    table, ambiguous = _instructions(dump_dir)
    totals: dict[str, dict] = collections.defaultdict(
        lambda: {
            "ms": 0.0,
            "bytes": 0,
            "kernels": 0,
            "where": collections.Counter(),
            "bytes_where": collections.Counter(),
        }
    )
    unmatched: collections.Counter = collections.Counter()
    # Time per instruction, to name the heaviest kernels and what they fuse.
    per_instruction: collections.Counter = collections.Counter()
    found: dict[tuple[str, str], tuple[str, str, dict]] = {}
    kernel_ms = 0.0
    # Inside a command buffer (a CUDA graph) a kernel's `hlo_op` names the buffer,
    # not the instruction; a fusion's kernel is named after its instruction
    # (`loop_add_fusion_11` for `%loop_add_fusion.11`), library kernels are not.
    by_kernel_name = {
        (m, op.replace(".", "_")): info for (m, op), info in table.items()
    }
    kernels = _kernels(trace_dir)
    for event in kernels:
        args = event.get("args", {})
        ms = event["dur"] / 1e3
        module = args.get("hlo_module", "")
        info = table.get((module, args.get("hlo_op", ""))) or by_kernel_name.get(
            (module, event["name"])
        )
        if info is not None and info["kind"] in _CONTROL_FLOW:
            # On a CPU a loop's or branch's event spans the events of its body,
            # which are counted themselves.
            continue
        kernel_ms += ms
        if info is None:
            part = _library_part(event["name"])
            if part == "other":
                unmatched[event["name"][:60]] += ms
        else:
            kind = info["kind"]
            if "fmha" in kind or "cudnn" in kind.lower():
                # Within a named scope, the scope's part; else attention as such.
                scoped = (
                    name
                    for name, where, fns in parts
                    if where.startswith("scope:") and _matches(info, where, fns)
                )
                part = f"{next(scoped, 'attention')} (cuDNN)"
            else:
                part = part_of(info, parts)
                # cuBLAS calls, Triton GEMM fusions; on a CPU dots and XNNPACK.
                if kind == "dot" or any(m in kind for m in ("gemm", "matmul", "ynn")):
                    part += ": matmul"
        row = totals[part]
        row["ms"] += ms
        row["kernels"] += 1
        row["bytes"] += 0 if info is None else info["bytes"]
        if info is not None:
            where = f"{os.path.basename(info['file'] or '?')}:{info['function']}"
            row["where"][f"{where} ({info['kind']})"] += ms
            row["bytes_where"][f"{info['op']} ({info['kind']})"] += info["bytes"]
            per_instruction[module, info["op"]] += ms
            found[module, info["op"]] = (part, where, info)
    out = {}
    for part, row in sorted(totals.items(), key=lambda kv: -kv[1]["ms"]):
        seconds = row["ms"] / 1e3
        out[part] = {
            "ms_per_step": row["ms"] / steps,
            "share": row["ms"] / kernel_ms if kernel_ms else 0.0,
            "kernels_per_step": row["kernels"] / steps,
            "gb_per_s": row["bytes"] / seconds / 1e9
            if seconds and row["bytes"]
            else None,
            "top": {k: v / steps for k, v in row["where"].most_common(4)},
            "top_bytes": {k: v / steps for k, v in row["bytes_where"].most_common(3)},
        }
    return {
        "kernel_ms_per_step": kernel_ms / steps,
        "parts": out,
        # Modules whose kernels went to "other": several dumped modules bear their
        # names (`_instructions`).
        "ambiguous_modules": sorted(
            ambiguous & {e.get("args", {}).get("hlo_module", "") for e in kernels}
        ),
        "unmatched_ms_per_step": {k: v / steps for k, v in unmatched.most_common(10)},
        "heaviest": [
            {
                "instruction": op,
                "ms_per_step": ms / steps,
                "part": part,
                "where": where,
                "result": info["result"],
                "body": info["body"],
            }
            for (module, op), ms in per_instruction.most_common(HEAVIEST)
            for part, where, info in [found[module, op]]
        ],
    }


# Twice what the fastest GPU's memory moves (an H200's HBM: 4.8 TB/s). L2 hits can
# lift a part above its device's HBM rate, but a part that seems to move more than
# this was charged wrong bytes: an H100 profile read with XLA's `%tuple#i` operands
# taken for whole tuples showed parts at 3.8 to 430 TB/s.
IMPOSSIBLE_GB_PER_S = 10_000


def summary(label: str, out: dict) -> str:
    """The `breakdown` `out` of `label` in lines of text for a log: per part, its
    time per call and the sources (file:function, instruction kind) that take the
    most of it; the heaviest instructions, with their result and what their fused
    body computes; and the kernels found in no dump. The rows keep only the
    totals; this says where in the code to look."""
    lines = [f"profile of {label}: {out['kernel_ms_per_step']:.2f} ms per call"]
    for part, v in out["parts"].items():
        top = "; ".join(f"{where} {ms:.2f}" for where, ms in v["top"].items())
        lines.append(f"  {part}: {v['ms_per_step']:.2f} ms ({top})")
    lines.append("  heaviest instructions:")
    for k in out["heaviest"]:
        body = f" fusing {k['body']}" if k["body"] else ""
        lines.append(
            f"    {k['instruction']} {k['ms_per_step']:.2f} ms, {k['part']}, "
            f"from {k['where']}: {k['result']}{body}"
        )
    if out["unmatched_ms_per_step"]:
        named = "; ".join(
            f"{name} {ms:.2f}" for name, ms in out["unmatched_ms_per_step"].items()
        )
        lines.append(f"  in no dump: {named}")
    return "\n".join(lines)


def add_rows(
    results: Any,
    label: str,
    run: Callable[[], object],
    dump_dir: str,
    parts: Sequence[tuple[str, str, Sequence[str] | None]],
    *,
    steps: int = 3,
    **fields: Any,
) -> dict:
    """Trace `steps` calls of `run` (already compiled and run once), add a row per
    part to `results` (workload `profile`, impl `label`, and `fields`), print its
    `summary` to the log and return the `breakdown`."""
    with tempfile.TemporaryDirectory() as trace_dir:
        capture(run, steps, trace_dir)
        out = breakdown(trace_dir, dump_dir, steps, parts)
    for part, v in out["parts"].items():
        if v["gb_per_s"] is not None and v["gb_per_s"] > IMPOSSIBLE_GB_PER_S:
            # The bytes charged to some instruction are wrong: say which, and
            # store no bandwidth rather than a false one.
            charged = "; ".join(
                f"{name}: {b / 1e9:.3g} GB" for name, b in v["top_bytes"].items()
            )
            results.note(
                f"{label}, {part}: achieved bandwidth left out; the bytes charged "
                f"to its kernels give {v['gb_per_s'] / 1e3:.3g} TB/s, more than "
                f"any device's memory moves. Most bytes per call: {charged}."
            )
            v = dict(v, gb_per_s=None)
        results.add(
            workload="profile",
            impl=label,
            **fields,
            part=part,
            ms_per_call=v["ms_per_step"],
            share=v["share"],
            kernels_per_call=v["kernels_per_step"],
            gb_per_s=v["gb_per_s"],
        )
    print(summary(label, out), flush=True)
    if out["ambiguous_modules"]:
        results.note(
            f"{label}: the kernels of {', '.join(out['ambiguous_modules'])} are under "
            "'other': several programs of the process compiled to modules of that "
            "name, and a kernel names its module only by name."
        )
    return out
