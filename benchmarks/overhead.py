"""Framework overhead: altlearn's backprop step against a minimal hand-written optax loop.

Command (writes docs/bench/overhead.json and prints a markdown table):

    python -m benchmarks.overhead --config=experiments/configs/default.py

What it measures, in one run, on the config's model, data, batch size and optimizer:

1. *altlearn*: ``Experiment(config)``, ``init``, and ``train_steps(state, chunk_steps)`` jitted
   and compiled ahead of time, as ``altlearn.runner`` runs a chunk (state donated).
2. *hand*: the same MLP written as a plain flax ``nn.Module``, ``optax`` with the same learning
   rate, ``softmax_cross_entropy_with_integer_labels(...).mean()``, ``jax.value_and_grad``, in a
   ``lax.scan`` of ``chunk_steps`` steps (``benchmarks.harness.make_hand_loop``). It starts from
   altlearn's initial params and draws its minibatches exactly as altlearn does (one
   permutation of the training split per epoch, from the same key, drawn up front per chunk),
   so both loops run the same training run: the same batches, the same losses to float
   rounding (the JSON records the largest relative difference of the last chunk's per-step
   losses), the same number of steps per timed call.

Both chunks are compiled ahead of time (compile time reported apart); then, after one untimed
warm-up round, ``repeats`` timed rounds of altlearn, hand, matmul (each call blocks) alternate so
machine noise hits all three alike (``benchmarks.harness.timed_rounds``). Time per step is the
median chunk time divided by ``chunk_steps``; the ratio altlearn/hand has the target <= 1.10.

FLOPs per step come from XLA's ``cost_analysis()`` of one compiled altlearn ``train_step`` (XLA
counts a ``while`` loop body once whatever its trip count, so the chunk's own count is not
divided by ``chunk_steps``); the analytic 6 * batch * num_params is reported beside it and used
if XLA gives no count. Both loops do the same math, so both are credited with that count. The
machine's float32 peak is the fastest call of a jitted square matmul timed in the same rounds
(``benchmarks.harness.matmul_peak``); achieved GFLOP/s of both loops are reported as a fraction
of it. The JSON also records how many cores other processes kept busy during the timed rounds.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app

from altlearn import report
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    Matmul,
    busy_cores_line,
    check_hand_supported,
    command_line,
    compiled_flops,
    machine_facts,
    make_hand_loop,
    matmul_peak,
    timed_rounds,
    write_json,
)

OVERHEAD_TARGET = 1.10


def config_summary(config: ml_collections.ConfigDict, experiment: Experiment) -> dict[str, Any]:
    sizes = [
        int(np.prod(experiment.dataset.x_train.shape[1:])),
        *map(int, config.model.widths),
        int(experiment.dataset.num_outputs),
    ]
    return {
        "rule": config.rule.name,
        "model": config.model.name,
        "layer_sizes": sizes,
        "activation": config.model.activation,
        "data": config.data.name,
        "num_train": int(experiment.num_train),
        "batch_size": int(experiment.batch_size),
        "optimizer": config.optimizer.name,
        "learning_rate": float(config.optimizer.learning_rate),
        "seed": int(config.seed),
    }


def max_relative_difference(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def measure(
    config: ml_collections.ConfigDict,
    chunk_steps: int = 500,
    repeats: int = 7,
    matmul_size: int = 2048,
) -> dict[str, Any]:
    """Runs the whole benchmark for ``config``; returns every number as a JSON-able dict."""
    if chunk_steps <= 0 or repeats <= 0:
        raise ValueError(f"chunk_steps and repeats must be positive, got {chunk_steps}, {repeats}.")
    check_hand_supported(config)
    experiment = Experiment(config)
    state = experiment.init(jax.random.PRNGKey(int(config.seed)))
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(state.variables["params"])))

    # The hand loop starts from altlearn's initial state (its own copy: altlearn's is donated).
    hand_init, hand_train_chunk = make_hand_loop(experiment)
    hand_state = hand_init(state)
    hand_params = int(sum(np.size(p) for p in jax.tree.leaves(hand_state.params)))
    if hand_params != num_params:
        raise AssertionError(f"hand MLP has {hand_params} parameters, altlearn's {num_params}.")

    # FLOPs of one step: XLA's count for one compiled train_step, else the analytic count.
    b = experiment.batch_size
    batch = (experiment.x_train[:b], experiment.y_train[:b])
    xla_step_flops = compiled_flops(jax.jit(experiment.train_step).lower(state, batch).compile())
    analytic_flops = 6.0 * b * num_params
    flops_per_step = xla_step_flops if xla_step_flops is not None else analytic_flops
    flops_source = (
        "xla_cost_analysis_train_step" if xla_step_flops is not None else "analytic_6_batch_params"
    )

    loops = {
        "altlearn": Loop(lambda s: experiment.train_steps(s, chunk_steps), state, chunk_steps),
        "hand": Loop(lambda s: hand_train_chunk(s, chunk_steps), hand_state, chunk_steps),
    }
    matmul = Matmul(matmul_size)
    rounds = timed_rounds({**loops, "matmul": matmul}, repeats)
    peak = matmul_peak(matmul, rounds.times["matmul"])
    losses = {"altlearn": loops["altlearn"].outputs["loss"], "hand": loops["hand"].outputs}

    results = {}
    for name, loop in loops.items():
        times = rounds.times[name]
        median = statistics.median(times)
        per_step = median / chunk_steps
        gflops = flops_per_step / per_step / 1e9
        results[name] = {
            "compile_s": loop.compile_s,
            "chunk_times_s": times,
            "median_chunk_s": median,
            "step_us": per_step * 1e6,
            "steps_per_s": 1.0 / per_step,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["gflops"],
            "loss_last_50_steps": float(np.mean(np.asarray(losses[name])[-50:])),
            "timed_calls": len(times),
            "steps_per_call": loop.steps_per_call,
            "steps_run": int(loop.state.step),  # the loop's own counter, warm-up included
        }
    ratio = results["altlearn"]["median_chunk_s"] / results["hand"]["median_chunk_s"]
    return {
        "altlearn": results["altlearn"],
        "hand": results["hand"],
        "ratio_altlearn_over_hand": ratio,
        "target_ratio": OVERHEAD_TARGET,
        "target_met": bool(ratio <= OVERHEAD_TARGET),
        "chunk_steps": chunk_steps,
        "repeats": repeats,
        "steps_timed_per_loop": chunk_steps * repeats,
        "hand_start": "altlearn's initial params, step and run key",
        "hand_batches": "altlearn's: per-epoch jax.random.permutation from split(run key)[0], "
        "drawn per chunk, sliced into batches",
        "loss_max_relative_difference_last_chunk": max_relative_difference(
            losses["hand"], losses["altlearn"]
        ),
        "other_processes_busy_cores": rounds.other_load_cores,
        "num_params": num_params,
        "flops_per_step": flops_per_step,
        "flops_source": flops_source,
        "flops_per_step_xla": xla_step_flops,
        "flops_per_step_analytic": analytic_flops,
        "matmul_peak": peak,
        "config": config_summary(config, experiment),
        "machine": machine_facts(),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per loop, then the ratio)."""
    peak = result["matmul_peak"]
    lines = [
        "| loop | compile (s) | median chunk (s) | time/step (us) | steps/s | GFLOP/s "
        "| % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("altlearn", "hand"):
        r = result[name]
        lines.append(
            f"| {name} | {r['compile_s']:.2f} | {r['median_chunk_s']:.3f} | {r['step_us']:.0f} | "
            f"{r['steps_per_s']:.0f} | {r['gflops']:.1f} | {100 * r['fraction_of_peak']:.1f} |"
        )
    ratio = result["ratio_altlearn_over_hand"]
    verdict = "met" if result["target_met"] else "NOT met"
    lines += [
        "",
        f"ratio altlearn/hand: **{ratio:.3f}** (target <= {result['target_ratio']:.2f}: {verdict})",
        f"FLOPs/step: {result['flops_per_step'] / 1e6:.1f} M ({result['flops_source']}; analytic "
        f"6*B*P = {result['flops_per_step_analytic'] / 1e6:.1f} M); float32 matmul peak "
        f"({peak['n']}x{peak['n']}, fastest call of the rounds): {peak['gflops']:.1f} GFLOP/s",
        "Same run in both loops: per-step losses of the last chunk agree to "
        f"{result['loss_max_relative_difference_last_chunk']:.1e} (largest relative difference).",
    ]
    busy = busy_cores_line(result)
    if busy:
        lines.append(busy)
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.overhead")
    try:
        result = measure(_CONFIG.value, _CHUNK_STEPS.value, _REPEATS.value, _MATMUL_SIZE.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    result["command"] = command_line("benchmarks.overhead")
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    from altlearn.config import define_config_flag

    try:
        _CONFIG, _ARGV = define_config_flag(sys.argv, "experiments/configs/default.py")
    except ValueError as e:
        sys.exit(f"error: {e}")
    _CHUNK_STEPS = flags.DEFINE_integer("chunk_steps", 500, "Steps per compiled chunk.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed chunk calls per loop (interleaved).")
    _OUT = flags.DEFINE_string("out", "docs/bench/overhead.json", "Where the JSON goes.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOPs matmul.")
    app.run(main, argv=_ARGV)
