"""Step time of each learning rule divided by the backprop step time, in one run, with each
rule's arithmetic floor beside it.

    python -m benchmarks.rules --setting=digits --out=docs/bench/rules_digits.json
    python -m benchmarks.rules --setting=mnist1d --seeds=32 --out=docs/bench/rules_mnist1d_32.json

Settings (np_family's methods, leaky ReLU 0.2, Adam, one noise sample per step as paper 003):
``digits`` MLP 64-256-256-10 at batch 64, ``mnist1d`` the default MLP 40-512-512-10 at batch
128, ``paper`` the paper's CIFAR-10-sized MLP (3072-1024x3-10, batch 1000) on random data of
that shape (no files needed). ``--seeds=S`` > 1 times S seeds in one program (what a
sweep runs, ``altlearn.driver.members_program``: mapped one by one on a CPU by default, all
vmapped with ``--members_per_batch=0``), every method alike.

Each method's ``chunk_steps`` training steps are compiled ahead of time (compile time reported
apart) and timed as one call (``benchmarks.harness.Loop``); after one untimed warm-up round the
methods' calls are interleaved round-robin ``repeats`` times so machine noise hits all of them
alike. A step time is the median call; a ratio is paired by round (the median over rounds of
the method's call over backprop's call in the same round, with the range over rounds beside
it), so a slow stretch of the machine weighs on both sides of it. Every method's timed calls
cover the same number of steps: the JSON records each run's own step counter at the end
(``steps_run``).

The floor (``matmul_flops``) is the matrix-product arithmetic a method cannot avoid, over
backprop's: for an MLP with products F_l = 2 B d_{l-1} d_l, backprop does the forward pass,
the weight gradients and the input gradients of layers 2.. (3 sum F - F_1). Node perturbation
does a clean pass, a noisy pass that starts at the first perturbed pre-activation (the layers
before it are the clean pass's) and the layer-local weight products; its jvp form the same with
a tangent pass in place of the noisy one; inp one pass per layer, pass l from layer l; the
forward gradient a primal and a tangent pass (x V_1 in the first layer, z_t W + z V after);
weight perturbation two forward passes. Decorrelated models add the product with R_l in every
pass (2 B d_{l-1}^2) and, every ``every``-th step, the update C R = Z^T (Z R) / B. Noise draws,
activations and the optimizer are not in the floor: they are what separates a measured ratio
from it. XLA's own count of the compiled step's operations (``cost_analysis``, every op, the
noise generator's integer arithmetic included) is recorded beside it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app

from altlearn import data as data_lib
from altlearn import driver, report
from altlearn.train import Experiment
from benchmarks.harness import (
    Loop,
    busy_cores_line,
    command_line,
    compiled_flops,
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
    "inp",
    "danp",
    "dinp",
    "fg",
    "wp",
    "np/dist=normal",
    "anp/dist=normal",
    "fg/dist=normal",
    "wp/dist=normal",
)
# (data, hidden widths, batch) of each setting; "paper" uses np_family's paper scale.
SETTINGS = {"digits": ("digits", (256, 256), 64), "mnist1d": ("mnist1d", (512, 512), 128)}
# The step-time targets (x backprop's step) of the speed work, by the method's rule and variant.
TARGETS = {
    "np": 1.2, "np/jvp": 1.2, "fg": 1.2, "wp": 1.2,
    "anp": 1.3, "inp": 1.3,
    "danp": 2.0, "dinp": 2.0,
    "dbp": 1.8,
}  # fmt: skip


def method_config(name: str, setting: str) -> ml_collections.ConfigDict:
    """np_family's config for ``method[/jvp][/everyK][/key=value]`` in ``setting``."""
    method, *mods = name.split("/")
    extra = "".join(
        ",mode=jvp" if m == "jvp" else f",{m}" if "=" in m else f",every={m[len('every') :]}"
        for m in mods
    )
    if setting == "paper":
        return np_family.get_config(f"method={method},data=cifar10,scale=paper{extra}")
    data, widths, batch = SETTINGS[setting]
    config = np_family.get_config(f"method={method},data={data}{extra}")
    config.model.widths = widths
    config.batch_size = batch
    return config


def target_of(name: str) -> float | None:
    """The target ratio of method ``name`` (its rule and mode; noise options share it)."""
    method, *mods = name.split("/")
    if "jvp" in mods and f"{method}/jvp" in TARGETS:
        return TARGETS[f"{method}/jvp"]
    return TARGETS.get(method)  # danp/jvp: danp's


def matmul_flops(name: str, dims: Sequence[int], batch: int) -> float | None:
    """The matrix-product FLOPs per step that method ``name`` cannot avoid on an MLP of layer
    widths ``dims`` (input first) at ``batch``, one noise sample (module docstring); None for a
    method without a floor here."""
    method, *mods = name.split("/")
    every = next((int(m[len("every") :]) for m in mods if m.startswith("every")), 1)
    decorrelated = method in ("dbp", "dnp", "danp", "dinp")
    rule = {"dbp": "bp", "dnp": "np", "danp": "anp", "dinp": "inp"}.get(method, method)
    f = [2.0 * batch * a * b for a, b in zip(dims[:-1], dims[1:])]
    r = [2.0 * batch * a * a if decorrelated else 0.0 for a in dims[:-1]]
    per_layer = [fl + rl for fl, rl in zip(f, r)]  # a layer's product in one pass
    forward = sum(per_layer)
    tail = lambda i: sum(per_layer[i + 1 :])  # a pass that starts at layer i's pre-activation
    if rule == "bp":
        total = forward + sum(f) + sum(per_layer[1:])  # forward, weight and input gradients
    elif rule in ("np", "anp"):
        total = forward + tail(0) + sum(f)  # clean, noisy (or tangent) pass, local products
    elif rule == "inp":
        total = forward + sum(tail(i) for i in range(len(f))) + sum(f)
    elif rule == "fg":
        total = forward + f[0] + 2 * sum(f[1:])  # primal; tangent x V_1, then z_t W + z V
    elif rule == "wp":
        total = 2 * forward
    else:
        return None
    if decorrelated:  # the update C R = Z^T (Z R) / B (or Z^T Z then C R where B >= d)
        total += sum(min(2 * rl, rl + 2.0 * a**3) for rl, a in zip(r, dims[:-1])) / every
    return total


def paper_sized_dataset() -> data_lib.Dataset:
    """Random data shaped like CIFAR-10 (timing only)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=5000).astype(np.int32)
    return data_lib.Dataset(
        "cifar10-shaped", "classification", 10, x, y, x[:0], y[:0], x[:1000], y[:1000]
    )


def method_configs(
    methods: Sequence[str], setting: str = "mnist1d"
) -> tuple[dict[str, ml_collections.ConfigDict], data_lib.Dataset | None]:
    """The configs of ``methods`` and, at the paper's scale, the random CIFAR-10-shaped data."""
    if setting not in (*SETTINGS, "paper"):
        raise ValueError(
            f"Unknown setting {setting!r}; valid choices: {', '.join((*SETTINGS, 'paper'))}."
        )
    dataset = paper_sized_dataset() if setting == "paper" else None
    configs = {}
    for name in methods:
        config = method_config(name, setting)
        if dataset is not None:
            config.data.standardize = "none"
        configs[name] = config
    return configs, dataset


def layer_dims(experiment: Experiment) -> list[int]:
    """The MLP's widths, input first, from its initial params (for the floor)."""
    params = jax.eval_shape(experiment.init, jax.random.PRNGKey(0)).variables["params"]
    kernels = [params[name]["kernel"].shape for name in experiment.model.layer_names]
    return [kernels[0][0]] + [k[1] for k in kernels]


def method_loop(
    experiment: Experiment, chunk_steps: int, seeds: int = 1, members_per_batch: int = 0
) -> Loop:
    """``chunk_steps`` training steps of ``experiment``, compiled: one run, or ``seeds`` > 1
    runs in one program as the engine runs them (``driver.members_program``)."""
    chunk = lambda s: experiment.train_steps(s, chunk_steps)
    if seeds > 1:
        keys = jax.random.split(jax.random.PRNGKey(0), seeds)
        state = jax.jit(jax.vmap(experiment.init))(keys)
        chunk = driver.members_program(chunk, members_per_batch)
    else:
        state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
    return Loop(chunk, state, chunk_steps)


def measure(
    configs: Mapping[str, ml_collections.ConfigDict],
    chunk_steps: int,
    repeats: int,
    dataset: data_lib.Dataset | None = None,
    seeds: int = 1,
    members_per_batch: int = 0,
) -> dict[str, Any]:
    """Median seconds per step of each config, interleaved; compile times apart. The first
    config is the baseline of ``ratio_vs_first`` (the median over rounds of each round's call
    time over the baseline's in the same round; ``ratio_range`` their extremes) and of
    ``floor``; ``seeds`` > 1 runs that
    many seeds in one program for every config, ``members_per_batch`` of them vmapped at a time
    (``altlearn.driver.members_program``; 0: all)."""
    loops, floors, xla = {}, {}, {}
    for name, config in configs.items():
        experiment = Experiment(config, dataset)
        loops[name] = method_loop(experiment, chunk_steps, seeds, members_per_batch)
        floors[name] = matmul_flops(name, layer_dims(experiment), config.batch_size)
        xla[name] = compiled_flops(loops[name].fn)  # a while loop's body counts once: one step
    rounds = timed_rounds(loops, repeats)
    median = {name: statistics.median(times) / chunk_steps for name, times in rounds.times.items()}
    first = next(iter(loops))
    results = {}
    for name, loop in loops.items():
        # Paired: each round's call over the baseline's call of the same round, so a slow
        # stretch of the machine weighs on both sides of a ratio alike.
        paired = [t / b for t, b in zip(rounds.times[name], rounds.times[first], strict=True)]
        steps_run = np.asarray(loop.state.step)  # the run's own counter, warm-up included
        results[name] = {
            "step_ms": 1e3 * median[name],
            "ratio_vs_first": statistics.median(paired),
            "ratio_range": [min(paired), max(paired)],
            "floor": None
            if None in (floors[name], floors[first])
            else floors[name] / floors[first],
            "matmul_flops": floors[name],
            "xla_flops_vs_first": None
            if None in (xla[name], xla[first])
            else xla[name] / xla[first],
            "target": target_of(name),
            "compile_s": loop.compile_s,
            "timed_calls": len(rounds.times[name]),
            "steps_per_call": loop.steps_per_call,
            "steps_run": int(steps_run.reshape(-1)[0]),
        }
    return {"results": results, "other_processes_busy_cores": rounds.other_load_cores}


def markdown_table(result: dict[str, Any]) -> str:
    lines = []
    if result.get("seeds", 1) > 1:
        how = "all vmapped" if result["members_per_batch"] == 0 else "mapped one by one"
        lines += [f"{result['seeds']} seeds in one program ({how}), ms per step of all:", ""]
    lines += [
        "| method | step (ms) | vs bp (range over rounds) | floor (matmul FLOPs / bp's) "
        "| XLA's op count / bp's | target | compile (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        xla = "-" if r["xla_flops_vs_first"] is None else f"{r['xla_flops_vs_first']:.2f}"
        floor = "-" if r["floor"] is None else f"{r['floor']:.2f}"
        target = "-" if r["target"] is None else f"<= {r['target']:.1f}x"
        if r["target"] is not None:
            target += " met" if r["ratio_vs_first"] <= r["target"] else " **not met**"
        lines.append(
            f"| {name} | {r['step_ms']:.3f} | {r['ratio_vs_first']:.2f}x "
            f"({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | {floor} "
            f"| {xla} | {target} | {r['compile_s']:.1f} |"
        )
    busy = busy_cores_line(result)
    return "\n".join([*lines, "", busy] if busy else lines)


def members_per_batch(flag_value: int | None) -> int:
    """The ``--members_per_batch`` flag's value, or the engine's default where it is unset."""
    return driver.default_members_per_batch() if flag_value is None else flag_value


def run_header(
    binary: str,
    configs: Mapping[str, ml_collections.ConfigDict],
    setting: str,
    seeds: int,
    members: int,
    chunk_steps: int,
    repeats: int,
) -> dict[str, Any]:
    """What a per-method binary (this one, ``benchmarks.profile``) records about its run."""
    first = next(iter(configs.values()))
    return {
        "command": command_line(binary),
        "machine": machine_facts(),
        "setting": setting,
        "model": f"mlp {first.model.widths} batch {first.batch_size}",
        "seeds": seeds,
        "members_per_batch": members,
        "chunk_steps": chunk_steps,
        "repeats": repeats,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.rules")
    configs, dataset = method_configs(_METHODS.value, _SETTING.value)
    members = members_per_batch(_MEMBERS.value)
    measured = measure(configs, _CHUNK.value, _REPEATS.value, dataset, _SEEDS.value, members)
    header = run_header(
        "benchmarks.rules", configs, _SETTING.value, _SEEDS.value, members, _CHUNK.value,
        _REPEATS.value,
    )  # fmt: skip
    result = {**header, **measured}
    out = write_json(result, _OUT.value, markdown_table(result), provenance)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _SETTING = flags.DEFINE_enum(
        "setting", "mnist1d", [*SETTINGS, "paper"], "Model, data and batch (module docstring)."
    )
    _SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds in one program per method.")
    _MEMBERS = flags.DEFINE_integer(
        "members_per_batch",
        None,
        "Seeds vmapped at a time in that program (0: all; default: the engine's, "
        "altlearn.driver.default_members_per_batch).",
    )
    _CHUNK = flags.DEFINE_integer("chunk_steps", 50, "Steps per timed call.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per method (median reported).")
    _METHODS = flags.DEFINE_list(
        "methods",
        list(METHODS),
        "method[/jvp][/everyK][/key=value] names of experiments/configs/np_family.py "
        "(e.g. rng=on: JAX's partitionable threefry; dist=normal: the papers' Gaussian noise).",
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/rules.json", "JSON output path.")
    app.run(main)
