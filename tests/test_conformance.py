"""Conformance over the rule registry: every rule jits, scans, vmaps and learns.

A rule added to ``RULES`` without an entry in ``SETUPS`` fails ``test_every_rule_has_a_setup``,
so no rule escapes these tests.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from altlearn.rules import RULES
from altlearn.train import Experiment, make_train

# rule -> settings on the tiny problem (digits, MLP 64-32-10):
#   overrides: config overrides; steps: the budget for the learning test;
#   max_train_loss / min_test_accuracy: the bounds the rule must pass within that budget;
#   sweep: (hyperparameter, two values) for the vmap test;
#   learning_overrides: extra overrides for the learning test only.
SETUPS = {
    "backprop": dict(
        overrides={"optimizer.learning_rate": 1e-2},
        steps=200,
        max_train_loss=0.15,
        min_test_accuracy=0.92,
        sweep=("optimizer.learning_rate", (1e-3, 1e-2)),
    ),
    "node_perturbation": dict(
        overrides={"rule.sigma": 1e-2, "optimizer.learning_rate": 3e-3},
        steps=300,
        max_train_loss=0.7,
        min_test_accuracy=0.80,
        sweep=("rule.sigma", (1e-2, 3e-2)),
    ),
    "weight_perturbation": dict(
        overrides={"rule.sigma": 1e-2, "optimizer.learning_rate": 3e-3},
        learning_overrides={"rule.num_noise_samples": 16},
        steps=400,
        max_train_loss=1.2,
        min_test_accuracy=0.60,
        sweep=("rule.sigma", (1e-2, 3e-2)),
    ),
    "evolution": dict(
        overrides={
            "rule.population_size": 64,
            "rule.strategy_params": {"std_init": 0.05},
            "optimizer.learning_rate": 1e-2,
        },
        steps=300,
        max_train_loss=0.4,
        min_test_accuracy=0.85,
        sweep=("rule.strategy_params.std_init", (0.02, 0.05)),
    ),
    "pso": dict(
        overrides={"rule.velocity_clamp": 0.1},
        steps=200,
        max_train_loss=0.7,
        min_test_accuracy=0.7,
        sweep=("rule.inertia", (0.5, 0.729)),
    ),
    "neuron_pso": dict(
        overrides={"rule.velocity_clamp": 0.1},
        steps=100,
        max_train_loss=0.3,
        min_test_accuracy=0.85,
        sweep=("rule.inertia", (0.5, 0.729)),
    ),
    "forward_gradient": dict(
        overrides={"optimizer.learning_rate": 3e-3},
        learning_overrides={"rule.num_noise_samples": 16},
        steps=400,
        max_train_loss=1.2,
        min_test_accuracy=0.60,
        sweep=("optimizer.learning_rate", (1e-3, 3e-3)),
    ),
    "closed_form": dict(
        # In 64-bit mode, as the binaries run it (float32 solves: tests/test_closed_form.py).
        # Full batch, as the rule is designed for.
        x64=True,
        overrides={"loss": "squared_error", "batch_size": 100_000, "model.widths": (16,)},
        steps=8,
        max_train_loss=0.1,
        min_test_accuracy=0.9,
        sweep=("rule.ridge", (1e-4, 1e-2)),
    ),
}

RULE_NAMES = sorted(RULES)


def _config(rule, steps=6, **extra):
    return tiny_config(rule, steps=steps, **{**SETUPS[rule]["overrides"], **extra})


def _learning_config(rule):
    setup = SETUPS[rule]
    return _config(rule, steps=setup["steps"], **setup.get("learning_overrides", {}))


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
def test_jit_and_scan_keep_state_structure(rule):
    experiment = Experiment(_config(rule))
    state = experiment.init(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(experiment.train_steps, static_argnums=1)(state, 3)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert metrics["loss"].shape == (3,)
    assert int(new_state.step) == 3
    assert np.all(np.isfinite(metrics["loss"]))


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_no_retrace_per_step(rule):
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
    for _ in range(3):
        state, _ = chunk(state)
    assert chunk_traces == 1
    assert int(state.step) == 6


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_vmap_over_seeds_and_a_numeric_hyperparameter_matches_single_runs(rule):
    """One program trains (key a, h0), (key a, h1), (key b, h1): members 0 and 1 differ only in
    the hyperparameter, 1 and 2 only in the seed; a member equals its own unbatched run."""
    name, (h0, h1) = SETUPS[rule]["sweep"]
    train = make_train(_config(rule))
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    keys = jnp.stack([key_a, key_a, key_b])
    values = jnp.array([h0, h1, h1])
    _, batched = jax.jit(jax.vmap(train))(keys, {name: values})
    _, single = jax.jit(train)(keys[2], {name: h1})
    np.testing.assert_allclose(batched["step"]["loss"][2], single["step"]["loss"], rtol=1e-4)
    np.testing.assert_allclose(
        batched["eval"]["train_loss"][2], single["eval"]["train_loss"], rtol=1e-4
    )
    final = np.asarray(batched["eval"]["train_loss"])
    assert len(set(np.round(final, 6))) == 3, "seeds and hyperparameter values must matter"


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_learns_on_a_small_problem(rule):
    setup = SETUPS[rule]
    train = make_train(_learning_config(rule))
    _, metrics = jax.jit(train)(jax.random.PRNGKey(0))
    first_losses = float(np.mean(metrics["step"]["loss"][:5]))
    train_loss = float(metrics["eval"]["train_loss"])
    test_accuracy = float(metrics["eval"]["test_accuracy"])
    assert train_loss < setup["max_train_loss"] < first_losses, (first_losses, train_loss)
    assert test_accuracy > setup["min_test_accuracy"], test_accuracy
