"""The learning-rule leaderboard: every registered rule that can train a setting, tuned the
same way, at equal steps, equal forward passes and equal wall time, 10 seeds each
(docs/LEADERBOARD.md).

    python -m experiments.leaderboard --workdir=docs/results           # the full table
    python -m experiments.leaderboard --quick --workdir=runs/leaderboard  # small: ~8 minutes

Settings and methods come from experiments/configs/leaderboard.py: every rule of the registry
and ``backprop_decay`` (backprop with decoupled weight decay, tuned over kp's decay grid: kp's
control), on the MLP on digits and on MNIST-1D, the CNN on digits and a regression set
(``--settings``, ``--methods`` pick a subset). A rule that cannot train a setting gets a line
saying why (the error its config raises, or ``ABSENT`` in the config with a measured reason).

For every (setting, method):
1. Tuning (``altlearn.tune``): the learning rate (``LEARNING_RATES``, where the rule applies the
   optimizer) times the rule's main option (its ``RuleSpec.search``: two values), refined to
   ``GRID_SIZE`` points where a rule has fewer (a rule without a main option gets six learning
   rates between the same ends; a swarm six values of its own option), so every rule is tuned
   on as many points; on ``--tune_seeds`` tuning seeds (1000, 1001, ...), apart from the
   reported seeds 0..9; chosen by the mean final validation accuracy (validation loss for
   regression). Where the validation loss would have chosen another point, the table says so.
2. Timing (first, for every setting, before anything trains): every method's step with the
   reported seeds vmapped, compiled first and then timed round-robin three times
   (``driver.interleaved_step_seconds``; the median), so a drift of the machine reaches every
   method alike. At the config's values: tuned values are numbers in the same program.
3. Training: the reported seeds as ONE vmapped program, trained to the longest of the three
   budgets and evaluated at each budget's step: equal steps (the setting's), equal forward
   passes (backprop's passes in those steps, counted in samples: ``altlearn.budgets``) and equal
   time (backprop's time for them). With a constant learning rate a run stopped at step k is the
   run of k steps, so one run gives all three.
Each finished part (a tuning, the timings, a run) is saved under ``WORKDIR/NAME_parts/``: a
killed command run again with the same flags resumes where it stopped.

The table, per setting and budget: rank (1 + the number of methods whose 95% interval lies
wholly better: methods whose intervals overlap share ranks), the test figure's mean ± sample
std [95% t interval], the paired difference to backprop (the same seeds: the same
initialisation and batches), the chosen values, the forward passes per step, the steps, and the
time per step against backprop's. A plot per setting: each method's mean and interval at each
budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from altlearn import budgets, driver, plotting, report, rules, tune
from altlearn import config as config_lib
from altlearn.budgets import BUDGETS
from altlearn.train import Experiment

CONFIG = "experiments/configs/leaderboard.py"
REFERENCE = "backprop"  # the budgets are its spend; the paired column is against it
LEARNING_RATES = "optimizer.learning_rate=[3e-4,2e-3,1e-2]"
GRID_SIZE = 6  # points per rule: 3 learning rates x 2 values of the rule's main option
CONTROL_SEARCH = {"backprop_decay": "kp"}  # a control tuned over the search of the rule it controls
CONTROL_OF = {rule: control for control, rule in CONTROL_SEARCH.items()}
# --quick: the first setting's table, small (about 8 minutes on 2 cores, mostly compiling)
QUICK = {"steps": 100, "seeds": 5, "tune_seeds": 1, "settings": ["mlp_digits"]}


def precision(config: ml_collections.ConfigDict):
    """JAX's 64-bit mode on for a rule that solves in float64 (closed_form) and OFF for every
    other rule, as each runs in its own binary (``altlearn.train.configure_jax``)."""
    wide = rules.resolve(config.rule).wants_x64 and jax.default_backend() != "tpu"
    return jax.enable_x64(bool(wide))


def module():
    return config_lib.load_config_module(CONFIG)


def search_specs(method: str, config: ml_collections.ConfigDict) -> list[str]:
    """The tuning grid's specs of ``method``: the learning rates, then the rule's main option
    (``RuleSpec.search``, keys under ``rule.``)."""
    rule = CONTROL_SEARCH.get(method, config.rule.name)
    return [LEARNING_RATES, *(f"rule.{s}" for s in rules.RULES[rule].search)]


def chosen(settings: list[str], methods: list[str]) -> tuple[list[str], list[str]]:
    """The settings and methods asked for (all where none is named); unknown names refused
    naming the valid ones."""
    mod = module()
    unknown = [s for s in settings if s not in mod.SETTINGS]
    if unknown:
        raise ValueError(f"--settings {unknown}: valid choices: {', '.join(mod.SETTINGS)}.")
    bad = [m for m in methods if m not in mod.METHODS]
    if bad:
        raise ValueError(f"--methods {bad}: valid choices: {', '.join(mod.METHODS)}.")
    return settings or list(mod.SETTINGS), methods or list(mod.METHODS)


def plan(settings: list[str], methods: list[str], steps: int | None):
    """``{setting: ({method: config}, {method: reason absent})}``, every config built (and its
    Experiment made) as its run will make it, so bad input fails before anything compiles."""
    mod = module()
    absent_listed = getattr(mod, "ABSENT", {})
    out = {}
    for setting in settings:
        configs, absent = {}, {}
        for method in methods:
            config = mod.get_config(f"method={method},setting={setting}")
            if steps:
                config.steps = int(steps)
            if (method, setting) in absent_listed:
                absent[method] = absent_listed[(method, setting)]
                continue
            try:
                with precision(config):
                    Experiment(config)
            except ValueError as e:
                absent[method] = str(e).split("\n")[0]
                continue
            specs = search_specs(method, config)
            mine = tune.applicable(config, specs)
            lost = [s for s in specs if s not in mine and s.startswith("rule.")]
            if lost:  # a rule's own search must name one of its sweepable options
                raise ValueError(f"{method}: RuleSpec.search {lost} names no sweepable option.")
            with precision(config):
                tune.check_specs([config], mine)
            configs[method] = config
        if REFERENCE not in configs:
            raise ValueError(f"--methods must include {REFERENCE} (every budget is its spend).")
        out[setting] = (configs, absent)
    return out


def classification(config: ml_collections.ConfigDict) -> bool:
    return config.loss != "squared_error"


class Parts:
    """Finished parts of a run, saved as JSON under ``root`` and found again by a rerun with the
    same plan (a part records the config it was made for; another config redoes it)."""

    def __init__(self, root: Path):
        self.root = root

    def get(self, name: str, config: dict) -> Any:
        path = self.root / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["config"] == json.loads(json.dumps(report._jsonable(config))):
                return saved["value"]
        return None

    def put(self, name: str, config: dict, value: Any) -> Any:
        path = self.root / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        document = {"config": config, "value": value}
        tmp.write_text(json.dumps(report._jsonable(document)) + "\n")
        tmp.rename(path)  # saved whole or not at all
        return json.loads(path.read_text())["value"]


def tuned_choice(record: dict, by: str) -> dict[str, float]:
    """The point a tuning record's figures choose by ``by`` (the mean over tuning seeds)."""
    return record["grid"][int(np.argmin(tune.ranked_scores(record["figures"][by], by)))]


def tune_method(parts: Parts, setting: str, method: str, config, tune_seeds: int) -> dict:
    by = "val_accuracy" if classification(config) else "val_loss"
    key = {"config": config.to_dict(), "seeds": tune_seeds, "size": GRID_SIZE}
    saved = parts.get(f"{setting}/tune_{method}", key)
    if saved is not None:
        return saved
    tuning = tune.tune(config, search_specs(method, config), tune_seeds, by, GRID_SIZE)
    record = tuning.record()
    if by == "val_accuracy":  # what the validation loss would have chosen instead
        record["by_val_loss"] = tuned_choice(record, "val_loss")
    return parts.put(f"{setting}/tune_{method}", key, record)


def budget_steps(
    reference: ml_collections.ConfigDict, config, times: dict, method: str, seeds: int
) -> dict[str, int]:
    """``{budget: steps}`` of ``method``: its steps at each budget, from the reference's spend
    in its steps."""
    out = {}
    for budget in BUDGETS:
        spend = budgets.spend(reference, seeds, budget, times[REFERENCE])
        out[budget] = budgets.budget_steps(config, seeds, budget, spend, times[method])
    return out


def train_method(parts: Parts, setting: str, method: str, config, steps: dict, seeds: int):
    """The reported seeds trained to the longest budget, evaluated at every budget's step and
    about 20 times on the way."""
    longest = max(steps.values())
    run_config = config.copy_and_resolve_references()
    run_config.steps = longest
    every = max(1, -(-longest // budgets.EVALUATIONS))
    eval_at = sorted({*range(0, longest + 1, every), *steps.values(), longest})
    key = {"config": run_config.to_dict(), "seeds": seeds, "eval_at": eval_at}
    saved = parts.get(f"{setting}/run_{method}", key)
    if saved is not None:
        return saved
    runs = driver.run(run_config, seeds=range(seeds), eval_at=eval_at)
    curves = [
        {"step": int(s), **{k: v[:, i].tolist() for k, v in runs.curves.items() if k != "step"}}
        for i, s in enumerate(runs.steps)
    ]
    at = {int(c["step"]): c for c in curves}
    record = {
        "curves": curves,
        "final": {budget: at[int(s)] for budget, s in steps.items()},
        "steps": steps,
        "forward_passes": runs.experiment.step_cost,
        "batch_size": runs.experiment.batch_size,
        "compile_time_s": runs.compile_s,
        "run_time_s": runs.run_s,
    }
    return parts.put(f"{setting}/run_{method}", key, record)


def time_setting(parts: Parts, setting: str, configs: dict, seeds: int) -> dict[str, float]:
    """Every method's seconds per step, its seeds vmapped, timed round-robin
    (``driver.interleaved_step_seconds``). At the configs' own values: the tuned values are
    numbers in the same program, which take the same time."""
    key = {m: c.to_dict() for m, c in configs.items()} | {"seeds": seeds}
    times = parts.get(f"{setting}/times", key)
    if times is None:
        # one precision per program: a rule that solves in float64 is timed on its own
        wide = [m for m, c in configs.items() if rules.resolve(c.rule).wants_x64]
        narrow = [m for m in configs if m not in wide]
        times = {}
        for group in (narrow, *([m] for m in wide)):
            with precision(configs[group[0]]):
                measured = driver.interleaved_step_seconds(
                    [configs[m] for m in group], range(seeds)
                )
            times.update(zip(group, measured))
        times = parts.put(f"{setting}/times", key, times)
    return times


def run_setting(
    parts: Parts, setting: str, configs: dict, times: dict, seeds: int, tune_seeds: int
) -> dict:
    tunings = {}
    for method, config in configs.items():
        with precision(config):
            tunings[method] = tune_method(parts, setting, method, config, tune_seeds)
        tune.apply(config, tunings[method]["chosen"])
    steps = {}
    for method, config in configs.items():
        with precision(config):
            steps[method] = budget_steps(configs[REFERENCE], config, times, method, seeds)
    methods = {}
    for method, config in configs.items():
        with precision(config):
            run = train_method(parts, setting, method, config, steps[method], seeds)
        methods[method] = {
            **run,
            "tuned": tunings[method],
            "time_per_step_s": times[method],
            "config": config.to_dict(),
        }
    return methods


# ---------------------------------------------------------------------- the table


def metric_of(methods: dict) -> str:
    final = next(iter(methods.values()))["final"]["steps"]
    return "test_accuracy" if "test_accuracy" in final else "test_loss"


def ranks(summaries: dict[str, dict], higher_better: bool) -> dict[str, int]:
    """1 + the number of methods whose 95% interval lies wholly better than this one's."""
    out = {}
    for m, s in summaries.items():
        if higher_better:
            out[m] = 1 + sum(o["low"] > s["high"] for n, o in summaries.items() if n != m)
        else:
            out[m] = 1 + sum(o["high"] < s["low"] for n, o in summaries.items() if n != m)
    return out


def chosen_text(tuned: dict) -> str:
    def short(values: dict) -> str:
        return ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in values.items())

    text = short(tuned["chosen"])
    other = tuned.get("by_val_loss")
    if other is not None and other != tuned["chosen"]:
        text += f" (val loss: {short(other)})"
    return text


def setting_table(setting: str, entry: dict) -> str:
    methods, absent = entry["methods"], entry["absent"]
    metric = metric_of(methods)
    higher = metric == "test_accuracy"
    seeds = len(methods[REFERENCE]["final"]["steps"][metric])
    ref_time = methods[REFERENCE]["time_per_step_s"]
    lines = [f"### {setting}: {entry['description']}", ""]
    for budget in BUDGETS:
        ref = methods[REFERENCE]
        if budget == "steps":
            spend = f"every method trains {ref['steps']['steps']} steps"
        elif budget == "passes":
            passes = ref["steps"]["steps"] * ref["forward_passes"] * ref["batch_size"]
            spend = f"every method gets {passes:.4g} sample forward passes"
        else:
            seconds = ref["steps"]["steps"] * ref["time_per_step_s"]
            spend = f"every method gets {seconds:.3g} s of training ({seeds} seeds vmapped)"
        summaries = {m: report.stats(r["final"][budget][metric]) for m, r in methods.items()}
        rank = ranks(summaries, higher)
        order = sorted(
            methods, key=lambda m: (rank[m], -summaries[m]["mean"] * (1 if higher else -1))
        )
        scale, digits = (100.0, 1) if higher else (1.0, 3)
        unit = " (%)" if higher else ""
        lines += [
            f"#### {setting}, {BUDGETS[budget]}: {spend}",
            "",
            f"| rank | method | {metric}{unit} | minus {REFERENCE} | chosen | passes / step | "
            "steps | time / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in order:
            r = methods[m]
            f = r["final"][budget][metric]
            diff = (
                "-"
                if m == REFERENCE
                else report.cell(
                    report.paired(f, methods[REFERENCE]["final"][budget][metric]),
                    scale,
                    digits,
                    sign=True,
                    std=False,
                )  # fmt: skip
            )
            lines.append(
                f"| {rank[m]} | {m} | {report.cell(summaries[m], scale, digits)} | {diff} | "
                f"{chosen_text(r['tuned'])} | {r['forward_passes']:.4g} | {r['steps'][budget]} | "
                f"{r['time_per_step_s'] * 1e3:.2f} ms ({r['time_per_step_s'] / ref_time:.2f}x) |"
            )
        lines.append("")
    controlled = [(m, c) for m, c in CONTROL_OF.items() if m in methods and c in methods]
    if controlled:
        scale, digits = (100.0, 1) if higher else (1.0, 3)
        lines += [
            f"#### {setting}: what a rule adds beyond its regulariser (paired, {metric})",
            "",
            "| rule | minus its control | " + " | ".join(BUDGETS.values()) + " |",
            "|---|---|" + "---|" * len(BUDGETS),
        ]
        for m, c in controlled:
            cells = [
                report.cell(
                    report.paired(methods[m]["final"][b][metric], methods[c]["final"][b][metric]),
                    scale,
                    digits,
                    sign=True,
                    std=False,
                )  # fmt: skip
                for b in BUDGETS
            ]
            lines.append(f"| {m} | {c} | " + " | ".join(cells) + " |")
        lines.append("")
    if absent:
        lines += ["Absent from this setting:", ""]
        lines += [f"- {m}: {reason}" for m, reason in absent.items()]
        lines.append("")
    return "\n".join(lines)


def text(results: dict, seeds: int, tune_seeds: int) -> str:
    head = (
        f"Test {{accuracy, loss}} of the final iterate, mean ± sample std [95% t interval] over "
        f"{seeds} seeds (0..{seeds - 1}); minus {REFERENCE}: the paired difference and its "
        f"interval. Every method tuned on {GRID_SIZE} points on {tune_seeds} tuning seed(s) "
        "(1000..), chosen by validation accuracy (validation loss for regression); '(val loss: "
        "...)' gives the point the validation loss would have chosen where it differs. Rank: "
        "1 + the number of methods whose interval lies wholly better (overlapping intervals "
        "share ranks). Passes / step: forward-pass equivalents over the method's batch; time / "
        f"step: {seeds} seeds vmapped, against {REFERENCE}'s."
    )
    return "\n".join([head, "", *(setting_table(s, e) for s, e in results.items())])


def description(config: ml_collections.ConfigDict) -> str:
    model = config.model
    shape = (
        "MLP " + "-".join(str(w) for w in model.widths)
        if model.name == "mlp"
        else f"CNN {tuple(model.channels)} channels, dense {tuple(model.dense)}"
    )
    return f"{config.data.name}, {shape}, {config.loss} loss, batch {config.batch_size}"


def main(argv: list[str]) -> None:
    del argv
    if _REWRITE.value:  # the table and plots again from NAME.json, under its own provenance
        record = report.read(Path(_WORKDIR.value) / f"{_NAME.value}.json")
        provenance = record.pop("provenance")
        write(Path(_WORKDIR.value), _NAME.value, record, provenance)
        return
    provenance = report.Provenance()
    quick = QUICK if _QUICK.value else {}
    seeds = quick.get("seeds", _SEEDS.value)
    tune_seeds = quick.get("tune_seeds", _TUNE_SEEDS.value)
    steps = quick.get("steps", _STEPS.value)
    try:
        workdir = report.prepare_workdir(_WORKDIR.value)
        asked = _SETTINGS.value or quick.get("settings", [])
        plans = plan(*chosen(asked, _METHODS.value), steps)
    except ValueError as e:
        sys.exit(f"error: {e}")
    parts = Parts(workdir / f"{_NAME.value}_parts")
    # every method timed first, before any training, each setting's methods round-robin
    times = {s: time_setting(parts, s, configs, seeds) for s, (configs, _) in plans.items()}
    results = {}
    for setting, (configs, absent) in plans.items():
        logging.info("setting %s: %s", setting, ", ".join(configs))
        results[setting] = {
            "description": description(configs[REFERENCE]),
            "methods": run_setting(parts, setting, configs, times[setting], seeds, tune_seeds),
            "absent": absent,
        }
    settings = {"seeds": seeds, "tune_seeds": tune_seeds, "grid_size": GRID_SIZE}
    write(workdir, _NAME.value, {"settings": settings, "results": results}, provenance)


def write(workdir: Path, name: str, result: dict, provenance) -> None:
    """The table, the numbers and the plots of ``result`` (``report.write``)."""
    results, settings = result["results"], result["settings"]
    body = text(results, settings["seeds"], settings["tune_seeds"])

    def plot(path: Path) -> None:
        everything = {s: e["methods"] for s, e in results.items()}
        plotting.plot_leaderboard(everything, path, BUDGETS)
        for setting, methods in everything.items():
            plotting.plot_leaderboard(
                {setting: methods}, path.with_name(f"{path.stem}_{setting}.png"), BUDGETS
            )

    paths = report.write(workdir, name, result, body, provenance, plot)
    print(body)
    print(f"Table, numbers and plots: {paths['md']}, {paths['json']}, {workdir}/{name}_*.png")


if __name__ == "__main__":
    _SETTINGS = flags.DEFINE_list("settings", [], "Settings (default: all of the config's).")
    _METHODS = flags.DEFINE_list("methods", [], "Methods (default: every rule and control).")
    _SEEDS = flags.DEFINE_integer("seeds", 10, "Reported seeds 0..N-1 (vmapped).")
    _TUNE_SEEDS = flags.DEFINE_integer("tune_seeds", 2, "Tuning seeds per grid point (1000..).")
    _STEPS = flags.DEFINE_integer("steps", None, "Override the settings' steps.")
    _QUICK = flags.DEFINE_bool(
        "quick", False, f"The same table, small: {QUICK} (about 8 minutes on 2 cores)."
    )
    _REWRITE = flags.DEFINE_bool(
        "rewrite", False, "Write NAME.md and the plots again from NAME.json; train nothing."
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/leaderboard", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "leaderboard", "Output file name (NAME.json, .md, .png).")
    app.run(main)
