"""Whole-network PSO: altlearn's ``pso`` rule against pyswarms, time per iteration.

    python -m benchmarks.pso --out=docs/bench/pso.json     (~2-3 min on 2 CPU cores)

Same network, data, swarm size, coefficients, velocity clamp and particle initialisation (the
same initial network, plus ``init_scale`` * N(0, 1) per particle, particle 0 the network itself)
on both sides. pyswarms (``pyswarms.single.GlobalBestPSO``, a benchmark-only dependency: the
``bench`` extra) gets the objective a careful user would write: one vectorised numpy forward
pass of the MLP over all particles (float32 batched matmuls), drawing the next minibatch of a
per-epoch permutation on each call; it gives the same per-particle losses as altlearn's loss of
the same network (tested). It is timed with numpy's default BLAS threads and with one BLAS
thread (threadpoolctl), and the ratio uses the faster: numpy's stacked matmuls call one small
GEMM per particle, and multi-threaded OpenBLAS on such calls can be many times slower, most of
all on a loaded machine.

Every method runs ``chunk_steps`` iterations per timed call: altlearn as one call of
``Experiment.train_steps`` (batch sampling included) compiled ahead of time (compile time
reported apart), pyswarms as one ``optimize(iters=chunk_steps)``. After one untimed warm-up
round, the calls of all methods are interleaved ``repeats`` times and the median per iteration
reported; the JSON records how many iterations each side ran (altlearn's step counter, the
number of objective calls pyswarms made).

Work per iteration differs, and the table says so: pyswarms scores the P particles; altlearn
by default also re-scores the P personal bests and the global best on each batch (RULES.md
section 3's decision), 2P + 1 forward passes; with ``rescore_bests=False`` (classic PSO, as
pyswarms) it does P + 1 (the +1 is its ``loss`` metric of the incoming params), timed too. The
float32 matmul peak (``benchmarks.harness.matmul_peak``: the fastest 2048^2 matmul timed in the
same rounds) gives a floor: P forward passes at the peak, 2 * batch * num_params * P FLOPs;
pyswarms' time over that floor bounds the ratio any implementation of the same P passes could
reach on this machine.

A third table times pso against the loop a user of evosax writes (``benchmarks.harness.
make_raw_pso_loop``: evosax's ``PSO``, ask, the vmapped loss, tell, in a ``lax.scan``), from the
same initial particles on the same minibatches: altlearn as specified and as the same algorithm
as evosax's (``rescore_bests=False``, ``velocity_clamp=0`` and ``shared_coefficients=True``: one
r1, r2 per particle; P + 1 forward passes against evosax's P, the +1 being the incoming params'
loss that altlearn reports).

The last rows compare ``neuron_pso`` (16 particles per neuron, Jacobi) with ``pso`` given as
many particles as ``neuron_pso`` evaluates candidates per step, so both do the same number of
(full or downstream-only) network evaluations per step.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app

from altlearn import report
from altlearn.config import base_config
from altlearn.rules.neuron_pso import neurons_of
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    Matmul,
    busy_cores_line,
    command_line,
    machine_facts,
    make_raw_pso_loop,
    matmul_peak,
    timed_rounds,
    write_json,
)

INERTIA, COGNITIVE, SOCIAL = 0.729, 1.49445, 1.49445
INIT_SCALE, CLAMP = 0.1, 0.1
NEURON_PARTICLES = 16
AS_EVOSAX = "altlearn pso as evosax's (rescore_bests=False, velocity_clamp=0, shared_coefficients)"


def make_config(
    rule: str, batch_size: int, data: str = "digits", widths: Sequence[int] = (32,), **options
) -> ml_collections.ConfigDict:
    """``rule`` (pso or neuron_pso) on an MLP with the coefficients both libraries use."""
    config = base_config(rule=rule, model="mlp", data=data)
    config.model.widths = tuple(int(w) for w in widths)
    config.batch_size = batch_size
    config.rule.update(
        inertia=INERTIA,
        cognitive=COGNITIVE,
        social=SOCIAL,
        init_scale=INIT_SCALE,
        velocity_clamp=CLAMP,
        **options,
    )
    return config


def altlearn_loop(config: ml_collections.ConfigDict, chunk_steps: int) -> Loop:
    experiment = Experiment(config)
    state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
    loop = Loop(lambda s: experiment.train_steps(s, chunk_steps), state, chunk_steps)
    loop.experiment = experiment
    return loop


class ParticleLayout:
    """A network as one flat particle vector, pyswarms' way: per layer, in order, the kernel
    (row-major) then the bias."""

    def __init__(self, params: Any):
        self.names = list(params)
        self.shapes = [(params[n]["kernel"].shape, params[n]["bias"].size) for n in self.names]
        self.size = sum(int(np.prod(k)) + b for k, b in self.shapes)

    def flatten(self, params: Any) -> np.ndarray:
        return np.concatenate(
            [
                np.concatenate([np.ravel(params[n]["kernel"]), np.ravel(params[n]["bias"])])
                for n in self.names
            ]
        )

    def unflatten(self, vector: np.ndarray) -> dict[str, Any]:
        """The params pytree (altlearn's layer names) of one particle vector."""
        out, offset = {}, 0
        for name, (kernel_shape, bias_size) in zip(self.names, self.shapes):
            size = int(np.prod(kernel_shape))
            kernel = vector[offset : offset + size].reshape(kernel_shape)
            bias = vector[offset + size : offset + size + bias_size]
            out[name] = {"kernel": kernel, "bias": bias}
            offset += size + bias_size
        return out

    def forward_losses(self, positions: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Mean cross-entropy of every particle [P, D] on the batch (x [B, in], y [B]): [P]."""
        theta = positions.astype(np.float32)
        h, offset = x, 0
        for i, (kernel_shape, bias_size) in enumerate(self.shapes):
            size = int(np.prod(kernel_shape))
            kernel = theta[:, offset : offset + size].reshape(-1, *kernel_shape)
            bias = theta[:, offset + size : offset + size + bias_size][:, None, :]
            offset += size + bias_size
            h = h @ kernel + bias  # [P, B, out]
            if i < len(self.shapes) - 1:
                h = np.maximum(h, 0.0)
        top = h.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(h - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(h, y[None, :, None], axis=-1)[..., 0]
        return (log_z - picked).mean(axis=1).astype(np.float64)


class PyswarmsRun:
    """pyswarms GlobalBestPSO on a numpy forward pass of the same MLP and data, ``iterations``
    per call, numpy's BLAS limited to ``blas_threads`` (None: numpy's default)."""

    def __init__(
        self,
        experiment: Experiment,
        params: Any,
        batch_size: int,
        population_size: int,
        iterations: int,
        blas_threads: int | None,
    ):
        import pyswarms
        import threadpoolctl

        self.blas_threads, self.iterations = blas_threads, iterations
        self.controller = threadpoolctl.ThreadpoolController()
        data = experiment.dataset
        self.x = data.x_train.reshape(data.x_train.shape[0], -1).astype(np.float32)
        self.y = data.y_train
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)
        self.order, self.position = np.arange(0), 0
        self.objective_calls = 0
        params = jax.device_get(params)
        self.layout = ParticleLayout(params)
        center = self.layout.flatten(params).astype(np.float64)
        noise = self.rng.normal(size=(population_size, center.size))
        noise[0] = 0.0  # particle 0 = the initial network, as in altlearn
        self.optimizer = pyswarms.single.GlobalBestPSO(
            n_particles=population_size,
            dimensions=center.size,
            options={"c1": COGNITIVE, "c2": SOCIAL, "w": INERTIA},
            init_pos=center + INIT_SCALE * noise,
            velocity_clamp=(-CLAMP, CLAMP),
        )

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        if self.batch_size >= self.x.shape[0]:
            return self.x, self.y
        if self.position + self.batch_size > self.order.size:
            self.order, self.position = self.rng.permutation(self.x.shape[0]), 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.x[idx], self.y[idx]

    def objective(self, positions: np.ndarray) -> np.ndarray:
        """Mean cross-entropy of every particle [P, D] on the next batch: [P]."""
        self.objective_calls += 1
        return self.layout.forward_losses(positions, *self.batch())

    def __call__(self) -> None:
        with self.controller.limit(limits=self.blas_threads, user_api="blas"):
            self.optimizer.optimize(self.objective, iters=self.iterations, verbose=False)


def experiment_shape(experiment: Experiment) -> str:
    sizes = [int(np.prod(experiment.x_train.shape[1:]))]
    sizes += [int(w) for w in experiment.config.model.widths]
    return "-".join(map(str, [*sizes, experiment.dataset.num_outputs]))


def measure(
    data: str = "digits",
    widths: Sequence[int] = (32,),
    population_size: int = 64,
    batch_size: int = 128,
    chunk_steps: int = 50,
    repeats: int = 5,
    neuron_pso: bool = True,
    matmul_size: int = 2048,
    full_batch: bool = True,
    evosax: bool = True,
) -> dict[str, Any]:
    """pso against pyswarms at ``batch_size`` and (``full_batch``) at full batch, (``evosax``)
    against a raw evosax PSO loop, then (``neuron_pso``) neuron_pso against pso at equal
    evaluations; every number as a JSON-able dict."""
    population = population_size
    config = lambda rule, batch, **options: make_config(rule, batch, data, widths, **options)
    results: dict[str, Any] = {}
    loads = []
    num_train = Experiment(config("pso", batch_size)).num_train
    batches = {"minibatch": batch_size, **({"full batch": num_train} if full_batch else {})}
    for label, batch in batches.items():
        first = altlearn_loop(config("pso", batch, population_size=population), chunk_steps)
        experiment = first.experiment
        params = first.state.variables["params"]  # read before the loop donates it
        num_params = sum(int(np.size(a)) for a in jax.tree.leaves(params))
        pyswarms_run = lambda threads, e=experiment, p=params, b=batch: PyswarmsRun(
            e, p, b, population, chunk_steps, threads
        )
        runs = {
            "altlearn pso": first,
            "altlearn pso, no re-scoring": altlearn_loop(
                config("pso", batch, population_size=population, rescore_bests=False), chunk_steps
            ),
            "pyswarms": pyswarms_run(None),
            "pyswarms, 1 BLAS thread": pyswarms_run(1),
        }
        matmul = Matmul(matmul_size)
        rounds = timed_rounds({**runs, "matmul": matmul}, repeats)
        loads.append(rounds.other_load_cores)
        times = {name: statistics.median(rounds.times[name]) / chunk_steps for name in runs}
        baseline = min(times["pyswarms"], times["pyswarms, 1 BLAS thread"])
        ratio = baseline / times["altlearn pso"]
        ratio_plain = baseline / times["altlearn pso, no re-scoring"]
        # The FLOP floor: P forward passes at the machine's peak (fastest matmul of the rounds).
        peak = matmul_peak(matmul, rounds.times["matmul"])["gflops"]
        floor_s = 2.0 * batch * num_params * population / (peak * 1e9)
        iterations_run = {
            "altlearn": int(runs["altlearn pso"].state.step),
            "altlearn_no_rescore": int(runs["altlearn pso, no re-scoring"].state.step),
            "pyswarms": runs["pyswarms"].objective_calls,
            "pyswarms_1_blas_thread": runs["pyswarms, 1 BLAS thread"].objective_calls,
        }
        results[label] = {
            "batch_size": batch,
            "altlearn_ms": 1e3 * times["altlearn pso"],
            "altlearn_no_rescore_ms": 1e3 * times["altlearn pso, no re-scoring"],
            "pyswarms_ms": 1e3 * times["pyswarms"],
            "pyswarms_1_blas_thread_ms": 1e3 * times["pyswarms, 1 BLAS thread"],
            "ratio_pyswarms_over_altlearn": ratio,  # against the faster pyswarms setting
            "ratio_pyswarms_over_altlearn_no_rescore": ratio_plain,
            "matmul_peak_gflops": peak,
            "forward_flops_floor_ms": 1e3 * floor_s,  # P passes at the peak
            "ratio_bound_at_peak": baseline / floor_s,
            "altlearn_compile_s": first.compile_s,
            "iterations_per_call": chunk_steps,
            "timed_calls": repeats,
            "iterations_run": iterations_run,  # warm-up round included
            "forward_passes_per_iteration": {
                "altlearn": 2 * population + 1,
                "altlearn_no_rescore": population + 1,
                "pyswarms": population,
            },
            "other_processes_busy_cores": rounds.other_load_cores,
        }

    if evosax:  # the same classic PSO algorithm written with evosax, at the minibatch size
        classic = config(
            "pso", batch_size, population_size=population, rescore_bests=False,
            shared_coefficients=True,
        )  # fmt: skip
        classic.rule.velocity_clamp = 0.0  # evosax's PSO has none
        runs = {
            "altlearn pso": altlearn_loop(
                config("pso", batch_size, population_size=population), chunk_steps
            ),
            AS_EVOSAX: altlearn_loop(classic, chunk_steps),
        }
        experiment = Experiment(classic)
        raw_init, raw_chunk = make_raw_pso_loop(experiment)
        raw_state = jax.jit(raw_init)(jax.jit(experiment.init)(jax.random.PRNGKey(0)))
        runs["raw evosax PSO"] = Loop(lambda s: raw_chunk(s, chunk_steps), raw_state, chunk_steps)
        rounds = timed_rounds(runs, repeats)
        loads.append(rounds.other_load_cores)
        times = {name: statistics.median(rounds.times[name]) / chunk_steps for name in runs}
        passes = {"altlearn pso": 2 * population + 1, "raw evosax PSO": population}
        passes[AS_EVOSAX] = population + 1
        results["evosax"] = {
            name: {
                "step_ms": 1e3 * times[name],
                "vs_raw_evosax": times[name] / times["raw evosax PSO"],
                "forward_passes_per_iteration": passes[name],
                "compile_s": run.compile_s,
                "steps_run": int(run.state.step),
            }
            for name, run in runs.items()
        }

    if neuron_pso:
        experiment = first.experiment
        params = experiment.model.init(jax.random.PRNGKey(0), experiment.x_train[:1])["params"]
        num_neurons = sum(neurons_of(p).shape[0] for p in params.values())
        candidates = 2 * num_neurons * NEURON_PARTICLES  # positions + personal bests
        equal = candidates // 2  # pso's 2P + 1 evaluations matched to neuron_pso's candidates
        runs = {
            "neuron_pso": altlearn_loop(
                config(
                    "neuron_pso",
                    batch_size,
                    particles_per_neuron=NEURON_PARTICLES,
                    update_order="jacobi",
                ),
                chunk_steps,
            ),
            "pso": altlearn_loop(config("pso", batch_size, population_size=equal), chunk_steps),
        }
        rounds = timed_rounds(runs, repeats)
        loads.append(rounds.other_load_cores)
        times = {name: statistics.median(rounds.times[name]) / chunk_steps for name in runs}
        evaluations = {"neuron_pso": candidates + experiment.model.num_layers + 1}
        evaluations["pso"] = 2 * equal + 1
        results["neuron_pso_vs_pso"] = {
            name: {
                "step_ms": 1e3 * times[name],
                "network_evaluations_per_step": evaluations[name],
                "us_per_evaluation": 1e6 * times[name] / evaluations[name],
                "compile_s": run.compile_s,
                "steps_run": int(run.state.step),
            }
            for name, run in runs.items()
        }

    import pyswarms

    known = [load for load in loads if load is not None]
    return {
        "machine": {
            **machine_facts(),
            "pyswarms": pyswarms.__version__,
            "numpy": np.__version__,
        },
        "model": f"mlp {experiment_shape(first.experiment)}",
        "data": data,
        "settings": {
            "population_size": population,
            "batch_size": batch_size,
            "chunk_steps": chunk_steps,
            "repeats": repeats,
            "inertia": INERTIA,
            "cognitive": COGNITIVE,
            "social": SOCIAL,
            "init_scale": INIT_SCALE,
            "velocity_clamp": CLAMP,
        },
        "results": results,
        "other_processes_busy_cores": max(known) if known else None,  # the worst of the rounds
    }


def markdown_tables(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"PSO, {result['model']}, {result['data']}, {settings['population_size']} particles, "
        "ms per iteration:",
        "",
        "| batch | pyswarms (ms) | pyswarms, 1 BLAS thread (ms) | altlearn, re-scored bests "
        "(ms) | faster pyswarms / altlearn | altlearn, rescore_bests=False (ms) | faster "
        "pyswarms / that | P forward passes at the matmul peak (ms) | pyswarms / that floor | "
        "altlearn compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ("minibatch", "full batch"):
        if label not in result["results"]:
            continue
        r = result["results"][label]
        lines.append(
            f"| {label} ({r['batch_size']}) | {r['pyswarms_ms']:.2f} | "
            f"{r['pyswarms_1_blas_thread_ms']:.2f} | {r['altlearn_ms']:.2f} | "
            f"{r['ratio_pyswarms_over_altlearn']:.1f}x | {r['altlearn_no_rescore_ms']:.2f} | "
            f"{r['ratio_pyswarms_over_altlearn_no_rescore']:.1f}x | "
            f"{r['forward_flops_floor_ms']:.2f} | {r['ratio_bound_at_peak']:.1f}x | "
            f"{r['altlearn_compile_s']:.1f} |"
        )
    neuron = result["results"].get("neuron_pso_vs_pso")
    if neuron:
        lines += [
            "",
            f"neuron_pso ({NEURON_PARTICLES} particles per neuron, Jacobi) vs pso at equal "
            f"network evaluations per step, batch {settings['batch_size']}:",
            "",
            "| rule | evaluations / step | step (ms) | vs pso | us / evaluation | compile (s) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in neuron.items():
            lines.append(
                f"| {name} | {r['network_evaluations_per_step']} | {r['step_ms']:.2f} | "
                f"{r['step_ms'] / neuron['pso']['step_ms']:.2f}x | "
                f"{r['us_per_evaluation']:.2f} | {r['compile_s']:.1f} |"
            )
    raw = result["results"].get("evosax")
    if raw:
        lines += [
            "",
            f"pso against a raw evosax PSO loop (ask, vmapped loss, tell), batch "
            f"{settings['batch_size']}:",
            "",
            "| loop | forward passes / iteration | step (ms) | vs raw evosax | compile (s) |",
            "|---|---|---|---|---|",
        ]
        for name, r in raw.items():
            lines.append(
                f"| {name} | {r['forward_passes_per_iteration']} | {r['step_ms']:.2f} | "
                f"{r['vs_raw_evosax']:.2f}x | {r['compile_s']:.1f} |"
            )
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.pso")
    result = measure(
        data=_DATA.value,
        widths=tuple(int(w) for w in _WIDTHS.value),
        population_size=_POPULATION.value,
        batch_size=_BATCH.value,
        chunk_steps=_CHUNK.value,
        repeats=_REPEATS.value,
        neuron_pso=_NEURON.value,
        matmul_size=_MATMUL_SIZE.value,
        full_batch=_FULL_BATCH.value,
        evosax=_EVOSAX.value,
    )
    result = {"command": command_line("benchmarks.pso"), **result}
    out = write_json(result, _OUT.value, markdown_tables(result), provenance)
    print(markdown_tables(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _DATA = flags.DEFINE_string("data", "digits", "Dataset.")
    _WIDTHS = flags.DEFINE_list("widths", ["32"], "Hidden widths of the MLP.")
    _POPULATION = flags.DEFINE_integer("population_size", 64, "Particles (both libraries).")
    _BATCH = flags.DEFINE_integer("batch_size", 128, "Minibatch size (full batch is timed too).")
    _CHUNK = flags.DEFINE_integer(
        "chunk_steps", 50, "Iterations per timed call, altlearn and pyswarms alike."
    )
    _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per method (median reported).")
    _FULL_BATCH = flags.DEFINE_bool("full_batch", True, "Also time pso vs pyswarms at full batch.")
    _EVOSAX = flags.DEFINE_bool("evosax", True, "Also time pso against a raw evosax PSO loop.")
    _NEURON = flags.DEFINE_bool("neuron_pso", True, "Also time neuron_pso vs pso at equal work.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOPs matmul.")
    _OUT = flags.DEFINE_string("out", "docs/bench/pso.json", "JSON output path.")
    app.run(main)
