"""Compares methods over seeds: every (dataset, method) trains all its seeds as ONE vmapped
program for exactly the steps asked, evaluated about 20 times (``--eval_every`` to choose);
writes a JSON file, a markdown table and a plot.

    python -m experiments.compare --config=experiments/configs/np_family.py \\
        --methods=bp,dbp,np,anp,inp,dnp,danp,dinp,fg,wp --data=digits,mnist1d --seeds=3 \\
        --out=docs/results/np_family

``--config`` names a config file whose ``get_config`` takes ``method=M,data=D`` (plus
``--variant_extra`` appended, e.g. ``mode=jvp``). Seeds vary the initialisation, the batches and
the rule's noise; the data split is fixed by the config's ``seed``. Equal steps and batch for
every method of a dataset come from the config file, unless a budget flag gives every method the
same number of forward passes (``--budget_forward_passes``) or the same training time on this
machine (``--budget_seconds``) instead.

``--tune=KEY=SPEC`` (repeatable; SPEC as ``experiments.sweep``'s) tunes every method the same
way: each method's grid of the keys its config has (a learning rate for all, sigma for node
perturbation, ...) trains as one vmapped program on TUNING seeds (1000, 1001, ...); the point
with the lowest mean final validation loss is chosen, then trained on the reported seeds (0, 1,
...) at the method's steps or budget and reported on test. ``--tune_seeds=N``: N tuning seeds
per point (default: as many as ``--seeds``); ``--tune_by=val_accuracy`` chooses by the final
validation accuracy instead of the loss. Keys a rule does not read (a swarm's optimizer)
are not tuned for it:

    python -m experiments.compare --config=experiments/configs/np_family.py \
        --methods=bp,np,danp --data=digits --tune='optimizer.learning_rate=logspace(-4,-2,5)' \
        --tune='rule.sigma=[1e-3,1e-2,1e-1]' --out=runs/tuned
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from altlearn import config as config_lib
from altlearn import rules
from altlearn import sweep as sweep_lib
from altlearn.plotting import plot_comparison
from altlearn.train import Experiment, configure_jax, make_train


def load_get_config(path: str):
    return config_lib.load_config_module(path).get_config


def forward_passes(experiment: Experiment) -> float:
    """Forward-pass equivalents one step of the experiment's rule spends (its
    ``RuleSpec.cost``; a backward or jvp pass counts 2)."""
    config = experiment.config
    options = {k: v for k, v in config.rule.items() if k != "name"}
    return rules.step_cost(
        config.rule.name,
        experiment.model,
        options,
        experiment.batch_size,
        experiment.split_sizes,
    )


PROBE_SECONDS = 0.5


def budget_steps(config, seeds: int, forward_passes_budget: int, seconds_budget: float) -> int:
    """Steps that spend the given budget: forward passes (equal for every method), or wall
    seconds of this machine (measured on a short compiled probe of the real vmapped run)."""
    experiment = Experiment(config)
    if forward_passes_budget:
        return max(1, int(forward_passes_budget // forward_passes(experiment)))
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(seeds))
    state = jax.jit(jax.vmap(experiment.init))(keys)
    probe, per_step = 20, None
    # Lengthen the probe until it runs >= PROBE_SECONDS: a 20-step probe of a 0.1 ms step is
    # mostly call overhead and gave the fastest methods half their budget.
    for _ in range(3):
        chunk = jax.jit(jax.vmap(lambda s, n=probe: experiment.train_steps(s, n))).lower(state)
        chunk = chunk.compile()
        jax.block_until_ready(chunk(state))
        t = time.perf_counter()
        jax.block_until_ready(chunk(state))
        elapsed = time.perf_counter() - t
        per_step = elapsed / probe
        if elapsed >= PROBE_SECONDS:
            break
        probe = int(probe * min(PROBE_SECONDS / max(elapsed, 1e-6) * 1.2, 100))
    return max(1, int(seconds_budget / per_step))


EVALUATIONS = 20  # per run, when --eval_every is not given: enough points for a curve


def set_steps(
    config,
    seeds: int,
    steps: int | None = None,
    eval_every: int | None = None,
    budget_forward_passes: int = 0,
    budget_seconds: float = 0.0,
) -> None:
    """Sets how long ``config`` trains: exactly ``steps`` (default: the config's), or the steps
    a budget gives (``budget_steps``), evaluated every ``eval_every`` steps (default: about
    ``EVALUATIONS`` times per run; ``run_one`` makes the last interval shorter if need be)."""
    if budget_forward_passes or budget_seconds:
        steps = budget_steps(config, seeds, budget_forward_passes, budget_seconds)
    config.steps = int(steps or config.steps)
    config.eval_every = int(eval_every or -(-config.steps // EVALUATIONS))


def run_one(config, seeds: int) -> dict:
    """Trains ``seeds`` seeds of ``config`` in one vmapped program for exactly ``config.steps``
    steps, evaluating every ``config.eval_every`` steps and at the end (a last shorter chunk
    when ``eval_every`` does not divide ``steps``); returns curves and figures."""
    experiment = Experiment(config)
    keys = jax.vmap(jax.random.PRNGKey)(np.arange(seeds))
    state = jax.jit(jax.vmap(experiment.init))(keys)
    steps, every = int(config.steps), int(config.eval_every)
    lengths = [every] * (steps // every) + ([steps % every] if steps % every else [])
    evaluate = jax.jit(jax.vmap(experiment.evaluate))
    t = time.perf_counter()
    chunks = {
        n: jax.jit(jax.vmap(lambda s, n=n: experiment.train_steps(s, n)), donate_argnums=0)
        .lower(state)
        .compile()
        for n in sorted(set(lengths))
    }
    compile_time = time.perf_counter() - t
    curves = [{"step": 0, **{k: np.asarray(v).tolist() for k, v in evaluate(state).items()}}]
    train_time = 0.0
    for n in lengths:
        t = time.perf_counter()
        state, metrics = chunks[n](state)
        jax.block_until_ready(metrics)
        train_time += time.perf_counter() - t
        record = {k: np.asarray(v).tolist() for k, v in evaluate(state).items()}
        curves.append({"step": int(state.step[0]), **record})
        logging.info(
            "%s %s step %d test_accuracy %s",
            config.data.name,
            config.rule.name,
            curves[-1]["step"],
            np.round(record.get("test_accuracy", record["test_loss"]), 3),
        )
    final = curves[-1]
    return {
        "curves": curves,
        "final": final,
        "compile_time_s": compile_time,
        "time_per_step_s": train_time / max(steps, 1),
        "train_time_s": train_time,
        "steps": steps,
        "forward_passes": forward_passes(experiment),
        "config": json.loads(config.to_json()),
    }


TUNE_SEEDS_FROM = 1000  # tuning seeds 1000, 1001, ...: never the reported seeds 0, 1, ...


def tune_keys(configs: dict[str, Any], specs: list[str]) -> None:
    """Refuses a ``--tune`` key that no method's config has as a sweepable float, naming them."""
    for spec in specs:
        key = spec.partition("=")[0].strip()
        if not any(key in config_lib.hparams(c) for c in configs.values()):
            known = sorted({k for c in configs.values() for k in config_lib.hparams(c)})
            raise ValueError(
                f"--tune {spec}: {key!r} is no method's sweepable float; they are: "
                f"{', '.join(known)}."
            )


TUNE_BY = ("val_loss", "val_accuracy")  # what --tune_by may choose by


def check_tune_by(by: str) -> None:
    if by not in TUNE_BY:
        raise ValueError(f"--tune_by={by}: valid choices: {', '.join(TUNE_BY)}.")


def tune(config, specs: list[str], seeds: int, by: str = "val_loss") -> dict[str, Any] | None:
    """The point of the ``--tune`` grid (the keys ``config`` has) with the best mean final
    validation figure ``by`` (the lowest loss or the highest accuracy) over ``seeds`` TUNING
    seeds (``TUNE_SEEDS_FROM`` on), all points and seeds as one vmapped program; ``config`` is
    set to it. None if no key applies."""
    check_tune_by(by)
    mine = [s for s in specs if s.partition("=")[0].strip() in config_lib.hparams(config)]
    if not mine:
        return None
    train = make_train(config)  # loads the data once: the check below and the grid use it
    if by == "val_accuracy" and not train.experiment.task.is_classification:
        raise ValueError("--tune_by=val_accuracy needs a classification dataset; use val_loss.")
    axes = [sweep_lib.parse_axis(config, spec, seed=int(config.seed)) for spec in mine]
    points = sweep_lib.points(axes)[1]
    keys = jnp.stack(
        [jax.random.PRNGKey(TUNE_SEEDS_FROM + s) for _ in points for s in range(seeds)]
    )
    hparams = {k: jnp.asarray([p[k] for p in points for _ in range(seeds)]) for k in points[0]}
    t = time.perf_counter()
    _, out = jax.jit(jax.vmap(train))(keys, hparams)
    val = np.asarray(out["eval"][by], np.float64).reshape(len(points), seeds)
    sign = 1.0 if by == "val_loss" else -1.0  # lower is better
    score = np.where(np.isfinite(val), sign * val, np.inf).mean(axis=1)
    best = int(np.argmin(score))
    for key, value in points[best].items():
        config_lib.set_key(config, key, value)
    return {
        "grid": points,
        "by": by,
        f"mean_{by}": (sign * score).tolist(),
        "chosen": points[best],
        "tuning_seeds": list(range(TUNE_SEEDS_FROM, TUNE_SEEDS_FROM + seeds)),
        "seconds": time.perf_counter() - t,
    }


def _mean_std(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def table(results: dict, seeds: int) -> str:
    lines = []
    for data, methods in results.items():
        bp_time = methods.get("bp", {}).get("time_per_step_s")
        lines += [
            f"### {data}",
            "",
            f"| method | test accuracy (mean ± std, {seeds} seeds) | best-seed | train loss | "
            "grad cosine | forward passes / step | steps | time / step (vs bp) | train time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in methods.items():
            f = r["final"]
            if r.get("tuned"):
                chosen = ", ".join(
                    f"{k.split('.')[-1]} {v:.3g}" for k, v in r["tuned"]["chosen"].items()
                )
                name = f"{name} ({chosen})"
            ratio = f" ({r['time_per_step_s'] / bp_time:.2f}x)" if bp_time else ""
            cos = _mean_std(f["grad_cosine"]) if "grad_cosine" in f else "-"
            lines.append(
                f"| {name} | {_mean_std(f['test_accuracy'])} | {max(f['test_accuracy']):.3f} | "
                f"{_mean_std(f['train_loss'])} | {cos} | {r['forward_passes']:g} | "
                f"{r['steps']} | {r['time_per_step_s'] * 1e3:.2f} ms{ratio} | "
                f"{r['train_time_s']:.1f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    try:
        get_config = load_get_config(_CONFIG.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    results: dict[str, dict] = {}
    for data in _DATA.value:
        results[data] = {}
        configs = {}
        for method in _METHODS.value:
            variant = f"method={method},data={data}" + (f",{_EXTRA.value}" if _EXTRA.value else "")
            configs[method] = get_config(variant)
        try:
            tune_keys(configs, _TUNE.value)
            check_tune_by(_TUNE_BY.value)
        except ValueError as e:
            sys.exit(f"error: {e}")
        for method, config in configs.items():
            configure_jax(config)  # 64-bit mode for rules that solve in float64 (closed_form)
            set_steps(
                config,
                _SEEDS.value,
                _STEPS.value,
                _EVAL_EVERY.value,
                _BUDGET_PASSES.value,
                _BUDGET_SECONDS.value,
            )
            tune_seeds = _TUNE_SEEDS.value or _SEEDS.value
            tuned = tune(config, _TUNE.value, tune_seeds, _TUNE_BY.value) if _TUNE.value else None
            results[data][method] = {**run_one(config, _SEEDS.value), "tuned": tuned}
    out = Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results, _SEEDS.value)
    out.with_suffix(".md").write_text(text + "\n")
    plot_comparison(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _CONFIG = flags.DEFINE_string("config", "experiments/configs/np_family.py", "Config file.")
    _METHODS = flags.DEFINE_list("methods", ["bp", "danp"], "Methods (the config's method names).")
    _DATA = flags.DEFINE_list("data", ["digits"], "Datasets.")
    _EXTRA = flags.DEFINE_string("variant_extra", "", "Appended to every config variant.")
    _SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (vmapped).")
    _STEPS = flags.DEFINE_integer("steps", None, "Override the config's steps (trained exactly).")
    _EVAL_EVERY = flags.DEFINE_integer(
        "eval_every", None, f"Evaluate every N steps (default: {EVALUATIONS} times per run)."
    )
    _BUDGET_PASSES = flags.DEFINE_integer(
        "budget_forward_passes", 0, "Give every method this many forward passes (0: off)."
    )
    _BUDGET_SECONDS = flags.DEFINE_float(
        "budget_seconds", 0.0, "Give every method this much training time (0: off)."
    )
    _TUNE = flags.DEFINE_multi_string(
        "tune",
        [],
        "KEY=SPEC (as experiments.sweep's --sweep): each method's grid of the keys it has, chosen "
        "by validation loss on tuning seeds, then reported on fresh seeds.",
    )
    _TUNE_SEEDS = flags.DEFINE_integer(
        "tune_seeds", 0, "Tuning seeds per grid point (1000, 1001, ...; 0: as many as --seeds)."
    )
    _TUNE_BY = flags.DEFINE_string(
        "tune_by", "val_loss", f"What tuning chooses by: {' or '.join(TUNE_BY)} (final, mean)."
    )
    _OUT = flags.DEFINE_string("out", "runs/compare", "Output path prefix (.json, .md, .png).")
    app.run(main)
