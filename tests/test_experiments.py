"""Experiment configs and the comparison binaries on tiny settings."""

import pytest
from conftest import tiny_config

from altlearn import config as config_lib
from altlearn.train import Experiment
from experiments import compare
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


def test_compare_trains_exactly_the_steps_asked_and_tabulates():
    config = tiny_config("node_perturbation", steps=4, eval_every=2)
    config.rule.num_noise_samples = 1
    compare.set_steps(config, seeds=2, steps=300)  # not rounded to a multiple of eval_every
    assert (config.steps, config.eval_every) == (300, 15)  # 20 evaluations: a curve
    compare.set_steps(config, seeds=2, steps=5, eval_every=2)
    result = compare.run_one(config, seeds=2)
    assert [c["step"] for c in result["curves"]] == [0, 2, 4, 5]  # a last, shorter chunk
    assert result["steps"] == 5 and len(result["final"]["test_accuracy"]) == 2
    assert result["forward_passes"] == 2  # clean pass + one noisy pass (np's RuleSpec.cost)
    text = compare.table({"digits": {"np": result}}, seeds=2)
    assert "| np |" in text and "2 seeds" in text and "| 5 |" in text
    compare.set_steps(config, seeds=2, budget_forward_passes=51)  # 25 steps of 2 passes
    assert (config.steps, config.eval_every) == (25, 2)


def test_tuning_chooses_by_validation_on_tuning_seeds_and_skips_keys_a_method_lacks():
    """compare's --tune: the grid of the keys a config has, one vmapped program on tuning seeds
    1000.., the point with the lowest mean final validation loss set in the config; a key no
    method has is refused naming the sweepable ones."""
    config = tiny_config("node_perturbation", steps=6, eval_every=6)
    config.rule.num_noise_samples = 1
    specs = ["optimizer.learning_rate=[1e-6,1e-2]", "rule.sigma=[1e-2]"]
    tuned = compare.tune(config, specs, seeds=2)
    assert len(tuned["grid"]) == 2 and tuned["tuning_seeds"] == [1000, 1001]
    assert tuned["chosen"] == {"optimizer.learning_rate": 1e-2, "rule.sigma": 1e-2}
    assert tuned["mean_val_loss"][1] < tuned["mean_val_loss"][0]  # lr 1e-6 barely moves
    assert config.optimizer.learning_rate == 1e-2
    config.optimizer.learning_rate = 1e-6
    by_accuracy = compare.tune(config, specs, seeds=2, by="val_accuracy")
    assert by_accuracy["chosen"] == tuned["chosen"] and by_accuracy["by"] == "val_accuracy"
    assert by_accuracy["mean_val_accuracy"][1] > by_accuracy["mean_val_accuracy"][0]
    with pytest.raises(ValueError, match="--tune_by=test_accuracy: valid choices: val_loss, val_"):
        compare.tune(config, specs, seeds=1, by="test_accuracy")
    backprop = tiny_config("backprop", steps=6, eval_every=6)
    assert compare.tune(backprop, ["rule.sigma=[1e-2]"], seeds=1) is None  # bp has no sigma
    with pytest.raises(ValueError, match="'rule.sgima' is no method's sweepable float"):
        compare.tune_keys({"np": config, "bp": backprop}, ["rule.sgima=[1]"])


def test_population_config_and_generated_rice_table(tmp_path):
    from altlearn.data import load_dataset
    from experiments import make_table
    from experiments.configs import population

    path = make_table.write_table(tmp_path / "rice_like.csv", rows=200)
    data = load_dataset(f"csv:{path}")
    assert data.task == "classification" and data.num_outputs == 2
    assert data.x_train.shape[1] == 7
    for method in population.METHODS:
        config = population.get_config(f"method={method},data=csv:{path}")
        assert config.model.widths == (16,)
    with pytest.raises(ValueError, match="valid choices: bp, pso"):
        population.get_config("method=cma")


def test_closed_form_compare_on_a_tiny_run(monkeypatch):
    """closed_form and the Adam baselines (gd and sgd run the same code), the lr grid in one
    vmapped program, the tables and the reach analysis."""
    import jax

    from altlearn.data import load_dataset
    from experiments import closed_form_compare as cfc
    from experiments.configs import closed_form

    with pytest.raises(ValueError, match="valid choices: closed_form, gd"):
        closed_form.get_config("method=lbfgs")
    data = load_dataset("wine")
    with jax.enable_x64(True):
        result = {"closed_form": cfc.run_closed_form(data, width=8, seeds=2, alternations=3)}
        assert result["closed_form"]["dtype"] == "float64"
    monkeypatch.setattr(cfc, "BASELINES", ("adam_full", "adam"))
    for method in cfc.BASELINES:
        result[method] = cfc.run_baseline(method, data, 8, 2, 20, [1e-3, 1e-2], 4)
        assert result[method]["best_lr"] in (1e-3, 1e-2)
        assert len(result[method]["train_loss"]) == 2  # seeds
    runs = result["closed_form"]["runs"]
    assert all(len(r["train_loss"]) == 4 and r["time_s"][-1] > 0 for r in runs)
    assert all(b <= a for r in runs for a, b in zip(r["train_loss"][1:], r["train_loss"][2:]))
    result["reach"] = cfc.reach_analysis(result)
    text = cfc.summarise({"wine": result})
    assert "| closed_form (float64) |" in text and "Adam's best training loss" in text
