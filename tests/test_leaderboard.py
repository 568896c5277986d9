"""The leaderboard (experiments/leaderboard.py): every rule in every setting or named absent with
a reason, every rule tuned on as many grid points, ranks that tie where intervals overlap, the
three budgets from one run, and a killed run resumed from its saved parts."""

import json

import numpy as np
import pytest
from conftest import run_module

from altlearn import report, rules, sweep, tune
from experiments import leaderboard
from experiments.configs import leaderboard as settings


def test_every_rule_is_in_every_setting_or_named_with_its_reason():
    plans = leaderboard.plan(list(settings.SETTINGS), list(settings.METHODS), steps=None)
    for setting, (configs, absent) in plans.items():
        assert set(configs) | set(absent) == set(settings.METHODS), setting
        assert not set(configs) & set(absent)
        assert all(len(reason) > 40 for reason in absent.values()), absent
    # closed_form solves a two-layer ReLU network under the square loss: the regression setting
    assert "closed_form" in plans["regression"][0]
    assert "square loss" in plans["mlp_digits"][1]["closed_form"]
    assert "closed_form" in plans["mlp_digits"][1] and "closed_form" in plans["cnn_digits"][1]
    # every rule of the registry trains at least one setting
    assert set(rules.RULES) <= {m for configs, _ in plans.values() for m in configs}


@pytest.mark.parametrize("method", settings.METHODS)
def test_every_method_is_tuned_on_the_same_number_of_points(method):
    """The learning rates times the rule's main option (two values), refined to GRID_SIZE
    points where a rule has fewer keys: no rule gets a finer or coarser search."""
    setting = "regression" if method == "closed_form" else "mlp_digits"
    config = settings.get_config(f"method={method},setting={setting}")
    specs = tune.applicable(config, leaderboard.search_specs(method, config))
    rule = leaderboard.CONTROL_SEARCH.get(method, config.rule.name)
    assert len(specs) == (1 if rules.RULES[rule].uses_optimizer(config.rule) else 0) + len(
        rules.RULES[rule].search
    )
    for spec in rules.RULES[rule].search:
        assert len(sweep.parse_values(spec.partition("=")[0], spec.partition("=")[2])) == 2
    axes = [sweep.parse_axis(config, s, 0, "--tune") for s in specs]
    grid = sweep.points(tune.refine(axes, leaderboard.GRID_SIZE))[1]
    assert len(grid) == leaderboard.GRID_SIZE, (method, grid)


def test_kp_and_its_backprop_control_search_the_same_decays():
    kp = settings.get_config("method=kp")
    control = settings.get_config("method=backprop_decay")
    assert control.rule.name == "backprop" and control.rule.weight_decay == kp.rule.weight_decay
    assert leaderboard.search_specs("backprop_decay", control) == leaderboard.search_specs("kp", kp)


def test_ranks_tie_where_intervals_overlap():
    s = {
        "a": report.stats([0.90, 0.91, 0.92]),  # [0.875, 0.945]
        "b": report.stats([0.89, 0.90, 0.91]),  # overlaps a
        "c": report.stats([0.50, 0.51, 0.52]),  # below both
    }
    assert leaderboard.ranks(s, higher_better=True) == {"a": 1, "b": 1, "c": 3}
    assert leaderboard.ranks(s, higher_better=False) == {"a": 2, "b": 2, "c": 1}


def test_bad_settings_and_methods_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"--settings \['mlp_cifar'\]: valid choices: mlp_dig"):
        leaderboard.chosen(["mlp_cifar"], [])
    with pytest.raises(ValueError, match=r"--methods \['sgd'\]: valid choices: backprop"):
        leaderboard.chosen([], ["sgd"])
    with pytest.raises(ValueError, match="--methods must include backprop"):
        leaderboard.plan(["regression"], ["fa"], steps=None)
    assert leaderboard.chosen([], []) == (list(settings.SETTINGS), list(settings.METHODS))


@pytest.mark.slow
def test_leaderboard_binary_end_to_end_and_resumes(tmp_path):
    """Three budgets from one run per method; backprop's spend is every method's; a rerun
    finds every part saved and trains nothing."""
    flags = (
        "--settings=mlp_digits", "--methods=backprop,dfa", "--steps=6", "--seeds=2",
        "--tune_seeds=1", f"--workdir={tmp_path}",
    )  # fmt: skip
    done = run_module("experiments.leaderboard", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "leaderboard.json").read_text())
    methods = document["results"]["mlp_digits"]["methods"]
    bp, dfa = methods["backprop"], methods["dfa"]
    assert bp["steps"] == {"steps": 6, "passes": 6, "seconds": 6}
    # dfa's step costs 2 passes against backprop's 3: 9 steps for backprop's 18 passes
    assert dfa["forward_passes"] == 2 and dfa["steps"]["passes"] == 9
    assert dfa["steps"]["steps"] == 6
    assert [c["step"] for c in dfa["curves"]][-1] == max(dfa["steps"].values())
    for budget, steps in dfa["steps"].items():
        assert dfa["final"][budget]["step"] == steps
    assert len(bp["tuned"]["grid"]) == len(dfa["tuned"]["grid"]) == leaderboard.GRID_SIZE
    assert all(len(v) == 1 for v in dfa["tuned"]["figures"]["val_accuracy"])  # 1 tuning seed
    assert np.asarray(dfa["final"]["steps"]["test_accuracy"]).shape == (2,)
    table = (tmp_path / "leaderboard.md").read_text()
    assert "equal forward passes: every method gets 1152 sample forward passes" in table
    assert "| rank | method |" in table and "minus backprop" in table
    assert (tmp_path / "leaderboard_mlp_digits.png").exists()
    parts = sorted((tmp_path / "leaderboard_parts" / "mlp_digits").glob("*.json"))
    assert [p.name for p in parts] == [
        "run_backprop.json", "run_dfa.json", "times.json", "tune_backprop.json", "tune_dfa.json",
    ]  # fmt: skip
    stamps = [p.stat().st_mtime_ns for p in parts]
    # run again (in this process, as main runs it): every part is found, nothing is redone
    configs = leaderboard.plan(["mlp_digits"], ["backprop", "dfa"], steps=6)["mlp_digits"][0]
    saved = leaderboard.Parts(tmp_path / "leaderboard_parts")
    times = leaderboard.time_setting(saved, "mlp_digits", configs, 2)
    again = leaderboard.run_setting(saved, "mlp_digits", configs, times, seeds=2, tune_seeds=1)
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(methods))
    record = report.read(tmp_path / "leaderboard.json")  # --rewrite: the same table again
    provenance = record.pop("provenance")
    leaderboard.write(tmp_path, "again", record, provenance)
    assert (tmp_path / "again.md").read_text() == (tmp_path / "leaderboard.md").read_text()


def _fake(accuracies, steps=300):
    budgets = ("steps", "passes", "seconds")
    return {
        "final": {b: {"test_accuracy": list(accuracies), "step": steps} for b in budgets},
        "steps": dict.fromkeys(budgets, steps),
        "forward_passes": 3.0,
        "batch_size": 64,
        "time_per_step_s": 1e-3,
        "tuned": {"chosen": {"optimizer.learning_rate": 1e-3}},
    }


def test_kp_is_set_against_its_control_paired():
    """The table says what kp adds beyond its weight decay: kp minus backprop_decay, paired."""
    entry = {
        "description": "x",
        "absent": {"closed_form": "needs the square loss (the reason given)"},
        "methods": {
            "backprop": _fake([0.90, 0.92, 0.94]),
            "kp": _fake([0.80, 0.83, 0.86]),
            "backprop_decay": _fake([0.90, 0.92, 0.94]),
        },
    }
    table = leaderboard.setting_table("s", entry)
    line = next(x for x in table.splitlines() if x.startswith("| kp | backprop_decay |"))
    assert line.count("-9.0 [-11.5, -6.5]") == 3  # -9 points (std 1) at each budget, 3 seeds
    assert "- closed_form: needs the square loss" in table
