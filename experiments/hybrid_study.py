"""Backprop + evolution phases (paper 004) against backprop alone: a paired test over seeds.

    python -m experiments.hybrid_study --data=digits,mnist1d --seeds=10 \\
        --workdir=docs/results --name=hybrid

Every method of experiments/configs/hybrid.py (``--methods``) trains the same seeds through
the engine (``altlearn.driver``: all seeds as one vmapped program); seed s gives every method
the same initialisation and batches, so differences are paired. Reported per method: final test
accuracy and loss (mean, sample std, 95% interval) and the paired difference to ``bp`` with its
95% interval (``altlearn.report``).

Every method is evaluated just before and just after each phase step of the hybrid config
(``--methods``' configs read the phase steps from the rule they run; backprop alone at the
same steps): the change of the selection loss (the validation samples the phase scored), of the
whole validation split and of the test split, beside backprop alone's change over the same step
of the same seed. A phase that improves the samples it selected on but not the test split is
fitting those samples. ``s / step`` is the steady-state time per step with the phases at their
share (``driver.step_seconds``); a phase's own wall time is in the training runner's
``metrics.jsonl`` (``phase_time_s``) and in ``benchmarks.hybrid``.

Writes ``NAME.json`` (every number), ``NAME.md`` (the tables) and ``NAME.png`` to ``--workdir``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from absl import app, flags

from altlearn import config as config_lib
from altlearn import driver, plotting, report
from altlearn.plotting import plt
from altlearn.train import Experiment
from experiments.configs import hybrid as hybrid_configs

FIGURES = ("test_accuracy", "test_loss", "val_loss", "train_loss")


def phase_steps(config) -> list[int]:
    """The steps (counted from 1) whose step runs the config's rule's phase."""
    is_phase = Experiment(config).phase_steps
    return [t for t in range(1, int(config.steps) + 1) if is_phase(t)]


def run_method(config, seeds: int, phases: list[int]) -> dict[str, Any]:
    """All seeds through the driver, evaluated before and after every phase step."""
    runs = driver.run(config, seeds=range(seeds), eval_at=[s for t in phases for s in (t - 1, t)])
    at = {step: i for i, step in enumerate(runs.steps)}
    curve = lambda name, step: runs.curves[name][:, at[step]]
    around = []
    for t in phases:
        entry = {"step": t}
        for k in ("val_loss", "test_loss", "test_accuracy"):
            entry[f"{k}_change"] = (curve(k, t) - curve(k, t - 1)).tolist()
        for name in ("accepted", "val_loss_change"):  # the phase step's own figures
            if f"rule/{name}" in runs.curves:
                entry[f"selection_{name}"] = curve(f"rule/{name}", t).tolist()
        around.append(entry)
    out = {k: runs.final(k)[0].tolist() for k in FIGURES}
    if "rule/acceptance_rate" in runs.curves:
        out["acceptance_rate"] = runs.final("rule/acceptance_rate")[0].tolist()
    every = phases[1] - phases[0] if len(phases) > 1 else 1
    out["seconds_per_step"] = driver.step_seconds(config, range(seeds), period=every)
    return {**out, "steps": int(config.steps), "around_phases": around, "run_s": runs.run_s}


def configs(data: str, methods: list[str], sets: list[str]) -> dict[str, Any]:
    """The methods' configs on ``data`` with ``--set`` applied, and the hybrid config whose
    phase steps every method is evaluated around (``"reference"``)."""
    out = {m: hybrid_configs.get_config(f"method={m},data={data}") for m in methods}
    out["reference"] = hybrid_configs.get_config(f"method=hybrid,data={data}")
    config_lib.apply_sets(list(out.values()), sets)
    return out


def study(datasets: list[str], methods: list[str], seeds: int, sets=()) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": seeds, "methods": methods, "sets": list(sets), "results": {}}
    for data in datasets:
        chosen = configs(data, methods, list(sets))
        reference = chosen.pop("reference")
        results = {}
        for method, config in chosen.items():
            own = config.rule.name == "hybrid"
            results[method] = run_method(config, seeds, phase_steps(config if own else reference))
        for method, r in results.items():
            if "bp" in results and method != "bp":
                for figure in ("test_accuracy", "test_loss"):
                    r[f"vs_bp_{figure}"] = report.paired(r[figure], results["bp"][figure])
        out["results"][data] = results
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    for data, results in result["results"].items():
        lines += [
            f"**{data}** ({result['seeds']} paired seeds; each method's steps from "
            "experiments/configs/hybrid.py; mean ± sample std [95% t interval])",
            "",
            "| method | steps | test accuracy (%) | minus bp | test loss | minus bp "
            "| accepted phases | s / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, r in results.items():
            d_acc, d_loss = r.get("vs_bp_test_accuracy"), r.get("vs_bp_test_loss")
            rate = r.get("acceptance_rate")
            lines.append(
                f"| {method} | {r['steps']} | "
                f"{report.cell(report.stats(r['test_accuracy']), 100, 2)} | "
                f"{report.cell(d_acc, 100, 2, sign=True) if d_acc else ''} | "
                f"{report.cell(report.stats(r['test_loss']), digits=4)} | "
                f"{report.cell(d_loss, digits=4, sign=True) if d_loss else ''} | "
                f"{'' if rate is None else report.cell(report.stats(rate), digits=2)} | "
                f"{r['seconds_per_step'] * 1e3:.1f} ms |"
            )
        lines += [
            "",
            "Around the phases (each seed's mean over its phases, then mean ± sample std [95% t "
            "interval] over seeds; bp: the same steps):",
            "",
        ]
        lines += [
            "| method | selection loss change | val loss change | test loss change "
            "| test accuracy change |",
            "|---|---|---|---|---|",
        ]
        for method, r in results.items():
            phases = r["around_phases"]

            def change(key, scale=1.0, digits=5, phases=phases):
                """Per seed the mean change over the phases; its stats over the seeds."""
                if not phases or key not in phases[0]:
                    return ""
                per_seed = np.mean([p[key] for p in phases], axis=0)
                return report.cell(report.stats(per_seed), scale, digits, sign=True)

            lines.append(
                f"| {method} | {change('selection_val_loss_change')} | "
                f"{change('val_loss_change')} | {change('test_loss_change')} | "
                f"{change('test_accuracy_change', 100, 3)} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path) -> None:
    count = len(result["results"])
    fig, axes = plt.subplots(1, count, figsize=(6 * count, 4), squeeze=False)
    for ax, (data, results) in zip(axes[0], result["results"].items()):
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
    plotting.save(fig, path, 90)


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    try:
        report.prepare_workdir(_WORKDIR.value)
        for data in _DATA.value:  # every method and dataset checked before anything trains
            for config in configs(data, list(_METHODS.value), _SET.value).values():
                Experiment(config)
        result = study(list(_DATA.value), list(_METHODS.value), _SEEDS.value, _SET.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = table(result)
    report.write(_WORKDIR.value, _NAME.value, result, text, provenance, lambda p: plot(result, p))
    print(text)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _DATA = flags.DEFINE_list("data", ["digits", "mnist1d"], "Datasets (scale=cpu).")
    _METHODS = flags.DEFINE_list(
        "methods", list(hybrid_configs.METHODS), "Methods of experiments/configs/hybrid.py."
    )
    _SEEDS = flags.DEFINE_integer("seeds", 10, "Paired seeds, vmapped.")
    _SET = flags.DEFINE_multi_string(
        "set", [], "KEY=VALUE for every method whose config has KEY (rule.es_every=50, steps=..)."
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/hybrid", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "hybrid", "Output file name (NAME.json, .md, .png).")
    app.run(main)
