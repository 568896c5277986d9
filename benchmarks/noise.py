"""What one perturbation-noise entry costs to draw, by generator and distribution, in one run.

    python -m benchmarks.noise --out=docs/bench/noise.json

The perturbation rules draw one noise entry per unit and sample (node perturbation) or per
weight (weight perturbation, forward gradient) every step; on a CPU the draws are a large part
of a small step. Timed side by side (``benchmarks.harness.timed_rounds``, compile apart): each
JAX key implementation (threefry in its classic and its partitionable mode, ``rbg``,
``unsafe_rbg``) drawing ``normal`` entries and ``rademacher`` entries (32 signs unpacked from
each 32-bit word) as the rules draw them (``altlearn.rules._noise`` through ``altlearn.prng``:
threefry's hash written out as one kernel; other generators fall back to JAX's draw) and
through JAX's own draw (``jax.random.normal``, ``jax.random.bits``: on CPU the hash is a loop of
5 iterations), and
``jax.random.rademacher`` (one uniform per entry). Each call draws ``--draws`` arrays of
``--shape`` from folded keys inside one compiled loop and sums them (so nothing is skipped);
the table gives nanoseconds per entry.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
from absl import app

from altlearn import prng, report
from altlearn.rules import _noise
from benchmarks.harness import (
    busy_cores_line,
    command_line,
    compile_ahead,
    machine_facts,
    timed_rounds,
    write_json,
)

GENERATORS = ("threefry", "threefry partitionable", "rbg", "unsafe_rbg")
DISTRIBUTIONS = {
    "normal, JAX's draw": lambda k, shape: jax.random.normal(k, shape),
    "normal": prng.normal,
    "rademacher (32 signs per word), JAX's bits": lambda k, shape: _noise.signs(
        jax.random.bits(k, (-(-math.prod(shape) // 32),), jnp.uint32), shape
    ),
    "rademacher (32 signs per word)": _noise.rademacher,
    "jax.random.rademacher": lambda k, shape: jax.random.rademacher(k, shape, jnp.float32),
}


def draw_loop(distribution: str, shape: tuple[int, ...], draws: int):
    """``key -> sum of draws arrays`` drawn from ``fold_in(key, i)``."""
    draw = DISTRIBUTIONS[distribution]

    def loop(key):
        body = lambda i, acc: acc + jnp.sum(draw(jax.random.fold_in(key, i), shape))
        return jax.lax.fori_loop(0, draws, body, jnp.float32(0))

    return loop


def measure(shape: tuple[int, ...], draws: int, repeats: int) -> dict[str, Any]:
    calls, compile_s = {}, {}
    for generator in GENERATORS:
        impl = None if generator.startswith("threefry") else generator
        partitionable = generator == "threefry partitionable"
        key = jax.random.key(0, impl=impl) if impl else jax.random.key(0)
        for distribution in DISTRIBUTIONS:
            name = f"{generator} | {distribution}"
            with jax.threefry_partitionable(partitionable):
                fn, compile_s[name] = compile_ahead(draw_loop(distribution, shape, draws), key)
            calls[name] = lambda fn=fn, key=key: fn(key)
    rounds = timed_rounds(calls, repeats)
    entries = draws * math.prod(shape)
    results = {
        name: {
            "ns_per_entry": 1e9 * statistics.median(times) / entries,
            "compile_s": compile_s[name],
            "times_s": times,
        }
        for name, times in rounds.times.items()
    }
    return {"results": results, "other_processes_busy_cores": rounds.other_load_cores}


def markdown_table(result: dict[str, Any]) -> str:
    base = result["results"]["threefry | normal, JAX's draw"]["ns_per_entry"]
    lines = [
        f"{result['draws']} draws of shape {tuple(result['shape'])} per call, median of "
        f"{result['repeats']} calls:",
        "",
        "| generator | distribution | ns / entry | vs threefry normal, JAX's draw |",
        "|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        generator, distribution = name.split(" | ")
        lines.append(
            f"| {generator} | {distribution} | {r['ns_per_entry']:.2f} "
            f"| {r['ns_per_entry'] / base:.2f}x |"
        )
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.noise")
    shape = tuple(int(s) for s in _SHAPE.value)
    result = {
        "command": command_line("benchmarks.noise"),
        "machine": machine_facts(),
        "shape": shape,
        "draws": _DRAWS.value,
        "repeats": _REPEATS.value,
        **measure(shape, _DRAWS.value, _REPEATS.value),
    }
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _SHAPE = flags.DEFINE_list("shape", ["128", "1024"], "Shape of one draw.")
    _DRAWS = flags.DEFINE_integer("draws", 50, "Draws per timed call.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls (median reported).")
    _OUT = flags.DEFINE_string("out", "docs/bench/noise.json", "JSON output path.")
    app.run(main)
