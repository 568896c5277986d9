"""Framework overhead: altlearn's backprop step against a minimal hand-written optax loop.

Command (writes docs/bench/overhead.json and prints a markdown table):

    python -m experiments.bench --config=experiments/configs/default.py

What it measures, in one run, on the config's model, data, batch size and optimizer:

1. *altlearn*: ``Experiment(config)``, ``init``, and ``train_steps(state, chunk_steps)`` jitted
   and compiled ahead of time (``.lower(state).compile()``), as ``altlearn.runner`` does.
2. *hand*: the same MLP written as a plain flax ``nn.Module``, ``optax`` with the same learning
   rate, ``softmax_cross_entropy_with_integer_labels(...).mean()``, ``jax.value_and_grad``, in a
   ``lax.scan`` of ``chunk_steps`` steps over minibatches of the same size from the same
   on-device arrays (``experiment.x_train``, ``experiment.y_train``). Batches come from one
   permutation of the training split per epoch, drawn up front for each chunk and sliced into
   batches (``jax.random.permutation``), so both loops do the same sampling work.

Both chunks are compiled ahead of time (compile time reported apart); then, after one untimed
warm-up call each, ``repeats`` timed rounds of altlearn, hand, matmul (each call blocks on its
results) alternate so machine noise hits all three alike. Time per step is the median chunk time
divided by ``chunk_steps``; the ratio altlearn/hand has the target <= 1.10.

Both chunks donate their state (``donate_argnums=0``, as the runner does) and each call is fed
the state the previous call returned, so every timed chunk continues one real training run.

FLOPs per step come from XLA's ``cost_analysis()`` of one compiled altlearn ``train_step`` (XLA
counts a ``while`` loop body once whatever its trip count, so the chunk's own count is not
divided by ``chunk_steps``); the analytic 6 * batch * num_params is reported beside it and used
if XLA gives no count. Both loops do the same math, so both are credited with that count. The
machine's float32 peak is the median GFLOP/s of a jitted square matmul (2 n^3 flops), timed in
the same rounds; achieved GFLOP/s of both loops are reported as a fraction of that peak. The
JSON also records how many cores other processes kept busy during the timed rounds (Linux).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app

from altlearn import models
from altlearn.train import Experiment

OVERHEAD_TARGET = 1.10


class HandMLP(nn.Module):
    """flatten -> [Dense -> activation] * len(widths) -> Dense(num_outputs), He-normal kernels."""

    widths: Sequence[int]
    num_outputs: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = self.activation(nn.Dense(w, kernel_init=nn.initializers.he_normal())(x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.he_normal())(x)


class HandState(NamedTuple):
    step: jax.Array  # int32 []
    key: jax.Array
    params: Any
    opt_state: optax.OptState


def check_supported(config: ml_collections.ConfigDict) -> None:
    """The hand loop mirrors backprop on an MLP with cross-entropy and a constant-rate optimizer."""
    problems = []
    if config.rule.name != "backprop":
        problems.append(f"rule.name={config.rule.name!r} (needs 'backprop')")
    if config.model.name != "mlp":
        problems.append(f"model.name={config.model.name!r} (needs 'mlp')")
    elif config.model.decorrelation:
        problems.append("model.decorrelation=True (needs False)")
    if config.optimizer.name not in ("sgd", "adam"):
        problems.append(f"optimizer.name={config.optimizer.name!r} (needs 'adam' or 'sgd')")
    if config.optimizer.schedule != "constant":
        problems.append(f"optimizer.schedule={config.optimizer.schedule!r} (needs 'constant')")
    if config.loss not in ("auto", "cross_entropy"):
        problems.append(f"loss={config.loss!r} (needs 'auto' or 'cross_entropy')")
    if problems:
        raise ValueError(
            "The overhead benchmark compares backprop on an MLP with a hand-written loop; this "
            f"config has {'; '.join(problems)}."
        )


def make_hand_loop(
    experiment: Experiment,
) -> tuple[Callable[[jax.Array], HandState], Callable[[HandState, int], tuple[HandState, Any]]]:
    """``init(key)`` and ``train_chunk(state, num_steps)`` of the hand-written loop."""
    config = experiment.config
    if not experiment.task.is_classification:
        raise ValueError(f"Dataset {config.data.name!r} is not a classification dataset.")
    module = HandMLP(
        tuple(config.model.widths),
        experiment.dataset.num_outputs,
        models.make_activation(config.model.activation, config.model.negative_slope),
    )
    lr = float(config.optimizer.learning_rate)
    optimizer = optax.adam(lr) if config.optimizer.name == "adam" else optax.sgd(lr)
    x_train, y_train = experiment.x_train, experiment.y_train
    batch, num_train = experiment.batch_size, experiment.num_train
    spe = num_train // batch

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def init(key: jax.Array) -> HandState:
        key_model, key_data = jax.random.split(key)
        params = module.init(key_model, x_train[:1])["params"]
        return HandState(jnp.zeros((), jnp.int32), key_data, params, optimizer.init(params))

    def train_chunk(state: HandState, num_steps: int) -> tuple[HandState, jax.Array]:
        # One permutation per epoch touched by this chunk, cut into batches of indices.
        first_epoch, offset = jnp.divmod(state.step, spe)
        epochs = first_epoch + jnp.arange(num_steps // spe + 2)
        perms = jax.vmap(
            lambda e: jax.random.permutation(jax.random.fold_in(state.key, e), num_train)
        )(epochs)
        batches = perms[:, : spe * batch].reshape(-1, batch)
        idx = jax.lax.dynamic_slice_in_dim(batches, offset, num_steps)

        def body(carry: tuple[Any, Any], i: jax.Array):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x_train[i], y_train[i])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (state.params, state.opt_state), idx)
        return HandState(state.step + num_steps, state.key, params, opt_state), losses

    return init, train_chunk


def compiled_flops(compiled: Any) -> float | None:
    """The ``flops`` entry of ``compiled.cost_analysis()`` (a dict, or a list of dicts)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or analysis.get("flops", 0) <= 0:
        return None
    return float(analysis["flops"])


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, own.user + own.system


def other_load_cores(start: tuple[float, float] | None, wall: float) -> float | None:
    """Mean number of cores other processes kept busy since ``start`` (None off Linux)."""
    end = cpu_seconds()
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


def _compile(fn: Callable, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(*args).compile()
    return compiled, time.perf_counter() - t


def make_matmul(n: int = 2048) -> Callable[[], jax.Array]:
    """A compiled float32 n x n matmul on fixed operands (2 n^3 flops per call)."""
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    return lambda: matmul(a, b)


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


def machine_facts() -> dict[str, Any]:
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "processor": platform.processor() or platform.machine(),
        "cpu_model_name": model_name,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "load_average_at_end_incl_this_run": list(os.getloadavg()),
    }


def measure(
    config: ml_collections.ConfigDict,
    chunk_steps: int = 500,
    repeats: int = 7,
    matmul_size: int = 2048,
) -> dict[str, Any]:
    """Runs the whole benchmark for ``config``; returns every number as a JSON-able dict."""
    if chunk_steps <= 0 or repeats <= 0:
        raise ValueError(f"chunk_steps and repeats must be positive, got {chunk_steps}, {repeats}.")
    check_supported(config)
    experiment = Experiment(config)
    key = jax.random.PRNGKey(int(config.seed))

    # altlearn
    state = experiment.init(key)
    num_params = int(sum(np.size(p) for p in jax.tree.leaves(state.variables["params"])))
    alt_chunk, alt_compile = _compile(lambda s: experiment.train_steps(s, chunk_steps), state)

    # the hand-written loop
    hand_init, hand_train_chunk = make_hand_loop(experiment)
    hand_state = hand_init(key)
    hand_params = int(sum(np.size(p) for p in jax.tree.leaves(hand_state.params)))
    if hand_params != num_params:
        raise AssertionError(f"hand MLP has {hand_params} parameters, altlearn's {num_params}.")
    hand_chunk, hand_compile = _compile(lambda s: hand_train_chunk(s, chunk_steps), hand_state)

    # FLOPs of one step: XLA's count for one compiled train_step, else the analytic count.
    b = experiment.batch_size
    batch = (experiment.x_train[:b], experiment.y_train[:b])
    step_compiled = jax.jit(experiment.train_step).lower(state, batch).compile()
    xla_step_flops = compiled_flops(step_compiled)
    analytic_flops = 6.0 * experiment.batch_size * num_params
    flops_per_step = xla_step_flops if xla_step_flops is not None else analytic_flops
    flops_source = (
        "xla_cost_analysis_train_step" if xla_step_flops is not None else "analytic_6_batch_params"
    )

    # Warm up, then interleave the timed repeats: altlearn, hand, matmul, altlearn, ...
    runs: dict[str, list[Any]] = {"altlearn": [alt_chunk, state], "hand": [hand_chunk, hand_state]}
    matmul = make_matmul(matmul_size)
    times: dict[str, list[float]] = {name: [] for name in (*runs, "matmul")}
    losses: dict[str, Any] = {}
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    for rep in range(repeats + 1):
        for name, run in runs.items():
            fn, s = run
            t = time.perf_counter()
            run[1], losses[name] = jax.block_until_ready(fn(s))
            elapsed = time.perf_counter() - t
            if rep > 0:
                times[name].append(elapsed)
        t = time.perf_counter()
        matmul().block_until_ready()
        if rep > 0:
            times["matmul"].append(time.perf_counter() - t)
    other_load = other_load_cores(cpu_start, time.perf_counter() - wall_start)
    losses["altlearn"] = losses["altlearn"]["loss"]  # altlearn's per-step metrics are a dict

    matmul_s = statistics.median(times["matmul"])
    peak = {
        "n": matmul_size,
        "times_s": times["matmul"],
        "median_s": matmul_s,
        "gflops": 2 * matmul_size**3 / matmul_s / 1e9,
    }
    loops = {}
    for name, compile_s in (("altlearn", alt_compile), ("hand", hand_compile)):
        median = statistics.median(times[name])
        per_step = median / chunk_steps
        gflops = flops_per_step / per_step / 1e9
        loops[name] = {
            "compile_s": compile_s,
            "chunk_times_s": times[name],
            "median_chunk_s": median,
            "step_us": per_step * 1e6,
            "steps_per_s": 1.0 / per_step,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["gflops"],
            "loss_last_50_steps": float(np.mean(np.asarray(losses[name])[-50:])),
        }
    ratio = loops["altlearn"]["median_chunk_s"] / loops["hand"]["median_chunk_s"]
    return {
        "altlearn": loops["altlearn"],
        "hand": loops["hand"],
        "ratio_altlearn_over_hand": ratio,
        "target_ratio": OVERHEAD_TARGET,
        "target_met": bool(ratio <= OVERHEAD_TARGET),
        "chunk_steps": chunk_steps,
        "repeats": repeats,
        "steps_timed_per_loop": chunk_steps * repeats,
        "hand_batches": "per-epoch jax.random.permutation drawn per chunk, sliced into batches",
        "other_processes_busy_cores": other_load,
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
        f"({peak['n']}x{peak['n']}): {peak['gflops']:.1f} GFLOP/s",
    ]
    if result.get("other_processes_busy_cores") is not None:
        lines.append(
            f"Other processes kept {result['other_processes_busy_cores']:.2f} of "
            f"{result['machine']['cpu_count']} cores busy during the timed chunks."
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        result = measure(_CONFIG.value, _CHUNK_STEPS.value, _REPEATS.value, _MATMUL_SIZE.value)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    result["command"] = " ".join(["python -m experiments.bench", *sys.argv[1:]])
    out = write_json(result, _OUT.value)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary, so importing ``measure`` (tests) defines none
    # and cannot clash with experiments.train's --config.
    from absl import flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        "experiments/configs/default.py",
        "Config file, optionally with :variant.",
        lock_config=True,
    )
    _CHUNK_STEPS = flags.DEFINE_integer("chunk_steps", 500, "Steps per compiled chunk.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed chunk calls per loop (interleaved).")
    _OUT = flags.DEFINE_string("out", "docs/bench/overhead.json", "Where the JSON goes.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the peak-FLOPs matmul.")
    app.run(main)
