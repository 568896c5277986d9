r"""Paper 002's claim, tested: closed-form alternating solves vs SGD and Adam.

For each dataset, the same network (in-width-out ReLU), initialisation (seed s gives every method
the same weights) and square loss for every method, each trained through the engine
(``altlearn.driver``, the seeds vmapped) and evaluated on the whole training split:

* closed_form: ``--alternations`` alternations per seed, evaluated after each one.
* gd / adam_full (full batch) and sgd / adam (minibatch 64): the learning rate of the grid
  (``--sgd_lrs``, ``--adam_lrs``) with the lowest mean final TRAINING loss on the tuning seeds
  (``altlearn.tune``: the claim is about optimisation), then ``--steps`` steps on the reported
  seeds, or as many as one run makes in closed_form's wall time where that is more
  (``--max_steps`` caps it), ``--records`` evaluations.

Every method's wall-time axis is its step count times the steady-state time of ONE run's step
(``driver.step_seconds``, compilation apart), measured the same way for all. Writes NAME.json
(curves, grids, timings), NAME.md (tables) and NAME.png (training loss against wall time per
dataset, mean over seeds) to ``--workdir``.

    python -m experiments.closed_form_compare --workdir=docs/results --name=closed_form
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags

from altlearn import data as data_lib
from altlearn import driver, plotting, report, tune
from altlearn.plotting import pyplot
from altlearn.train import configure_jax
from experiments.configs.closed_form import get_config

BASELINES = ("gd", "adam_full", "sgd", "adam")
DATASETS = ("diabetes", "breast_cancer", "wine", "digits", "mnist1d")


def _config(method: str, data: str, width: int, steps: int, records: int):
    config = get_config(f"method={method},data={data},width={width}")
    config.steps = steps
    config.eval_every = max(1, steps // records)
    return config


def train_method(config, dataset, seeds: int, per_step: float | None = None) -> dict:
    """The seeds through the driver; the training-loss curves on a wall-time axis (``per_step``:
    one run's steady-state seconds per step, measured here if not given)."""
    runs = driver.run(config, seeds=range(seeds), dataset=dataset)
    per_step = per_step or driver.step_seconds(config, [0], dataset=dataset)
    out = {
        "steps": runs.steps,
        "time_s": (np.asarray(runs.steps) * per_step).tolist(),
        "train_loss": runs.curves["train_loss"].tolist(),  # [seed, record]
        "final": {k: v[:, -1].tolist() for k, v in runs.curves.items() if k != "step"},
        "time_per_step_s": per_step,
        "compile_time_s": runs.compile_s,
    }
    for name in ("accepted", "step_length"):  # closed_form's per-alternation figures
        if f"rule/{name}" in runs.curves:
            out[name] = runs.curves[f"rule/{name}"][:, 1:].tolist()
    return out


def run_baseline(method, dataset, width, seeds, steps, lrs, records, min_seconds, max_steps):
    """The learning rate tuned on the tuning seeds, then the reported seeds at it, for at least
    ``min_seconds`` of one run's time (closed_form's) up to ``max_steps``."""
    config = _config(method, dataset.name, width, steps, records)
    grid = f"optimizer.learning_rate=[{','.join(lrs)}]"
    tuned = tune.tune(config, [grid], seeds, by="train_loss", dataset=dataset)
    tune.apply(config, tuned.chosen)
    per_step = driver.step_seconds(config, [0], dataset=dataset)
    if min_seconds > 0:
        steps = min(max(steps, int(np.ceil(min_seconds / per_step))), max_steps)
        config = _config(method, dataset.name, width, -(-steps // records) * records, records)
        tune.apply(config, tuned.chosen)
    lr = tuned.chosen["optimizer.learning_rate"]
    out = train_method(config, dataset, seeds, per_step)
    return {**out, "best_lr": lr, "tuning": tuned.record()}


def _baselines(r: dict) -> list[str]:
    return [m for m in BASELINES if m in r]


def _reach_time(times, losses, target) -> float | None:
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return float(np.asarray(times)[hit[0]]) if len(hit) else None


def reach_analysis(r: dict) -> dict:
    """Per seed: Adam's best training loss (either batch mode), when closed_form reaches it,
    and when Adam reached it."""
    cf, out = r["closed_form"], []
    if not any(m in r for m in ("adam_full", "adam")):
        return {"per_seed": out}
    for seed, loss in enumerate(cf["train_loss"]):
        best_method, target = None, np.inf
        for method in [m for m in ("adam_full", "adam") if m in r]:
            curve = np.asarray(r[method]["train_loss"][seed])
            finite = curve[np.isfinite(curve)]
            if finite.size and finite.min() < target:
                best_method, target = method, float(finite.min())
        adam = r[best_method]
        out.append(
            {
                "adam_method": best_method,
                "adam_best_loss": target,
                "adam_time_s": _reach_time(adam["time_s"], adam["train_loss"][seed], target),
                "closed_form_time_s": _reach_time(cf["time_s"], loss, target),
                "closed_form_final_loss": loss[-1],
            }
        )
    return {"per_seed": out}


def reach_sentence(r: dict) -> str:
    per_seed = r["reach"]["per_seed"]
    if not per_seed:
        return "No Adam baseline ran (--methods)."
    reached = [s["closed_form_time_s"] for s in per_seed if s["closed_form_time_s"] is not None]
    adam = ", ".join(f"{s['adam_best_loss']:.4g} ({s['adam_method']})" for s in per_seed)
    if len(reached) == len(per_seed):
        adam_times = np.mean([s["adam_time_s"] for s in per_seed])
        return (
            f"Adam's best training loss per seed: {adam}. closed_form reaches it after "
            f"{np.mean(reached):.2f} s on average (Adam needed {adam_times:.2f} s)."
        )
    return (
        f"Adam's best training loss per seed: {adam}. closed_form reaches it on "
        f"{len(reached)} of {len(per_seed)} seeds"
        + (f" (after {np.mean(reached):.2f} s on average)." if reached else ".")
    )


def line_search_sentence(cf: dict) -> str:
    """How closed_form's backtracking went over every alternation of every seed."""
    if "step_length" not in cf:
        return ""
    t = np.asarray(cf["step_length"]).ravel()
    short = t[(t > 0) & (t < 1)]
    median = f" (median t {np.median(short):g})" if short.size else ""
    return (
        f"Line search over the {t.size} alternations of the seeds: the full step (t = 1) taken "
        f"in {np.mean(t == 1):.0%}, a shortened one in {short.size / t.size:.0%}{median}, "
        f"none (t = 0, the step rejected) in {np.mean(t == 0):.0%}."
    )


def summarise(results: dict) -> str:
    lines = []
    for data, r in results.items():
        metric = "test_accuracy" if "test_accuracy" in r["closed_form"]["final"] else "test_loss"
        lines += [
            f"### {data}",
            "",
            "Mean ± sample std [95% t interval] over seeds.",
            "",
            f"| method | lr (tuned) | final train loss | {metric} | steps | time / step | "
            "total time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in ("closed_form", *_baselines(r)):
            b = r[method]
            name = f"closed_form ({r['dtype']})" if method == "closed_form" else method
            lr = f"{b['best_lr']:g}" if "best_lr" in b else "-"
            final_loss = report.stats(np.asarray(b["train_loss"])[:, -1])
            lines.append(
                f"| {name} | {lr} | {report.cell(final_loss, significant=True)} | "
                f"{report.cell(report.stats(b['final'][metric]))} | {b['steps'][-1]} | "
                f"{b['time_per_step_s'] * 1e3:.3f} ms | {b['time_s'][-1]:.2f} |"
            )
        grid = "; ".join(
            f"{m}: "
            + ", ".join(
                f"{p['optimizer.learning_rate']:g} -> {s:.3g}"
                for p, s in zip(r[m]["tuning"]["grid"], r[m]["tuning"]["scores"], strict=True)
            )
            for m in _baselines(r)
        )
        lines += [
            "",
            reach_sentence(r),
            "",
            line_search_sentence(r["closed_form"]),
            "",
            "Learning-rate grids (lr -> mean final train loss on the tuning seeds; inf: "
            f"diverged): {grid}.",
            "",
        ]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    fig, axes = pyplot().subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (data, r) in zip(axes[0], results.items()):
        for method in ("closed_form", *_baselines(r)):
            b = r[method]
            loss = np.nanmean(np.asarray(b["train_loss"], np.float64), axis=0)
            label = method if method == "closed_form" else f"{method} (lr {b['best_lr']:g})"
            style = dict(color="black", marker="o", ms=3) if method == "closed_form" else {}
            ax.plot(b["time_s"][1:], loss[1:], label=label, **style)
        ax.set(xscale="log", yscale="log", title=data, xlabel="wall time (s, compile excluded)")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    plotting.save(fig, path, 120)


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    results = {}
    try:
        report.prepare_workdir(_WORKDIR.value)
        if _REPLOT.value:  # the tables and plot again from NAME.json, nothing trained
            results = report.read(f"{_WORKDIR.value}/{_NAME.value}.json")
            provenance = results.pop("provenance")  # the run that trained it
            text = summarise(results)
            report.write(
                _WORKDIR.value, _NAME.value, results, text, provenance,
                lambda p: plot(results, p),
            )  # fmt: skip
            print(text)
            return
        configure_jax(_config("closed_form", "diabetes", _WIDTH.value, 1, 1))
        unknown = sorted(set(_METHODS.value) - set(BASELINES))
        if unknown:
            raise ValueError(
                f"--methods: unknown {unknown}; valid choices: {', '.join(BASELINES)}."
            )
        for data in _DATA.value:  # every dataset and grid checked before anything trains
            for method in _METHODS.value:
                lrs = _SGD_LRS.value if method in ("gd", "sgd") else _ADAM_LRS.value
                config = _config(method, data, _WIDTH.value, _STEPS.value, _RECORDS.value)
                tune.check_specs([config], [f"optimizer.learning_rate=[{','.join(lrs)}]"])
        for data in _DATA.value:
            dataset = data_lib.load_dataset(data, seed=0, validation_fraction=0.1)
            cf_config = _config("closed_form", data, _WIDTH.value, _ALTS.value, _ALTS.value)
            r = {"closed_form": train_method(cf_config, dataset, _SEEDS.value)}
            r["dtype"] = "float64" if configure_jax(cf_config) else "float32"
            cf_seconds = r["closed_form"]["time_s"][-1]
            for method in _METHODS.value:
                lrs = _SGD_LRS.value if method in ("gd", "sgd") else _ADAM_LRS.value
                r[method] = run_baseline(
                    method, dataset, _WIDTH.value, _SEEDS.value, _STEPS.value,
                    lrs, _RECORDS.value, cf_seconds, _MAX_STEPS.value,
                )  # fmt: skip
            r["reach"] = reach_analysis(r)
            results[data] = r
    except (ValueError, data_lib.MissingDataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    text = summarise(results)
    report.write(_WORKDIR.value, _NAME.value, results, text, provenance, lambda p: plot(results, p))
    print(text)


if __name__ == "__main__":
    _DATA = flags.DEFINE_list("data", list(DATASETS), "Datasets.")
    _METHODS = flags.DEFINE_list("methods", list(BASELINES), "Baselines against closed_form.")
    _SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds (every method gets the same inits).")
    _WIDTH = flags.DEFINE_integer("width", 32, "Hidden width, the same for every method.")
    _ALTS = flags.DEFINE_integer("alternations", 30, "closed_form alternations.")
    _STEPS = flags.DEFINE_integer("steps", 5000, "Steps of every baseline.")
    _MAX_STEPS = flags.DEFINE_integer(
        "max_steps", 400_000, "Cap on a baseline's steps when matching closed_form's time."
    )
    _RECORDS = flags.DEFINE_integer("records", 50, "Training-loss records per baseline run.")
    _SGD_LRS = flags.DEFINE_list("sgd_lrs", ["0.003", "0.01", "0.03", "0.1", "0.3"], "SGD grid.")
    _ADAM_LRS = flags.DEFINE_list(
        "adam_lrs", ["0.0001", "0.0003", "0.001", "0.003", "0.01"], "Adam grid."
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/closed_form", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "closed_form", "Output file name (NAME.json, .md, .png).")
    _REPLOT = flags.DEFINE_bool("replot", False, "Only redraw NAME.md and NAME.png from NAME.json.")
    app.run(main)
