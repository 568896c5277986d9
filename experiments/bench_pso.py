"""Whole-network PSO: altlearn's ``pso`` rule against pyswarms, time per iteration.

    python -m experiments.bench_pso --out=docs/bench/pso.json     (~2-3 min on 2 CPU cores)

Same network, data, swarm size, coefficients, velocity clamp and particle initialisation on
both sides. pyswarms (``pyswarms.single.GlobalBestPSO``, a benchmark-only dependency) gets the
objective a careful user would write: one vectorised numpy forward pass of the MLP over all
particles (float32 batched matmuls), drawing the next minibatch of a per-epoch permutation on
each call. It is timed with numpy's default BLAS threads and with one BLAS thread
(threadpoolctl), and the ratio uses the faster: numpy's stacked matmuls call one small GEMM
per particle, and multi-threaded OpenBLAS on such calls can be many times slower, most of all
on a loaded machine.

altlearn runs ``chunk_steps`` iterations of ``Experiment.train_steps`` (batch sampling
included) as one call compiled ahead of time; compile time is reported apart. pyswarms runs
``pyswarms_chunk_steps`` iterations per call. Timed calls of all methods are interleaved
``repeats`` times and the median per iteration reported.

Work per iteration differs, and the table says so: pyswarms scores the P particles; altlearn
by default also re-scores the P personal bests and the global best on each batch (RULES.md
section 3's decision), 2P + 1 forward passes; with ``rescore_bests=False`` (classic PSO, as
pyswarms) it does P + 1 (the +1 is its ``loss`` metric of the incoming params), timed too. The
float32 matmul peak (fastest 2048^2 matmul, timed in the same rounds) gives a floor: P forward
passes at the peak, 2 * batch * num_params * P FLOPs; pyswarms' time over that floor bounds the
ratio any implementation of the same P passes could reach on this machine.

The last rows compare ``neuron_pso`` (16 particles per neuron, Jacobi) with ``pso`` given as
many particles as ``neuron_pso`` evaluates candidates per step, so both do the same number of
(full or downstream-only) network evaluations per step.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import pyswarms
import threadpoolctl
from absl import app, flags

from altlearn.config import base_config
from altlearn.rules.neuron_pso import neurons_of
from altlearn.train import Experiment
from experiments.bench import make_matmul

_DATA = flags.DEFINE_string("data", "digits", "Dataset.")
_WIDTHS = flags.DEFINE_list("widths", ["32"], "Hidden widths of the MLP.")
_POPULATION = flags.DEFINE_integer("population_size", 64, "Particles (both libraries).")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Minibatch size (full batch is timed too).")
_CHUNK = flags.DEFINE_integer("chunk_steps", 50, "altlearn iterations per timed call.")
_PYSWARMS_CHUNK = flags.DEFINE_integer("pyswarms_chunk_steps", 10, "pyswarms iterations per call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per method (median reported).")
_NEURON = flags.DEFINE_bool("neuron_pso", True, "Also time neuron_pso vs pso at equal work.")
_OUT = flags.DEFINE_string("out", "docs/bench/pso.json", "JSON output path.")

INERTIA, COGNITIVE, SOCIAL = 0.729, 1.49445, 1.49445
INIT_SCALE, CLAMP = 0.1, 0.1
NEURON_PARTICLES = 16


def make_config(rule: str, batch_size: int, **rule_options):
    config = base_config(rule=rule, model="mlp", data=_DATA.value)
    config.model.widths = tuple(int(w) for w in _WIDTHS.value)
    config.batch_size = batch_size
    config.rule.update(
        inertia=INERTIA,
        cognitive=COGNITIVE,
        social=SOCIAL,
        init_scale=INIT_SCALE,
        velocity_clamp=CLAMP,
        **rule_options,
    )
    return config


class AltlearnRun:
    """``chunk_steps`` steps of a config compiled ahead of time; ``__call__`` times one call."""

    def __init__(self, config, dataset=None):
        self.experiment = Experiment(config, dataset)
        self.state = jax.jit(self.experiment.init)(jax.random.PRNGKey(0))
        t = time.perf_counter()
        self.chunk = (
            jax.jit(lambda s: self.experiment.train_steps(s, _CHUNK.value))
            .lower(self.state)
            .compile()
        )
        self.compile_s = time.perf_counter() - t
        self()  # warm-up

    def __call__(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.chunk(self.state)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - t) / _CHUNK.value


class PyswarmsRun:
    """pyswarms GlobalBestPSO on a numpy forward pass of the same MLP and data, with numpy's
    BLAS limited to ``blas_threads`` (None: numpy's default)."""

    def __init__(self, experiment: Experiment, batch_size: int, blas_threads: int | None):
        self.blas_threads = blas_threads
        data = experiment.dataset
        self.x = data.x_train.reshape(data.x_train.shape[0], -1).astype(np.float32)
        self.y = data.y_train
        self.batch_size = batch_size
        self.rng = np.random.default_rng(0)
        self.order, self.position = np.arange(0), 0
        params = jax.device_get(experiment.model.init(jax.random.PRNGKey(0), data.x_train[:1]))
        # Per layer: (kernel shape, bias size), in the order of the flat particle vector.
        self.shapes = [(p["kernel"].shape, p["bias"].size) for p in params["params"].values()]
        center = np.concatenate(
            [np.concatenate([p["kernel"].ravel(), p["bias"]]) for p in params["params"].values()]
        ).astype(np.float64)
        noise = self.rng.normal(size=(_POPULATION.value, center.size))
        noise[0] = 0.0  # particle 0 = the initial network, as in altlearn
        self.optimizer = pyswarms.single.GlobalBestPSO(
            n_particles=_POPULATION.value,
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
        x, y = self.batch()
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

    def __call__(self) -> float:
        with threadpoolctl.threadpool_limits(limits=self.blas_threads, user_api="blas"):
            t = time.perf_counter()
            self.optimizer.optimize(self.objective, iters=_PYSWARMS_CHUNK.value, verbose=False)
            return (time.perf_counter() - t) / _PYSWARMS_CHUNK.value


class MatmulRun:
    """The float32 matmul peak, timed in the same rounds (the fastest call is the peak)."""

    def __init__(self, n: int = 2048):
        self.n, self.fn, self.times = n, make_matmul(n), []
        self.fn().block_until_ready()

    def __call__(self) -> float:
        t = time.perf_counter()
        self.fn().block_until_ready()
        self.times.append(time.perf_counter() - t)
        return self.times[-1]

    def peak_gflops(self) -> float:
        return 2 * self.n**3 / min(self.times) / 1e9


def median_times(runs: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def experiment_shape(experiment: Experiment) -> str:
    sizes = [int(np.prod(experiment.x_train.shape[1:]))]
    sizes += [int(w) for w in experiment.config.model.widths]
    return "-".join(map(str, [*sizes, experiment.dataset.num_outputs]))


def main(argv: list[str]) -> None:
    del argv
    population = _POPULATION.value
    load_at_start = os.getloadavg()[0]
    results, rows = {}, []
    num_train = Experiment(make_config("pso", _BATCH.value)).num_train
    for label, batch in (("minibatch", _BATCH.value), ("full batch", num_train)):
        first = AltlearnRun(make_config("pso", batch, population_size=population))
        runs = {
            "altlearn pso": first,
            "altlearn pso, no re-scoring": AltlearnRun(
                make_config("pso", batch, population_size=population, rescore_bests=False)
            ),
            "pyswarms": PyswarmsRun(first.experiment, batch, None),
            "pyswarms, 1 BLAS thread": PyswarmsRun(first.experiment, batch, 1),
            "matmul": MatmulRun(),
        }
        times = median_times(runs, _REPEATS.value)
        baseline = min(times["pyswarms"], times["pyswarms, 1 BLAS thread"])
        ratio = baseline / times["altlearn pso"]
        ratio_plain = baseline / times["altlearn pso, no re-scoring"]
        # The FLOP floor: P forward passes at the fastest matmul rate of the rounds.
        peak = runs["matmul"].peak_gflops()
        num_params = sum(
            int(np.size(a))
            for a in jax.tree.leaves(
                first.experiment.model.init(jax.random.PRNGKey(0), first.experiment.x_train[:1])
            )
        )
        floor_s = 2.0 * batch * num_params * population / (peak * 1e9)
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
            "forward_passes_per_iteration": {
                "altlearn": 2 * population + 1,
                "altlearn_no_rescore": population + 1,
                "pyswarms": population,
            },
        }
        rows.append(
            f"| {label} ({batch}) | {1e3 * times['pyswarms']:.2f} | "
            f"{1e3 * times['pyswarms, 1 BLAS thread']:.2f} | "
            f"{1e3 * times['altlearn pso']:.2f} | {ratio:.1f}x | "
            f"{1e3 * times['altlearn pso, no re-scoring']:.2f} | {ratio_plain:.1f}x | "
            f"{1e3 * floor_s:.2f} | {baseline / floor_s:.1f}x | {first.compile_s:.1f} |"
        )

    neuron_rows = []
    if _NEURON.value:
        experiment = first.experiment
        params = experiment.model.init(jax.random.PRNGKey(0), experiment.x_train[:1])["params"]
        num_neurons = sum(neurons_of(p).shape[0] for p in params.values())
        candidates = 2 * num_neurons * NEURON_PARTICLES  # positions + personal bests
        equal = candidates // 2  # pso's 2P + 1 evaluations matched to neuron_pso's candidates
        runs = {
            "neuron_pso": AltlearnRun(
                make_config("neuron_pso", _BATCH.value, particles_per_neuron=NEURON_PARTICLES)
            ),
            "pso": AltlearnRun(make_config("pso", _BATCH.value, population_size=equal)),
        }
        times = median_times(runs, _REPEATS.value)
        evaluations = {"neuron_pso": candidates + experiment.model.num_layers + 1}
        evaluations["pso"] = 2 * equal + 1
        results["neuron_pso_vs_pso"] = {
            name: {
                "step_ms": 1e3 * times[name],
                "network_evaluations_per_step": evaluations[name],
                "us_per_evaluation": 1e6 * times[name] / evaluations[name],
                "compile_s": run.compile_s,
            }
            for name, run in runs.items()
        }
        neuron_rows = [
            f"| {name} | {evaluations[name]} | {1e3 * times[name]:.2f} | "
            f"{1e6 * times[name] / evaluations[name]:.2f} | {runs[name].compile_s:.1f} |"
            for name in runs
        ]

    model = f"mlp {experiment_shape(first.experiment)}"
    out = {
        "command": "python -m experiments.bench_pso "
        + " ".join(
            f"--{f}={flags.FLAGS[f].value}"
            for f in (
                "data",
                "population_size",
                "batch_size",
                "chunk_steps",
                "pyswarms_chunk_steps",
                "repeats",
            )
        )
        + f" --widths={','.join(_WIDTHS.value)}",
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "pyswarms": pyswarms.__version__,
            "numpy": np.__version__,
            "device": str(jax.devices()[0].device_kind),
            # a shared machine: other processes' load shows in the timings
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        },
        "model": model,
        "settings": {
            "population_size": population,
            "inertia": INERTIA,
            "cognitive": COGNITIVE,
            "social": SOCIAL,
            "init_scale": INIT_SCALE,
            "velocity_clamp": CLAMP,
        },
        "results": results,
    }
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(out, indent=1) + "\n")
    print(f"PSO, {model}, {_DATA.value}, {population} particles, ms per iteration:\n")
    print(
        "| batch | pyswarms (ms) | pyswarms, 1 BLAS thread (ms) | altlearn, re-scored bests "
        "(ms) | faster pyswarms / altlearn | altlearn, rescore_bests=False (ms) | faster "
        "pyswarms / that | P forward passes at the matmul peak (ms) | pyswarms / that floor | "
        "altlearn compile (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    if neuron_rows:
        print(
            f"\nneuron_pso ({NEURON_PARTICLES} particles per neuron, Jacobi) vs pso at equal "
            f"network evaluations per step, batch {_BATCH.value}:\n"
        )
        print(
            "| rule | evaluations / step | step (ms) | us / evaluation | compile (s) |\n"
            "|---|---|---|---|---|"
        )
        print("\n".join(neuron_rows))


if __name__ == "__main__":
    app.run(main)
