"""The backprop + evolution hybrid (paper 004): the elitist phase never worsens the validation
loss, zero noise or no phase is backprop exactly, layer selection, the validation split (never
the test split), resume, the binary, bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_binary, small_problem, step_by_hand, tiny_config

from altlearn import losses, rules, runner
from altlearn.rules.hybrid import select_layers
from altlearn.train import Experiment

TASK = losses.make_task("classification")
LR = 0.05


@pytest.fixture(scope="module")
def problem():
    return small_problem((8, 8))


def _hybrid(problem, **options):
    model, _, data, _ = problem
    return rules.make_rule("hybrid", model, TASK, optax.sgd(LR), {"val": data["val"]}, **options)


def _val_loss(problem, variables):
    model, _, data, _ = problem
    return float(rules.batch_loss(model, TASK, variables, data["val"])[0])


@pytest.mark.parametrize(
    "strategy, noise_scale", [("elitist", 1e-2), ("elitist", 1.0), ("HillClimbing", 1.0)]
)
def test_a_phase_never_returns_a_worse_validation_loss(problem, strategy, noise_scale):
    """es_every=1: every step is a backprop step then a phase. From the same state, the
    phase's result has a validation loss no higher than the backprop step's (large noise: the
    offspring are mostly worse and the parent must survive)."""
    model, variables, _, batches = problem
    rule = _hybrid(problem, es_every=1, noise_scale=noise_scale, strategy=strategy)
    backprop = rules.make_rule("backprop", model, TASK, optax.sgd(LR), {})
    state = rule.init(jax.random.PRNGKey(1), variables)
    accepted = 0
    for t in range(6):
        key = jax.random.PRNGKey(t)
        bp_variables, _, _ = jax.jit(backprop.step)(
            jax.random.split(key)[0], variables, state.train, batches[t % 4]
        )
        variables, state, metrics = jax.jit(rule.step)(key, variables, state, batches[t % 4])
        assert _val_loss(problem, variables) <= _val_loss(problem, bp_variables) + 1e-7
        np.testing.assert_allclose(
            metrics["val_loss_before"], _val_loss(problem, bp_variables), rtol=1e-5
        )
        np.testing.assert_allclose(metrics["val_loss_after"], _val_loss(problem, variables), 1e-5)
        assert float(metrics["val_loss_change"]) <= 0
        accepted += int(metrics["accepted"])
    assert int(state.accepted) == accepted and int(state.phases) == 6
    if noise_scale == 1e-2:
        assert accepted >= 1  # small steps around an untrained net: some are better


def test_zero_noise_in_a_sweep_or_no_phase_is_backprop_exactly(problem):
    """s = 0 (a traced value: a sweep point) makes every offspring the parent, never accepted;
    es_every beyond the run runs no phase: both equal backprop (the same jitted scan of 6
    steps), also with the optimizer state reset on acceptance."""
    model, variables, _, batches = problem
    xs = jnp.stack([b[0] for b in batches]), jnp.stack([b[1] for b in batches])

    def scan(rule):
        def body(carry, t):
            v, state = carry
            batch = (xs[0][t % 4], xs[1][t % 4])
            key = jax.random.fold_in(jax.random.PRNGKey(5), t)
            v, state, _ = rule.step(key, v, state, batch)
            return (v, state), None

        state = rule.init(jax.random.PRNGKey(1), variables)
        return jax.lax.scan(body, (variables, state), jnp.arange(6))[0][0]["params"]

    backprop = rules.make_rule("backprop", model, TASK, optax.sgd(LR), {})
    reference = jax.jit(lambda: scan(backprop))()
    never = jax.jit(lambda: scan(_hybrid(problem, es_every=100)))()
    jax.tree.map(np.testing.assert_array_equal, never, reference)

    def run(noise_scale):
        return scan(_hybrid(problem, es_every=2, noise_scale=noise_scale, on_accept="reset"))

    jax.tree.map(np.testing.assert_array_equal, jax.jit(run)(0.0), reference)
    swept = jax.jit(jax.vmap(run))(jnp.asarray([0.0, 0.05]))  # a sweep: to rounding
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-7), swept, reference
    )
    moved = jax.tree.map(lambda a: a[1], swept)
    assert (
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(reference))
        )
        > 1e-4
    )


@pytest.mark.slow
def test_sharded_and_chunked_phases_equal_one_vmap(problem):
    """Offspring evaluated over the 8 (fake) devices and in chunks under a memory budget give
    the phases of one plain vmap (the elitist offspring are regenerated from their keys)."""
    _, variables, _, batches = problem
    assert jax.device_count() == 8
    runs = {}
    for name, options in {
        "plain": {},
        # 16 offspring over 8 devices, 1 per device at a time (a budget below one member):
        # two sequential chunks of 8, each sharded.
        "sharded_chunked": {"shard": True, "memory_budget_mb": 1e-3},
    }.items():
        rule = _hybrid(problem, es_every=1, population_size=16, **options)
        runs[name] = step_by_hand(rule, variables, batches, 3)[-1]
    for name in ("sharded_chunked",):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            runs[name][0]["params"],
            runs["plain"][0]["params"],
        )
        assert int(runs[name][1].accepted) == int(runs["plain"][1].accepted)


@pytest.mark.parametrize("layers", [("head",), ("layer_0", "layer_1")])
def test_layer_selection_changes_only_the_selected_layers(problem, layers):
    model, variables, _, batches = problem
    rule = _hybrid(problem, es_every=1, noise_scale=0.01, layers=layers, population_size=16)
    backprop = rules.make_rule("backprop", model, TASK, optax.sgd(LR), {})
    selected = select_layers(model.layer_names, layers)
    state = rule.init(jax.random.PRNGKey(1), variables)
    changed = set()
    for t in range(4):
        key = jax.random.PRNGKey(t)
        bp_variables, _, _ = jax.jit(backprop.step)(
            jax.random.split(key)[0], variables, state.train, batches[t]
        )
        variables, state, _ = jax.jit(rule.step)(key, variables, state, batches[t])
        for name in model.layer_names:
            # Apart from rounding (two compiled programs), or moved by a phase (noise 1e-2 std)
            moved = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(
                    jax.tree.leaves(variables["params"][name]),
                    jax.tree.leaves(bp_variables["params"][name]),
                )
            )
            if name not in selected:
                assert moved < 1e-6, name
            elif moved > 1e-4:
                changed.add(name)
    assert changed == set(selected), changed  # an accepted phase moves every selected layer


def test_phases_score_the_validation_split_and_the_test_split_is_never_offered(
    problem, monkeypatch
):
    """The phase's parent loss is the loss on the first val_size validation samples; the rule
    declares only the val split, and the training loop offers a rule only what it declares."""
    model, variables, data, batches = problem
    rule = _hybrid(problem, es_every=1, val_size=10)
    _, _, metrics = step_by_hand(rule, variables, batches, 1)[0]
    backprop = rules.make_rule("backprop", model, TASK, optax.sgd(LR), {})
    bp = step_by_hand(backprop, variables, batches, 1)[0][0]
    x, y = data["val"]
    expected = float(rules.batch_loss(model, TASK, bp, (x[:10], y[:10]))[0])
    np.testing.assert_allclose(metrics["val_loss_before"], expected, rtol=1e-5)
    assert rules.RULES["hybrid"].needs == ("val",)
    offered = []
    spec = rules.RULES["hybrid"]

    @functools.wraps(spec.factory)  # the factory's signature: its options
    def spy(model, task, optimizer, data, **options):
        offered.append(set(data))
        return spec.factory(model, task, optimizer, data, **options)

    monkeypatch.setitem(rules.RULES, "hybrid", spec._replace(factory=spy))
    experiment = Experiment(tiny_config("hybrid"))
    jax.eval_shape(experiment.init, jax.random.PRNGKey(0))
    assert offered and offered[0] == {"val"}  # the rule asked for val and got val only
    assert "test" not in experiment.rule_data


@pytest.mark.slow
def test_hybrid_learns_times_its_phases_and_resumes_to_identical_numbers(tmp_path, monkeypatch):
    """Through the runner on digits: it learns, phases are counted, reported and timed (each
    phase step a chunk of its own); a run interrupted between phases, and run without the phase
    chunks, ends with the same numbers."""
    config = tiny_config("hybrid", steps=40, **{"rule.es_every": 10, "rule.val_size": 128})
    config.eval_every = 10
    whole = runner.run(config, tmp_path / "whole")
    assert whole["rule/phases"] == 4
    assert 0 <= whole["rule/acceptance_rate"] <= 1
    assert whole["train_loss"] < 0.5
    records = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").open()]
    for record in records[1:]:  # one phase per evaluation interval, timed
        assert record["phases_timed"] == 1 and record["phase_step_time_s"] > 0, record
        assert record["phase_time_s"] < record["phase_step_time_s"]
        assert record["rule/phase"] == 0.1  # the rule's own per-step figures span the interval
    assert whole["phase_step_time_s"] > 0 and "phase_time_s" in whole

    def interrupt(record):
        if record["step"] == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(Experiment, "phase_steps", property(lambda self: None))  # unsplit chunks
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path / "cut", on_eval=interrupt)
    resumed = runner.run(config, tmp_path / "cut")
    assert "phase_step_time_s" not in resumed
    for key in ("train_loss", "val_loss", "test_loss", "rule/accepted_phases"):
        assert resumed[key] == whole[key], key


@pytest.mark.slow
def test_binary_runs_the_hybrid_config(tmp_path):
    result = run_binary(
        tmp_path,
        "--config=experiments/configs/hybrid.py:data=digits",
        "--config.rule.es_every=5",
        "--config.rule.layers=('head',)",
        "--config.steps=10",
        "--config.eval_every=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 10 and summary["rule/phases"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("rule/val_loss_change" in r for r in records if r["step"] > 0)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(layers=("conv*",)), r"matches no layer; the model's layers: layer_0, layer_1"),
        (dict(noise_scale=0.0), "noise_scale must be > 0"),
        (dict(population_size=0), "population_size must be >= 1"),
        (dict(es_every=0), "es_every must be >= 1"),
        (dict(strategy="Nope_ES"), "Unknown evosax strategy 'Nope_ES'; valid choices: "),
        (dict(on_accept="drop"), "valid choices: keep, reset"),
        (dict(guide=True), "guide=True needs strategy='GuidedES'"),
        (dict(strategy_params={"std_init": 1.0}), "the elitist .1 \\+ lambda. strategy has none"),
    ],
)
def test_bad_options_are_clear_errors(problem, options, message):
    with pytest.raises(ValueError, match=message):
        _hybrid(problem, **options)


def test_needs_a_validation_split(problem):
    model, _, _, _ = problem
    with pytest.raises(ValueError, match="needs the val split"):
        rules.make_rule("hybrid", model, TASK, optax.sgd(LR), {})
    config = tiny_config("hybrid")
    config.data.validation_fraction = 0.0
    with pytest.raises(ValueError, match="validation_fraction"):
        Experiment(config)


def test_cost_counts_the_validation_samples_a_phase_scores():
    """(1 + lambda) validation passes per phase of 1 generation, every es_every steps, in
    training batches: the split's own size where it is smaller than val_size or val_size is 0
    (the whole split); the nominal val_size where the caller does not know the data."""
    per_phase = 1 + 8  # the parent and 8 offspring, one generation (the defaults)
    cost = lambda sizes, **o: rules.resolve({"name": "hybrid", **o}).cost(None, sizes)
    assert cost(rules.Sizes(64)) == pytest.approx(3 + per_phase * 512 / 64 / 100)
    sizes = rules.Sizes(64, 1000, 144)
    assert cost(sizes) == pytest.approx(3 + per_phase * 144 / 64 / 100)
    whole = cost(rules.Sizes(64, 1000, 300), val_size=0)
    assert whole == pytest.approx(3 + per_phase * 300 / 64 / 100)
    with pytest.raises(ValueError, match="its cost needs the split's size"):
        cost(rules.Sizes(64), val_size=0)
