"""Pinned behaviour of persistent training's buffer and report: after the last iteration the
buffer and the best end point stay; the report's figures of the stored end points, padded
evaluation slots never counted, slots not yet stored reported as NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_problem, step_by_hand

from altlearn import losses, rules
from altlearn.train import _eval_chunks

TASK = losses.make_task("classification")


@pytest.fixture(scope="module")
def run():
    """Two iterations of three steps of SGD with the deflation penalty (lambda 0.5, p = 2,
    alpha = 1) on the small problem, then two steps more: (problem, rule, the runs after each
    step)."""
    problem = small_problem((8,))
    model, variables, data, batches = problem
    rule = rules.make_rule(
        "persistent",
        model,
        TASK,
        optax.sgd(0.5),
        data,
        num_iterations=2,
        iteration_steps=3,
        strength=0.5,
        penalty="deflation",
    )
    return problem, rule, step_by_hand(rule, variables, batches, 8)


def test_after_the_last_iteration_the_buffer_and_the_best_end_point_stay(run):
    (model, _, data, _), _, runs = run
    ends = runs[5][1].train.estimator.ends
    assert int(ends.count) == 2
    val = [
        float(rules.batch_loss(model, TASK, {"params": p}, data["val"])[0])
        for p in (
            runs[2][0]["params"],
            jax.tree.map(lambda b: b[1], ends.params),
        )
    ]
    np.testing.assert_allclose(ends.val_loss, val, rtol=1e-5)
    best = jax.tree.map(lambda b: b[int(np.argmin(val))], ends.params)
    for t in (5, 6, 7):
        variables, state, _ = runs[t]
        jax.tree.map(np.testing.assert_array_equal, state.train.estimator.ends, ends)
        jax.tree.map(np.testing.assert_array_equal, variables["params"], best)
        assert int(state.step) == t + 1


def _parameter_distance(a, b):
    """Per layer the squared distance over its parameter count, summed; its square root."""
    total = 0.0
    for name in a:
        diff = jnp.concatenate([jnp.ravel(a[name][k] - b[name][k]) for k in a[name]])
        total += float(jnp.mean(jnp.square(diff)))
    return total**0.5


def test_the_penalty_of_iteration_1_is_the_deflation_of_the_stored_end_point(run):
    """Iteration 1's first step starts at theta_0 with end point 0 stored: it reports the
    distance d to it as ``nearest_end_point`` and lambda log(d^-p + alpha) as ``penalty``;
    iteration 0 has no end point to be near (inf, penalty 0)."""
    (_, variables, _, _), _, runs = run
    d = _parameter_distance(variables["params"], runs[2][0]["params"])
    metrics = runs[3][2]
    np.testing.assert_allclose(metrics["nearest_end_point"], d, rtol=1e-5)
    np.testing.assert_allclose(metrics["penalty"], 0.5 * np.log(d**-2.0 + 1.0), rtol=1e-5)
    assert np.isposinf(runs[0][2]["nearest_end_point"]) and float(runs[0][2]["penalty"]) == 0


def test_the_report_reads_the_stored_end_points_and_never_counts_padding(run):
    """On the validation split in chunks of 12 (32 samples: the last chunk padded with 4):
    each end point's loss, the fraction of the 32 samples the two end points label apart
    (padding never counted), their parameter distance and function distance (root mean
    squared output difference on the probe batch: the training inputs), and NaN for a slot not
    yet stored."""
    (model, _, data, _), rule, runs = run
    x, y = data["val"]
    splits = {"val": _eval_chunks(np.asarray(x), np.asarray(y), 12)}
    report = jax.jit(rule.report)
    variables, state, _ = runs[6]
    out = report(variables, state, splits)
    ends = [jax.tree.map(lambda b, i=i: b[i], state.train.estimator.ends.params) for i in (0, 1)]
    logits = [model.apply({"params": p}, x) for p in ends]
    apart = float(jnp.mean(jnp.argmax(logits[0], -1) != jnp.argmax(logits[1], -1)))
    assert 0 < apart < 1
    np.testing.assert_allclose(out["val_disagreement/0-1"], apart, rtol=1e-6)
    for i in (0, 1):
        loss = rules.batch_loss(model, TASK, {"params": ends[i]}, (x, y))[0]
        np.testing.assert_allclose(out[f"val_loss/iteration_{i}"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["distance/parameter/0-1"], _parameter_distance(*ends), rtol=1e-5)
    probe = [model.apply({"params": p}, data["train"][0]) for p in ends]
    rms = float(jnp.sqrt(jnp.mean(jnp.square(probe[0] - probe[1]))))
    np.testing.assert_allclose(out["distance/function/0-1"], rms, rtol=1e-5)
    assert float(out["end_points"]) == 2.0
    # Mid-way through iteration 1: one end point stored, the figures of slot 1 unknown.
    variables, state, _ = runs[4]
    out = report(variables, state, splits)
    assert float(out["end_points"]) == 1.0 and np.isnan(out["best_iteration"])
    assert np.isfinite(out["val_loss/iteration_0"]) and np.isnan(out["val_loss/iteration_1"])
    assert np.isnan(out["val_disagreement/0-1"]) and np.isnan(out["distance/parameter/0-1"])
