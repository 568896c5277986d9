"""Backprop + evolution phases (paper 004) against controls that can win: a paired test.

    python -m experiments.hybrid_study --data=digits,mnist1d,breast_cancer --seeds=10 \\
        --tune_seeds=2 --workdir=docs/results --name=hybrid

Every method of experiments/configs/hybrid.py (``--methods``) trains the same seeds through
the engine (``altlearn.driver``: all seeds as one vmapped program); seed s gives every method
the same initialisation and batches, so differences are paired. Reported per method: test
accuracy and loss at the final iterate and at the best iterate chosen on validation
(``Runs.best``: the evaluation with the lowest validation loss), mean, sample std and 95%
interval (``altlearn.report``).

The hybrid selects on validation labels that backprop never sees, so its controls get the same
access: ``bp`` at its best iterate on validation, ``bp_trainval`` trained on those labels,
``bp_matched`` (the phases' forward passes as extra steps) at its best iterate, and
``no_selection`` (the same perturbations without selection). The verdict table gives hybrid
minus each control, paired over seeds, with its 95% interval and Holm's adjusted p-value over
every difference the table holds (the intervals are read together).

``--tune_seeds=N`` tunes every method the same way before the reported seeds run: three grid
points each, on tuning seeds 1000.. (never reported), chosen by final validation loss
(``altlearn.tune``): the learning rate for the backprop methods (bp_trainval takes bp's, as its
validation split is trained on), the phases' noise scale for the methods with phases (at bp's
learning rate).

Every method is evaluated just before and just after each phase step of the hybrid config
(``--methods``' configs read the phase steps from the rule they run; backprop alone at the
same steps): the change of the selection loss (the validation samples the phase scored), of the
whole validation split and of the test split, beside backprop alone's change over the same step
of the same seed. A phase that improves the samples it selected on but not the test split is
fitting those samples. ``s / step`` is the steady-state time per step with the phases at their
share (``driver.step_seconds``); a phase's own wall time is in the training runner's
``metrics.jsonl`` (``phase_time_s``) and in ``benchmarks.hybrid``.

Writes ``NAME.json`` (every number), ``NAME.md`` (the tables) and ``NAME.png`` to ``--workdir``;
every finished chunk of runs goes to ``NAME_chunks/`` there, so a killed study run again with
the same flags resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from altlearn import config as config_lib
from altlearn import driver, plotting, report, tune
from altlearn.plotting import pyplot
from altlearn.train import Experiment
from experiments.configs import hybrid as hybrid_configs

FIGURES = ("test_accuracy", "test_loss", "val_loss", "train_loss")


def phase_steps(config) -> list[int]:
    """The steps (counted from 1) whose step runs the config's rule's phase."""
    is_phase = Experiment(config).phase_steps
    return [t for t in range(1, int(config.steps) + 1) if is_phase(t)]


def run_method(config, seeds: int, phases: list[int], **saved: Any) -> dict[str, Any]:
    """All seeds through the driver, evaluated before and after every phase step and every
    ``eval_every`` steps to the end (the best iterate's candidates: the same steps for every
    method up to the shortest run)."""
    every = int(config.eval_every)
    grid = range(every, int(config.steps) + 1, every)
    eval_at = sorted({*grid, *(s for t in phases for s in (t - 1, t))})
    runs = driver.run(config, seeds=range(seeds), eval_at=eval_at, **saved)
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
    for k in ("test_accuracy", "test_loss"):
        values, steps = runs.best(k, by="val_loss")
        out[f"best_{k}"] = values[0].tolist()
    out["best_step"] = steps[0].tolist()
    if "rule/acceptance_rate" in runs.curves:
        out["acceptance_rate"] = runs.final("rule/acceptance_rate")[0].tolist()
    period = phases[1] - phases[0] if len(phases) > 1 else 1
    out["seconds_per_step"] = driver.step_seconds(config, range(seeds), period=period)
    return {**out, "steps": int(config.steps), "around_phases": around, "run_s": runs.run_s}


def configs(data: str, methods: list[str], sets: list[str]) -> dict[str, Any]:
    """The methods' configs on ``data`` with ``--set`` applied, and the hybrid config whose
    phase steps every method is evaluated around (``"reference"``)."""
    out = {m: hybrid_configs.get_config(f"method={m},data={data}") for m in methods}
    out["reference"] = hybrid_configs.get_config(f"method=hybrid,data={data}")
    ratio = {m: c.steps / out["reference"].steps for m, c in out.items()}  # bp_matched's > 1
    config_lib.apply_sets(list(out.values()), sets)
    for method, config in out.items():  # a --set of the steps keeps bp_matched's extra share
        config.steps = int(round(out["reference"].steps * ratio[method]))
    return out


LR_GRID = "optimizer.learning_rate=[3e-4,1e-3,3e-3]"
NOISE_GRID = "rule.noise_scale=[0.003,0.01,0.03]"
# Hybrid minus each control: (row, control method, its figure: final or best iterate).
CONTROLS = (
    ("bp, final iterate", "bp", ""),
    ("bp, best iterate on validation", "bp", "best_"),
    ("bp trained on train + validation", "bp_trainval", ""),
    ("bp_matched, best iterate on validation", "bp_matched", "best_"),
    ("no_selection", "no_selection", ""),
)


def tune_methods(chosen: dict[str, Any], seeds: int, by: str, save=None) -> dict[str, Any]:
    """Every method tuned on three grid points (see the module docstring); returns each
    method's tuning record. bp first: its learning rate is the start of the others'."""
    records: dict[str, Any] = {}
    order = sorted(chosen, key=lambda m: m != "bp")
    for method in order:
        config = chosen[method]
        if method != "bp" and "bp" in records:  # bp's learning rate, before its own grid
            tune.apply(config, records["bp"]["chosen"])
        if method == "bp_trainval":
            continue  # its validation split is trained on: bp's choice
        spec = NOISE_GRID if config.rule.name == "hybrid" else LR_GRID
        tuning = tune.tune(config, [spec], seeds, by, **(save(f"tune_{method}") if save else {}))
        tune.apply(config, tuning.chosen)
        records[method] = tuning.record()
    return records


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Hybrid's final test accuracy and loss minus each control's present, paired."""
    if "hybrid" not in results:
        return []
    out = []
    for row, method, prefix in CONTROLS:
        if method in results:
            entry = {"control": row, "method": method, "figure": prefix or "final_"}
            for k in ("test_accuracy", "test_loss"):
                entry[k] = report.paired(results["hybrid"][k], results[method][prefix + k])
            out.append(entry)
    return out


def study(
    datasets: list[str],
    methods: list[str],
    seeds: int,
    sets=(),
    tune_seeds=0,
    by="val_loss",
    save_dir=None,
) -> dict[str, Any]:
    """``save_dir``: every run's finished chunks are saved there, and a study run again with the
    same arguments loads them instead of training (a killed study resumes)."""
    out: dict[str, Any] = {"seeds": seeds, "methods": methods, "sets": list(sets), "results": {}}
    out["tuning"], out["verdicts"] = {}, {}
    for data in datasets:
        chosen = configs(data, methods, list(sets))
        reference = chosen.pop("reference")

        def save(name, data=data):
            return {} if save_dir is None else {"save_dir": save_dir, "name": f"{data}_{name}"}

        if tune_seeds:
            out["tuning"][data] = tune_methods(chosen, tune_seeds, by, save)
        results = {}
        for method, config in chosen.items():
            own = config.rule.name == "hybrid"
            phases = phase_steps(config if own else reference)
            results[method] = run_method(config, seeds, phases, **save(method))
            results[method]["hparams"] = {
                k: float(v) for k, v in config_lib.hparams(config).items()
            }
        for method, r in results.items():
            if "bp" in results and method != "bp":
                for figure in ("test_accuracy", "test_loss"):
                    r[f"vs_bp_{figure}"] = report.paired(r[figure], results["bp"][figure])
        out["results"][data] = results
        out["verdicts"][data] = verdicts(results)
    # Holm over every difference the verdict table holds (both figures, every dataset).
    cells = [
        v[k] for d in out["verdicts"].values() for v in d for k in ("test_accuracy", "test_loss")
    ]
    for c, adjusted in zip(cells, report.holm([c["p"] for c in cells])):
        c["p_holm"] = adjusted
    return out


def verdict_table(result: dict[str, Any]) -> list[str]:
    """Hybrid (final iterate) minus each control, every dataset: one table."""
    rows = [(d, v) for d, vs in result.get("verdicts", {}).items() for v in vs]
    if not rows:
        return []
    count = 2 * len(rows)
    lines = [
        f"Hybrid (final iterate) minus each control ({result['seeds']} paired seeds; mean "
        f"[95% t interval]; p: Holm-adjusted over the {count} differences of this table):",
        "",
        "| data | control | test accuracy (points) | p | test loss | p |",
        "|---|---|---|---|---|---|",
    ]
    for data, v in rows:
        acc, loss = v["test_accuracy"], v["test_loss"]
        lines.append(
            f"| {data} | {v['control']} | {report.cell(acc, 100, 2, True, False)} | "
            f"{acc['p_holm']:.3f} | {report.cell(loss, 1, 4, True, False)} | "
            f"{loss['p_holm']:.3f} |"
        )
    return [*lines, ""]


def table(result: dict[str, Any]) -> str:
    lines = verdict_table(result)
    for data, results in result["results"].items():
        lines += [
            f"**{data}** ({result['seeds']} paired seeds; each method's steps from "
            "experiments/configs/hybrid.py; mean ± sample std [95% t interval])",
            "",
            "| method | steps | test accuracy (%) | minus bp | test loss | minus bp "
            "| best iterate on validation: test accuracy (%) | its step | accepted phases "
            "| s / step |",
            "|---|---|---|---|---|---|---|---|---|---|",
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
                f"{report.cell(report.stats(r['best_test_accuracy']), 100, 2)} | "
                f"{np.mean(r['best_step']):.0f} | "
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
    fig, axes = pyplot().subplots(1, count, figsize=(6 * count, 4), squeeze=False)
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
        tune.check_by(_TUNE_BY.value)
        result = study(
            list(_DATA.value),
            list(_METHODS.value),
            _SEEDS.value,
            _SET.value,
            _TUNE_SEEDS.value,
            _TUNE_BY.value,
            save_dir=Path(_WORKDIR.value) / f"{_NAME.value}_chunks",
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = table(result)
    report.write(_WORKDIR.value, _NAME.value, result, text, provenance, lambda p: plot(result, p))
    print(text)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _DATA = flags.DEFINE_list(
        "data", ["digits", "mnist1d", "breast_cancer"], "Datasets (scale=cpu)."
    )
    _METHODS = flags.DEFINE_list(
        "methods", list(hybrid_configs.METHODS), "Methods of experiments/configs/hybrid.py."
    )
    _SEEDS = flags.DEFINE_integer("seeds", 10, "Paired seeds, vmapped.")
    _SET = flags.DEFINE_multi_string(
        "set", [], "KEY=VALUE for every method whose config has KEY (rule.es_every=50, steps=..)."
    )
    _TUNE_SEEDS = flags.DEFINE_integer(
        "tune_seeds", 0, "Tuning seeds (1000..) per grid point; 0: no tuning (the configs' values)."
    )
    _TUNE_BY = flags.DEFINE_string("tune_by", "val_loss", "Tuning figure: val_loss, val_accuracy.")
    _WORKDIR = flags.DEFINE_string("workdir", "runs/hybrid", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "hybrid", "Output file name (NAME.json, .md, .png).")
    app.run(main)
