r"""Paper 002's claim, tested: closed-form alternating solves vs SGD and Adam (issue 6).

For each dataset, the same network (in-width-out ReLU), initialisation (seed s gives every method
the same weights) and square loss for every method:

* closed_form: ``--alternations`` alternations per seed, each timed on its own (one jitted step,
  blocked), so the wall-time axis is the rule's real cumulative time, compile excluded.
* gd / adam_full (full batch) and sgd / adam (minibatch 64): ``--steps`` steps, or as many as
  one run makes in closed_form's wall time where that is more (``--max_steps`` caps it), at
  every learning rate of the grid (``--sgd_lrs``, ``--adam_lrs``) for every seed, as ONE
  vmapped program per method; the learning rate with the lowest final training loss (mean over
  seeds) is kept. Their wall-time axis is step x the steady-state time per step of one
  unbatched run at that rate.

Writes ``--out``.json (curves, grids, timings), .md (tables) and .png (training loss against
wall time per dataset, mean over seeds).

    python -m experiments.closed_form_compare --out=docs/results/closed_form
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from altlearn import data as data_lib
from altlearn.train import Experiment, configure_jax
from experiments.configs.closed_form import get_config

BASELINES = ("gd", "adam_full", "sgd", "adam")
DATASETS = ("diabetes", "breast_cancer", "wine", "digits", "mnist1d")


def _config(method: str, data: str, width: int, lr: float = 1e-2, steps: int | None = None):
    config = get_config(f"method={method},data={data},width={width},lr={lr}")
    if steps is not None:
        config.steps = steps
    return config


def run_closed_form(dataset, width: int, seeds: int, alternations: int) -> dict:
    """Per seed: training loss after each alternation and the cumulative wall time."""
    config = _config("closed_form", dataset.name, width, steps=alternations)
    experiment = Experiment(config, dataset)
    t = time.perf_counter()
    step = (
        jax.jit(lambda s: experiment.train_steps(s, 1))
        .lower(experiment.init(jax.random.PRNGKey(0)))
        .compile()
    )
    compile_time = time.perf_counter() - t
    evaluate = jax.jit(experiment.evaluate)
    runs = []
    for seed in range(seeds):
        state = jax.jit(experiment.init)(jax.random.PRNGKey(seed))
        first = float(evaluate(state)["train_loss"])
        times, losses, accepted, lengths = [0.0], [first], [], []
        for _ in range(alternations):
            t = time.perf_counter()
            state, metrics = step(state)
            jax.block_until_ready(state)
            times.append(times[-1] + time.perf_counter() - t)
            losses.append(float(metrics["loss_after"][0]))
            accepted.append(float(metrics["accepted"][0]))
            lengths.append(float(metrics["step_length"][0]))
        final = {k: float(v) for k, v in evaluate(state).items()}
        runs.append(
            {
                "time_s": times,
                "train_loss": losses,
                "accepted": accepted,
                "step_length": lengths,
                "final": final,
            }
        )
        logging.info(
            "%s closed_form seed %d: train loss %.4g after %.2f s",
            dataset.name,
            seed,
            losses[-1],
            times[-1],
        )
    return {
        "runs": runs,
        "compile_time_s": compile_time,
        "dtype": _solve_dtype(),
    }


def _solve_dtype() -> str:
    from altlearn.rules.closed_form import solve_dtype

    return jnp.dtype(solve_dtype("auto")).name


def _time_per_step(experiment, lr: float, steps: int) -> tuple[float, float]:
    """(steady-state seconds per step of ONE run at ``lr``, compile seconds)."""
    single = experiment.init(jax.random.PRNGKey(0), {"optimizer.learning_rate": lr})
    t = time.perf_counter()
    timed = jax.jit(lambda s: experiment.train_steps(s, steps)[0]).lower(single).compile()
    compile_time = time.perf_counter() - t
    single = jax.block_until_ready(timed(single))
    repeats = 3
    t = time.perf_counter()
    for _ in range(repeats):
        single = timed(single)
    jax.block_until_ready(single)
    return (time.perf_counter() - t) / (repeats * steps), compile_time


def run_baseline(
    method, dataset, width, seeds, steps, lrs, records, min_seconds=0.0, max_steps=400_000
) -> dict:
    """The lr grid x seeds in one vmapped program; curves of the best lr; its unbatched timing.

    A baseline runs ``steps`` steps, or more where that takes less than ``min_seconds`` of one
    run's time (so it gets at least closed_form's wall time), up to ``max_steps``.
    """
    config = _config(method, dataset.name, width, steps=steps)
    experiment = Experiment(config, dataset)
    if min_seconds > 0:
        probe, _ = _time_per_step(experiment, lrs[0], 200)
        steps = min(max(steps, int(np.ceil(min_seconds / probe))), max_steps)
        steps = -(-steps // records) * records
        config = _config(method, dataset.name, width, steps=steps)
        experiment = Experiment(config, dataset)
    every = max(1, steps // records)
    grid_lrs = jnp.repeat(jnp.asarray(lrs, jnp.float32), seeds)
    keys = jnp.tile(jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds)), (len(lrs), 1))
    init = jax.jit(jax.vmap(lambda k, lr: experiment.init(k, {"optimizer.learning_rate": lr})))
    state = init(keys, grid_lrs)
    chunk = jax.jit(jax.vmap(lambda s: experiment.train_steps(s, every)[0]), donate_argnums=0)
    train_loss = jax.jit(jax.vmap(lambda s: experiment.evaluate_split(s.variables, "train")))
    curves = [np.asarray(train_loss(state)["loss"])]
    for _ in range(steps // every):
        state = chunk(state)
        curves.append(np.asarray(train_loss(state)["loss"]))
    curves = np.stack(curves, axis=1).reshape(len(lrs), seeds, -1)  # [lr, seed, record]
    final = np.where(np.isfinite(curves[:, :, -1]), curves[:, :, -1], np.inf).mean(axis=1)
    best = int(np.argmin(final))
    evaluation = jax.jit(jax.vmap(experiment.evaluate))(state)
    best_eval = {
        k: np.asarray(v).reshape(len(lrs), seeds)[best].tolist() for k, v in evaluation.items()
    }
    # Steady-state time per step of ONE run at the chosen rate (compile reported apart).
    per_step, compile_time = _time_per_step(experiment, lrs[best], min(every, 2000))
    steps_axis = np.arange(curves.shape[-1]) * every
    logging.info(
        "%s %s: lr %g, final train loss %.4g", dataset.name, method, lrs[best], final[best]
    )
    return {
        "lrs": list(lrs),
        "final_train_loss_by_lr": final.tolist(),
        "best_lr": lrs[best],
        "steps": steps_axis.tolist(),
        "time_s": (steps_axis * per_step).tolist(),
        "train_loss": curves[best].tolist(),  # [seed, record]
        "final": best_eval,
        "time_per_step_s": per_step,
        "compile_time_s": compile_time,
    }


def _reach_time(times, losses, target) -> float | None:
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return float(np.asarray(times)[hit[0]]) if len(hit) else None


def summarise(results: dict) -> str:
    lines = []
    for data, r in results.items():
        cf = r["closed_form"]
        classification = "test_accuracy" in cf["runs"][0]["final"]
        metric = "test_accuracy" if classification else "test_loss"
        lines += [
            f"### {data}",
            "",
            f"| method | lr (grid best) | final train loss (mean ± std) | {metric} | "
            "steps | time / step | total time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        losses = np.array([run["train_loss"][-1] for run in cf["runs"]])
        tests = np.array([run["final"][metric] for run in cf["runs"]])
        total = np.mean([run["time_s"][-1] for run in cf["runs"]])
        steps = len(cf["runs"][0]["train_loss"]) - 1
        lines.append(
            f"| closed_form ({cf['dtype']}) | - | {losses.mean():.4g} ± {losses.std():.2g} | "
            f"{tests.mean():.3f} ± {tests.std():.3f} | {steps} | {total / steps * 1e3:.1f} ms | "
            f"{total:.2f} |"
        )
        for method in BASELINES:
            b = r[method]
            loss = np.array(b["train_loss"])[:, -1]
            test = np.array(b["final"][metric])
            lines.append(
                f"| {method} | {b['best_lr']:g} | {loss.mean():.4g} ± {loss.std():.2g} | "
                f"{test.mean():.3f} ± {test.std():.3f} | {b['steps'][-1]} | "
                f"{b['time_per_step_s'] * 1e3:.3f} ms | "
                f"{b['time_s'][-1]:.2f} |"
            )
        lines.append("")
        lines.append(reach_sentence(data, r))
        lines.append("")
        grid = "; ".join(
            f"{m}: "
            + ", ".join(
                f"{lr:g} -> {loss:.3g}"
                for lr, loss in zip(r[m]["lrs"], r[m]["final_train_loss_by_lr"], strict=True)
            )
            for m in BASELINES
        )
        lines += [
            f"Learning-rate grids (lr -> final train loss, mean of seeds; inf: diverged): {grid}.",
            "",
        ]
    return "\n".join(lines)


def reach_analysis(r: dict) -> dict:
    """Per seed: Adam's best training loss (either batch mode), when closed_form reaches it,
    and when Adam reached it."""
    cf = r["closed_form"]
    out = []
    for seed, run in enumerate(cf["runs"]):
        best_method, target = None, np.inf
        for method in ("adam_full", "adam"):
            loss = np.array(r[method]["train_loss"][seed])
            finite = loss[np.isfinite(loss)]
            if finite.size and finite.min() < target:
                best_method, target = method, float(finite.min())
        adam = r[best_method]
        out.append(
            {
                "adam_method": best_method,
                "adam_best_loss": target,
                "adam_time_s": _reach_time(adam["time_s"], adam["train_loss"][seed], target),
                "closed_form_time_s": _reach_time(run["time_s"], run["train_loss"], target),
                "closed_form_final_loss": run["train_loss"][-1],
            }
        )
    return {"per_seed": out}


def reach_sentence(data: str, r: dict) -> str:
    per_seed = r["reach"]["per_seed"]
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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (data, r) in zip(axes[0], results.items()):
        cf = r["closed_form"]["runs"]
        times = np.mean([run["time_s"] for run in cf], axis=0)
        ax.plot(
            times[1:],
            np.mean([run["train_loss"] for run in cf], axis=0)[1:],
            "o-",
            ms=3,
            label="closed_form",
            color="black",
        )
        for method in BASELINES:
            b = r[method]
            t, loss = np.array(b["time_s"]), np.nanmean(np.array(b["train_loss"]), axis=0)
            ax.plot(t[1:], loss[1:], label=f"{method} (lr {b['best_lr']:g})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(data)
        ax.legend(fontsize=6)
        ax.set_xlabel("wall time (s, compile excluded)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (mean of 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    configure_jax(_config("closed_form", "diabetes", _WIDTH.value))
    results = {}
    for data in _DATA.value:
        dataset = data_lib.load_dataset(data, seed=0, validation_fraction=0.1)
        r = {"closed_form": run_closed_form(dataset, _WIDTH.value, _SEEDS.value, _ALTS.value)}
        for method in BASELINES:
            lrs = [
                float(x)
                for x in (_SGD_LRS.value if "sgd" in method or method == "gd" else _ADAM_LRS.value)
            ]
            cf_seconds = max(run["time_s"][-1] for run in r["closed_form"]["runs"])
            r[method] = run_baseline(
                method,
                dataset,
                _WIDTH.value,
                _SEEDS.value,
                _STEPS.value,
                lrs,
                _RECORDS.value,
                min_seconds=cf_seconds,
                max_steps=_MAX_STEPS.value,
            )
        r["reach"] = reach_analysis(r)
        results[data] = r
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = summarise(results)
    out.with_suffix(".md").write_text(text + "\n")
    plot(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    _DATA = flags.DEFINE_list("data", list(DATASETS), "Datasets.")
    _SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds (every method gets the same inits).")
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
    _OUT = flags.DEFINE_string("out", "runs/closed_form", "Output path prefix (.json .md .png).")
    app.run(main)
