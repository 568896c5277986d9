"""Conformance over the rule registry, on its entries as shipped: every rule declares a positive
cost and known data splits, jits, scans, vmaps, and learns a small problem with its DEFAULT
options (and, where its setup tunes options, with those too).

A rule added to ``RULES`` without an entry in ``SETUPS`` fails ``test_every_rule_has_a_setup``,
so no rule escapes these tests.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_program, tiny_config

from altlearn import models
from altlearn.rules import NEEDS, RULES, SPLITS, Sizes, options_of, resolve
from altlearn.train import Experiment, make_train

# rule -> settings on the tiny problem (digits, MLP 64-32-10, batch 64, Adam 1e-2):
#   problem: what the rule needs of the problem itself (loss, model, batch), never a rule
#     option; every test uses it;
#   defaults: the budget (steps) and bounds (max_train_loss, min_test_accuracy) the rule must
#     pass with its default options; measured over 4 keys, the numbers in the comments;
#   overrides: options for the jit, retrace and vmap tests and the tuned learning test;
#   sweep: (hyperparameter, two values) for the vmap test;
#   mechanics: options only for the jit, retrace and vmap tests, which check structure, not
#     learning (one noise sample instead of the default 16 keeps them fast);
#   tuned: where ``overrides`` set rule options, the budget and bounds of the learning test
#     with them (rules without one are tested learning with their defaults only).
SETUPS = {
    "backprop": dict(
        overrides={},
        # train loss 0.07-0.10, test accuracy 0.94-0.96
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.9),
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "node_perturbation": dict(
        mechanics={"rule.num_noise_samples": 1},
        overrides={"rule.sigma": 1e-2, "optimizer.learning_rate": 3e-3},
        # train loss 0.30-0.41, test accuracy 0.85-0.91
        defaults=dict(steps=150, max_train_loss=0.8, min_test_accuracy=0.75),
        tuned=dict(steps=300, max_train_loss=0.7, min_test_accuracy=0.80),
        sweep=("rule.sigma", (1e-2, 3e-2)),
    ),
    "weight_perturbation": dict(
        mechanics={"rule.num_noise_samples": 1},
        overrides={"rule.sigma": 1e-2, "optimizer.learning_rate": 3e-3},
        # train loss 0.43-0.66, test accuracy 0.81-0.88
        defaults=dict(steps=200, max_train_loss=1.0, min_test_accuracy=0.7),
        tuned=dict(steps=400, max_train_loss=1.2, min_test_accuracy=0.60),
        sweep=("rule.sigma", (1e-2, 3e-2)),
    ),
    "evolution": dict(
        overrides={
            "rule.strategy_params": {"std_init": 0.05},
            "optimizer.learning_rate": 1e-2,
        },
        # train loss 0.28-0.35, test accuracy 0.89-0.90
        defaults=dict(steps=150, max_train_loss=0.7, min_test_accuracy=0.8),
        tuned=dict(steps=300, max_train_loss=0.4, min_test_accuracy=0.85),
        sweep=("rule.strategy_params.std_init", (0.02, 0.05)),
    ),
    "pso": dict(
        overrides={},
        # train loss 0.73-0.95, test accuracy 0.71-0.75
        defaults=dict(steps=100, max_train_loss=1.5, min_test_accuracy=0.5),
        sweep=("rule.inertia", (0.5, 0.729)),
    ),
    "neuron_pso": dict(
        overrides={},
        # train loss 0.23-0.31, test accuracy 0.88-0.92
        defaults=dict(steps=50, max_train_loss=0.6, min_test_accuracy=0.8),
        sweep=("rule.inertia", (0.5, 0.729)),
    ),
    "forward_gradient": dict(
        mechanics={"rule.num_noise_samples": 1},
        overrides={"optimizer.learning_rate": 3e-3},
        # train loss 0.38-0.60, test accuracy 0.83-0.89
        defaults=dict(steps=200, max_train_loss=1.0, min_test_accuracy=0.7),
        sweep=("optimizer.learning_rate", (1e-3, 3e-3)),
    ),
    "persistent": dict(
        # Three restarts of 50 steps (with its default 1000-step iterations a short run is only
        # iteration 0, plain backprop), so the penalty and the restarts are exercised.
        overrides={"rule.iteration_steps": 3},
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.9),
        sweep=("rule.strength", (0.0, 10.0)),
    ),
    "hybrid": dict(
        # A phase every 20 steps (the default, 100, would not come in a short run); in the
        # mechanics tests every 2 steps with small populations.
        mechanics={"rule.es_every": 2, "rule.population_size": 2, "rule.val_size": 32},
        overrides={"rule.es_every": 20},
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.9),
        tuned=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.9),
        sweep=("rule.noise_scale", (0.0, 0.05)),
    ),
    # The feedback-alignment family and PEPITA.
    "fa": dict(
        overrides={},
        # train loss 0.22-0.26, test accuracy 0.90-0.92
        defaults=dict(steps=100, max_train_loss=0.45, min_test_accuracy=0.85),
        # (under Adam the feedback's scale hardly matters: a factor per layer)
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "dfa": dict(
        overrides={},
        # train loss 0.19-0.23, test accuracy 0.91-0.92
        defaults=dict(steps=100, max_train_loss=0.45, min_test_accuracy=0.85),
        # (under Adam the feedback's scale hardly matters: a factor per layer)
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "usf": dict(
        overrides={},
        # train loss 0.08-0.10, test accuracy 0.95-0.96
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.9),
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "brsf": dict(
        overrides={},
        # train loss 0.12-0.13, test accuracy 0.93-0.95
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.88),
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "frsf": dict(
        overrides={},
        # train loss 0.11-0.11, test accuracy 0.94-0.96
        defaults=dict(steps=100, max_train_loss=0.3, min_test_accuracy=0.88),
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "kp": dict(
        overrides={},
        # train loss 0.20-0.21, test accuracy 0.92-0.93
        defaults=dict(steps=100, max_train_loss=0.45, min_test_accuracy=0.85),
        sweep=("rule.weight_decay", (1e-4, 1e-2)),
    ),
    "pepita": dict(
        overrides={},
        # train loss 0.26-0.37, test accuracy 0.85-0.89
        defaults=dict(steps=100, max_train_loss=0.6, min_test_accuracy=0.78),
        sweep=("rule.feedback_scale", (0.05, 0.1)),
    ),
    "closed_form": dict(
        # In 64-bit mode, as the binaries run it (float32 solves: tests/test_closed_form.py).
        x64=True,
        # Its defaults need the square loss and one hidden layer; full batch, as designed.
        problem={"loss": "squared_error", "batch_size": 100_000, "model.widths": (16,)},
        overrides={},
        # train loss 0.05-0.08, test accuracy 0.95-0.97
        defaults=dict(steps=8, max_train_loss=0.1, min_test_accuracy=0.9),
        sweep=("rule.ridge", (1e-4, 1e-2)),
    ),
}

RULE_NAMES = sorted(RULES)
TUNED = sorted(name for name in RULES if "tuned" in SETUPS.get(name, {}))


def _config(rule, steps=6, mechanics=True):
    """The tiny problem (with the rule's ``problem``) and the rule's ``overrides`` (and, for
    the tests of mechanics, its ``mechanics``)."""
    setup = SETUPS[rule]
    overrides = {**setup["overrides"], **(setup.get("mechanics", {}) if mechanics else {})}
    return tiny_config(rule, steps=steps, **setup.get("problem", {}), **overrides)


def _defaults_config(rule):
    """The tiny problem (with the rule's ``problem``) and every rule option at its default."""
    setup = SETUPS[rule]
    return tiny_config(rule, steps=setup["defaults"]["steps"], **setup.get("problem", {}))


def _tiny_model():
    """The tiny problem's model (digits, 8x8x1 inputs and 10 classes; MLP 64-32-10)."""
    config = tiny_config()
    options = {k: v for k, v in config.model.items() if k != "name"}
    return models.make_model(config.model.name, (8, 8, 1), 10, **options)


@pytest.fixture(autouse=True)
def _precision(request):
    """JAX's 64-bit mode for the rules whose setup asks for it (as ``configure_jax`` does)."""
    callspec = getattr(request.node, "callspec", None)
    rule = callspec.params.get("rule") if callspec else None
    with jax.enable_x64(bool(rule and SETUPS.get(rule, {}).get("x64", False))):
        yield


def test_every_rule_has_a_setup():
    assert set(SETUPS) == set(RULES)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_every_rule_declares_a_positive_cost(rule):
    """``RuleSpec.cost``: forward-pass equivalents per step with the default options, which
    equal-compute comparisons divide by."""
    cost = resolve({"name": rule}).cost(_tiny_model(), Sizes(64, 1437, 160))
    assert isinstance(cost, float) and math.isfinite(cost) and cost > 0, cost


def test_declared_needs_are_known():
    """Every ``RuleSpec.needs`` names only what a rule may ask for (a layered model, the train
    and val splits); the test split is never one of them."""
    assert "test" not in SPLITS
    for name, spec in RULES.items():
        assert isinstance(spec.needs, tuple), name
        assert set(spec.needs) <= set(NEEDS), (name, spec.needs)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_uses_optimizer_says_what_the_rule_does(rule):
    """``RuleSpec.uses_optimizer``: a rule that says it applies the optimizer calls its update in
    a step; one that says it does not, never (else a sweep or tuner would vary a key the rule
    never reads, or skip one it does). Traced, not compiled."""
    experiment = Experiment(_config(rule, steps=2))
    adam, updates = optax.adam(1e-3), []

    def update(*args, **kwargs):
        updates.append(1)
        return adam.update(*args, **kwargs)

    spy = optax.GradientTransformation(adam.init, update)
    built = experiment.rule(experiment.model, experiment.task, spy, experiment.rule_data)
    batch = (experiment.x_train[:8], experiment.y_train[:8])

    def step(key):
        variables = experiment.model.init(key, batch[0][:1])
        return built.step(key, variables, built.init(key, variables), batch)

    jax.eval_shape(step, jax.random.PRNGKey(0))
    assert bool(updates) == experiment.rule.uses_optimizer, (rule, len(updates))


def test_every_rule_traces_in_64_bit_mode():
    """A run beside closed_form in one process has JAX's 64-bit mode on: every rule's program
    still traces (its loop carries keep their dtypes: a float64 zero where the step writes
    float32 fails here). Traced, not compiled, to stay cheap."""
    with jax.enable_x64(True):
        for rule in RULE_NAMES:
            train = make_train(_config(rule, steps=2))
            jax.jit(train).lower(jax.random.PRNGKey(0), None)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_jit_scan_keep_state_structure_and_never_retrace(rule):
    """The rule's step traces once however often it is called; a jitted chunk of steps (one
    ``lax.scan``) keeps the state's structure, shapes and dtypes, traces once over three calls
    and counts its steps."""
    experiment = Experiment(_config(rule))
    state = experiment.init(jax.random.PRNGKey(0))
    rule_fn = experiment.build_rule(experiment.default_hparams)
    traces = 0

    def step(key, variables, rule_state, batch):
        nonlocal traces
        traces += 1
        return rule_fn.step(key, variables, rule_state, batch)

    step = jax.jit(step)
    variables, rule_state = state.variables, state.rule_state
    for i in range(3):
        batch = (experiment.x_train[i * 8 : (i + 1) * 8], experiment.y_train[i * 8 : (i + 1) * 8])
        variables, rule_state, _ = step(jax.random.PRNGKey(i), variables, rule_state, batch)
    assert traces == 1

    chunk_traces = 0

    def chunk(s):
        nonlocal chunk_traces
        chunk_traces += 1
        return experiment.train_steps(s, 2)

    chunk = jax.jit(chunk)
    first = state
    for _ in range(3):
        state, metrics = chunk(state)
        assert jax.tree.structure(state) == jax.tree.structure(first)
        chex.assert_trees_all_equal_shapes_and_dtypes(state, first)
        assert metrics["loss"].shape == (2,) and np.all(np.isfinite(metrics["loss"]))
    assert chunk_traces == 1
    assert int(state.step) == 6


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_vmap_over_seeds_and_a_numeric_hyperparameter_keeps_members_apart(rule):
    """One program trains (key a, h0), (key a, h1), (key b, h1): members 0 and 1 differ only in
    the hyperparameter, 1 and 2 only in the seed; member 2 equals (key b, h1) trained with no
    other member beside it (the same program, every member alike): nothing leaks between
    members. (A member against its unbatched run: tests/test_engine.py.)"""
    name, (h0, h1) = SETUPS[rule]["sweep"]
    train = make_train(_config(rule))
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    keys = jnp.stack([key_a, key_a, key_b])
    values = jnp.array([h0, h1, h1])
    program = jax.jit(jax.vmap(train))  # compiled once, for three members
    _, batched = program(keys, {name: values})
    _, alone = program(jnp.stack([key_b] * 3), {name: jnp.full(3, h1)})
    single = jax.tree.map(lambda a: a[0], alone)  # (key b, h1) with no other member beside it
    np.testing.assert_allclose(
        batched["train_loss_running"][2], single["train_loss_running"], rtol=1e-4
    )
    np.testing.assert_allclose(batched["train_loss"][2], single["train_loss"], rtol=1e-4)
    final = np.asarray(batched["train_loss"][:, -1])
    assert len(set(np.round(final, 6))) == 3, "seeds and hyperparameter values must matter"


@pytest.mark.slow
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_default_options_learn_on_a_small_problem(rule):
    """With no rule option set, the loss falls from its start to below the bound in the
    budget, stays finite, and the test accuracy clears its bound."""
    bounds = SETUPS[rule]["defaults"]
    config = _defaults_config(rule)
    assert config.rule.to_dict() == {"name": rule, **options_of(rule)}
    curves = run_program(config, eval_at=[5])
    first_losses = float(curves["train_loss_running"][1])  # the mean of steps 1-5
    train_loss = float(curves["train_loss"][-1])
    test_accuracy = float(curves["test_accuracy"][-1])
    assert np.all(np.isfinite(curves["train_loss_running"][1:]))
    assert train_loss < bounds["max_train_loss"] < first_losses, (first_losses, train_loss)
    assert test_accuracy > bounds["min_test_accuracy"], test_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("rule", TUNED)
def test_learns_on_a_small_problem_with_tuned_options(rule):
    bounds = SETUPS[rule]["tuned"]
    curves = run_program(_config(rule, steps=bounds["steps"], mechanics=False), eval_at=[5])
    first_losses = float(curves["train_loss_running"][1])  # the mean of steps 1-5
    train_loss = float(curves["train_loss"][-1])
    test_accuracy = float(curves["test_accuracy"][-1])
    assert train_loss < bounds["max_train_loss"] < first_losses, (first_losses, train_loss)
    assert test_accuracy > bounds["min_test_accuracy"], test_accuracy
