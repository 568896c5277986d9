"""Step time of each learning rule divided by the backprop step time, in one run.

    python -m benchmarks.rules --data=mnist1d --out=docs/bench/rules_mnist1d.json

Every method uses the same model (np_family's CPU MLP: in-256-256-256-out, leaky ReLU), data and
batch. Each method's ``chunk_steps`` training steps are compiled ahead of time (compile time
reported apart) and timed as one call (``benchmarks.harness.Loop``); after one untimed warm-up
round the methods' calls are interleaved round-robin ``repeats`` times so machine noise hits all
of them alike, and the median is reported. Every method's timed calls cover the same number of
steps: the JSON records each run's own step counter at the end (``steps_run``).
``--scale=paper`` times the paper's CIFAR-10-sized MLP (3072-1024x3-10, batch 1000) on random
data of that shape (no files needed).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app

from altlearn import data as data_lib
from altlearn import report
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    busy_cores_line,
    command_line,
    machine_facts,
    timed_rounds,
    write_json,
)
from experiments.configs import np_family

METHODS = (
    "bp",
    "dbp",
    "np",
    "np/jvp",
    "anp",
    "anp/jvp",
    "inp",
    "inp/jvp",
    "dnp",
    "danp",
    "danp/jvp",
    "dinp",
    "danp/every4",
    "danp/every16",
    "fg",
    "wp",
    "np/rng=on",
    "fg/rng=on",
    "wp/rng=on",
)


def method_config(name: str, data: str, scale: str) -> ml_collections.ConfigDict:
    """np_family's config for ``method[/jvp][/everyK][/key=value]``."""
    method, *mods = name.split("/")
    extra = "".join(
        ",mode=jvp" if m == "jvp" else f",{m}" if "=" in m else f",every={m[len('every') :]}"
        for m in mods
    )
    return np_family.get_config(f"method={method},data={data},scale={scale}{extra}")


def paper_sized_dataset() -> data_lib.Dataset:
    """Random data shaped like CIFAR-10 (timing only)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=5000).astype(np.int32)
    return data_lib.Dataset(
        "cifar10-shaped", "classification", 10, x, y, x[:0], y[:0], x[:1000], y[:1000]
    )


def method_configs(
    methods: tuple[str, ...] | list[str], data: str = "mnist1d", scale: str = "cpu"
) -> tuple[dict[str, ml_collections.ConfigDict], data_lib.Dataset | None]:
    """The configs of ``methods`` and, at the paper's scale, the random CIFAR-10-shaped data."""
    dataset = paper_sized_dataset() if scale == "paper" else None
    data = "cifar10" if scale == "paper" else data
    configs = {}
    for name in methods:
        config = method_config(name, data, scale)
        if dataset is not None:
            config.data.standardize = "none"
        configs[name] = config
    return configs, dataset


def measure(
    configs: Mapping[str, ml_collections.ConfigDict],
    chunk_steps: int,
    repeats: int,
    dataset: data_lib.Dataset | None = None,
) -> dict[str, Any]:
    """Median seconds per step of each config, interleaved; compile times apart. The first
    config is the baseline of ``ratio_vs_first``."""
    loops = {}
    for name, config in configs.items():
        experiment = Experiment(config, dataset)
        state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
        loops[name] = Loop(
            lambda s, e=experiment: e.train_steps(s, chunk_steps), state, chunk_steps
        )
    rounds = timed_rounds(loops, repeats)
    median = {name: statistics.median(times) / chunk_steps for name, times in rounds.times.items()}
    base = median[next(iter(loops))]
    results = {
        name: {
            "step_ms": 1e3 * median[name],
            "ratio_vs_first": median[name] / base,
            "compile_s": loop.compile_s,
            "timed_calls": len(rounds.times[name]),
            "steps_per_call": loop.steps_per_call,
            "steps_run": int(loop.state.step),  # the run's own counter, warm-up included
        }
        for name, loop in loops.items()
    }
    return {"results": results, "other_processes_busy_cores": rounds.other_load_cores}


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| method | step (ms) | vs bp | compile (s) |", "|---|---|---|---|"]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {r['step_ms']:.3f} | {r['ratio_vs_first']:.2f}x | {r['compile_s']:.1f} |"
        )
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.rules")
    configs, dataset = method_configs(_METHODS.value, _DATA.value, _SCALE.value)
    measured = measure(configs, _CHUNK.value, _REPEATS.value, dataset)
    first = next(iter(configs.values()))
    result = {
        "command": command_line("benchmarks.rules"),
        "machine": machine_facts(),
        "model": f"mlp {first.model.widths} batch {first.batch_size}",
        "chunk_steps": _CHUNK.value,
        "repeats": _REPEATS.value,
        **measured,
    }
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _DATA = flags.DEFINE_string("data", "mnist1d", "Dataset (cpu scale).")
    _SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "Model and batch sizes.")
    _CHUNK = flags.DEFINE_integer("chunk_steps", 50, "Steps per timed call.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per method (median reported).")
    _METHODS = flags.DEFINE_list(
        "methods",
        list(METHODS),
        "method[/jvp][/everyK][/key=value] names of experiments/configs/np_family.py "
        "(rng=on: the noise drawn by JAX's partitionable threefry instead of the classic one).",
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/rules.json", "JSON output path.")
    app.run(main)
