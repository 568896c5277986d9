"""Speed and memory of the ``evolution`` rule (evosax strategies over network weights).

Command (writes docs/bench/evolution.json and prints markdown tables):

    python -m benchmarks.evolution

Model, data, batch: MLP 40-256-256-10 (ReLU) on mnist1d, batch 128; strategy Open_ES with
std 0.05 and Adam (learning rate 1e-2). What it measures, in one run:

1. *Overhead.* altlearn (``Experiment.train_steps``, one generation per step) against a raw
   evosax loop: the same MLP written as a plain flax module, ``Open_ES(...)`` with the same
   population, std and optimizer, ``ask`` -> ``vmap`` of the mean cross-entropy -> ``tell`` in a
   ``lax.scan`` (``benchmarks.harness.make_raw_es_loop``). The raw loop starts from altlearn's
   initial mean and derives its batches and ask/tell keys as the rule does, so both run the same
   generations (the JSON records the largest relative difference of their per-generation mean
   fitness). Both chunks of ``chunk_generations`` generations are compiled ahead of time
   (compile time reported apart), then timed in interleaved rounds after a warm-up round;
   medians. altlearn also evaluates the incoming params once per step (``metrics['loss']``) and
   guards NaN fitness, which the raw loop does not. Target ratio <= 1.05.
2. *Throughput.* Generations per second at each population size, and the achieved GFLOP/s of
   a generation against the machine's float32 peak (the fastest of the jitted 2048x2048
   matmuls timed in the same rounds: the median would understate the peak when other
   processes share the cores, and overstate every fraction of it). FLOPs per generation:
   XLA's ``cost_analysis()`` of ONE compiled ``train_step`` (XLA counts a while-loop body once,
   so a chunk's count is not divided), and the analytic forward count
   2 * batch * num_params * (population + 1) beside it. Target: within 2x of the matmul floor
   (>= 50% of peak). The rule's population evaluation alone (``evaluate_population`` on a fixed
   population, no ask or tell) is timed too, which splits a generation into the forward passes
   and evosax's ask/tell (sampling P x num_params normals, ravelling and unravelling the
   population, the update).
3. *Memory.* ``memory_analysis()`` of one compiled ``train_step`` per population size, without
   and with ``rule.memory_budget_mb`` (chunked evaluation): XLA's temporary buffers (what
   chunking bounds), and the arguments and outputs (the training state: 5 * num_params floats
   for Open_ES with Adam, namely params, mean, two Adam moments and best solution, whatever the
   population). The population itself (P * num_params floats) is made whole by ``ask`` whatever
   the budget. The chunked step's generations per second are timed at the largest population.
   (On CPU ``peak_memory_in_bytes`` counts little more than the arguments; it is not reported.)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from jax.flatten_util import ravel_pytree

from altlearn import report
from altlearn.config import base_config
from altlearn.rules._population import activation_bytes, chunk_size_for, evaluate_population
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    Matmul,
    busy_cores_line,
    command_line,
    compiled_flops,
    machine_facts,
    make_raw_es_loop,
    matmul_peak,
    memory_bytes,
    timed_rounds,
    write_json,
)

OVERHEAD_TARGET = 1.05
PEAK_FRACTION_TARGET = 0.5
STD = 0.05
LEARNING_RATE = 1e-2
BATCH = 128
MIN_CHUNK_GENERATIONS = 4  # generations per timed call, at the least (``measure``)


def evolution_config(
    population_size: int,
    memory_budget_mb: int = 0,
    widths: Sequence[int] = (256, 256),
    batch_size: int = BATCH,
    rng_partitionable: str = "auto",
    data: str = "mnist1d",
) -> ml_collections.ConfigDict:
    """Open_ES on ``data`` (mnist1d), MLP in-widths-out."""
    config = base_config(rule="evolution", model="mlp", data=data)
    config.model.widths = tuple(widths)
    config.batch_size = batch_size
    config.rule.rng_partitionable = rng_partitionable
    config.rule.strategy = "Open_ES"
    config.rule.population_size = population_size
    config.rule.strategy_params = {"std_init": STD}
    config.rule.memory_budget_mb = memory_budget_mb
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = LEARNING_RATE
    return config


def raw_loop(experiment: Experiment, key: jax.Array, params: Any, generations: int) -> Loop:
    """The raw evosax loop of ``experiment``'s population, from ``params`` (altlearn's initial
    params from ``key``), ``generations`` per call."""
    raw_init, raw_chunk = make_raw_es_loop(
        experiment, int(experiment.config.rule.population_size), STD, LEARNING_RATE
    )
    return Loop(lambda s: raw_chunk(s, generations), raw_init(key, params), generations)


def population_around(params: Any, population_size: int) -> Any:
    """``population_size`` members params + STD * N(0, 1), as Open_ES asks them."""
    flat, unravel = ravel_pytree(params)
    noise = jax.random.normal(jax.random.PRNGKey(1), (population_size, flat.size))
    return jax.vmap(unravel)(flat + STD * noise)


def evaluation_chunk(
    experiment: Experiment, population: Any, num_generations: int
) -> tuple[Any, jax.Array]:
    """The rule's population evaluation alone (no ask, no tell), on ``num_generations``
    successive batches: the share of a generation that altlearn itself computes."""
    batch = experiment.batch_size

    def body(_, t: jax.Array):
        x = jax.lax.dynamic_slice_in_dim(experiment.x_train, t * batch, batch)
        y = jax.lax.dynamic_slice_in_dim(experiment.y_train, t * batch, batch)
        fitness_fn = lambda m: jnp.mean(
            experiment.task.loss(experiment.model.apply({"params": m}, x), y)
        )
        return None, jnp.mean(evaluate_population(fitness_fn, population))

    _, losses = jax.lax.scan(body, None, jnp.arange(num_generations))
    return population, losses


def _per_generation_loss(outputs: Any) -> np.ndarray:
    """Per-generation mean fitness of a chunk's outputs (altlearn's metrics or a raw array)."""
    return np.asarray(outputs["fitness_mean"] if isinstance(outputs, dict) else outputs)


def max_relative_difference(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def measure(
    populations: Sequence[int] = (16, 64, 256, 1024),
    overhead_population: int = 64,
    chunk_generations: int = 16,
    repeats: int = 9,
    memory_budget_mb: int = 32,
    widths: Sequence[int] = (256, 256),
    matmul_size: int = 2048,
    batches: Sequence[int] = (128, 512, 2048),
    min_chunk_generations: int = MIN_CHUNK_GENERATIONS,
    data: str = "mnist1d",
) -> dict[str, Any]:
    """Runs parts 1-3; returns every number as a JSON-able dict.

    A population P is timed in chunks of chunk_generations * overhead_population // P
    generations, so every chunk does about the same work, but at least
    ``min_chunk_generations``: a compiled call pays for its temporary buffers once (allocated
    and first touched on each call), which training amortises over ``eval_every`` steps
    (measured, P = 1024: 1011 ms per generation at one generation per call, 702 ms at four).
    """
    key = jax.random.PRNGKey(0)
    loops: dict[str, Loop] = {}  # every timed chunk, in the order of a round

    per_population: dict[int, dict[str, Any]] = {}
    for p in sorted({*populations, overhead_population}):
        generations = max(min_chunk_generations, chunk_generations * overhead_population // p)
        for budget in (0, memory_budget_mb) if memory_budget_mb > 0 else (0,):
            experiment = Experiment(evolution_config(p, budget, widths, data=data))
            state = experiment.init(key)
            batch = (experiment.x_train[: experiment.batch_size],)
            batch += (experiment.y_train[: experiment.batch_size],)
            step = jax.jit(experiment.train_step).lower(state, batch).compile()
            entry = per_population.setdefault(p, {"population_size": p})
            entry["memory" if budget == 0 else "memory_budgeted"] = memory_bytes(step)
            if budget:  # the chunk size the rule picks: as many members as fit the budget
                member_bytes = activation_bytes(experiment.model.apply, state.variables, batch[0])
                entry["activation_bytes_per_member"] = member_bytes
                entry["chunk_size_budgeted"] = chunk_size_for(p, member_bytes, budget)
            if budget == 0:
                num_params = sum(int(np.size(a)) for a in jax.tree.leaves(state.variables))
                entry["num_params"] = num_params
                entry["flops_xla"] = compiled_flops(step)
                entry["flops_analytic"] = 2.0 * experiment.batch_size * num_params * (p + 1)
                entry["population_bytes"] = 4 * p * num_params
            if budget == 0 or p == max(populations):
                name = f"altlearn/P={p}" + (f"/budget={budget}MB" if budget else "")
                loops[name] = Loop(
                    lambda s, e=experiment, g=generations: e.train_steps(s, g), state, generations
                )
            if budget == 0:
                loops[f"evaluation/P={p}"] = Loop(
                    lambda pop, e=experiment, g=generations: evaluation_chunk(e, pop, g),
                    population_around(state.variables["params"], p),
                    generations,
                )
            if budget == 0 and p == overhead_population:  # from altlearn's initial state
                loops[f"raw/P={p}"] = raw_loop(
                    experiment, key, state.variables["params"], generations
                )

    # The threefry mode: altlearn and the raw loop again in JAX's default mode on CPU
    # (partitionable, "on"), which a raw evosax loop gets unless its user changes it.
    po, gens = overhead_population, max(min_chunk_generations, chunk_generations)
    experiment = Experiment(evolution_config(po, 0, widths, BATCH, "on", data))
    state = experiment.init(key)
    loops[f"altlearn/P={po}/rng=on"] = Loop(
        lambda s, e=experiment: e.train_steps(s, gens), state, gens
    )
    loops[f"raw/P={po}/rng=on"] = raw_loop(experiment, key, state.variables["params"], gens)

    # Larger batches at the overhead population: the forward FLOPs grow with the batch, the
    # sampling and the update do not.
    by_batch: dict[int, dict[str, Any]] = {}
    for b in batches:
        if b == BATCH:
            continue
        experiment = Experiment(evolution_config(po, 0, widths, b, data=data))
        state = experiment.init(key)
        batch = (experiment.x_train[:b], experiment.y_train[:b])
        step = jax.jit(experiment.train_step).lower(state, batch).compile()
        num_params = per_population[po]["num_params"]
        by_batch[b] = {
            "batch_size": b,
            "flops_xla": compiled_flops(step),
            "flops_analytic": 2.0 * b * num_params * (po + 1),
        }
        g = max(min_chunk_generations, chunk_generations * BATCH // b)
        population = population_around(state.variables["params"], po)
        loops[f"altlearn/P={po}/B={b}"] = Loop(
            lambda s, e=experiment, g=g: e.train_steps(s, g), state, g
        )
        loops[f"evaluation/P={po}/B={b}"] = Loop(
            lambda pop, e=experiment, g=g: evaluation_chunk(e, pop, g), population, g
        )

    matmul = Matmul(matmul_size)
    rounds = timed_rounds({**loops, "matmul": matmul}, repeats)
    peak = matmul_peak(matmul, rounds.times["matmul"])
    peak_gflops = peak["gflops"]

    timed = {}
    for name, loop in loops.items():
        times = [t / loop.steps_per_call for t in rounds.times[name]]
        median = statistics.median(times)
        outputs = loop.outputs
        step = getattr(loop.state, "step", None)
        timed[name] = {
            "compile_s": loop.compile_s,
            "generations_per_chunk": loop.steps_per_call,
            "timed_calls": len(times),
            "generations_run": None if step is None else int(step),  # warm-up included
            "generation_times_s": times,
            "median_generation_s": median,
            "generations_per_s": 1.0 / median,
            "mean_loss_last_chunk": float(
                np.mean(np.asarray(outputs["loss"] if isinstance(outputs, dict) else outputs))
            ),
        }
    for p, entry in per_population.items():
        flops = entry["flops_xla"] or entry["flops_analytic"]
        gen_s = timed[f"altlearn/P={p}"]["median_generation_s"]
        entry["generations_per_s"] = 1.0 / gen_s
        entry["gflops"] = flops / gen_s / 1e9
        entry["fraction_of_peak"] = entry["gflops"] / peak_gflops
        evaluation_s = timed[f"evaluation/P={p}"]["median_generation_s"]
        evaluation_flops = 2.0 * BATCH * entry["num_params"] * p
        entry["evaluation_s"] = evaluation_s
        entry["evaluation_share"] = evaluation_s / gen_s
        entry["evaluation_fraction_of_peak"] = evaluation_flops / evaluation_s / 1e9 / peak_gflops
        budgeted = timed.get(f"altlearn/P={p}/budget={memory_budget_mb}MB")
        if budgeted is not None:
            entry["generations_per_s_budgeted"] = budgeted["generations_per_s"]
    for b, entry in by_batch.items():
        flops = entry["flops_xla"] or entry["flops_analytic"]
        gen_s = timed[f"altlearn/P={po}/B={b}"]["median_generation_s"]
        evaluation_s = timed[f"evaluation/P={po}/B={b}"]["median_generation_s"]
        entry["generations_per_s"] = 1.0 / gen_s
        entry["gflops"] = flops / gen_s / 1e9
        entry["fraction_of_peak"] = entry["gflops"] / peak_gflops
        entry["evaluation_s"] = evaluation_s
        entry["evaluation_share"] = evaluation_s / gen_s
        entry["evaluation_fraction_of_peak"] = (
            2.0 * b * per_population[po]["num_params"] * po / evaluation_s / 1e9 / peak_gflops
        )
    by_batch[BATCH] = {"batch_size": BATCH, **per_population[po]}
    median = lambda name: timed[name]["median_generation_s"]
    same_run = lambda suffix: max_relative_difference(
        _per_generation_loss(loops[f"raw/P={po}{suffix}"].outputs),
        _per_generation_loss(loops[f"altlearn/P={po}{suffix}"].outputs),
    )
    ratio = median(f"altlearn/P={po}") / median(f"raw/P={po}")
    rng = {
        "altlearn_rng_on_s": median(f"altlearn/P={po}/rng=on"),
        "raw_rng_on_s": median(f"raw/P={po}/rng=on"),
        "ratio_altlearn_over_raw_rng_on": median(f"altlearn/P={po}/rng=on")
        / median(f"raw/P={po}/rng=on"),
        "speedup_classic_over_partitionable": median(f"altlearn/P={po}/rng=on")
        / median(f"altlearn/P={po}"),
        "ratio_altlearn_auto_over_raw_jax_default": median(f"altlearn/P={po}")
        / median(f"raw/P={po}/rng=on"),
    }
    fractions = [per_population[p]["fraction_of_peak"] for p in populations]
    layer_sizes = [int(np.prod(experiment.x_train.shape[1:])), *widths]
    layer_sizes.append(int(experiment.dataset.num_outputs))
    return {
        "overhead": {
            "population_size": overhead_population,
            "altlearn": timed[f"altlearn/P={overhead_population}"],
            "raw_evosax": timed[f"raw/P={overhead_population}"],
            "ratio_altlearn_over_raw": ratio,
            "target_ratio": OVERHEAD_TARGET,
            "target_met": bool(ratio <= OVERHEAD_TARGET),
            "raw_start": "altlearn's initial mean; batches and ask/tell keys derived as the rule",
            "fitness_mean_max_relative_difference_last_chunk": same_run(""),
            "fitness_mean_max_relative_difference_last_chunk_rng_on": same_run("/rng=on"),
            **rng,
        },
        "by_batch": [by_batch[b] for b in sorted(by_batch)],
        "populations": [per_population[p] for p in populations],
        "peak_fraction_target": PEAK_FRACTION_TARGET,
        "peak_target_met": {
            str(p): bool(f >= PEAK_FRACTION_TARGET) for p, f in zip(populations, fractions)
        },
        "memory_budget_mb": memory_budget_mb,
        "timed_chunks": timed,
        "repeats": repeats,
        "matmul_peak": peak,
        "other_processes_busy_cores": rounds.other_load_cores,
        "config": {
            "model": f"mlp {'-'.join(map(str, layer_sizes))} relu",
            "data": data,
            "batch_size": BATCH,
            "strategy": "Open_ES",
            "std": STD,
            "optimizer": f"adam({LEARNING_RATE})",
        },
        "machine": machine_facts(),
    }


def markdown_tables(result: dict[str, Any]) -> str:
    """The three tables: overhead, throughput against population size, memory."""
    o = result["overhead"]
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "n/a"
    lines = [
        f"**Overhead** (Open_ES, P={o['population_size']}, "
        f"{o['altlearn']['generations_per_chunk']} generations per compiled chunk)",
        "",
        "| loop | compile (s) | time/generation (ms) | generations/s |",
        "|---|---:|---:|---:|",
    ]
    for name in ("altlearn", "raw_evosax"):
        r = o[name]
        lines.append(
            f"| {name} | {r['compile_s']:.2f} | {1e3 * r['median_generation_s']:.2f} | "
            f"{r['generations_per_s']:.1f} |"
        )
    verdict = "met" if o["target_met"] else "NOT met"
    lines += [
        "",
        f"ratio altlearn/raw: **{o['ratio_altlearn_over_raw']:.3f}** "
        f"(target <= {o['target_ratio']:.2f}: {verdict})",
        "",
        f"Same loops in JAX's default threefry mode on CPU (partitionable): altlearn "
        f"{1e3 * o['altlearn_rng_on_s']:.2f} ms, raw {1e3 * o['raw_rng_on_s']:.2f} ms per "
        f"generation (ratio {o['ratio_altlearn_over_raw_rng_on']:.3f}); the classic mode "
        f"(rule.rng_partitionable=auto on CPU) is {o['speedup_classic_over_partitionable']:.2f}x "
        f"faster; altlearn (auto) / raw evosax with JAX defaults: "
        f"**{o['ratio_altlearn_auto_over_raw_jax_default']:.3f}**",
        "",
        "Same run in both loops: per-generation mean fitness of the last chunk agrees to "
        f"{o['fitness_mean_max_relative_difference_last_chunk']:.1e} "
        f"({o['fitness_mean_max_relative_difference_last_chunk_rng_on']:.1e} partitionable; "
        "largest relative difference).",
        "",
        f"**Throughput** (float32 matmul peak {result['matmul_peak']['gflops']:.1f} GFLOP/s, "
        f"fastest {result['matmul_peak']['n']}^2 matmul of the rounds)",
        "",
        "| population | generations/s | GFLOP/generation (XLA) | GFLOP/generation "
        "(2·B·params·(P+1)) | GFLOP/s | % of peak | evaluation alone (ms) | evaluation "
        "% of peak | evaluation share of a generation |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["populations"]:
        xla = f"{r['flops_xla'] / 1e9:.2f}" if r["flops_xla"] else "n/a"
        lines.append(
            f"| {r['population_size']} | {r['generations_per_s']:.1f} | {xla} | "
            f"{r['flops_analytic'] / 1e9:.2f} | {r['gflops']:.1f} | "
            f"{100 * r['fraction_of_peak']:.0f} | {1e3 * r['evaluation_s']:.1f} | "
            f"{100 * r['evaluation_fraction_of_peak']:.0f} | "
            f"{100 * r['evaluation_share']:.0f}% |"
        )
    lines += [
        "",
        f"**Batch size** at P={o['population_size']}",
        "",
        "| batch | generations/s | GFLOP/s | % of peak | evaluation % of peak | "
        "evaluation share of a generation |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["by_batch"]:
        lines.append(
            f"| {r['batch_size']} | {r['generations_per_s']:.1f} | {r['gflops']:.1f} | "
            f"{100 * r['fraction_of_peak']:.0f} | {100 * r['evaluation_fraction_of_peak']:.0f} | "
            f"{100 * r['evaluation_share']:.0f}% |"
        )
    lines += [
        "",
        f"**Memory** of one compiled step (MiB; budget = rule.memory_budget_mb="
        f"{result['memory_budget_mb']})",
        "",
        "| population | population (P·params·4 B) | temp | temp, budget | members per chunk, "
        "budget | arguments | outputs | generations/s, budget |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["populations"]:
        m, mb = r["memory"] or {}, r.get("memory_budgeted") or {}
        budgeted = r.get("generations_per_s_budgeted")
        lines.append(
            f"| {r['population_size']} | {mib(r['population_bytes'])} | {mib(m.get('temp'))} | "
            f"{mib(mb.get('temp'))} | {r.get('chunk_size_budgeted', '-')} | "
            f"{mib(m.get('argument'))} | {mib(m.get('output'))} | "
            f"{f'{budgeted:.1f}' if budgeted else '-'} |"
        )
    busy = busy_cores_line(result)
    if busy:
        lines += ["", busy]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.evolution")
    result = measure(
        tuple(int(p) for p in _POPULATIONS.value),
        _OVERHEAD_POPULATION.value,
        _CHUNK_GENERATIONS.value,
        _REPEATS.value,
        _BUDGET_MB.value,
        tuple(int(w) for w in _WIDTHS.value),
        _MATMUL_SIZE.value,
        tuple(int(b) for b in _BATCHES.value),
        _MIN_CHUNK_GENERATIONS.value,
        _DATA.value,
    )
    result["command"] = command_line("benchmarks.evolution")
    out = write_json(result, _OUT.value, markdown_tables(result), provenance)
    print(markdown_tables(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _POPULATIONS = flags.DEFINE_list("populations", ["16", "64", "256", "1024"], "Sizes timed.")
    _OVERHEAD_POPULATION = flags.DEFINE_integer("overhead_population", 64, "P of part 1.")
    _CHUNK_GENERATIONS = flags.DEFINE_integer(
        "chunk_generations", 16, "Generations per chunk at the overhead population."
    )
    _MIN_CHUNK_GENERATIONS = flags.DEFINE_integer(
        "min_chunk_generations", MIN_CHUNK_GENERATIONS, "Generations per timed call, at least."
    )
    _REPEATS = flags.DEFINE_integer("repeats", 9, "Timed rounds (interleaved).")
    _BUDGET_MB = flags.DEFINE_integer(
        "budget_mb", 32, "rule.memory_budget_mb of part 3 (0: skip it)."
    )
    _WIDTHS = flags.DEFINE_list("widths", ["256", "256"], "Hidden widths of the MLP.")
    _OUT = flags.DEFINE_string("out", "docs/bench/evolution.json", "Where the JSON goes.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOPs matmul.")
    _DATA = flags.DEFINE_string("data", "mnist1d", "Dataset.")
    _BATCHES = flags.DEFINE_list(
        "batches", ["128", "512", "2048"], "Batch sizes timed at the overhead population."
    )
    app.run(main)
