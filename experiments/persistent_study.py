"""Persistent neurons (paper 001) against plain training, restarts and SGDR at equal steps.

    python -m experiments.persistent_study --study=toy --out=docs/results/persistent_toy
    python -m experiments.persistent_study --study=kink --out=docs/results/persistent_kink
    python -m experiments.persistent_study --study=cnn --data=digits,mnist1d \\
        --out=docs/results/persistent_cnn

Every study writes ``OUT.json`` (every number), ``OUT.md`` (the tables) and ``OUT.png``.

toy: a 2-D loss surface with a shallow basin near the start and a deeper one farther away;
    plain gradient descent from the start ends in the shallow one. Persistent iterations from
    the same start, for each penalty; the trajectories drawn on the contour plot; the first
    iteration that reaches the deep basin. (The surface is the model: a flax module whose one
    parameter is the 2-D point and whose output's squared error is the surface.)
kink: ``data=kink`` (a narrow tent on [-1, 1]), MLP 1-8-8-1 ReLU, full batch, Adam: persistent
    (K iterations of T steps) against one long run of K T steps and K restarts of T steps from
    fresh initialisations (the restart with the lowest validation loss reported), over
    ``--inits`` initialisations vmapped; the distribution of the final training loss and the
    fraction below ``--good_loss``.
cnn: a LeNet-style CNN (5-wide convolutions of 6 and 16 channels, dense 120-84) on digits and
    mnist1d, He initialisation times 1, 0.1 and 10; persistent full and partial (the dense
    layers) against plain, restarts and SGDR (``cosine_restarts`` with K cycles), K x T steps
    each; each method's iterate is chosen among its K snapshots by validation loss (persistent:
    the end point the rule reports; restarts: one per restart; plain and SGDR: every T steps)
    and reported on test, over ``--seeds`` seeds.

Fair choices: for kink and cnn, persistent's lambda and tau (and, for kink, the penalty) are
chosen by validation loss on TUNING initialisations or seeds (the first ones), in one vmapped
sweep, and every method is then reported on FRESH ones it was not chosen on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from altlearn import losses, models, rules
from altlearn.train import Experiment
from experiments.configs import persistent as persistent_configs

PENALTIES = ("gaussian", "inverse", "deflation")
STUDY_FLAGS = {
    "toy": ("iterations", "steps"),
    "kink": ("inits", "good_loss"),
    "cnn": ("seeds", "data"),
}

# ----------------------------------------------------------------------------------- toy


def toy_surface(theta: jax.Array) -> jax.Array:
    """f(theta) > 0: a shallow basin near (1, 1) (minimum f = 0.70) close to the start, a deep
    one near (-1.2, -1.2) (f = 0.29), in a gentle bowl."""
    shallow = 0.55 * jnp.exp(-jnp.sum(jnp.square(theta - 1.0)) / 0.5)
    deep = 1.0 * jnp.exp(-jnp.sum(jnp.square(theta + 1.2)) / 0.6)
    return 1.15 - shallow - deep + 0.05 * jnp.sum(jnp.square(theta))


TOY_START = (0.6, 0.3)


class ToySurface(nn.Module):
    """A model whose only parameter is the point theta; its output is sqrt(2 f(theta)) for every
    sample, so the squared error against 0 is f(theta)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        theta = self.param("theta", lambda key: jnp.asarray(TOY_START, jnp.float32))
        value = jnp.sqrt(2.0 * toy_surface(theta))
        return jnp.broadcast_to(value, (x.shape[0], 1))


def toy_study(iterations: int, steps: int, learning_rate: float) -> dict[str, Any]:
    model = models.from_flax(ToySurface(), "toy_surface")
    task = losses.make_task("regression", "squared_error")
    x, y = jnp.zeros((4, 1)), jnp.zeros((4, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    data = {"train": (x, y), "val": (x, y)}
    out: dict[str, Any] = {"start": list(TOY_START), "iterations": iterations, "steps": steps}
    settings = {
        "gaussian": dict(strength=0.5, width=0.5),
        "inverse": dict(strength=0.02, power=2.0, epsilon=0.01),
        "deflation": dict(strength=1.0, power=2.0, alpha=1.0),
    }
    for penalty, options in settings.items():
        rule = rules.make_rule(
            "persistent",
            model,
            task,
            optax.sgd(learning_rate),
            data,
            num_iterations=iterations,
            iteration_steps=steps,
            penalty=penalty,
            **options,
        )

        @jax.jit
        def run(variables, rule=rule):
            def body(carry, t):
                v, s = carry
                v, s, m = rule.step(jax.random.PRNGKey(0), v, s, (x, y))
                return (v, s), (v["params"]["theta"], m["loss"])

            state = rule.init(jax.random.PRNGKey(1), variables)
            _, (path, loss) = jax.lax.scan(body, (variables, state), jnp.arange(iterations * steps))
            return path, loss

        path, _ = run(variables)
        path = np.asarray(path).reshape(iterations, steps, 2)
        ends = path[:, -1]
        values = [float(toy_surface(jnp.asarray(e))) for e in ends]
        deep = [bool(np.linalg.norm(e + 1.2) < 0.5) for e in ends]
        out[penalty] = {
            "options": options,
            "paths": path[:, :: max(1, steps // 100)].tolist(),
            "end_points": ends.tolist(),
            "end_values": values,
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
        first = r["first_deep_iteration"]
        lines.append(
            f"| {penalty} | {r['options']} | {values} | {'never' if first is None else first} |"
        )
    return "\n".join(lines)


def toy_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(-2.5, 2.5, 201)
    gx, gy = np.meshgrid(grid, grid)
    f = jax.vmap(jax.vmap(lambda a, b: toy_surface(jnp.stack([a, b]))))(gx, gy)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, penalty in zip(axes, PENALTIES):
        ax.contourf(gx, gy, np.asarray(f), levels=30, cmap="viridis")
        for i, trajectory in enumerate(result[penalty]["paths"]):
            t = np.asarray(trajectory)
            ax.plot(t[:, 0], t[:, 1], "-", lw=1.8, label=f"iteration {i}")
            ax.plot(t[-1, 0], t[-1, 1], "o", color="white", ms=5)
        ax.plot(*result["start"], "*", color="red", ms=12)
        ax.set_title(penalty)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------- kink and cnn


def _vmapped_run(config, keys: jax.Array, hparams: dict | None, snapshots: int):
    """Trains ``keys`` (x hparams) as one vmapped program in ``snapshots`` chunks; returns the
    evaluation after each chunk, stacked [snapshots, members] per metric."""
    experiment = Experiment(config)
    steps = int(config.steps)
    chunk_steps = steps // snapshots
    init = jax.jit(jax.vmap(experiment.init))
    state = init(keys, hparams) if hparams is not None else init(keys)
    chunk = jax.jit(jax.vmap(lambda s: experiment.train_steps(s, chunk_steps)[0]))
    evaluate = jax.jit(jax.vmap(experiment.evaluate))
    out = []
    for _ in range(snapshots):
        state = chunk(state)
        out.append({k: np.asarray(v) for k, v in evaluate(state).items()})
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


def _choose(records: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
    """Per member (or per group of ``group`` consecutive members, the restarts of one seed): the
    snapshot with the lowest validation loss; its figures [members // group]."""
    val = records["val_loss"]  # [snapshots, members]
    snaps, members = val.shape
    val = (
        val.reshape(snaps, members // group, group).transpose(1, 0, 2).reshape(members // group, -1)
    )
    best = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=1)
    out = {}
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy"):
        if key in records:
            v = records[key].reshape(snaps, members // group, group).transpose(1, 0, 2)
            v = v.reshape(members // group, -1)
            out[key] = v[np.arange(v.shape[0]), best]
    return out


def _keys(first: int, count: int) -> jax.Array:
    return jax.vmap(jax.random.PRNGKey)(jnp.arange(first, first + count))


def compare_methods(
    base, methods: dict[str, Any], tuned: dict[str, Any], k: int, inits: int, first: int
):
    """Each method on ``inits`` fresh initialisations (seeds first .. first + inits - 1)."""
    results = {}
    for name, (config, kind) in methods.items():
        t = time.perf_counter()
        if kind == "restarts":  # K fresh initialisations of T steps per seed
            keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s), k))(
                jnp.arange(first, first + inits)
            ).reshape(inits * k, -1)
            records = _vmapped_run(config, keys, None, 1)
            chosen = _choose(records, k)
        else:
            hp = None
            if kind == "persistent":
                hp = {h: jnp.full((inits,), v) for h, v in tuned.items()}
            records = _vmapped_run(config, _keys(first, inits), hp, k)
            # persistent reports its own choice (the end point with the lowest val loss)
            chosen = {key: v[-1] for key, v in records.items()} if kind == "persistent" else None
            chosen = chosen or _choose(records, 1)
        results[name] = {
            key: np.asarray(v).tolist()
            for key, v in chosen.items()
            if key in ("train_loss", "val_loss", "test_loss", "test_accuracy")
        }
        results[name]["seconds"] = time.perf_counter() - t
        logging.info("%s: %s", name, {k_: np.round(np.mean(v), 4) for k_, v in chosen.items()})
    return results


def tune_persistent(config, grid: dict[str, list[float]], k: int, inits: int) -> dict[str, Any]:
    """lambda x tau by validation loss on the tuning initialisations 0 .. inits - 1, one vmapped
    program; returns the chosen point and every point's mean validation loss."""
    names = list(grid)
    mesh = np.array(np.meshgrid(*[grid[n] for n in names], indexing="ij")).reshape(len(names), -1)
    points = mesh.shape[1]
    keys = jnp.tile(_keys(0, inits), (points, 1))
    hp = {
        f"rule.{n}": jnp.repeat(jnp.asarray(mesh[i], jnp.float32), inits)
        for i, n in enumerate(names)
    }
    records = _vmapped_run(config, keys, hp, k)
    val = records["val_loss"][-1].reshape(points, inits)
    score = np.mean(np.where(np.isfinite(val), val, 1e9), axis=1)
    best = int(np.argmin(score))
    return {
        "grid": {n: mesh[i].tolist() for i, n in enumerate(names)},
        "mean_val_loss": score.tolist(),
        "chosen": {f"rule.{n}": float(mesh[i, best]) for i, n in enumerate(names)},
    }


def study_config(setting: str, method: str, **variant: str):
    """The config of ``method`` in ``setting`` (experiments/configs/persistent.py)."""
    items = {"setting": setting, "method": method, **variant}
    return persistent_configs.get_config(",".join(f"{k}={v}" for k, v in items.items()))


def kink_study(inits: int, good_loss: float) -> dict[str, Any]:
    persistent = study_config("kink", "persistent")
    k, steps = int(persistent.rule.num_iterations), int(persistent.rule.iteration_steps)
    methods = {
        "one long run": (study_config("kink", "plain"), "plain"),
        "restarts": (study_config("kink", "restart"), "restarts"),
    }
    tuning = {}
    for penalty in PENALTIES:  # the penalty, lambda and tau, on the tuning initialisations
        config = persistent.copy_and_resolve_references()
        config.rule.penalty = penalty
        grid = {"strength": [0.1, 1.0, 10.0], "width": [0.1, 0.3, 1.0]}
        if penalty != "gaussian":
            grid = {"strength": [0.01, 0.1, 1.0], "power": [1.0, 2.0]}
        tuning[penalty] = tune_persistent(config, grid, k, inits)
    penalty = min(tuning, key=lambda p: min(tuning[p]["mean_val_loss"]))
    config = persistent.copy_and_resolve_references()
    config.rule.penalty = penalty
    chosen = tuning[penalty]["chosen"]
    methods = {**methods, f"persistent ({penalty})": (config, "persistent")}
    results = compare_methods(persistent, methods, chosen, k, inits, first=inits)
    for r in results.values():
        r["fraction_below_good_loss"] = float(np.mean(np.asarray(r["train_loss"]) < good_loss))
    return {
        "iterations": k,
        "iteration_steps": steps,
        "inits": inits,
        "good_loss": good_loss,
        "tuning": tuning,
        "chosen_penalty": penalty,
        "chosen": chosen,
        "results": results,
    }


def cnn_study(datasets: list[str], seeds: int) -> dict[str, Any]:
    k = persistent_configs.ITERATIONS
    steps = {data: persistent_configs.STEPS[data] for data in datasets}
    out = {"iterations": k, "iteration_steps": steps, "seeds": seeds, "results": {}}
    for data in datasets:
        for scale in (1.0, 0.1, 10.0):
            configs = {
                method: study_config("cnn", method, data=data, scale=scale)
                for method in persistent_configs.METHODS
            }
            persistent, partial = configs["persistent"], configs["partial"]
            methods = {
                "plain": (configs["plain"], "plain"),
                "restarts": (configs["restart"], "restarts"),
                "SGDR": (configs["sgdr"], "plain"),
            }
            grid = {"strength": [0.1, 1.0, 10.0], "width": [0.03, 0.3]}
            tuned_full = tune_persistent(persistent, grid, k, seeds)
            tuned_partial = tune_persistent(partial, grid, k, seeds)
            results = compare_methods(
                persistent,
                {**methods, "persistent (full)": (persistent, "persistent")},
                tuned_full["chosen"],
                k,
                seeds,
                first=seeds,
            )
            results.update(
                compare_methods(
                    partial,
                    {"persistent (partial)": (partial, "persistent")},
                    tuned_partial["chosen"],
                    k,
                    seeds,
                    first=seeds,
                )
            )
            out["results"][f"{data}, init x{scale:g}"] = {
                "tuning": {"full": tuned_full, "partial": tuned_partial},
                "methods": results,
            }
    return out


def _mean_std(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.4f} ± {v.std():.4f}"


def kink_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['iterations']} x {result['iteration_steps']} full-batch Adam steps per method; "
        f"{result['inits']} fresh initialisations (tuning on {result['inits']} others: penalty "
        f"{result['chosen_penalty']}, {result['chosen']}).",
        "",
        f"| method | train loss (mean ± std) | median | fraction below {result['good_loss']:g} "
        "| test loss (mean) |",
        "|---|---|---|---|---|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {_mean_std(r['train_loss'])} | {np.median(r['train_loss']):.4f} | "
            f"{r['fraction_below_good_loss']:.2f} | {np.mean(r['test_loss']):.4f} |"
        )
    return "\n".join(lines)


def kink_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [np.log10(np.maximum(r["train_loss"], 1e-8)) for r in result["results"].values()]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(np.arange(1, len(data) + 1), list(result["results"]))
    for i, d in enumerate(data):
        ax.plot(
            np.full(len(d), i + 1) + np.random.default_rng(i).uniform(-0.15, 0.15, len(d)),
            d,
            ".",
            alpha=0.4,
        )
    ax.axhline(np.log10(result["good_loss"]), color="grey", ls="--", lw=1)
    ax.set_ylabel("log10 final training loss")
    ax.set_title(f"kink: {result['inits']} initialisations")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cnn_table(result: dict[str, Any]) -> str:
    lines = []
    for setting, r in result["results"].items():
        chosen_full = r["tuning"]["full"]["chosen"]
        chosen_partial = r["tuning"]["partial"]["chosen"]
        lines += [
            f"**{setting}** (persistent full: {chosen_full}; partial: {chosen_partial})",
            "",
            "| method | test accuracy (mean ± std) | test loss | val loss |",
            "|---|---|---|---|",
        ]
        for name, m in r["methods"].items():
            lines.append(
                f"| {name} | {_mean_std(m['test_accuracy'])} | {np.mean(m['test_loss']):.4f} | "
                f"{np.mean(m['val_loss']):.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def cnn_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["results"])
    methods = list(next(iter(result["results"].values()))["methods"])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(settings)), 4))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        means = [
            np.mean(result["results"][s]["methods"][method]["test_accuracy"]) for s in settings
        ]
        stds = [np.std(result["results"][s]["methods"][method]["test_accuracy"]) for s in settings]
        ax.bar(np.arange(len(settings)) + j * width, means, width, yerr=stds, label=method)
    ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2)
    ax.set_xticklabels(settings, fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = {"toy": (toy_table, toy_plot), "kink": (kink_table, kink_plot)}
    tables["cnn"] = (cnn_table, cnn_plot)
    if _REPLOT.value:  # tables and plot again from OUT.json, nothing trained
        result = json.loads(out.with_suffix(".json").read_text())
        table, plot = tables[_STUDY.value]
        out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{table(result)}\n")
        plot(result, out.with_suffix(".png"))
        return
    t = time.perf_counter()
    if _STUDY.value == "toy":
        result = toy_study(_ITERATIONS.value, _STEPS.value, 0.05)
        text, plot = toy_table(result), toy_plot
    elif _STUDY.value == "kink":
        result = kink_study(_INITS.value, _GOOD_LOSS.value)
        text, plot = kink_table(result), kink_plot
    else:
        result = cnn_study(list(_DATA.value), _SEEDS.value)
        text, plot = cnn_table(result), cnn_plot
    result["seconds"] = time.perf_counter() - t
    result["command"] = "python -m experiments.persistent_study " + " ".join(
        f"--{f}={','.join(map(str, v)) if isinstance(v := flags.FLAGS[f].value, list) else v}"
        for f in ("study", *STUDY_FLAGS[_STUDY.value], "out")
    )
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"`{result['command']}`\n\n{text}\n")
    plot(result, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _STUDY = flags.DEFINE_enum("study", "kink", ["toy", "kink", "cnn"], "Which study.")
    _ITERATIONS = flags.DEFINE_integer("iterations", 4, "toy: persistent iterations K.")
    _STEPS = flags.DEFINE_integer("steps", 300, "toy: steps per iteration T.")
    _INITS = flags.DEFINE_integer("inits", 64, "kink: initialisations (tuning, then fresh).")
    _SEEDS = flags.DEFINE_integer("seeds", 3, "cnn: seeds (tuning, then fresh).")
    _GOOD_LOSS = flags.DEFINE_float("good_loss", 0.01, "kink: the training loss called good.")
    _DATA = flags.DEFINE_list("data", ["digits", "mnist1d"], "cnn: datasets.")
    _OUT = flags.DEFINE_string("out", "runs/persistent", "Output prefix (.json, .md, .png).")
    _REPLOT = flags.DEFINE_bool("replot", False, "Only redraw OUT.md and OUT.png from OUT.json.")
    app.run(main)
