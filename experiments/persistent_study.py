"""Persistent neurons (paper 001) against plain training, restarts and SGDR at equal steps.

    python -m experiments.persistent_study --study=toy --workdir=runs/p --name=persistent_toy
    python -m experiments.persistent_study --study=kink --workdir=runs/p --name=persistent_kink
    python -m experiments.persistent_study --study=cnn --data=digits,mnist1d \\
        --workdir=runs/p --name=persistent_cnn

Every study trains through the engine (``altlearn.driver``: seeds and points vmapped in one
program), tunes with ``altlearn.tune`` and writes ``NAME.json``, ``NAME.md`` and ``NAME.png``
(``altlearn.report``).

toy: a 2-D loss surface with a shallow basin near the start and a deeper one farther away;
    plain gradient descent from the start ends in the shallow one. Persistent iterations from
    the same start, for each penalty; the trajectories drawn on the contour plot; the first
    iteration that reaches the deep basin. (The surface is the model: a flax module whose one
    parameter is the 2-D point and whose output's squared error is the surface.)
kink: ``data=kink`` (a narrow tent on [-1, 1]), MLP 1-8-8-1 ReLU, full batch, Adam: persistent
    (K iterations of T steps) with the parameter distance and with the function distance, each
    with its best penalty, against one long run of K T steps and K restarts of T steps from
    fresh initialisations (the restart with the lowest validation loss reported), over
    ``--inits`` initialisations vmapped; the distribution of the final training loss and the
    fraction below ``--good_loss``.
cnn: a LeNet-style CNN (5-wide convolutions of 6 and 16 channels, dense 120-84) on digits and
    mnist1d, He initialisation times 1, 0.1 and 10; persistent full and partial (the dense
    layers) against plain, restarts and SGDR (``cosine_restarts`` with K cycles), K x T steps
    each; each method's iterate is chosen among its K snapshots by validation loss (persistent:
    the end point the rule reports; restarts: one per restart; plain and SGDR: every T steps)
    and reported on test, over ``--seeds`` seeds.

Fair choices: every method is tuned by validation loss on the tuning seeds (1000, 1001, ...:
``altlearn.tune``) on as many grid points as the others: on kink persistent's lambda and tau
(and the penalty) and the baselines' learning rate (9 points); on cnn persistent's learning
rate and lambda and the baselines' learning rate (6 points); every method is then reported on
the seeds 0, 1, ... none was chosen on.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from altlearn import config as config_lib
from altlearn import data as data_lib
from altlearn import driver, models, plotting, report, tune
from altlearn.plotting import pyplot
from experiments.configs import persistent as persistent_configs

PENALTIES = ("gaussian", "inverse", "deflation")
FIGURES = ("train_loss", "val_loss", "test_loss", "test_accuracy")

# ----------------------------------------------------------------------------------- toy


def toy_surface(theta: jax.Array) -> jax.Array:
    """f(theta) > 0: a shallow basin near (1, 1) (minimum f = 0.70) close to the start, a deep
    one near (-1.2, -1.2) (f = 0.29), in a gentle bowl."""
    shallow = 0.55 * jnp.exp(-jnp.sum(jnp.square(theta - 1.0)) / 0.5)
    deep = 1.0 * jnp.exp(-jnp.sum(jnp.square(theta + 1.2)) / 0.6)
    return 1.15 - shallow - deep + 0.05 * jnp.sum(jnp.square(theta))


TOY_START = (0.6, 0.3)
TOY_SETTINGS = {
    "gaussian": dict(strength=0.5, width=0.5),
    "inverse": dict(strength=0.02, power=2.0, epsilon=0.01),
    "deflation": dict(strength=1.0, power=2.0, alpha=1.0),
}


class ToySurface(nn.Module):
    """A model whose only parameter is the point theta; its output is sqrt(2 f(theta)) for every
    sample, so the squared error against 0 is f(theta)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        theta = self.param("theta", lambda key: jnp.asarray(TOY_START, jnp.float32))
        value = jnp.sqrt(2.0 * toy_surface(theta))
        return jnp.broadcast_to(value, (x.shape[0], 1))


def toy_study(iterations: int, steps: int, learning_rate: float) -> dict[str, Any]:
    zeros = np.zeros((4, 1), np.float32)
    dataset = data_lib.Dataset("toy", "regression", 1, *([zeros] * 6))
    model = models.from_flax(ToySurface(), "toy_surface")
    out: dict[str, Any] = {"start": list(TOY_START), "iterations": iterations, "steps": steps}
    every = max(1, steps // 100)
    for penalty, options in TOY_SETTINGS.items():
        config = config_lib.base_config("persistent", "mlp", "digits")
        config.update_from_flattened_dict(
            {"loss": "squared_error", "batch_size": 4, "steps": iterations * steps,
             "optimizer.name": "sgd", "optimizer.learning_rate": learning_rate,
             "rule.num_iterations": iterations, "rule.iteration_steps": steps,
             "rule.penalty": penalty, **{f"rule.{k}": v for k, v in options.items()}}
        )  # fmt: skip
        runs = driver.run(
            config, eval_at=range(0, iterations * steps + 1, every), dataset=dataset, model=model,
            observe=lambda s: {"theta": s.variables["params"]["theta"]},
        )  # fmt: skip
        theta = runs.curves["theta"][0]  # [evaluations, 2]
        ends = np.stack([theta[runs.steps.index((k + 1) * steps)] for k in range(iterations)])
        deep = [bool(np.linalg.norm(e + 1.2) < 0.5) for e in ends]
        out[penalty] = {
            "options": options,
            "paths": [
                theta[
                    [i for i, t in enumerate(runs.steps) if k * steps < t <= (k + 1) * steps]
                ].tolist()
                for k in range(iterations)
            ],
            "end_points": ends.tolist(),
            "end_values": [float(toy_surface(jnp.asarray(e))) for e in ends],
            "in_deep_basin": deep,
            "first_deep_iteration": deep.index(True) if any(deep) else None,
        }
    return out


def toy_table(result: dict[str, Any]) -> str:
    lines = [
        f"Start {tuple(result['start'])}; {result['iterations']} iterations of "
        f"{result['steps']} SGD steps; iteration 0 is plain gradient descent.",
        "",
        "| penalty | options | f at each end point | first iteration in the deep basin |",
        "|---|---|---|---|",
    ]
    for penalty in PENALTIES:
        r = result[penalty]
        values = ", ".join(f"{v:.3f}" for v in r["end_values"])
        first = "never" if r["first_deep_iteration"] is None else r["first_deep_iteration"]
        lines.append(f"| {penalty} | {r['options']} | {values} | {first} |")
    return "\n".join(lines)


def toy_plot(result: dict[str, Any], path) -> None:
    grid = np.linspace(-2.5, 2.5, 201)
    gx, gy = np.meshgrid(grid, grid)
    f = jax.vmap(jax.vmap(lambda a, b: toy_surface(jnp.stack([a, b]))))(gx, gy)
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.6))
    for ax, penalty in zip(axes, PENALTIES):
        ax.contourf(gx, gy, np.asarray(f), levels=30, cmap="viridis")
        for i, trajectory in enumerate(result[penalty]["paths"]):
            t = np.asarray(trajectory)
            ax.plot(t[:, 0], t[:, 1], "-", lw=1.8, label=f"iteration {i}")
            ax.plot(t[-1, 0], t[-1, 1], "o", color="white", ms=5)
        ax.plot(*result["start"], "*", color="red", ms=12)
        ax.set_title(penalty)
        ax.legend(fontsize=7)
    plotting.save(fig, path, 90)


# ----------------------------------------------------------------------- kink and cnn


def snapshots(runs: driver.Runs, group: int = 1) -> dict[str, np.ndarray]:
    """Per seed (or per group of ``group`` consecutive seeds, the restarts of one seed): the
    evaluation after step 0 with the lowest validation loss; its figures [seeds // group]."""
    val = runs.curves["val_loss"][:, 1:]  # [members, snapshots]
    val = val.reshape(val.shape[0] // group, -1)
    best = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=1)
    out = {}
    for key in FIGURES:
        if key in runs.curves:
            v = runs.curves[key][:, 1:].reshape(val.shape)
            out[key] = v[np.arange(v.shape[0]), best]
    return out


def compare_methods(methods: dict[str, Any], k: int, seeds: int, **options: Any) -> dict[str, Any]:
    """Each method on the reported seeds 0 .. seeds - 1: ``methods[name] = (config, kind,
    tuned point or None)``."""
    results = {}
    for name, (config, kind, point) in methods.items():
        if kind == "restarts":  # K fresh initialisations of T steps per seed
            keys = np.concatenate(
                [jax.random.split(jax.random.PRNGKey(s), k) for s in range(seeds)]
            )
            runs = driver.run(
                config, [point or {}], range(seeds * k), keys=keys, eval_at=(), **options
            )
            chosen = snapshots(runs, k)
        else:
            t = int(config.steps) // k
            at = range(t, k * t, t)
            runs = driver.run(config, [point or {}], range(seeds), eval_at=at, **options)
            # persistent reports its own choice (the end point with the lowest val loss)
            chosen = {key: runs.final(key)[0] for key in FIGURES if key in runs.curves}
            chosen = chosen if kind == "persistent" else snapshots(runs)
        results[name] = {key: np.asarray(v).tolist() for key, v in chosen.items()}
        results[name]["seconds"] = runs.compile_s + runs.run_s
    return results


def _config(setting: str, method: str, steps: int = 0, **variant: Any):
    """The config of ``method`` in ``setting`` (experiments/configs/persistent.py); ``steps``:
    T, the steps per iteration (0: the config's)."""
    items = {"setting": setting, "method": method, **variant, **({"steps": steps} if steps else {})}
    return persistent_configs.get_config(",".join(f"{k}={v}" for k, v in items.items()))


DISTANCE_GRIDS = {  # per penalty and distance: the grid tuned (9 or 6 points)
    ("gaussian", "parameter"): ["rule.strength=[0.1,1.0,10.0]", "rule.width=[0.1,0.3,1.0]"],
    # network outputs differ by about 0.1 between kink solutions: a width to match
    ("gaussian", "function"): ["rule.strength=[0.1,1.0,10.0]", "rule.width=[0.03,0.1,0.3]"],
}
DEFAULT_GRID = ["rule.strength=[0.01,0.1,1.0]", "rule.power=[1.0,2.0]"]  # inverse, deflation
BASELINE_GRID = ["optimizer.learning_rate=logspace(-3,-1,9)"]  # 9 points, as a gaussian's


def kink_study(
    inits: int,
    good_loss: float,
    steps: int = 0,
    penalties: tuple[str, ...] = PENALTIES,
    distances: tuple[str, ...] = ("parameter", "function"),
    **options: Any,
) -> dict[str, Any]:
    """``options`` go to every ``driver.run`` (``memory_budget_mb``: chunk the members)."""
    study_config = functools.partial(_config, steps=steps)
    persistent = study_config("kink", "persistent")
    k, steps = int(persistent.rule.num_iterations), int(persistent.rule.iteration_steps)
    tuning, methods = {}, {}
    for name, method, kind in (
        ("one long run", "plain", "plain"),
        ("restarts", "restart", "restarts"),
    ):
        config = study_config("kink", method)  # the baselines' learning rate, tuned alike
        tuning[name] = tune.tune(config, BASELINE_GRID, inits, **options).record()
        methods[name] = (config, kind, tuning[name]["chosen"])
    for distance in distances:  # per distance: the penalty, lambda and tau / p
        mine = {}
        for penalty in penalties:
            config = study_config("kink", "persistent", penalty=penalty)
            config.rule.distance = distance
            grid = DISTANCE_GRIDS.get((penalty, distance), DEFAULT_GRID)
            mine[penalty] = tune.tune(config, grid, inits, **options).record()
            tuning[f"{penalty}, {distance}"] = mine[penalty]
        penalty = min(mine, key=lambda p: min(mine[p]["scores"]))
        config = study_config("kink", "persistent", penalty=penalty)
        config.rule.distance = distance
        methods[f"persistent ({penalty}, {distance} distance)"] = (
            config,
            "persistent",
            mine[penalty]["chosen"],
        )
    results = compare_methods(methods, k, inits, **options)
    for r in results.values():
        r["fraction_below_good_loss"] = float(np.mean(np.asarray(r["train_loss"]) < good_loss))
    return {
        "iterations": k, "iteration_steps": steps, "inits": inits, "good_loss": good_loss,
        "tuning": tuning, "results": results,
        "chosen": {name: methods[name][2] for name in methods},
    }  # fmt: skip


# 6 points: the learning rate with the penalty's strength (tau at 0.3, chosen in 5 of 6 settings
# when the rate was not tuned), so that persistent's iterations train as fast as the baselines'
CNN_PERSISTENT_GRID = ["optimizer.learning_rate=[1e-3,3e-3,1e-2]", "rule.strength=[1.0,10.0]"]
CNN_BASELINE_GRID = ["optimizer.learning_rate=logspace(-3.5,-2,6)"]  # 6 points, 3e-4 .. 1e-2
CNN_METHODS = (  # name, config method, how compare_methods runs it, the grid tuned
    ("plain", "plain", "plain", CNN_BASELINE_GRID),
    ("restarts", "restart", "restarts", CNN_BASELINE_GRID),
    ("SGDR", "sgdr", "plain", CNN_BASELINE_GRID),
    ("persistent (full)", "persistent", "persistent", CNN_PERSISTENT_GRID),
    ("persistent (partial)", "partial", "persistent", CNN_PERSISTENT_GRID),
)


def cnn_study(
    datasets: list[str],
    seeds: int,
    iteration_steps: int = 0,
    scales: Sequence[float] = (1.0, 0.1, 10.0),
    tune_seeds: int = 0,
) -> dict[str, Any]:
    k = persistent_configs.ITERATIONS
    steps = {data: iteration_steps or persistent_configs.STEPS[data] for data in datasets}
    tune_seeds = tune_seeds or seeds
    out = {
        "iterations": k,
        "iteration_steps": steps,
        "seeds": seeds,
        "tune_seeds": tune_seeds,
        "results": {},
    }
    for data in datasets:
        for scale in scales:
            config = lambda m, d=data, s=scale: _config("cnn", m, steps[d], data=d, scale=s)
            # every method tuned on 6 points by validation loss on the tuning seeds (apart from
            # the reported ones, tune.TUNE_SEEDS_FROM on): the baselines' learning rate,
            # persistent's learning rate x lambda
            tuned = {
                name: (method, kind, tune.tune(config(method), grid, tune_seeds))
                for name, method, kind, grid in CNN_METHODS
            }
            methods = {
                name: (config(method), kind, t.chosen) for name, (method, kind, t) in tuned.items()
            }
            out["results"][f"{data}, init x{scale:g}"] = {
                "tuning": {name: t.record() for name, (*_, t) in tuned.items()},
                "methods": compare_methods(methods, k, seeds),
            }
    return out


def kink_table(result: dict[str, Any]) -> str:
    n, good = result["inits"], result["good_loss"]
    lines = [
        f"{result['iterations']} x {result['iteration_steps']} full-batch Adam steps per method; "
        f"{n} initialisations, every method's settings chosen by validation loss on {n} others "
        "(the chosen values: `chosen` in the JSON); mean ± sample std [95% t interval]; the "
        f"fraction below {good:g} with its 95% Clopper-Pearson interval; p: Fisher's exact test "
        f"of that fraction against the first persistent row (not corrected: "
        f"{len(result['results']) - 1} tests).",
        "",
        f"| method | train loss | median | fraction below {good:g} | p | test loss |",
        "|---|---|---|---|---|---|",
    ]
    results = result["results"]
    first = next(name for name in results if name.startswith("persistent"))
    below = {name: int(np.sum(np.asarray(r["train_loss"]) < good)) for name, r in results.items()}
    from scipy import stats as scipy_stats  # on first use (half a second to import)

    for name, r in results.items():
        ci = scipy_stats.binomtest(below[name], n).proportion_ci()
        p = ""
        if name != first:
            table = [[below[first], n - below[first]], [below[name], n - below[name]]]
            p = f"{scipy_stats.fisher_exact(table).pvalue:.2g}"
        lines.append(
            f"| {name} | {report.cell(report.stats(r['train_loss']), digits=4)} | "
            f"{np.median(r['train_loss']):.1e} | {below[name]}/{n} = {below[name] / n:.2f} "
            f"[{ci.low:.2f}, {ci.high:.2f}] | {p} | "
            f"{report.cell(report.stats(r['test_loss']), digits=4)} |"
        )
    return "\n".join(lines)


def kink_plot(result: dict[str, Any], path) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    data = [np.log10(np.maximum(r["train_loss"], 1e-8)) for r in result["results"].values()]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(np.arange(1, len(data) + 1), list(result["results"]))
    for i, d in enumerate(data):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(d))
        ax.plot(np.full(len(d), i + 1) + jitter, d, ".", alpha=0.4)
    ax.axhline(np.log10(result["good_loss"]), color="grey", ls="--", lw=1)
    ax.set_ylabel("log10 final training loss")
    ax.set_title(f"kink: {result['inits']} initialisations")
    plotting.save(fig, path, 90)


def cnn_table(result: dict[str, Any]) -> str:
    blocks = []
    for setting, r in result["results"].items():
        chosen = "; ".join(f"{name}: {t['chosen']}" for name, t in r["tuning"].items())
        plain = r["methods"]["plain"]["test_accuracy"]
        restarts = r["methods"]["restarts"]["test_accuracy"]
        minus = lambda acc, ref, same: (
            "" if same else report.cell(report.paired(acc, ref), sign=True)
        )
        rows = [
            f"| {name} | {report.cell(report.stats(m['test_accuracy']))} | "
            + minus(m["test_accuracy"], plain, name == "plain")
            + " | "
            + minus(m["test_accuracy"], restarts, name in ("plain", "restarts"))
            + f" | {report.cell(report.stats(m['test_loss']), digits=4)} | "
            + f"{report.cell(report.stats(m['val_loss']), digits=4)} |"
            for name, m in r["methods"].items()
        ]
        blocks.append(
            f"**{setting}** (chosen by validation loss on the tuning seeds: {chosen}; mean ± "
            "sample std "
            "[95% t interval]; paired differences over the same seeds)\n\n"
            "| method | test accuracy | minus plain | minus restarts | test loss | val loss |"
            "\n|---|---|---|---|---|---|\n" + "\n".join(rows)
        )
    return "\n\n".join(blocks) + "\n"


def cnn_plot(result: dict[str, Any], path) -> None:
    settings = list(result["results"])
    methods = list(next(iter(result["results"].values()))["methods"])
    fig, ax = pyplot().subplots(figsize=(max(8, 1.6 * len(settings)), 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        accuracy = [result["results"][s]["methods"][method]["test_accuracy"] for s in settings]
        stds = [np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accuracy]
        x = np.arange(len(settings)) + j * width
        ax.bar(x, [np.mean(a) for a in accuracy], width, yerr=stds, label=method)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings, fontsize=8)
    ax.set_ylabel("test accuracy (bars: sample std)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    plotting.save(fig, path, 90)


STUDIES = {
    "toy": (lambda: toy_study(_ITERATIONS.value, _STEPS.value, 0.05), toy_table, toy_plot),
    "kink": (
        lambda: kink_study(
            _INITS.value,
            _GOOD_LOSS.value,
            _T.value,
            tuple(_PENALTIES.value),
            tuple(_DISTANCES.value),
            memory_budget_mb=_MEMORY.value,
        ),
        kink_table,
        kink_plot,
    ),
    "cnn": (
        lambda: cnn_study(
            list(_DATA.value),
            _SEEDS.value,
            _T.value,
            [float(x) for x in _SCALES.value],
            _TUNE_SEEDS.value,
        ),
        cnn_table,
        cnn_plot,
    ),
}


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    run, table, plot = STUDIES[_STUDY.value]
    try:
        report.prepare_workdir(_WORKDIR.value)
        if _REPLOT.value:  # tables and plot again from NAME.json, nothing trained
            result = report.read(f"{_WORKDIR.value}/{_NAME.value}.json")
            provenance = result.pop("provenance")  # the run that trained it
        else:
            for data in _DATA.value if _STUDY.value == "cnn" else ():  # checked before training
                _config("cnn", "plain", data=data)
            try:
                bad = [x for x in _SCALES.value if not float(x) > 0]
            except ValueError:
                bad = _SCALES.value
            if bad:
                raise ValueError(f"--init_scales takes positive numbers; got {bad}")
            result = run()
    except (ValueError, data_lib.MissingDataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    text = table(result)
    report.write(_WORKDIR.value, _NAME.value, result, text, provenance, lambda p: plot(result, p))
    print(text)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _STUDY = flags.DEFINE_enum("study", "kink", list(STUDIES), "Which study.")
    _ITERATIONS = flags.DEFINE_integer("iterations", 4, "toy: persistent iterations K.")
    _STEPS = flags.DEFINE_integer("steps", 300, "toy: steps per iteration T.")
    _T = flags.DEFINE_integer(
        "iteration_steps", 0, "kink, cnn: steps per iteration T (0: the config's)."
    )
    _INITS = flags.DEFINE_integer("inits", 64, "kink: initialisations (and as many tuning seeds).")
    _SEEDS = flags.DEFINE_integer("seeds", 5, "cnn: reported seeds.")
    _TUNE_SEEDS = flags.DEFINE_integer(
        "tune_seeds", 0, "cnn: tuning seeds (0: as many as --seeds)."
    )
    _PENALTIES = flags.DEFINE_multi_enum(
        "penalties", list(PENALTIES), PENALTIES, "kink: the penalties tuned (and chosen among)."
    )
    _DISTANCES = flags.DEFINE_multi_enum(
        "distances",
        ["parameter", "function"],
        ["parameter", "function"],
        "kink: the distances, each with its own tuned penalty (a persistent row each).",
    )
    _MEMORY = flags.DEFINE_float(
        "memory_budget_mb", 0.0, "kink: run the members in chunks that fit this (0: all at once)."
    )
    _GOOD_LOSS = flags.DEFINE_float("good_loss", 0.01, "kink: the training loss called good.")
    _DATA = flags.DEFINE_list("data", ["digits", "mnist1d"], "cnn: datasets.")
    _SCALES = flags.DEFINE_list(
        "init_scales", ["1", "0.1", "10"], "cnn: initialisation scales (x He-normal)."
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/persistent", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "persistent", "Output file name (NAME.json, .md, .png).")
    _REPLOT = flags.DEFINE_bool("replot", False, "Only redraw NAME.md and NAME.png from NAME.json.")
    app.run(main)
