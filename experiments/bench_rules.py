"""Step time of each learning rule divided by the backprop step time, in one run.

    python -m experiments.bench_rules --data=mnist1d --out=docs/bench/rules_mnist1d.json

Every method uses the same model (np_family's CPU MLP: in-256-256-256-out, leaky ReLU), data and
batch. Each method's ``chunk_steps`` training steps are compiled ahead of time (compile time
reported apart) and timed as one call; the methods' timed calls are interleaved round-robin
``repeats`` times so machine noise hits all of them alike, and the median is reported.
``--scale=paper`` times the paper's CIFAR-10-sized MLP (3072-1024x3-10, batch 1000) on random
data of that shape (no files needed).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from altlearn import data as data_lib
from altlearn.train import Experiment
from experiments.configs import np_family


def method_config(name: str, data: str, scale: str):
    method, *mods = name.split("/")  # np/jvp, danp/every16, np/rng=on (any variant key=value)
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


def measure(configs: dict, chunk_steps: int, repeats: int, dataset=None) -> dict:
    """Median seconds per step of each config, interleaved; compile times apart."""
    runs = {}
    for name, config in configs.items():
        experiment = Experiment(config, dataset)
        state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
        t = time.perf_counter()
        chunk = (
            jax.jit(lambda s, e=experiment: e.train_steps(s, chunk_steps)).lower(state).compile()
        )
        compile_time = time.perf_counter() - t
        state, _ = chunk(state)  # warm-up
        jax.block_until_ready(state)
        runs[name] = {"chunk": chunk, "state": state, "compile_s": compile_time, "times": []}
    for _ in range(repeats):
        for r in runs.values():
            t = time.perf_counter()
            r["state"], metrics = r["chunk"](r["state"])
            jax.block_until_ready(metrics)
            r["times"].append((time.perf_counter() - t) / chunk_steps)
    base = statistics.median(runs[next(iter(runs))]["times"])
    return {
        name: {
            "step_ms": 1e3 * statistics.median(r["times"]),
            "ratio_vs_first": statistics.median(r["times"]) / base,
            "compile_s": r["compile_s"],
        }
        for name, r in runs.items()
    }


def main(argv: list[str]) -> None:
    del argv
    dataset = paper_sized_dataset() if _SCALE.value == "paper" else None
    data = "cifar10" if _SCALE.value == "paper" else _DATA.value
    configs = {}
    for name in _METHODS.value:
        config = method_config(name, data, _SCALE.value)
        if dataset is not None:
            config.data.standardize = "none"
        configs[name] = config
    results = measure(configs, _CHUNK.value, _REPEATS.value, dataset)
    first = next(iter(configs.values()))
    out = {
        "command": "python -m experiments.bench_rules "
        + " ".join(
            f"--{f}={flags.FLAGS[f].value}" for f in ("data", "scale", "chunk_steps", "repeats")
        ),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": __import__("os").cpu_count(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0].device_kind),
        },
        "model": f"mlp {first.model.widths} batch {first.batch_size}",
        "results": results,
    }
    Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_OUT.value).write_text(json.dumps(out, indent=1) + "\n")
    print("| method | step (ms) | vs bp | compile (s) |\n|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['step_ms']:.3f} | {r['ratio_vs_first']:.2f}x | {r['compile_s']:.1f} |"
        )


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _DATA = flags.DEFINE_string("data", "mnist1d", "Dataset (cpu scale).")
    _SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper"], "Model and batch sizes.")
    _CHUNK = flags.DEFINE_integer("chunk_steps", 50, "Steps per timed call.")
    _REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per method (median reported).")
    _METHODS = flags.DEFINE_list(
        "methods",
        [
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
        ],
        "method[/jvp][/everyK][/key=value] names of experiments/configs/np_family.py "
        "(rng=on: the noise drawn by JAX's partitionable threefry instead of the classic one).",
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/rules.json", "JSON output path.")
    app.run(main)
