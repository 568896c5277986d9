"""Backprop + evolution phases (paper 004) against backprop alone: a paired test over seeds.

    python -m experiments.hybrid_study --data=digits,mnist1d --seeds=5 \\
        --out=docs/results/hybrid

Every method of experiments/configs/hybrid.py (``--methods``) trains the same seeds as ONE
vmapped program; seed s gives every method the same initialisation and the same batches (the
key of ``experiments.train --config.seed=s``), so differences are paired. Reported per method:
final test accuracy and loss (mean, std) and the paired difference to ``bp`` with a 95%
confidence interval (t distribution, seeds - 1 degrees of freedom).

Around each evolution phase (the hybrid methods) the state is evaluated just before the phase's
step and just after it: the change of the selection loss (the validation samples the phase
scored), of the whole validation split and of the test split, beside backprop alone's change
over the same step of the same seed. A phase that improves the samples it selected on but not
the test split is fitting those samples. The wall time of a phase step and of a plain step is
timed after compilation, on this machine.

Writes ``OUT.json`` (every number), ``OUT.md`` (the tables) and ``OUT.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from scipy import stats

from altlearn.train import Experiment
from experiments.configs import hybrid as hybrid_configs

FIGURES = ("test_accuracy", "test_loss", "val_loss", "train_loss")


def run_method(config, seeds: int) -> dict[str, Any]:
    """All seeds as one vmapped program; evaluations before and after every phase step (or at
    the same steps for backprop alone)."""
    experiment = Experiment(config)
    steps = int(config.steps)
    every = int(hybrid_configs.ES["es_every"])
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(seeds))
    state = jax.jit(jax.vmap(experiment.init))(keys)
    run = {
        n: jax.jit(jax.vmap(lambda s, n=n: experiment.train_steps(s, n)))
        for n in {every - 1, 1, steps % every}
        if n > 0
    }
    evaluate = jax.jit(jax.vmap(experiment.evaluate))
    around: list[dict[str, Any]] = []
    phase_seconds, step_seconds = [], []
    done = 0
    while done + every <= steps:
        t = time.perf_counter()
        state, _ = run[every - 1](state)
        jax.block_until_ready(state)
        step_seconds.append((time.perf_counter() - t) / (every - 1))
        before = evaluate(state)
        t = time.perf_counter()
        state, metrics = run[1](state)
        jax.block_until_ready(state)
        phase_seconds.append(time.perf_counter() - t)
        after = evaluate(state)
        done += every
        entry = {
            "step": done,
            **{
                f"{k}_change": (np.asarray(after[k]) - np.asarray(before[k])).tolist()
                for k in ("val_loss", "test_loss", "test_accuracy")
            },
        }
        for name in ("accepted", "val_loss_change"):
            if name in metrics:
                entry[f"selection_{name}"] = np.asarray(metrics[name][:, 0]).tolist()
        around.append(entry)
    if steps - done:
        state, _ = run[steps - done](state)
    final = evaluate(state)
    out = {k: np.asarray(final[k]).tolist() for k in FIGURES}
    out["steps"] = steps
    out["around_phases"] = around
    # The first timings include compilation: steady state from the third on.
    out["seconds_per_step"] = float(np.median(step_seconds[2:] or step_seconds))
    out["seconds_phase_step"] = float(np.median(phase_seconds[2:] or phase_seconds))
    if "rule/acceptance_rate" in final:
        out["acceptance_rate"] = np.asarray(final["rule/acceptance_rate"]).tolist()
    return out


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b over seeds with a 95% t interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0
    return {"mean": float(d.mean()), "low": float(d.mean() - half), "high": float(d.mean() + half)}


def study(datasets: list[str], methods: list[str], seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": seeds, "methods": methods, "results": {}}
    for data in datasets:
        results = {}
        for method in methods:
            t = time.perf_counter()
            config = hybrid_configs.get_config(f"method={method},data={data}")
            results[method] = run_method(config, seeds)
            results[method]["seconds"] = time.perf_counter() - t
            logging.info(
                "%s %s: test accuracy %.4f", data, method, np.mean(results[method]["test_accuracy"])
            )
        for method, r in results.items():
            if "bp" in results and method != "bp":
                bp = results["bp"]
                r["vs_bp_test_accuracy"] = paired(r["test_accuracy"], bp["test_accuracy"])
                r["vs_bp_test_loss"] = paired(r["test_loss"], bp["test_loss"])
        out["results"][data] = results
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    for data, results in result["results"].items():
        lines += [
            f"**{data}** ({result['seeds']} paired seeds; each method's steps from "
            "experiments/configs/hybrid.py)",
            "",
            "| method | steps | test accuracy | minus bp (95% CI) | test loss | minus bp (95% CI) "
            "| accepted phases | s / step | s / phase step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, r in results.items():
            acc = np.asarray(r["test_accuracy"])
            loss = np.asarray(r["test_loss"])
            d_acc = r.get("vs_bp_test_accuracy")
            d_loss = r.get("vs_bp_test_loss")
            ci = lambda d, scale: (
                f"{scale * d['mean']:+.2f} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}]"
                if d
                else ""
            )
            rate = r.get("acceptance_rate")
            lines.append(
                f"| {method} | {r['steps']} | {100 * acc.mean():.2f} ± {100 * acc.std():.2f} | "
                f"{ci(d_acc, 100)} | {loss.mean():.4f} | {ci(d_loss, 1)} | "
                f"{'' if rate is None else f'{np.mean(rate):.2f}'} | "
                f"{r['seconds_per_step'] * 1e3:.1f} ms | {r['seconds_phase_step'] * 1e3:.1f} ms |"
            )
        lines += ["", "Around the phases (mean over phases and seeds; bp: the same steps):", ""]
        lines += [
            "| method | selection loss change | val loss change | test loss change "
            "| test accuracy change |",
            "|---|---|---|---|---|",
        ]
        for method, r in results.items():
            phases = r["around_phases"]
            mean = lambda key, phases=phases: (
                np.mean([np.mean(p[key]) for p in phases]) if phases else np.nan
            )
            selection = (
                f"{mean('selection_val_loss_change'):+.5f}"
                if phases and "selection_val_loss_change" in phases[0]
                else ""
            )
            lines.append(
                f"| {method} | {selection} | {mean('val_loss_change'):+.5f} | "
                f"{mean('test_loss_change'):+.5f} | {100 * mean('test_accuracy_change'):+.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["results"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        results = result["results"][data]
        base = np.asarray(results["bp"]["test_accuracy"]) if "bp" in results else None
        for i, (method, r) in enumerate(results.items()):
            acc = 100 * np.asarray(r["test_accuracy"])
            ax.plot(np.full(len(acc), i), acc, "o", alpha=0.6)
            ax.plot([i - 0.25, i + 0.25], [acc.mean()] * 2, "k-")
            if base is not None and method != "bp":  # lines join each seed to its bp run
                for a, b in zip(acc, 100 * base):
                    ax.plot([0, i], [b, a], "-", color="grey", alpha=0.15)
        ax.set_xticks(range(len(results)), list(results), rotation=20, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{data}: {result['seeds']} paired seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result = study(list(_DATA.value), list(_METHODS.value), _SEEDS.value)
    result["seconds"] = time.perf_counter() - t
    result["command"] = (
        f"python -m experiments.hybrid_study --data={','.join(_DATA.value)} "
        f"--methods={','.join(_METHODS.value)} --seeds={_SEEDS.value} --out={_OUT.value}"
    )
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{table(result)}\n")
    plot(result, out.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _DATA = flags.DEFINE_list("data", ["digits", "mnist1d"], "Datasets (scale=cpu).")
    _METHODS = flags.DEFINE_list(
        "methods", list(hybrid_configs.METHODS), "Methods of experiments/configs/hybrid.py."
    )
    _SEEDS = flags.DEFINE_integer("seeds", 5, "Paired seeds, vmapped.")
    _OUT = flags.DEFINE_string("out", "runs/hybrid", "Output prefix (.json, .md, .png).")
    app.run(main)
