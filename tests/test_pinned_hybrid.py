"""Pinned behaviour of the hybrid's schedule and phases: which steps end with a phase, the
optimizer state kept or reset when a phase's result is accepted, the noise relative to each
layer's kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import small_problem

from altlearn import losses, rules
from altlearn.rules.hybrid import is_phase_step, select_layers

TASK = losses.make_task("classification")


@pytest.fixture(scope="module")
def problem():
    return small_problem((8,))


def test_phases_follow_es_every_and_the_final_phase_step():
    """Steps are counted from 1: every es_every-th, and final_phase_step (> 0) once more."""
    due = lambda every, final: [t for t in range(1, 13) if is_phase_step(every, final, t)]
    assert due(4, 0) == [4, 8, 12]
    assert due(4, 6) == [4, 6, 8, 12]
    assert due(100, 1) == [1]
    assert due(100, 0) == []
    traced = jax.jit(lambda t: is_phase_step(4, 6, t))
    assert [bool(traced(t)) for t in range(1, 13)] == [t in (4, 6, 8, 12) for t in range(1, 13)]


def test_an_accepted_phase_keeps_the_optimizer_state(problem):
    """on_accept='keep' (the default): after an accepted phase the optimizer state is the
    backprop step's (Adam's moments and count), never re-initialised; the rule's step count
    goes on."""
    model, variables, data, batches = problem
    rule = rules.make_rule(
        "hybrid",
        model,
        TASK,
        optax.adam(1e-2),
        {"val": data["val"]},
        es_every=1,
        noise_scale=0.05,
        population_size=16,
    )
    backprop = rules.make_rule("backprop", model, TASK, optax.adam(1e-2), {})
    state = rule.init(jax.random.PRNGKey(1), variables)
    step, bp_step = jax.jit(rule.step), jax.jit(backprop.step)
    outcomes = []
    for t in range(4):
        key = jax.random.PRNGKey(t)
        _, bp_state, _ = bp_step(jax.random.split(key)[0], variables, state.train, batches[t])
        variables, state, metrics = step(key, variables, state, batches[t])
        outcomes.append(bool(metrics["accepted"]))
        want = bp_state
        assert int(state.train.count) == int(bp_state.count) == t + 1
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), state.train, want
        )
    assert any(outcomes), outcomes


def test_the_phase_noise_is_relative_to_each_layer_kernel_std(problem):
    """select=False, one offspring: the phase's change of a layer is noise_scale x std(kernel)
    x N(0, 1) per parameter, whatever the bias (set to 5 here, far from the kernel's scale)."""
    model, variables, data, batches = problem
    params = jax.tree.map(lambda a: a, variables["params"])
    for name in params:
        params[name] = {**params[name], "bias": jnp.full_like(params[name]["bias"], 5.0)}
    variables = {**variables, "params": params}
    options = dict(es_every=1, noise_scale=0.1, population_size=1, select=False)
    rule = rules.make_rule("hybrid", model, TASK, optax.sgd(0.0), {"val": data["val"]}, **options)
    state = rule.init(jax.random.PRNGKey(1), variables)
    new, _, _ = jax.jit(rule.step)(jax.random.PRNGKey(2), variables, state, batches[0])
    for name in params:  # sgd(0): the backprop step leaves the params, the phase moves them
        kernel = params[name]["kernel"]
        change = jnp.concatenate(
            [jnp.ravel(new["params"][name][k] - params[name][k]) for k in ("kernel", "bias")]
        )
        ratio = float(jnp.std(change) / (0.1 * jnp.std(kernel)))
        assert 0.7 < ratio < 1.3, (name, ratio)


def test_head_is_the_last_layer_and_patterns_select_in_model_order():
    names = ["layer_0", "layer_1", "layer_2"]
    assert select_layers(names, ("head",)) == ["layer_2"]
    assert select_layers(names, ("head", "layer_0")) == ["layer_0", "layer_2"]
    assert select_layers(names, ("layer_[01]", "layer_1")) == ["layer_0", "layer_1"]
    assert select_layers(names, ()) == names


def test_an_elitist_phase_returns_the_best_of_every_generation(problem, monkeypatch):
    """(1 + lambda) over three generations: the phase's result is the parent or the best
    offspring of ALL its generations (never a later generation's best that is worse)."""
    from altlearn.rules import hybrid as hybrid_module

    model, variables, data, batches = problem
    seen = []
    evaluate = hybrid_module.evaluate_population

    def spy(*args, **kwargs):
        f = evaluate(*args, **kwargs)
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), f)
        return f

    monkeypatch.setattr(hybrid_module, "evaluate_population", spy)
    options = dict(es_every=1, es_generations=3, population_size=4, noise_scale=0.3)
    rule = rules.make_rule("hybrid", model, TASK, optax.sgd(0.1), {"val": data["val"]}, **options)
    state = rule.init(jax.random.PRNGKey(1), variables)
    step = jax.jit(rule.step)
    for t in range(3):
        seen.clear()
        variables, state, metrics = step(jax.random.PRNGKey(t), variables, state, batches[t])
        jax.effects_barrier()
        assert len(seen) == 3
        best = min(float(metrics["val_loss_before"]), *(float(f.min()) for f in seen))
        np.testing.assert_allclose(metrics["val_loss_after"], best, rtol=1e-6)


def test_hill_climbing_samples_around_the_parent_until_an_offspring_beats_it(problem, monkeypatch):
    """The module docstring: evosax's record of the best, which HillClimbing samples around, is
    seeded with the parent. Large noise makes every first-generation offspring worse than the
    parent, so the second generation must again be drawn around the parent (z = 0)."""
    from altlearn.rules import hybrid as hybrid_module

    model, variables, data, batches = problem
    seen = []
    evaluate = hybrid_module.evaluate_population

    def spy(fitness_fn, population, *args, **kwargs):
        f = evaluate(fitness_fn, population, *args, **kwargs)
        jax.debug.callback(lambda p, v: seen.append((np.asarray(p), np.asarray(v))), population, f)
        return f

    monkeypatch.setattr(hybrid_module, "evaluate_population", spy)
    options = dict(es_every=1, es_generations=2, population_size=8, noise_scale=3.0)
    rule = rules.make_rule(
        "hybrid",
        model,
        TASK,
        optax.sgd(0.1),
        {"val": data["val"]},
        strategy="HillClimbing",
        **options,
    )
    state = rule.init(jax.random.PRNGKey(1), variables)
    _, _, metrics = jax.jit(rule.step)(jax.random.PRNGKey(0), variables, state, batches[0])
    jax.effects_barrier()
    (first, f_first), (second, _) = seen
    assert (f_first > float(metrics["val_loss_before"])).all()  # every offspring worse
    center = second.mean(axis=0)
    best_first = first[np.argmin(f_first)]
    assert np.linalg.norm(center) < np.linalg.norm(center - best_first)


@pytest.mark.parametrize(
    "options", [{"strategy": "CMA_ES"}, {"strategy": "GuidedES", "guide": True}]
)
def test_a_phase_runs_a_matrix_strategy_at_any_size_and_guided_es_with_its_guide(problem, options):
    """The phase searches the selected layers only, so rule.max_cma_dims does not apply: a
    num_dims x num_dims strategy (CMA-ES) runs there at any size; GuidedES gets the batch
    gradient as its guide (guide=True)."""
    model, variables, data, batches = problem
    options = dict(es_every=1, population_size=4, layers=("head",), **options)
    rule = rules.make_rule("hybrid", model, TASK, optax.sgd(0.1), {"val": data["val"]}, **options)
    state = rule.init(jax.random.PRNGKey(1), variables)
    _, state, metrics = jax.jit(rule.step)(jax.random.PRNGKey(0), variables, state, batches[0])
    assert int(state.phases) == 1
    assert float(metrics["val_loss_after"]) <= float(metrics["val_loss_before"])
