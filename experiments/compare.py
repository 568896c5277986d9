"""Compares methods over seeds: every (dataset, method) trains all its seeds as ONE vmapped
program (``altlearn.driver``) for exactly the steps asked, evaluated about 20 times; writes
``NAME.json``, ``NAME.md`` and ``NAME.png`` to ``--workdir`` (``altlearn.report``).

    python -m experiments.compare --config=experiments/configs/np_family.py \\
        --methods=bp,dbp,np,anp,inp,dnp,danp,dinp,fg,wp --data=digits,mnist1d --seeds=5 \\
        --workdir=runs/np_family

A method is a variant of the config file (``get_config("method=M,data=D")``, plus
``--variant_extra``) or any registered rule by name, with its default options on the config
file's model, data and schedule (``--methods=bp,node_perturbation``); a variant may carry
options of its own after slashes (``--methods=danp,danp/every=4``: the same variant with
``every=4``, reported as its own row, paired with the first); ``--set=KEY=VALUE``
(repeatable) overrides a config key for every method that has it. Seed s gives every method
the same initialisation and batches, so the table reports each method's paired difference to
the FIRST method beside its mean, sample std and 95% interval. Equal steps for every method
come from the config (or ``--steps``) unless a budget gives every method the same number of
forward passes (``--budget_forward_passes``) or the same training time on this machine
(``--budget_seconds``) instead.

``--budgets=steps,passes,seconds`` reports every method three ways from one tuning: at equal
steps (the config's, or ``--steps``), at the forward passes the FIRST method spends in those
steps, counted in samples (its cost per step times its batch times its steps: each method's
steps = that / (its own cost x batch); ``altlearn.budgets``), and at
the training time the first method takes for them on this machine (``driver.step_seconds``, all
seeds vmapped, compile apart). A table (and a panel) per dataset and budget.

``--tune=KEY=SPEC`` (repeatable; SPEC as ``experiments.sweep``'s) tunes every method the same
way (``altlearn.tune``): each method's grid of the keys its config has, on tuning seeds 1000..
(``--tune_seeds`` of them), chosen by the mean final ``--tune_by`` (val_loss, val_accuracy or
train_loss) at equal steps, on as many grid points for every method (``--tune_equal_size``: a
method without a key, backprop without ``rule.sigma``, gets its first key refined between the
same ends), then trained on the reported seeds 0.. (at every budget) and
reported on test.
"""

from __future__ import annotations

import sys

from absl import app, flags

from altlearn import budgets, plotting, report, rules, tune
from altlearn import config as config_lib
from altlearn.budgets import BUDGETS, check_budgets, run_method, set_steps
from altlearn.train import Experiment, configure_jax


def method_configs(config_file: str, methods: list[str], data: str, extra: str, sets: list[str]):
    """``{method: config}``: the config file's variants, or registered rules by name."""
    module = config_lib.load_config_module(config_file)
    variants = getattr(module, "METHODS", ())
    suffix = f",{extra}" if extra else ""
    configs = {}
    for method in methods:
        name, *options = method.split("/")  # danp/every=4: the variant with its options
        if options and name in variants:
            option_suffix = "," + ",".join(options)
            configs[method] = module.get_config(f"method={name},data={data}{suffix}{option_suffix}")
        elif method in variants:
            configs[method] = module.get_config(f"method={method},data={data}{suffix}")
        elif method in rules.RULES:
            configs[method] = config_lib.switch(module.get_config(f"data={data}{suffix}"), method)
        else:
            raise ValueError(
                f"--methods: unknown method {method!r}; valid choices: the variants of "
                f"{config_file} ({', '.join(variants) or 'none'}) or a rule "
                f"({', '.join(rules.RULES)})."
            )
    config_lib.apply_sets(list(configs.values()), sets)
    return configs


def table(results: dict) -> str:
    lines = []
    for data, methods in results.items():
        first_name, first = next(iter(methods.items()))
        spent = ""
        if first.get("budget") in ("passes", "seconds"):
            unit = "sample forward passes" if first["budget"] == "passes" else "s of training"
            spent = f" Every method gets {first['budget_value']:.4g} {unit}."
        metric = "test_accuracy" if "test_accuracy" in first["final"] else "test_loss"
        seeds = len(first["final"][metric])
        lines += [
            f"### {data}",
            "",
            f"{metric}: mean ± sample std [95% t interval] over {seeds} seeds; the paired "
            f"difference to {first_name} (same seeds: same initialisation and batches).{spent}",
            "",
            f"| method | {metric} | minus {first_name} | train loss | grad cosine | "
            "forward passes / step | steps | time / step | run time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in methods.items():
            f = r["final"]
            if r.get("tuned"):
                name += (
                    " ("
                    + ", ".join(
                        f"{k.split('.')[-1]} {v:.3g}" for k, v in r["tuned"]["chosen"].items()
                    )
                    + ")"
                )
            diff = (
                ""
                if r is first
                else report.cell(report.paired(f[metric], first["final"][metric]), sign=True)
            )
            ratio = r["time_per_step_s"] / first["time_per_step_s"]
            cos = report.cell(report.stats(f["grad_cosine"])) if "grad_cosine" in f else "-"
            lines.append(
                f"| {name} | {report.cell(report.stats(f[metric]))} | {diff} | "
                f"{report.cell(report.stats(f['train_loss']))} | {cos} | "
                f"{r['forward_passes']:g} | {r['steps']} | {r['time_per_step_s'] * 1e3:.2f} ms "
                f"({ratio:.2f}x) | {r['run_time_s']:.1f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_pairs(pairs: list[str], methods: list[str]) -> list[tuple[str, str]]:
    """``--pairs`` entries ``A:B`` (A minus B, both among ``methods``) as tuples."""
    out = []
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in methods or b not in methods:
            raise ValueError(
                f"--pairs: bad pair {pair!r}; give METHOD:METHOD, both among --methods "
                f"({', '.join(methods)})."
            )
        out.append((a, b))
    return out


def pairs_table(results: dict, pairs: list[tuple[str, str]]) -> str:
    """Per table of ``results``: each pair's paired difference A minus B by seed."""
    lines = []
    for label, methods in results.items():
        first = next(iter(methods.values()))
        metric = "test_accuracy" if "test_accuracy" in first["final"] else "test_loss"
        lines += [
            f"### {label}: paired differences",
            "",
            f"Each method minus its pair, paired by seed (same initialisation and batches), "
            f"mean ± sample std [95% t interval] over {len(first['final'][metric])} seeds.",
            "",
            f"| method | minus | {metric} | train loss |",
            "|---|---|---|---|",
        ]
        for a, b in pairs:
            fa, fb = methods[a]["final"], methods[b]["final"]
            diff = lambda key: report.cell(report.paired(fa[key], fb[key]), sign=True)  # noqa: B023
            lines.append(f"| {a} | {b} | {diff(metric)} | {diff('train_loss')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    try:
        report.prepare_workdir(_WORKDIR.value)
        tune.check_by(_TUNE_BY.value)
        check_budgets(_BUDGETS.value)
        pairs = parse_pairs(_PAIRS.value, _METHODS.value)
        if len(_BUDGETS.value) > 1 and (_BUDGET_PASSES.value or _BUDGET_SECONDS.value):
            raise ValueError(
                "--budgets derives the budgets from the first method; give "
                "--budget_forward_passes / --budget_seconds without it."
            )
        plans = {
            data: method_configs(_CONFIG.value, _METHODS.value, data, _EXTRA.value, _SET.value)
            for data in _DATA.value
        }
        for configs in plans.values():  # each method built as its run will build it
            for config in configs.values():
                configure_jax(config)
                Experiment(config)
            tune.check_specs(list(configs.values()), _TUNE.value)
        results: dict[str, dict] = {}
        for data, configs in plans.items():
            tuned = {}
            size = max(tune.grid_size(c, _TUNE.value) for c in configs.values())
            size = size if _TUNE_EQUAL.value else 0
            for method, config in configs.items():
                configure_jax(config)  # 64-bit mode for rules that solve in float64
                set_steps(
                    config, _SEEDS.value, _STEPS.value, _EVAL_EVERY.value,
                    _BUDGET_PASSES.value, _BUDGET_SECONDS.value,
                )  # fmt: skip
                if _TUNE.value:  # once, at equal steps, for every budget
                    tuned[method] = tune.tune(
                        config,
                        _TUNE.value,
                        _TUNE_SEEDS.value or _SEEDS.value,
                        _TUNE_BY.value,
                        size,
                    )
                    if tuned[method] is not None:
                        tune.apply(config, tuned[method].chosen)
            first = next(iter(configs.values()))
            for budget in _BUDGETS.value:
                label = data if _BUDGETS.value == ["steps"] else f"{data}, {BUDGETS[budget]}"
                spend = budgets.spend(first, _SEEDS.value, budget)
                results[label] = {}
                for method, base in configs.items():
                    config = base.copy_and_resolve_references()
                    configure_jax(config)
                    if budget != "steps" and base is not first:  # the first spends its steps
                        steps = budgets.budget_steps(config, _SEEDS.value, budget, spend)
                        set_steps(config, _SEEDS.value, steps)
                    r = run_method(config, _SEEDS.value, tuned.get(method))
                    results[label][method] = {**r, "budget": budget, "budget_value": spend}
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = table(results)
    if pairs:
        text += "\n" + pairs_table(results, pairs)
    document = {"results": results, "pairs": [list(p) for p in pairs]}
    paths = report.write(
        _WORKDIR.value, _NAME.value, document, text, provenance,
        lambda path: plotting.plot_comparison(results, path),
    )  # fmt: skip
    print(text)
    print(f"Table, numbers and plot: {paths['md']}, {paths['json']}, {paths['png']}")


if __name__ == "__main__":  # flags only for the binary: the module stays importable
    _CONFIG = flags.DEFINE_string("config", "experiments/configs/np_family.py", "Config file.")
    _METHODS = flags.DEFINE_list(
        "methods", ["bp", "danp"], "The config file's method variants, or registered rules."
    )
    _PAIRS = flags.DEFINE_list(
        "pairs", [], "A:B,...: also tabulate method A minus method B, paired by seed."
    )
    _DATA = flags.DEFINE_list("data", ["digits"], "Datasets.")
    _EXTRA = flags.DEFINE_string("variant_extra", "", "Appended to every config variant.")
    _SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE for every method that has KEY.")
    _SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1 (vmapped).")
    _STEPS = flags.DEFINE_integer("steps", None, "Override the config's steps (trained exactly).")
    _EVAL_EVERY = flags.DEFINE_integer(
        "eval_every",
        None,
        f"Evaluate every N steps (default: {budgets.EVALUATIONS} times per run).",
    )
    _BUDGET_PASSES = flags.DEFINE_integer(
        "budget_forward_passes", 0, "Give every method this many forward passes (0: off)."
    )
    _BUDGET_SECONDS = flags.DEFINE_float(
        "budget_seconds", 0.0, "Give every method this much training time (0: off)."
    )
    _BUDGETS = flags.DEFINE_list(
        "budgets", ["steps"], f"Report at these budgets: {', '.join(BUDGETS)} (one tuning)."
    )
    _TUNE = flags.DEFINE_multi_string(
        "tune", [], "KEY=SPEC: each method's grid of the keys it has (altlearn.tune)."
    )
    _TUNE_EQUAL = flags.DEFINE_bool(
        "tune_equal_size",
        True,
        "Every method tuned on as many points: a method lacking a key (bp: rule.sigma) gets its "
        "first key's values refined between the same ends.",
    )
    _TUNE_SEEDS = flags.DEFINE_integer(
        "tune_seeds", 0, "Tuning seeds per grid point (1000, 1001, ...; 0: as many as --seeds)."
    )
    _TUNE_BY = flags.DEFINE_string(
        "tune_by", "val_loss", f"What tuning chooses by: {', '.join(tune.BY)} (final, mean)."
    )
    _WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "compare", "Output file name (NAME.json, .md, .png).")
    app.run(main)
