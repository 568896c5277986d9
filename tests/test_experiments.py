"""Experiment configs and the comparison / benchmark binaries on tiny settings."""

import pytest
from conftest import tiny_config

from altlearn import config as config_lib
from altlearn.train import Experiment
from experiments import bench_rules, compare
from experiments.configs import np_family


@pytest.mark.parametrize("method", sorted(np_family.METHODS))
def test_np_family_configs_are_valid_at_both_scales(method):
    cpu = np_family.get_config(f"method={method},data=digits")
    Experiment(cpu)  # validates, loads the data, checks shapes and builds the rule
    paper = np_family.get_config(f"method={method},data=cifar10,scale=paper")
    config_lib.validate(paper)
    assert paper.model.widths == (1024, 1024, 1024) and paper.batch_size == 1000
    assert cpu.model.decorrelation == method.startswith("d")


def test_np_family_variant_errors():
    with pytest.raises(ValueError, match="valid choices: bp, dbp, np"):
        np_family.get_config("method=xnp")
    with pytest.raises(ValueError, match="keys: method, data"):
        np_family.get_config("optimiser=adam")


def test_compare_runs_seeds_in_one_program_and_tabulates():
    config = tiny_config("node_perturbation", steps=4, eval_every=2)
    result = compare.run_one(config, seeds=2)
    assert [c["step"] for c in result["curves"]] == [0, 2, 4]
    assert len(result["final"]["test_accuracy"]) == 2
    assert result["forward_passes"] == "1 + 1"
    text = compare.table({"digits": {"np": result}}, seeds=2)
    assert "| np |" in text and "2 seeds" in text


def test_bench_rules_measures_ratios():
    configs = {"bp": tiny_config("backprop"), "np": tiny_config("node_perturbation")}
    results = bench_rules.measure(configs, chunk_steps=3, repeats=2)
    assert results["bp"]["ratio_vs_first"] == 1.0
    assert results["np"]["step_ms"] > 0 and results["np"]["compile_s"] > 0
