"""The training loop: batches, chunking, evaluation, hyperparameters, and backprop's numbers."""

import jax
import numpy as np
import pytest
from conftest import run_program, tiny_config

from altlearn import config as config_lib
from altlearn.train import Experiment


@pytest.fixture(scope="module")
def experiment():
    return Experiment(tiny_config(steps=10))


def test_each_epoch_visits_every_training_sample_once(experiment):
    spe, bs = experiment.steps_per_epoch, experiment.batch_size
    perms = experiment.epoch_permutations(jax.random.PRNGKey(0), 0, 2)
    for perm in np.asarray(perms):
        assert sorted(perm.tolist()) == list(range(experiment.num_train))
    assert not np.array_equal(perms[0], perms[1])
    assert spe == experiment.num_train // bs


def test_chunking_does_not_change_the_run(experiment):
    state = experiment.init(jax.random.PRNGKey(0))
    run = jax.jit(experiment.train_steps, static_argnums=1)
    whole, whole_metrics = run(state, 50)  # crosses an epoch boundary (spe = 20)
    part, m1 = run(state, 17)
    part, m2 = run(part, 33)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole_metrics["loss"], np.concatenate([m1["loss"], m2["loss"]]))


def test_evaluate_matches_a_direct_computation(experiment):
    state = experiment.init(jax.random.PRNGKey(0))
    metrics = jax.jit(experiment.evaluate)(state)
    ds = experiment.dataset
    out = experiment.model.apply(state.variables, ds.x_test)
    loss = experiment.task.loss(out, ds.y_test).mean()
    accuracy = (np.argmax(out, -1) == ds.y_test).mean()
    np.testing.assert_allclose(metrics["test_loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["test_accuracy"], accuracy, rtol=1e-6)
    splits = {f"{s}_{m}" for s in ("train", "val", "test") for m in ("loss", "accuracy")}
    assert splits <= set(metrics)
    np.testing.assert_allclose(metrics["grad_cosine"], 1.0, rtol=1e-5)  # backprop is exact
    assert {"grad_cosine/layer_0", "grad_cosine/layer_1"} <= set(metrics)


def test_rules_are_offered_the_training_and_validation_splits_never_the_test_split(experiment):
    """The data a RuleSpec may declare (RuleSpec.splits) are whole splits on the device."""
    from altlearn import rules

    assert set(experiment.rule_data) == set(rules.SPLITS) == {"train", "val"}
    ds = experiment.dataset
    for split, (x, y) in {"train": (ds.x_train, ds.y_train), "val": (ds.x_val, ds.y_val)}.items():
        np.testing.assert_array_equal(experiment.rule_data[split][0], x)
        np.testing.assert_array_equal(experiment.rule_data[split][1], y)
    assert ds.x_val.shape[0] > 0


def test_hyperparameters_are_the_floats_of_rule_and_optimizer():
    hp = config_lib.hparams(tiny_config())
    assert hp == {
        "rule.decorrelation_rate": 1e-3,
        "rule.weight_decay": 0.0,
        "optimizer.learning_rate": 1e-2,
        "optimizer.momentum": 0.9,
        "optimizer.weight_decay": 1e-4,
    }


def test_unknown_hyperparameter_is_an_error(experiment):
    with pytest.raises(ValueError, match="sweepable ones for this config: optimizer.learning_rate"):
        experiment.init(jax.random.PRNGKey(0), {"rule.sigma": 0.1})


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"rule.name": "hebbian"}, "valid choices: backprop"),
        ({"data.name": "imagenet"}, "valid choices: mnist1d, digits"),
        ({"optimizer.name": "lion"}, "valid choices: sgd, momentum, nesterov, adam, adamw"),
        ({"optimizer.schedule": "step"}, "valid choices: constant, cosine"),
        ({"loss": "hinge"}, "valid choices: auto, cross_entropy, squared_error"),
        ({"batch_size": 0}, "positive integer"),
        ({"optimizer.learning_rate": -1.0}, "must be > 0"),
        ({"model.depth": 3}, "valid keys: activation, decorrelation, init_scale, intrinsic"),
    ],
)
def test_bad_config_names_the_valid_choices(overrides, match):
    config = tiny_config()
    config.unlock()  # a locked config from the binary refuses new keys earlier, by itself
    for key, value in overrides.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=match):
        Experiment(config)


def test_model_that_cannot_take_the_data_is_refused_before_training():
    config = config_lib.base_config(model="cnn", data="iris")
    with pytest.raises(ValueError, match="1-D signal"):
        Experiment(config)


def test_rule_needing_layers_refuses_a_flax_model():
    from altlearn import losses, models, rules

    model = models.make_model("resnet", (8, 1), 2)
    with pytest.raises(ValueError, match="needs a layered model"):
        rules.make_rule("node_perturbation", model, losses.make_task("classification"), None)


@pytest.mark.slow
def test_backprop_reaches_96_percent_on_digits(optimized):
    from experiments.configs import digits

    metrics = run_program(digits.get_config(), 0, eval_at=())
    assert float(metrics["test_accuracy"][-1]) >= 0.96


@pytest.mark.slow
def test_backprop_reaches_60_percent_on_mnist1d(optimized):
    from experiments.configs import default

    metrics = run_program(default.get_config(), 0, eval_at=())
    assert float(metrics["test_accuracy"][-1]) >= 0.60
