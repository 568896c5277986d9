"""Where a learning rule's step time goes, beside backprop's: XLA's time in each compiled
operation, summed by the Python function that emitted it, in one run.

    python -m benchmarks.profile --setting=digits --seeds=32 --methods=bp,np,inp,fg \
        --out=docs/bench/profile_digits_32.json

Each method's chunk of training steps is built and compiled as ``benchmarks.rules`` builds it
(same settings, seeds and members per program), timed without the profiler (median of
``repeats`` interleaved calls, ``benchmarks.harness.timed_rounds``), then called
``profiled_calls`` times under ``jax.profiler.trace``. Every compiled operation that ran (a
matrix product, a fused elementwise kernel, a sort, a copy) is an event of the trace named after
its HLO instruction; the compiled module's metadata gives the Python stack that emitted it (a
fusion: its root's), and the table sums the events' times by the innermost function of this
repository on that stack (``file:function``, with ``> flax``, ``> optax``... where it called
into a library). Loops and conditionals are not counted themselves (the operations of their
bodies are). So:

* a row is the CPU time (summed over threads) of the operations one function emitted, per
  training step of all members;
* ``operations`` is their sum and ``operations run`` how many ran; the unprofiled step minus
  the operations is the runtime's own work between operations (the executor's dispatch of each,
  loop control; independent operations may also overlap on the cores, which the sum counts
  twice). The profiler's own cost is per event, between the operations: the profiled step is
  reported beside the unprofiled one.

Read rows as differences between methods in one run, not as absolute truths: the profiler's
per-event cost falls on small operations most.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app

from altlearn import data as data_lib
from altlearn import report
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    busy_cores_line,
    timed_rounds,
    write_json,
)
from benchmarks.rules import (
    SETTINGS,
    members_per_batch,
    method_configs,
    method_loop,
    run_header,
)

REPO_PACKAGES = ("altlearn", "benchmarks", "experiments", "tests")
CONTROL_FLOW = {"while", "conditional", "call"}  # their bodies' operations are the events
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")


def _opcode(rest: str) -> str:
    """The opcode of an HLO instruction from the text after ``name = `` (shape, then opcode)."""
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, c in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    return rest.strip().split("(", 1)[0]


Frame = tuple[str, str, int]  # (file, function, line)


def _stack_frames(hlo_text: str) -> dict[int, list[Frame]]:
    """``stack_frame_id -> [frame, its caller, ...]`` (innermost first) from the FileNames,
    FunctionNames, FileLocations and StackFrames tables of a compiled module's text.

    The text prints a frame's parent one above its id (``parent_frame_id=1`` on an outermost
    frame, a frame never its own parent otherwise): read so when any frame names itself."""
    tables: dict[str, dict[int, str]] = {}
    table = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
        elif table is not None and (m := re.match(r"^(\d+) (.*)$", line)):
            table[int(m.group(1))] = m.group(2)
        elif table is not None and line.strip():
            table = None
    if "StackFrames" not in tables:
        return {}
    unquote = lambda t: {k: v.strip('"') for k, v in t.items()}
    files, functions = unquote(tables["FileNames"]), unquote(tables["FunctionNames"])
    field = lambda text, key: int(re.search(rf"{key}=(\d+)", text).group(1))
    locations = {
        k: (
            files[field(v, "file_name_id")],
            functions[field(v, "function_name_id")],
            field(v, "line"),
        )
        for k, v in tables["FileLocations"].items()
    }
    frames = {
        k: (field(v, "file_location_id"), field(v, "parent_frame_id"))
        for k, v in tables["StackFrames"].items()
    }
    shift = 1 if any(parent == k for k, (_, parent) in frames.items()) else 0
    stacks = {}
    for k in frames:
        stack, frame = [], k
        while frame in frames and len(stack) < 200:
            location, parent = frames[frame]
            stack.append(locations[location])
            frame = parent - shift
        stacks[k] = stack
    return stacks


def hlo_operations(hlo_text: str) -> dict[str, tuple[str, list[Frame]]]:
    """``instruction name -> (opcode, source stack innermost first)`` of a compiled module's
    text (``compiled.as_text()``); the stack is empty where the metadata names none."""
    stacks = _stack_frames(hlo_text)
    ops = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        frame = re.search(r"stack_frame_id=(\d+)", line)
        ops[m.group(1)] = (
            _opcode(m.group(2)),
            stacks.get(int(frame.group(1)), []) if frame else [],
        )
    return ops


def _package(file: str) -> str | None:
    """A file's path from this repository's top-level package on (``altlearn/models.py``), or
    None for a file of no such package (an installed library, ``<frozen runpy>``). Read from the
    path's parts, not from this checkout: a compiled program from the compilation cache names
    the files of the checkout that compiled it."""
    parts = Path(file).parts
    if "site-packages" in parts:
        return None
    tops = [i for i, part in enumerate(parts) if part in REPO_PACKAGES]
    return "/".join(parts[tops[-1] :]) if tops else None


def source_label(stack: Sequence[Frame]) -> str:
    """``path:function`` of the innermost frame inside this repository, with the package of any
    frame inside it (``altlearn/models.py:Dense.__call__ > flax``); ``(no source)`` if none."""
    for i, (file, function, _) in enumerate(stack):
        relative = _package(file)
        if relative is not None:
            label = f"{relative}:{function}"
            if i:  # called into a library: name it
                parts = Path(stack[0][0]).parts
                inner = (
                    parts[parts.index("site-packages") + 1]
                    if "site-packages" in parts
                    else Path(stack[0][0]).name
                )
                label += f" > {inner}"
            return label
    return "(no source)"


def operation_seconds(trace_dir: str, names: Mapping[str, Any]) -> tuple[collections.Counter, int]:
    """Seconds in each operation of ``names`` (HLO instruction names) in the perfetto trace
    that ``jax.profiler.trace(trace_dir, create_perfetto_trace=True)`` wrote, and how many
    times those operations ran."""
    (path,) = Path(trace_dir).rglob("*perfetto_trace.json.gz")
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds: collections.Counter = collections.Counter()
    count = 0
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            seconds[event["name"]] += 1e-6 * event.get("dur", 0.0)
            count += 1
    return seconds, count


def profile_loop(loop: Loop, calls: int) -> tuple[dict[str, float], float, float]:
    """Seconds per step by source function of ``calls`` calls of ``loop`` under the profiler,
    the profiled wall seconds per step and the operations run per step."""
    operations = hlo_operations(loop.fn.as_text())
    counted = {n: op for n, op in operations.items() if op[0] not in CONTROL_FLOW}
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                loop()
        wall = time.perf_counter() - start
        seconds, count = operation_seconds(trace_dir, counted)
    steps = calls * loop.steps_per_call
    by_source: collections.Counter = collections.Counter()
    for name, s in seconds.items():
        by_source[source_label(counted[name][1])] += s / steps
    return dict(by_source), wall / steps, count / steps


def measure(
    configs: Mapping[str, ml_collections.ConfigDict],
    chunk_steps: int,
    repeats: int,
    profiled_calls: int,
    dataset: data_lib.Dataset | None = None,
    seeds: int = 1,
    members_per_batch: int = 0,
) -> dict[str, Any]:
    """Each config's unprofiled step (median, interleaved) and its operations' time per source
    function under the profiler (module docstring)."""
    loops = {
        name: method_loop(Experiment(config, dataset), chunk_steps, seeds, members_per_batch)
        for name, config in configs.items()
    }
    rounds = timed_rounds(loops, repeats)
    results = {}
    for name, loop in loops.items():
        sources, profiled, count = profile_loop(loop, profiled_calls)
        results[name] = {
            "step_ms": 1e3 * statistics.median(rounds.times[name]) / chunk_steps,
            "profiled_step_ms": 1e3 * profiled,
            "operations_ms": 1e3 * sum(sources.values()),
            "operations_run": count,
            "sources_ms": {k: 1e3 * v for k, v in sorted(sources.items(), key=lambda i: -i[1])},
            "compile_s": loop.compile_s,
        }
    return {"results": results, "other_processes_busy_cores": rounds.other_load_cores}


def markdown_table(result: dict[str, Any], rows: int = 16) -> str:
    """One column per method (ms per step of all members), one per difference from the first
    method; the ``rows`` sources with the largest time or difference, the rest summed."""
    results = result["results"]
    names = list(results)
    first, others = names[0], names[1:]
    sources = {s for r in results.values() for s in r["sources_ms"]}
    ms = lambda name, s: results[name]["sources_ms"].get(s, 0.0)
    weight = lambda s: max(
        [ms(n, s) for n in names] + [abs(ms(n, s) - ms(first, s)) for n in names]
    )
    top = sorted(sources, key=lambda s: -weight(s))[:rows]
    head = ["source (operations emitted there)", *names, *(f"{n} - {first}" for n in others)]
    lines = [
        f"{result['seeds']} seed(s) in one program, ms per step of all (operations: CPU time "
        "summed over threads):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]

    def row(label: str, values: list[float]) -> str:
        diffs = [f"{v - values[0]:+.3f}" for v in values[1:]]
        return "| " + " | ".join([label, *(f"{v:.3f}" for v in values), *diffs]) + " |"

    for s in top:
        lines.append(row(f"`{s}`", [ms(n, s) for n in names]))
    rest = [sum(ms(n, s) for s in sources - set(top)) for n in names]
    lines.append(row("everything else", rest))
    lines.append(row("**operations**", [results[n]["operations_ms"] for n in names]))
    counts = [results[n]["operations_run"] for n in names]
    diffs = [f"{c - counts[0]:+.0f}" for c in counts[1:]]
    lines.append(
        "| operations run (count) | " + " | ".join([*(f"{c:.0f}" for c in counts), *diffs]) + " |"
    )
    lines.append(row("**step, unprofiled**", [results[n]["step_ms"] for n in names]))
    lines.append(row("step, profiled", [results[n]["profiled_step_ms"] for n in names]))
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.profile")
    configs, dataset = method_configs(_METHODS.value, _SETTING.value)
    members = members_per_batch(_MEMBERS.value)
    measured = measure(
        configs, _CHUNK.value, _REPEATS.value, _PROFILED.value, dataset, _SEEDS.value, members
    )
    header = run_header(
        "benchmarks.profile", configs, _SETTING.value, _SEEDS.value, members, _CHUNK.value,
        _REPEATS.value,
    )  # fmt: skip
    result = {**header, "profiled_calls": _PROFILED.value, **measured}
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _SETTING = flags.DEFINE_enum(
        "setting", "digits", [*SETTINGS, "paper"], "Model, data and batch (benchmarks.rules)."
    )
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds in one program per method.")
    _MEMBERS = flags.DEFINE_integer(
        "members_per_batch",
        None,
        "Seeds vmapped at a time (0: all; default: the engine's).",
    )
    _CHUNK = flags.DEFINE_integer("chunk_steps", 20, "Steps per call.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Unprofiled timed calls (median reported).")
    _PROFILED = flags.DEFINE_integer("profiled_calls", 3, "Calls under the profiler.")
    _METHODS = flags.DEFINE_list(
        "methods", ["bp", "np"], "Methods of benchmarks.rules (backprop first: the baseline)."
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/profile.json", "JSON output path.")
    app.run(main)
