"""What the hybrid's evolution phases cost: a chunk of ``es_every`` hybrid steps (one phase at
its end) against the same chunk of backprop steps, in one run.

    python -m benchmarks.hybrid --out=docs/bench/hybrid_digits.json
    python -m benchmarks.hybrid --scale=paper --out=runs/gpu/hybrid_gpu.json   # VGG16, GPU

Both methods come from experiments/configs/hybrid.py (``bp`` and ``hybrid``); each chunk is
compiled ahead of time (compile time apart) and the two are timed interleaved
(``benchmarks.harness``). The phase's time is the hybrid chunk minus the backprop chunk; the
step time is the backprop chunk over its steps. ``--scale=paper`` times VGG16 at batch 128 on
random data of CIFAR-10's shape (45,000 training, 5,000 validation images; no files needed).
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
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
from experiments.configs import hybrid as hybrid_configs


def cifar10_shaped(train: int = 45_000, val: int = 5_000) -> data_lib.Dataset:
    """Random data of CIFAR-10's shape (timing only)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(train + val, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=train + val).astype(np.int32)
    return data_lib.Dataset(
        "cifar10-shaped", "classification", 10, x[:train], y[:train], x[train:], y[train:],
        x[train:], y[train:],
    )  # fmt: skip


def measure(
    scale: str, data: str, repeats: int, chunks: int = 1, es_every: int = 0
) -> dict[str, Any]:
    """The two chunks timed; ``es_every`` > 0 replaces the config's phase interval."""
    dataset = cifar10_shaped() if scale == "paper" else None
    every = es_every or int(hybrid_configs.hybrid_options(scale)["es_every"])
    steps = every * chunks
    loops, experiments = {}, {}
    for method in ("bp", "hybrid"):
        config = hybrid_configs.get_config(f"method={method},data={data},scale={scale}")
        if dataset is not None:
            config.data.standardize = "none"
        if method == "hybrid":
            config.rule.es_every = every
        experiment = Experiment(config, dataset)
        state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
        loops[method] = Loop(lambda s, e=experiment: e.train_steps(s, steps), state, steps)
        experiments[method] = experiment
    rounds = timed_rounds(loops, repeats)
    median = {m: statistics.median(t) for m, t in rounds.times.items()}
    hybrid = experiments["hybrid"]
    options = {k: v for k, v in hybrid.config.rule.items() if k != "name"}
    return {
        "scale": scale,
        "data": "cifar10-shaped" if dataset is not None else data,
        "model": hybrid.config.model.name,
        "batch_size": hybrid.batch_size,
        "es_every": every,
        "phases_per_call": chunks,
        "options": {k: v for k, v in options.items() if k in hybrid_configs.ES or k == "val_size"},
        "bp_step_ms": 1e3 * median["bp"] / steps,
        "hybrid_chunk_s": median["hybrid"],
        "bp_chunk_s": median["bp"],
        "phase_s": (median["hybrid"] - median["bp"]) / chunks,
        "ratio_vs_bp": median["hybrid"] / median["bp"],
        "cost_ratio_vs_bp": hybrid.step_cost / experiments["bp"].step_cost,
        "compile_s": {m: loop.compile_s for m, loop in loops.items()},
        "steps_run": {m: int(loop.state.step) for m, loop in loops.items()},
        "other_processes_busy_cores": rounds.other_load_cores,
    }


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        "| scale | model, data | bp step | phase | hybrid / bp (measured) | hybrid / bp "
        "(forward-pass count) | compile bp / hybrid |",
        "|---|---|---|---|---|---|---|",
        f"| {result['scale']} | {result['model']}, {result['data']} | "
        f"{result['bp_step_ms']:.2f} ms | {result['phase_s'] * 1e3:.1f} ms | "
        f"{result['ratio_vs_bp']:.3f}x | {result['cost_ratio_vs_bp']:.3f}x | "
        f"{result['compile_s']['bp']:.1f} s / {result['compile_s']['hybrid']:.1f} s |",
    ]
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.hybrid")
    result = {
        "command": command_line("benchmarks.hybrid"),
        "machine": machine_facts(),
        "repeats": _REPEATS.value,
        **measure(_SCALE.value, _DATA.value, _REPEATS.value, _CHUNKS.value),
    }
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "cpu: small CNN; paper: VGG16.")
    _DATA = flags.DEFINE_string("data", "digits", "Dataset at scale=cpu (digits, mnist1d).")
    _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per method (median reported).")
    _CHUNKS = flags.DEFINE_integer("chunks", 1, "Phases per timed call (es_every steps each).")
    _OUT = flags.DEFINE_string("out", "docs/bench/hybrid.json", "JSON output path.")
    app.run(main)
