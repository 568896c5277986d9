"""Persistent neurons (paper 001): restarts from the same start, the penalty pushes away from the
stored end points, partial selection, lambda = 0 is the inner rule, the buffer and the best
iterate, resume in mid-iteration, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat, run_binary, small_problem, step_by_hand, tiny_config

from altlearn import losses, rules, runner

TASK = losses.make_task("classification")
LR = 0.05


@pytest.fixture(scope="module")
def problem():
    return small_problem((8,))


def _persistent(problem, **options):
    model, _, data, _ = problem
    return rules.make_rule("persistent", model, TASK, optax.sgd(LR), data, **options)


def _layer_distance(a, b):
    """The rule's parameter distance: per layer, squared distance over parameter count."""
    total = 0.0
    for name in a:
        da, db = flat(a[name]), flat(b[name])
        total += float(jnp.sum(jnp.square(da - db))) / da.size
    return total**0.5


@pytest.mark.parametrize("penalty", ["gaussian", "inverse", "deflation"])
@pytest.mark.parametrize("distance", ["parameter", "function"])
def test_the_penalty_pushes_away_from_a_stored_end_point(problem, penalty, distance):
    """Iteration 1 starts at theta_0, the stored end point theta*_0 nearby. The penalty's share
    of its first (SGD) step, the step with lambda > 0 minus the same step with lambda = 0, points
    from theta*_0 towards theta_0, i.e. away from the stored solution: a flipped sign of the
    penalty gradient fails this."""
    model, variables, _, batches = problem
    options = dict(num_iterations=2, iteration_steps=3, penalty=penalty, distance=distance)
    options.update(width=0.05, power=1.0)
    after = {}
    for strength in (0.0, 3.0):
        runs = step_by_hand(
            _persistent(problem, strength=strength, **options), variables, batches, 4
        )
        end_point = runs[2][0]["params"]  # the end of iteration 0
        after[strength] = runs[3][0]["params"]  # iteration 1's first step from theta_0
        stored = runs[3][1].train.estimator.ends
        assert int(stored.count) == 1
        jax.tree.map(lambda b, p: np.testing.assert_array_equal(b[0], p), stored.params, end_point)
    push = flat(after[3.0]) - flat(after[0.0])
    away = flat(variables["params"]) - flat(end_point)
    cosine = float(jnp.vdot(push, away) / (jnp.linalg.norm(push) * jnp.linalg.norm(away)))
    assert float(jnp.linalg.norm(push)) > 0
    assert cosine > 0.1, cosine
    assert _layer_distance(after[3.0], end_point) > _layer_distance(after[0.0], end_point)


@pytest.mark.parametrize("penalty", ["gaussian", "inverse"])
@pytest.mark.parametrize(
    "selection", [dict(layers=("layer_1",)), dict(layers=("layer_0",), neurons=(1, 5))]
)
def test_partial_selection_moves_only_the_selected_parameters(problem, penalty, selection):
    """With a partial P the penalty's gradient is zero outside P: the penalised step and the
    plain step differ only in the selected layer (or the selected neurons' weights and bias)."""
    model, variables, _, batches = problem
    options = dict(num_iterations=2, iteration_steps=3, penalty=penalty, width=1.0, **selection)
    steps = {}
    for strength in (0.0, 3.0):
        runs = step_by_hand(
            _persistent(problem, strength=strength, **options), variables, batches, 4
        )
        steps[strength] = runs[3][0]["params"]
    for name in model.layer_names:
        for leaf in ("kernel", "bias"):
            changed = np.asarray(steps[3.0][name][leaf] != steps[0.0][name][leaf])
            if name not in selection["layers"]:
                assert not changed.any(), (name, leaf)
            elif "neurons" in selection:
                units = np.zeros(changed.shape[-1], bool)
                units[list(selection["neurons"])] = True
                assert changed.any(axis=tuple(range(changed.ndim - 1))).tolist() == (
                    units.tolist()
                ), (name, leaf)
            else:
                assert changed.all(), (name, leaf)


@pytest.mark.parametrize("inner", ["backprop", "node_perturbation"])
def test_lambda_zero_is_the_inner_rule_restarted_from_the_same_start(problem, inner):
    """With lambda = 0 every iteration equals a plain run of the inner rule from theta_0 with a
    fresh optimizer on the same batches and keys; the buffer holds those end points, and the
    reported params are the one with the lowest validation loss."""
    model, variables, data, batches = problem
    options = dict(num_iterations=3, iteration_steps=4, strength=0.0, inner=inner)
    runs = step_by_hand(_persistent(problem, **options), variables, batches, 13)
    plain = rules.make_rule(inner, model, TASK, optax.sgd(LR), {})
    key = jax.random.PRNGKey(5)
    ends = []
    for k in range(3):
        v, state = variables, plain.init(jax.random.PRNGKey(1), variables)
        for t in range(4 * k, 4 * k + 4):
            v, state, metrics = jax.jit(plain.step)(
                jax.random.fold_in(key, t), v, state, batches[t % len(batches)]
            )
            np.testing.assert_allclose(runs[t][2]["loss"], metrics["loss"], rtol=1e-6)
        ends.append(v["params"])
        if k < 2:  # the rule's params at the end of iteration k
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                runs[4 * k + 3][0]["params"],
                v["params"],
            )
    final_variables, final_state, _ = runs[11]
    stored = final_state.train.estimator.ends
    assert int(stored.count) == 3
    for i in range(3):
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-7),
            stored.params,
            ends[i],
        )
    val_losses = [float(rules.batch_loss(model, TASK, {"params": p}, data["val"])[0]) for p in ends]
    np.testing.assert_allclose(stored.val_loss, val_losses, rtol=1e-5)
    best = int(np.argmin(val_losses))
    jax.tree.map(np.testing.assert_array_equal, final_variables["params"], ends[best])
    # After the last iteration the best iterate stays.
    jax.tree.map(np.testing.assert_array_equal, runs[12][0]["params"], ends[best])


def test_annealing_brings_lambda_to_zero_over_the_end_of_each_iteration(problem):
    _, variables, _, batches = problem
    rule = _persistent(problem, num_iterations=2, iteration_steps=4, anneal_fraction=0.5)
    strengths = [float(m["strength"]) for _, _, m in step_by_hand(rule, variables, batches, 8)]
    np.testing.assert_allclose(strengths, [1.0, 1.0, 1.0, 0.5] * 2, rtol=1e-6)


@pytest.mark.slow
def test_persistent_learns_and_reports_every_iteration(tmp_path):
    """Through the runner on digits: each iteration learns; summary.json names the best
    iteration by validation loss and holds every iteration's figures and the distances."""
    config = tiny_config("persistent", steps=300, **{"rule.iteration_steps": 100})
    config.eval_every = 50
    summary = runner.run(config, tmp_path)
    losses_ = [summary[f"rule/train_loss/iteration_{i}"] for i in range(3)]
    assert max(losses_) < 0.3, losses_
    val = [summary[f"rule/val_loss/iteration_{i}"] for i in range(3)]
    assert summary["rule/best_iteration"] == float(np.argmin(val))
    assert summary["val_loss"] == pytest.approx(min(val), rel=1e-5)
    assert summary["rule/distance/parameter/0-1"] > 0
    assert 0 <= summary["rule/test_disagreement/0-1"] <= 1


@pytest.mark.slow
def test_resume_in_the_middle_of_an_iteration_gives_identical_numbers(tmp_path):
    config = tiny_config("persistent", steps=16, **{"rule.iteration_steps": 8})
    config.rule.num_iterations = 2
    config.eval_every = 4
    whole = runner.run(config, tmp_path / "whole")

    def interrupt(record):
        if record["step"] == 12:  # iteration 1, four steps in
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path / "cut", on_eval=interrupt)
    resumed = runner.run(config, tmp_path / "cut")
    for key in ("train_loss", "val_loss", "test_loss", "rule/best_iteration"):
        assert resumed[key] == whole[key], key


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_iterations=0), "num_iterations must be >= 1"),
        (dict(strength=-1.0), "strength .lambda. must be >= 0"),
        (dict(width=0.0), "width must be > 0"),
        (dict(inner="pso"), "no gradient estimate; valid choices: backprop, node_perturbation"),
        (dict(inner="hebbian"), "Unknown rule 'hebbian'; valid choices"),
        (dict(penalty="cosine"), "valid choices: gaussian, inverse, deflation"),
        (dict(distance="kl"), "valid choices: parameter, function"),
        (
            dict(layers=("layer_7",)),
            r"unknown layer\(s\) \['layer_7'\]; the model's layers: layer_0",
        ),
        (dict(layers=("layer_0",), neurons=(8,)), "layer 'layer_0' has neurons 0..7"),
        (dict(neurons=(1,)), "give exactly one layer"),
        (dict(inner={"name": "backprop", "sigma": 1.0}), "Unknown option"),
    ],
)
def test_bad_options_are_clear_errors(problem, options, message):
    with pytest.raises(ValueError, match=message):
        _persistent(problem, **options)


def test_needs_a_validation_split(problem):
    model, _, data, _ = problem
    with pytest.raises(ValueError, match="needs the val split"):
        rules.make_rule("persistent", model, TASK, optax.sgd(LR), {"train": data["train"]})


@pytest.mark.slow
def test_binary_runs_the_config_with_the_inner_rule_switched(tmp_path):
    """experiments.train on experiments/configs/persistent.py, the inner rule switched from the
    command line (its options at their defaults, an explicit one applied): the run ends with the
    best iteration reported and every iteration's figures in summary.json."""
    result = run_binary(
        tmp_path,
        "--config=experiments/configs/persistent.py",
        "--config.rule.inner.num_noise_samples=2",
        "--config.rule.inner.name=node_perturbation",
        "--config.rule.iteration_steps=5",
        "--config.steps=20",
        "--config.eval_every=10",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rule"]["inner"] == {
        "name": "node_perturbation",
        **rules.options_of("node_perturbation"),
        "num_noise_samples": 2,
    }
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 20
    val = [summary[f"rule/val_loss/iteration_{i}"] for i in range(4)]
    assert summary["rule/best_iteration"] == float(np.argmin(val))


def test_run_if_runs_the_branch_only_on_the_steps_that_take_it_also_under_vmap():
    """base.run_if: under vmap with a predicate all members share, the branch runs only when
    it is taken (a lax.cond would become a select computing it every time); with predicates
    that differ, each member gets its own result."""
    calls = []

    def branch(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 2.0

    run = jax.jit(jax.vmap(lambda p, x: rules.base.run_if(p, branch, x)))
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(run(jnp.zeros(3, bool), x), x)
    jax.effects_barrier()
    assert calls == []
    np.testing.assert_array_equal(run(jnp.ones(3, bool), x), 2 * x)
    np.testing.assert_array_equal(run(jnp.array([True, False, True]), x), [0.0, 1.0, 4.0])
    jax.effects_barrier()
    assert len(calls) == 2


def test_cost_counts_the_probe_passes_in_training_batches(problem):
    """Function distance: the inner step plus a forward and backward pass (3) of the probe batch
    per stored end point (K - 1), in batches of the training batch size."""
    model = problem[0]
    options = {"distance": "function", "num_iterations": 3, "probe_size": 128}
    cost = lambda **o: rules.resolve({"name": "persistent", **o}).cost(model, rules.Sizes(64))
    assert cost(**options) == 3.0 + 3.0 * 2 * 2
    assert cost() == 3.0  # parameter distance
