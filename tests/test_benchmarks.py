"""The benchmark binaries (benchmarks/) measure what they claim, at tiny sizes.

Each comparison must compare the same work: the hand-written and raw loops follow altlearn's
run step for step (same start, same batches, same keys, so the same losses), every side of a
ratio times the same number of steps, and pyswarms' objective computes altlearn's loss. Timings
are not asserted against the targets here (too flaky in a test); the binaries report them.
"""

import importlib
import json
import math

import jax
import numpy as np
import pytest
from absl import flags
from conftest import tiny_config
from jax.flatten_util import ravel_pytree

from altlearn.config import base_config
from altlearn.rules.base import params_loss
from altlearn.train import Experiment
from benchmarks import (
    closed_form,
    evolution,
    harness,
    hybrid,
    noise,
    overhead,
    profile,
    pso,
    rules,
    sweep,
)

pytestmark = pytest.mark.slow  # each runs a benchmark binary's measurement

MODULES = (closed_form, evolution, harness, hybrid, overhead, profile, pso, rules, sweep)


def _positive(value) -> bool:
    return value > 0 and math.isfinite(value)


def test_modules_import_without_defining_flags():
    before = set(flags.FLAGS)
    for module in MODULES:
        importlib.reload(module)
    assert set(flags.FLAGS) == before


def test_harness_rounds_and_the_one_peak():
    calls = {"a": lambda: jax.numpy.ones(3), "matmul": harness.Matmul(32)}
    rounds = harness.timed_rounds(calls, repeats=3)
    assert [len(t) for t in rounds.times.values()] == [3, 3]
    peak = harness.matmul_peak(calls["matmul"], rounds.times["matmul"])
    assert peak["fastest_s"] == min(rounds.times["matmul"])
    assert peak["gflops"] == pytest.approx(2 * 32**3 / min(rounds.times["matmul"]) / 1e9)
    assert peak["gflops"] >= peak["gflops_median"] and peak["dtype"] == "float32"


# ---------------------------------------------------------------- overhead


def _overhead_config():
    config = base_config(data="digits")
    config.model.widths = (32,)
    config.batch_size = 32
    return config


def test_hand_loop_follows_altlearns_run():
    """Same initial params, same batches (across an epoch boundary and a chunk boundary), so the
    same per-step losses; and the same step count."""
    experiment = Experiment(_overhead_config())
    state = experiment.init(jax.random.PRNGKey(3))
    hand_init, hand_chunk = harness.make_hand_loop(experiment)
    hand_state = hand_init(state)
    alt_chunk = jax.jit(lambda s: experiment.train_steps(s, 25))
    hand = jax.jit(lambda s: hand_chunk(s, 25))
    alt_losses, hand_losses = [], []
    for _ in range(2):  # 50 steps: steps_per_epoch is 40 here
        state, metrics = alt_chunk(state)
        hand_state, losses = hand(hand_state)
        alt_losses.append(metrics["loss"])
        hand_losses.append(losses)
    assert experiment.steps_per_epoch < 50
    np.testing.assert_allclose(np.concatenate(hand_losses), np.concatenate(alt_losses), rtol=1e-4)
    assert int(state.step) == int(hand_state.step) == 50


def test_overhead_measure_times_the_same_steps(tmp_path):
    result = overhead.measure(_overhead_config(), chunk_steps=5, repeats=2, matmul_size=64)
    out = json.loads(harness.write_json(result, tmp_path / "overhead.json").read_text())
    for name in ("altlearn", "hand"):
        loop = out[name]
        assert len(loop["chunk_times_s"]) == loop["timed_calls"] == 2
        assert loop["steps_run"] == 5 * 3  # warm-up round + 2 timed rounds, each 5 steps
        for key in ("compile_s", "median_chunk_s", "step_us", "gflops", "fraction_of_peak"):
            assert _positive(loop[key]), (name, key, loop[key])
    assert out["loss_max_relative_difference_last_chunk"] < 1e-4
    assert _positive(out["ratio_altlearn_over_hand"]) and isinstance(out["target_met"], bool)
    peak = out["matmul_peak"]
    assert peak["gflops"] == pytest.approx(2 * 64**3 / min(peak["times_s"]) / 1e9)
    assert out["config"]["layer_sizes"] == [64, 32, 10]
    assert out["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert out["machine"]["backend"] == jax.default_backend()
    assert "| altlearn |" in overhead.markdown_table(out)


# ---------------------------------------------------------------- evolution


def test_raw_evosax_loop_follows_the_evolution_rule():
    """Same initial mean, batches and ask/tell keys: the same per-generation mean fitness and
    the same final mean (classic threefry, the CPU default; the measure test below checks JAX's
    partitionable mode too)."""
    config = evolution.evolution_config(8, widths=(8,), batch_size=64, data="digits")
    experiment = Experiment(config)
    key = jax.random.PRNGKey(2)
    state = experiment.init(key)
    raw_init, raw_chunk = harness.make_raw_es_loop(
        experiment, 8, evolution.STD, evolution.LEARNING_RATE
    )
    raw_state = raw_init(key, state.variables["params"])
    steps = experiment.steps_per_epoch + 2  # across an epoch boundary
    state, metrics = jax.jit(lambda s: experiment.train_steps(s, steps))(state)
    raw_state, fitness = jax.jit(lambda s: raw_chunk(s, steps))(raw_state)
    np.testing.assert_allclose(fitness, metrics["fitness_mean"], rtol=1e-4)
    mean = ravel_pytree(state.variables["params"])[0]
    np.testing.assert_allclose(raw_state.es_state.mean, mean, rtol=1e-4, atol=1e-6)
    assert int(raw_state.step) == int(state.step) == steps


def test_evolution_measure_times_the_same_generations(tmp_path):
    result = evolution.measure(
        populations=(4,),
        overhead_population=4,
        chunk_generations=2,
        repeats=1,
        memory_budget_mb=0,  # no budgeted part
        widths=(8,),
        matmul_size=64,
        batches=(128,),
        data="digits",
    )
    out = json.loads(harness.write_json(result, tmp_path / "evolution.json").read_text())
    o = out["overhead"]
    for suffix in ("", "/rng=on"):
        alt, raw = (out["timed_chunks"][f"{side}/P=4{suffix}"] for side in ("altlearn", "raw"))
        assert alt["generations_per_chunk"] == raw["generations_per_chunk"] >= 4
        assert alt["timed_calls"] == raw["timed_calls"] == 1
        assert alt["generations_run"] == raw["generations_run"] == 2 * alt["generations_per_chunk"]
    assert o["fitness_mean_max_relative_difference_last_chunk"] < 1e-4
    assert o["fitness_mean_max_relative_difference_last_chunk_rng_on"] < 1e-4
    assert _positive(o["ratio_altlearn_over_raw"])
    (p4,) = out["populations"]
    assert _positive(p4["fraction_of_peak"]) and _positive(p4["evaluation_fraction_of_peak"])
    assert out["matmul_peak"]["fastest_s"] == min(out["matmul_peak"]["times_s"])
    assert "**Memory**" in evolution.markdown_tables(out)


# ---------------------------------------------------------------- rules


def test_rules_methods_time_the_same_steps():
    configs = {"bp": tiny_config("backprop"), "np": tiny_config("node_perturbation")}
    result = rules.measure(configs, chunk_steps=3, repeats=2)
    runs = result["results"]
    # Each run's own step counter: every method's timed calls covered the same steps.
    assert [r["steps_run"] for r in runs.values()] == [3 * 3, 3 * 3]  # warm-up + 2 rounds
    assert [r["timed_calls"] for r in runs.values()] == [2, 2]
    assert all(_positive(r["step_ms"]) and _positive(r["compile_s"]) for r in runs.values())
    # Paired by round: the median of np's call over bp's call of the same round.
    lo, hi = runs["np"]["ratio_range"]
    assert lo <= runs["np"]["ratio_vs_first"] <= hi and runs["bp"]["ratio_range"] == [1.0, 1.0]
    assert "| np |" in rules.markdown_table(result)
    assert runs["bp"]["floor"] == 1.0 and runs["np"]["floor"] == pytest.approx(1.0, abs=0.2)


def test_profile_attributes_each_operation_to_the_function_that_emitted_it():
    """Every operation's time lands on a source function: node perturbation's estimator on
    node_perturbation.py (backprop has none there), its passes on models.py; the difference
    column is np minus bp; loops are not counted twice (the operations' sum is below the
    profiled step)."""
    configs = {"bp": tiny_config("backprop"), "np": tiny_config("node_perturbation")}
    result = profile.measure(configs, chunk_steps=2, repeats=1, profiled_calls=1)
    runs = result["results"]
    sources = runs["np"]["sources_ms"]
    assert any(s.startswith("altlearn/rules/node_perturbation.py:") for s in sources), sources
    assert any(s.startswith("altlearn/models.py:") for s in sources), sources
    assert not any("node_perturbation.py" in s for s in runs["bp"]["sources_ms"])
    for r in runs.values():
        assert _positive(r["step_ms"]) and 0 < r["operations_ms"] <= r["profiled_step_ms"]
        assert math.isclose(sum(r["sources_ms"].values()), r["operations_ms"])
    assert runs["np"]["operations_run"] > runs["bp"]["operations_run"] > 0  # + noise, + pass
    table = profile.markdown_table({**result, "seeds": 1}, rows=3)
    assert "| source (operations emitted there) | bp | np | np - bp |" in table
    assert table.count("\n| `") == 3 and "| everything else |" in table


def test_profile_reads_opcodes_and_stacks_from_the_compiled_text():
    """A compiled module's text: each instruction's opcode and its source stack, innermost
    first (the text prints parents one above their ids); the label is the innermost function of
    this repository, with the library it called into."""

    def h(x):
        return jax.numpy.sin(x) * 3.0

    def g(x):
        return h(x) + 1.0

    text = jax.jit(g).lower(jax.numpy.ones(3)).compile().as_text()
    ops = profile.hlo_operations(text)
    stacks = [stack for _, stack in ops.values() if stack]
    assert stacks and all(s[0][1].endswith("h") or s[0][1].endswith("g") for s in stacks)
    innermost = max(stacks, key=len)  # h, called by g, called by this test
    assert [f[1].split(".")[-1] for f in innermost[:2]] == ["h", "g"]
    label = profile.source_label(innermost)
    assert label.startswith("tests/test_benchmarks.py:") and label.endswith(".h")
    here = "/any/checkout/altlearn/models.py"
    flax_frame = ("/x/site-packages/flax/linen/linear.py", "Dense.__call__", 3)
    assert profile.source_label([flax_frame, (here, "LayeredModel.apply", 9)]) == (
        "altlearn/models.py:LayeredModel.apply > flax"
    )
    assert profile.source_label([flax_frame]) == "(no source)"
    # Files are read from their paths' parts (a cached program names another checkout's files).
    assert (
        profile._package("/other/checkout/altlearn/rules/_noise.py") == "altlearn/rules/_noise.py"
    )
    assert profile._package("<frozen runpy>") is None
    assert profile._opcode("(s32[], f32[2]{0}) while(%t), body=%b") == "while"
    assert profile._opcode("f32[2,2]{1,0} dot(%a, %b)") == "dot"


def test_rules_floor_counts_each_methods_products():
    """MLP 2-3-4 at batch 1: products F = [12, 24]; decorrelation products R = [8, 18]."""
    dims, floor = [2, 3, 4], rules.matmul_flops
    assert floor("bp", dims, 1) == 36 + 36 + 24  # forward, weight grads, input grads of layer 2
    assert floor("np", dims, 1) == floor("anp/jvp", dims, 1) == 36 + 24 + 36  # noisy from layer 2
    assert floor("inp", dims, 1) == 36 + 24 + 0 + 36  # pass l starts at layer l
    assert floor("fg", dims, 1) == 36 + 12 + 2 * 24  # primal, tangent (x V_1, then two products)
    assert floor("wp", dims, 1) == 2 * 36
    # dbp: forward 62, weight grads 36, input grads 42; the update min(2 R, R + 2 d^3) per layer
    assert floor("dbp", dims, 1) == 62 + 36 + 42 + 16 + 36
    assert floor("danp/every4", dims, 1) == 62 + 42 + 36 + (16 + 36) / 4
    assert floor("pso", dims, 1) is None
    assert rules.target_of("np/dist=normal") == 1.2 and rules.target_of("np/jvp") == 1.2
    assert rules.target_of("danp") == rules.target_of("danp/jvp") == 2.0
    assert rules.target_of("bp") is None


def test_noise_benchmark_times_every_generator_and_distribution():
    result = noise.measure((4, 40), draws=2, repeats=1)
    names = list(result["results"])
    assert len(names) == len(noise.GENERATORS) * len(noise.DISTRIBUTIONS)
    assert all(_positive(r["ns_per_entry"]) for r in result["results"].values())
    table = noise.markdown_table({**result, "shape": (4, 40), "draws": 2, "repeats": 1})
    assert "| rbg | normal |" in table and "1.00x" in table


# ---------------------------------------------------------------- pso


def test_pyswarms_objective_is_altlearns_loss():
    """pyswarms' numpy objective gives, for each particle vector, altlearn's loss of the same
    network on the same batch."""
    experiment = Experiment(pso.make_config("pso", batch_size=10_000, widths=(8,)))
    variables = experiment.init(jax.random.PRNGKey(0)).variables
    run = pso.PyswarmsRun(experiment, variables["params"], 10_000, 4, 1, None)
    layout = run.layout
    params = jax.device_get(variables["params"])
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(layout.unflatten(layout.flatten(params))), jax.tree.leaves(params)
        )
    )
    positions = run.optimizer.swarm.position  # the initial swarm: the network plus noise
    assert np.array_equal(positions[0], layout.flatten(params).astype(np.float64))
    losses = run.objective(positions)  # full batch: the whole training split
    batch = (experiment.x_train, experiment.y_train)
    altlearn = [
        float(
            params_loss(experiment.model, experiment.task, variables, batch)(
                jax.tree.map(lambda a: a.astype(np.float32), layout.unflatten(p))
            )
        )
        for p in positions
    ]
    np.testing.assert_allclose(losses, altlearn, rtol=1e-4)


def test_pso_measure_times_the_same_iterations():
    result = pso.measure(
        widths=(8,),
        population_size=4,
        batch_size=32,
        chunk_steps=2,
        repeats=1,
        neuron_pso=False,
        matmul_size=64,
        full_batch=False,
    )
    for label in ("minibatch",):
        r = result["results"][label]
        assert r["iterations_per_call"] == 2 and r["timed_calls"] == 1
        # warm-up round + 1 timed round of 2 iterations, on every side
        assert set(r["iterations_run"].values()) == {4}, r["iterations_run"]
        assert _positive(r["ratio_pyswarms_over_altlearn"]) and _positive(r["ratio_bound_at_peak"])
    assert "| minibatch (32) |" in pso.markdown_tables(result)
    raw = result["results"]["evosax"]
    assert {r["steps_run"] for r in raw.values()} == {4}  # the same iterations on every side
    assert raw["raw evosax PSO"]["vs_raw_evosax"] == 1.0
    assert "| raw evosax PSO | 4 |" in pso.markdown_tables(result)


def test_raw_evosax_pso_loop_starts_from_altlearns_particles():
    """The raw loop's first iteration scores altlearn's initial swarm: its personal bests are
    altlearn's initial positions with their losses on the first batch."""
    config = pso.make_config("pso", 32, widths=(8,), population_size=4, rescore_bests=False)
    experiment = Experiment(config)
    state = jax.jit(experiment.init)(jax.random.PRNGKey(0))
    init, chunk = harness.make_raw_pso_loop(experiment)
    raw = jax.jit(init)(state)
    position = state.rule_state.position
    first = jax.vmap(lambda p: ravel_pytree(harness.hand_params(experiment, p))[0])(position)
    np.testing.assert_allclose(raw.pso_state.population_best, first, rtol=1e-6)
    raw, losses = jax.jit(chunk, static_argnums=1)(raw, 3)
    assert losses.shape == (3,) and np.all(np.isfinite(losses)) and int(raw.step) == 3


# ---------------------------------------------------------------- closed_form

TINY = dict(d=5, num_outputs=3, teacher_width=4)


def test_closed_form_measure_writes_well_formed_results(tmp_path):
    """Growth exponents are not checked against the expected ones (tiny sizes measure
    dispatch, not arithmetic); the binary reports them."""
    with jax.enable_x64(True):
        result = closed_form.measure(
            sizes=(64, 128), width=4, widths=(4, 8), n_fixed=64, repeats=3, matmul_size=32, **TINY
        )
        json_path, md_path = closed_form.write_outputs(result, tmp_path / "closed_form")
        out = json.loads(json_path.read_text())
        points = [*out["grids"]["n"]["points"], *out["grids"]["h"]["points"]]
        assert [(p["n"], p["h"]) for p in out["grids"]["n"]["points"]] == [(64, 4), (128, 4)]
        assert [(p["n"], p["h"]) for p in out["grids"]["h"]["points"]] == [(64, 4), (64, 8)]
        for p in points:
            assert p["dtype"] == "float64"
            assert p["normal_matrix_size"] == p["h"] * (TINY["d"] + 1)
            assert p["num_chunks"] == 1  # the rule's default budget fits the whole batch
            for name in ("step", *closed_form.COMPONENTS):
                assert len(p["times_s"][name]) == 3
                assert all(_positive(t) for t in p["times_s"][name]), (name, p["times_s"][name])
                assert _positive(p["median_s"][name]) and _positive(p["compile_s"][name])
            for name in ("normal_matrix", "cholesky_solve"):
                assert _positive(p["flops"][name]) and _positive(p["gflops"][name])
            assert p["flops"]["normal_matrix"] == 2.0 * p["n"] * p["normal_matrix_size"] ** 2
            fractions = p["fractions_of_step"]
            assert set(fractions) == {*closed_form.COMPONENTS, "other"}
            assert all(f >= 0 and math.isfinite(f) for f in fractions.values()), fractions
            # No bound on their sum: at sub-millisecond sizes each part timed apart carries its
            # own dispatch cost, so the sum is timing noise there, not a property to test.
            assert p["line_search"]["trials"] >= 1
            assert math.isfinite(p["loss"]) and p["loss_after"] <= p["loss"] * (1 + 1e-5)
        for variable in ("n", "h"):
            for name in ("step", *closed_form.COMPONENTS):
                exponent = out["growth_exponents"][variable][name]
                assert math.isfinite(exponent["fitted"]) and len(exponent["local"]) == 1
        peak = out["float64_matmul_peak"]
        # the one peak: the fastest float64 matmul of every point's rounds (3 points x 3 rounds)
        assert peak["dtype"] == "float64" and len(peak["times_s"]) == 3 * 3
        assert peak["gflops"] == pytest.approx(2 * 32**3 / min(peak["times_s"]) / 1e9)
        assert out["machine"]["backend"] == jax.default_backend()
        md = md_path.read_text()
        assert "| 128 | 4 | 24 |" in md and "Growth exponents" in md and "Machine:" in md


def test_closed_form_needs_64_bit_mode():
    with jax.enable_x64(False), pytest.raises(ValueError, match="64-bit"):
        closed_form.measure_point(16, 2, repeats=1, **TINY)


def test_hybrid_measure_times_the_same_steps_with_one_phase():
    """Both chunks run es_every steps (the hybrid's with one phase at its end); the phase's time
    and the forward-pass ratio are well formed."""
    result = hybrid.measure("cpu", "digits", repeats=1, es_every=10)
    every = result["es_every"]
    assert result["steps_run"] == {"bp": 2 * every, "hybrid": 2 * every}  # warm-up + 1 round
    assert result["cost_ratio_vs_bp"] > 1 and _positive(result["bp_step_ms"])
    assert math.isfinite(result["phase_s"]) and _positive(result["ratio_vs_bp"])
    assert "| cpu | cnn, digits |" in hybrid.markdown_table(result)


def test_sweep_benchmark_against_a_loop_that_compiles_once():
    """The fair in-process baseline (make_train jitted once, a Python loop over the runs)
    compiles its training program ONCE: learning rate and seed are traced arrays."""
    base = tiny_config()
    base.model.widths = (8,)
    # Compiled here, not loaded from the tests' persistent cache (a load can report less time
    # saved than a program's threshold).
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        # the vmapped contrast is driver.run(members_per_batch=0): tests/test_engine.py
        result = sweep.measure(points=2, seeds=1, steps=4, separate=False, base=base, vmapped=False)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    assert result["runs"] == 2 and set(result) >= {"sweep", "loop"}
    # one ahead-of-time compile, none while the runs run
    assert result["loop"]["compiles_during_runs"] == 0, result["loop"]
    assert result["loop"]["program_compiles"] >= 1
    assert result["sweep"]["program_compiles"] >= 1 and _positive(result["sweep"]["wall_s"])
    assert _positive(result["loop"]["steady_s"]) and _positive(result["sweep_vs_loop_steady"])
    table = sweep.markdown_table({**result, "sweep_vmapped": result["sweep"]})
    assert "| one program, members mapped one by one (the engine's default) |" in table
    assert "| one program, all members vmapped (`members_per_batch=0`) |" in table
    assert "All members vmapped against the loop: steady state" in table
    sampled = sweep.measure(
        points=3, seeds=1, steps=4, separate=False, base=base, sample=1, vmapped=False
    )
    assert sampled["loop"]["estimated_from"] == 1  # one run timed, scaled to three
    loop = sampled["loop"]  # the compile counted once, the rest three times
    assert loop["steady_s"] <= loop["wall_s"] - loop["compile_s"] < 3 * loop["wall_s"]
    assert "(timed 1 runs, scaled)" in sweep.markdown_table(sampled)
