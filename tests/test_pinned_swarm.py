"""Pinned behaviour of the swarms and of population evaluation: the velocity update without a
clamp, bests re-scored on every batch, the generation's statistics, memory-bounded chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altlearn import losses, models, rules
from altlearn.rules._population import chunk_size_for, evaluate_population, population_sharding
from altlearn.rules._swarm import Coefficients, Swarm, update_swarm
from altlearn.rules.neuron_pso import candidate_loss, layer_params_of, neurons_of

TASK = losses.make_task("classification")


def test_velocity_clamp_zero_means_no_clamp():
    """v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x), unclipped when velocity_clamp is 0,
    clipped to [-v_max, v_max] when it is positive; then x <- x + v."""
    x, v, p = jnp.array([[0.0], [1.0]]), jnp.array([[0.5], [-0.5]]), jnp.array([[2.0], [-1.0]])
    swarm = Swarm(x, v, p)
    r = jnp.array([[[0.5], [0.25]], [[1.0], [0.5]]])  # r1, r2 per particle
    fitness, pbest_fitness = jnp.array([5.0, 5.0]), jnp.array([1.0, 2.0])  # no new bests
    g = jnp.array([3.0])  # the swarm best, fitness 0.5: stays
    w, c1, c2 = 0.5, 1.0, 2.0
    expected = w * v + c1 * r[0] * (p - x) + c2 * r[1] * (g[None] - x)  # [[3.75], [-1.5]]
    for clamp, bound in ((0.0, np.inf), (1.0, 1.0)):
        new, best, _ = update_swarm(
            r, swarm, g, fitness, pbest_fitness, jnp.float32(0.5), Coefficients(w, c1, c2, clamp)
        )
        want = np.clip(expected, -bound, bound)
        np.testing.assert_allclose(new.velocity, want, rtol=1e-6)
        np.testing.assert_allclose(new.position, x + want, rtol=1e-6)
        np.testing.assert_array_equal(best, g)


def test_pso_rescores_the_bests_on_each_batch_and_reports_the_generation():
    """Step 2 runs on a batch whose labels are shuffled: the bests found on batch 1 are scored
    again on it, so ``fitness_best`` is the reported params' loss on batch 2 (never a stale
    batch-1 figure), ``loss`` the incoming params' and ``fitness_mean`` the particles' mean;
    the state keeps its structure (the bests' fitness included)."""
    model = models.mlp((6,), 3, widths=(4,))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (32, 6))
    y = jax.random.randint(keys[1], (32,), 0, 3)
    variables = model.init(keys[2], x[:1])
    rule = rules.make_rule("pso", model, TASK, optax.sgd(0.1), {}, population_size=8)
    state = rule.init(jax.random.PRNGKey(1), variables)
    step = jax.jit(rule.step)
    loss_of = jax.jit(lambda params, batch: rules.params_loss(model, TASK, {}, batch)(params))
    variables, state, _ = step(jax.random.PRNGKey(2), variables, state, (x, y))
    shuffled = (x, (y + 1) % 3)
    particles = jax.jit(jax.vmap(loss_of, (0, None)))(state.position, shuffled)
    incoming = loss_of(variables["params"], shuffled)
    new, new_state, metrics = step(jax.random.PRNGKey(3), variables, state, shuffled)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)  # a lax.scan carry
    np.testing.assert_allclose(metrics["loss"], incoming, rtol=1e-5)
    np.testing.assert_allclose(metrics["fitness_best"], loss_of(new["params"], shuffled), 1e-5)
    np.testing.assert_allclose(metrics["fitness_mean"], jnp.mean(particles), rtol=1e-5)
    assert float(metrics["fitness_best"]) <= float(jnp.min(particles)) + 1e-6


def test_a_budget_below_one_member_evaluates_one_member_at_a_time():
    assert chunk_size_for(12, 10**9, 1) == 1
    assert chunk_size_for(12, 2**20, 4) == 4  # four members fit: the largest divisor <= 4
    assert chunk_size_for(12, 2**20, 5) == 4
    assert chunk_size_for(12, 2**20, 0) == 12  # no budget


def test_chunked_evaluation_holds_one_chunk_at_a_time_and_gives_the_same_fitness():
    """chunk_size 2 of 8 members: four sequential chunks (a loop of length 4 whose body sees
    2 members at once), the same fitness as one vmap over all 8."""
    population = {"w": jnp.arange(24.0).reshape(8, 3), "b": jnp.arange(8.0)}
    fitness = lambda m: jnp.sum(m["w"] ** 2) + m["b"]
    whole = evaluate_population(fitness, population)
    np.testing.assert_array_equal(whole, jax.vmap(fitness)(population))
    np.testing.assert_array_equal(evaluate_population(fitness, population, 2), whole)
    loops = lambda c: [
        e.params["length"]
        for e in jax.make_jaxpr(lambda p: evaluate_population(fitness, p, c))(population).eqns
        if e.primitive.name == "scan"
    ]
    assert loops(2) == [4] and loops(8) == []


def test_one_device_gets_no_population_sharding(monkeypatch):
    """A population is sharded only over several devices: on one there is nothing to split
    (None, whatever the population size); over the 8 test devices the member axis is split."""
    assert len(population_sharding(16).mesh.devices) == 8
    monkeypatch.setattr(jax, "devices", lambda: jax.local_devices()[:1])
    assert population_sharding(3) is None


def test_a_neuron_candidate_is_scored_as_the_whole_network_with_that_neuron_set():
    """neuron_pso's downstream-only evaluation (the rank-one update of the next dense layer
    through a non-identity decorrelation matrix, the splice at the output layer) gives the loss
    of a full forward pass with neuron j set to the candidate, in every layer."""
    model = models.mlp((6,), 3, widths=(5, 4), decorrelation=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (16, 6))
    y = jax.random.randint(keys[1], (16,), 0, 3)
    variables = model.init(keys[2], x)
    variables["decorrelation"] = jax.tree.map(lambda r: r + 0.1, variables["decorrelation"])

    @jax.jit
    def both(variables):
        """(downstream-only, full forward) losses of one candidate per neuron, per layer."""
        params, out = variables["params"], []
        _, trace = model.apply_layered(variables, x)
        for layer, name in enumerate(model.layer_names):
            rows = neurons_of(params[name])
            thetas = rows + jax.random.normal(jax.random.fold_in(keys[3], layer), rows.shape)
            loss, _, cache = candidate_loss(model, TASK, variables, layer, trace, y)
            js = jnp.arange(len(rows))

            def full(j, theta, rows=rows, name=name):
                changed = {**params, name: layer_params_of(rows.at[j].set(theta), params[name])}
                logits = model.apply({**variables, "params": changed}, x)
                return jnp.mean(TASK.loss(logits, y))

            out.append(
                (jax.vmap(loss, (0, 0, None))(js, thetas, cache), jax.vmap(full)(js, thetas))
            )
        return out

    for name, (fast, full) in zip(model.layer_names, both(variables)):
        np.testing.assert_allclose(fast, full, rtol=1e-5, err_msg=name)


def test_a_jacobi_step_moves_every_swarm_and_reports_each_neurons_best():
    """update_order='jacobi' (tests/test_swarm.py checks its steps against a reference loop in
    its slow tier): the state keeps its structure, and every neuron's reported weights are its
    swarm best: the incoming weights, or one of its particles' personal bests."""
    model = models.mlp((6,), 3, widths=(4,))
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 6))
    y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 3)
    variables = model.init(jax.random.PRNGKey(2), x)
    rule = rules.neuron_pso.neuron_pso(
        model, TASK, None, {}, 3, init_scale=0.5, velocity_clamp=0.0, update_order="jacobi"
    )
    state = jax.jit(rule.init)(jax.random.PRNGKey(3), variables)
    new, new_state, _ = jax.jit(rule.step)(jax.random.PRNGKey(4), variables, state, (x, y))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)  # a lax.scan carry
    for name, swarm in zip(model.layer_names, new_state):
        old, rows = neurons_of(variables["params"][name]), neurons_of(new["params"][name])
        for j in range(len(rows)):
            candidates = np.concatenate([old[j][None], swarm.pbest[j]])
            assert np.any(np.all(candidates == np.asarray(rows[j]), axis=1)), (name, j)
        assert not np.array_equal(swarm.position, state[model.layer_names.index(name)].position)
