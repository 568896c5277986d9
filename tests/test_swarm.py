"""Particle swarms (docs/RULES.md, pso and neuron_pso): whole-network PSO and per-neuron cooperative
PSO learn; the vmapped per-neuron step equals a plain loop over neurons; downstream-only
evaluation equals a full forward pass; sharding, chunking, clamping, NaN handling and errors."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altlearn import losses, models, rules
from altlearn.rules._population import activation_bytes, population_sharding
from altlearn.rules._swarm import (
    Coefficients,
    Swarm,
    as_fitness,
    chunk_size,
    random_like,
    uniform_fast,
    update_swarm,
)
from altlearn.rules.neuron_pso import candidate_loss, layer_params_of, neuron_pso, neurons_of
from altlearn.rules.pso import pso

TASK = losses.make_task("classification")


def _problem(model, input_shape=(6,), num_outputs=3, batch=16, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (batch, *input_shape))
    y = jax.random.randint(k2, (batch,), 0, num_outputs)
    return model.init(k3, x), (x, y)


@functools.partial(jax.jit, static_argnums=0)
def _full_loss(model, variables, params, batch):
    x, y = batch
    return jnp.mean(TASK.loss(model.apply({**variables, "params": params}, x), y))


def _loss_with_neuron(model, variables, params, layer, rows, j, theta, batch):
    """Full forward pass with neuron j of ``layer`` set to theta (the other neurons: rows)."""
    name = model.layer_names[layer]
    layer_params = layer_params_of(rows.at[j].set(theta), params[name])
    return _full_loss(model, variables, {**params, name: layer_params}, batch)


# ------------------------------------------------------------------------------ exactness


def _reference_neuron_pso_step(model, variables, state, batch, key, coef, order):
    """neuron_pso's specification by the letter: a Python loop over layers, neurons and particles,
    every fitness from a full forward pass."""
    params = dict(variables["params"])
    new_state = []
    noise = random_like(uniform_fast, key, tuple(s.position for s in state), (2,))
    for layer, (swarm, r) in enumerate(zip(state, noise)):
        name = model.layer_names[layer]
        rows = neurons_of(params[name])
        context_rows = rows
        n = swarm.position.shape[0]
        best_fitness = as_fitness(_full_loss(model, variables, params, batch))
        out = []
        for j in range(n):
            base = rows if order == "gauss_seidel" else context_rows
            loss = functools.partial(
                _loss_with_neuron, model, variables, params, layer, base, j, batch=batch
            )
            fitness = [
                as_fitness(jnp.stack([loss(theta) for theta in thetas[j]]))
                for thetas in (swarm.position, swarm.pbest)
            ]
            s = jax.tree.map(lambda leaf, j=j: leaf[j], swarm)
            s, best, fit = update_swarm(r[:, j], s, rows[j], *fitness, best_fitness, coef)
            out.append(s)
            rows = rows.at[j].set(best)
            if order == "gauss_seidel":
                best_fitness = fit
        params[name] = layer_params_of(rows, params[name])
        new_state.append(jax.tree.map(lambda *a: jnp.stack(a), *out))
    return {**variables, "params": params}, tuple(new_state)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["jacobi", "gauss_seidel"])
def test_neuron_pso_step_equals_loop_over_neurons(order):
    model = models.mlp((6,), 3, widths=(4,))
    variables, batch = _problem(model)
    coef = Coefficients(0.729, 1.49445, 1.49445, 0.0)
    rule = neuron_pso(model, TASK, None, {}, 4, *coef[:3], 0.5, 0.0, update_order=order)
    state = rule.init(jax.random.PRNGKey(1), variables)
    ref_vars, ref_state, initial = variables, state, variables["params"]
    for i in range(2):  # the second step moves particles that have a velocity
        key = jax.random.PRNGKey(10 + i)
        variables, state, metrics = jax.jit(rule.step)(key, variables, state, batch)
        if order == "gauss_seidel":  # a neuron's best changes only if the batch loss drops
            assert metrics["fitness_best"] <= metrics["loss"] + 1e-6
        ref_vars, ref_state = _reference_neuron_pso_step(
            model, ref_vars, ref_state, batch, key, coef, order
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            (variables, state),
            (ref_vars, ref_state),
        )
    first = model.layer_names[0]
    assert not np.allclose(variables["params"][first]["kernel"], initial[first]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, model, input_shape",
    [
        # dense layers: rank-one update of the next layer; the output layer: splice only
        ("mlp_decorrelated", models.mlp((6,), 3, widths=(5, 4), decorrelation=True), (6,)),
        # conv layers: splice a filter's feature map, run pool/flatten and the rest
        ("cnn", models.cnn((8, 8, 1), 3, channels=(2, 3), dense=()), (8, 8, 1)),
    ],
)
def test_downstream_evaluation_equals_full_forward(name, model, input_shape):
    variables, batch = _problem(model, input_shape)
    if "decorrelation" in variables:  # a non-identity R, so the decorrelated path counts
        variables["decorrelation"] = jax.tree.map(
            lambda r: r + 0.1 * jnp.ones_like(r), variables["decorrelation"]
        )
    params = variables["params"]
    apply_layered = jax.jit(model.apply_layered)
    _, trace = apply_layered(variables, batch[0])
    for layer in range(model.num_layers):
        lname = model.layer_names[layer]
        rows = neurons_of(params[lname])
        np.testing.assert_array_equal(
            layer_params_of(rows, params[lname])["kernel"], params[lname]["kernel"]
        )
        n, d = rows.shape
        thetas = rows + jax.random.normal(jax.random.PRNGKey(layer), (2, n, d))  # [2, n, d]
        loss, set_neuron, cache = candidate_loss(model, TASK, variables, layer, trace, batch[1])
        fast = jax.jit(jax.vmap(jax.vmap(loss, (0, 0, None)), (0, 0, None)))(
            jnp.broadcast_to(jnp.arange(n), (2, n)), thetas, cache
        )
        full = [
            [
                _loss_with_neuron(model, variables, params, layer, rows, j, t[j], batch)
                for j in range(n)
            ]
            for t in thetas
        ]
        np.testing.assert_allclose(fast, np.array(full), rtol=1e-5, err_msg=f"{name} {lname}")

        # Gauss-Seidel's cache update equals the trace of the changed network.
        changed = {**params, lname: layer_params_of(rows.at[1].set(thetas[0, 1]), params[lname])}
        _, new_trace = apply_layered({**variables, "params": changed}, batch[0])
        new_cache = set_neuron(cache, 1, thetas[0, 1])
        np.testing.assert_allclose(new_cache.a, new_trace.preacts[layer], rtol=1e-5, atol=1e-6)
        if new_cache.a_next is not None:
            np.testing.assert_allclose(
                new_cache.a_next, new_trace.preacts[layer + 1], rtol=1e-5, atol=1e-6
            )
    assert name != "mlp_decorrelated" or cache.a_next is None  # the output layer splices


# ------------------------------------------------------------------------------ mechanics


@pytest.mark.slow
@pytest.mark.parametrize(
    "rule_fn, configs",
    [
        (pso, [{}, {"shard": True, "memory_budget_mb": 1}]),
        (neuron_pso, [{}, {"shard": True, "memory_budget_mb": 1}]),
    ],
)
def test_sharded_and_chunked_equal_plain(rule_fn, configs):
    model = models.mlp((6,), 3, widths=(8,))
    variables, batch = _problem(model, batch=2048)
    member_bytes = lambda: activation_bytes(model.apply, variables, batch[0])
    assert chunk_size(64, member_bytes, 1, population_sharding(64)) < 64  # 1 MB chunks pso
    results = []
    for options in configs:
        rule = rule_fn(model, TASK, None, {}, 64 if rule_fn is pso else 8, **options)
        v, state = variables, rule.init(jax.random.PRNGKey(1), variables)
        for i in range(3):
            v, state, metrics = jax.jit(rule.step)(jax.random.PRNGKey(i), v, state, batch)
        results.append((v, state, metrics))
    for other in results[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), results[0], other)
    if rule_fn is pso:
        first = model.layer_names[0]
        assert len(results[1][1].position[first]["kernel"].sharding.device_set) == 8


@pytest.mark.parametrize("rule_fn", [pso, neuron_pso])
def test_velocity_clamp_bounds_velocities(rule_fn):
    model = models.mlp((6,), 3, widths=(8,))
    variables, batch = _problem(model)
    rule = rule_fn(model, TASK, None, {}, 8, init_scale=2.0, velocity_clamp=0.05)
    state = rule.init(jax.random.PRNGKey(1), variables)
    for i in range(3):
        variables, state, _ = jax.jit(rule.step)(jax.random.PRNGKey(i), variables, state, batch)
    velocity = jnp.concatenate(
        [
            jnp.ravel(v)
            for v in jax.tree.leaves(
                [s.velocity for s in ([state] if isinstance(state, Swarm) else state)]
            )
        ]
    )
    assert float(jnp.max(jnp.abs(velocity))) <= 0.05 + 1e-7
    assert float(jnp.max(jnp.abs(velocity))) > 0.04  # the clamp is active, not vacuous


@pytest.mark.parametrize("shared", [False, True])
def test_shared_coefficients_draw_one_r_per_particle(shared):
    """First step from zero velocity with pbest = x: v = c2 r2 (g - x), so v / (g - x) is
    c2 r2: one number per particle with shared_coefficients, one per coordinate without."""
    model = models.mlp((6,), 3, widths=(8,))
    variables, batch = _problem(model)
    rule = pso(model, TASK, None, {}, 6, init_scale=0.5, velocity_clamp=0.0,
               shared_coefficients=shared)  # fmt: skip
    state = rule.init(jax.random.PRNGKey(1), variables)
    per_particle = jax.vmap(lambda tree: jax.flatten_util.ravel_pytree(tree)[0])
    x = per_particle(state.position)  # [P, n]
    # The swarm best of the step (the best of the particles and the incoming network):
    variables_new, state_new, _ = jax.jit(rule.step)(jax.random.PRNGKey(2), variables, state, batch)
    g = jax.flatten_util.ravel_pytree(variables_new["params"])[0]
    v = per_particle(state_new.velocity)
    moving = np.abs(np.asarray(g - x)) > 1e-3
    ratio = np.where(moving, np.asarray(v) / np.where(moving, np.asarray(g - x), 1.0), np.nan)
    movers = np.any(moving, axis=1)  # particle 0 may be the best itself
    spread = np.nanmax(ratio[movers], axis=1) - np.nanmin(ratio[movers], axis=1)
    assert movers.sum() >= 4
    if shared:
        np.testing.assert_allclose(spread, 0.0, atol=1e-3)
    else:
        assert np.all(spread > 0.5)  # r2 ~ U(0, 1) per coordinate, times c2 = 1.49


def test_uniform_fast_is_uniform_and_keyed():
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    r = jax.jit(jax.vmap(lambda k: uniform_fast(k, (2, 50_000))))(keys)
    np.testing.assert_array_equal(r[1], uniform_fast(keys[1], (2, 50_000)))  # vmap == single
    assert r.dtype == jnp.float32 and float(r.min()) >= 0.0 and float(r.max()) < 1.0
    flat = np.asarray(r[0]).ravel()
    assert abs(flat.mean() - 0.5) < 0.005 and abs(flat.var() - 1 / 12) < 0.002
    np.testing.assert_allclose(
        np.histogram(flat, bins=10, range=(0, 1))[0] / flat.size, 0.1, atol=0.005
    )
    # uncorrelated: neighbours, r1 with r2, one key with another
    for a, b in [(flat[:-1], flat[1:]), (r[0, 0], r[0, 1]), (r[0], r[1])]:
        assert abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) < 0.01


def test_nan_fitness_never_becomes_a_best():
    swarm = Swarm(jnp.arange(4.0)[:, None], jnp.zeros((4, 1)), jnp.full((4, 1), 9.0))
    coef = Coefficients(0.729, 1.49445, 1.49445, 0.0)
    r = jnp.full((2, 4, 1), 0.5)
    fitness = as_fitness(jnp.array([jnp.nan, 1.0, jnp.nan, 5.0]))
    new, best, best_fitness = update_swarm(
        r, swarm, jnp.array([7.0]), fitness, jnp.full(4, 3.0), jnp.float32(2.0), coef
    )
    np.testing.assert_array_equal(new.pbest[:, 0], [9.0, 1.0, 9.0, 9.0])
    assert float(best[0]) == 1.0 and float(best_fitness) == 1.0
    nothing = jnp.full(4, jnp.inf)  # every particle NaN, the best too: nothing changes
    _, best, _ = update_swarm(r, swarm, jnp.array([7.0]), nothing, nothing, jnp.inf, coef)
    assert float(best[0]) == 7.0


@pytest.mark.parametrize("rule_fn", [pso, neuron_pso])
def test_nan_losses_are_counted_and_skipped(rule_fn):
    """A loss that is NaN for large outputs, on particles spread widely: some particles are
    NaN, the reported params are not. (neuron_pso runs Gauss-Seidel here: under Jacobi each
    neuron's new best is finite on its own, but the neurons of a layer change together.)"""
    model = models.mlp((6,), 3, widths=(8,))
    variables, batch = _problem(model)
    limit = 1.5 * float(jnp.max(jnp.abs(model.apply(variables, batch[0]))))
    nan_task = TASK._replace(
        loss=lambda out, y: jnp.where(jnp.max(jnp.abs(out)) > limit, jnp.nan, TASK.loss(out, y))
    )
    options = {"update_order": "gauss_seidel"} if rule_fn is neuron_pso else {}
    rule = rule_fn(model, nan_task, None, {}, 16, init_scale=1.0, velocity_clamp=0.0, **options)
    state = rule.init(jax.random.PRNGKey(1), variables)
    step = jax.jit(rule.step)
    for i in range(2):
        variables, state, metrics = step(jax.random.PRNGKey(i), variables, state, batch)
        assert int(metrics["nan_fitness"]) > 0
        assert np.isfinite(float(metrics["fitness_best"]))
        assert np.isfinite(float(_full_loss(model, variables, variables["params"], batch)))


# ------------------------------------------------------------------------------ errors


def test_errors():
    resnet = models.make_model("resnet", (8, 1), 3)
    with pytest.raises(ValueError, match="needs a layered model"):
        rules.make_rule("neuron_pso", resnet, TASK, optax.sgd(0.1))
    mlp = models.mlp((6,), 3, widths=(8,))
    with pytest.raises(ValueError, match="Unknown update_order 'random'.*jacobi, gauss_seidel"):
        rules.make_rule("neuron_pso", mlp, TASK, optax.sgd(0.1), update_order="random")
    with pytest.raises(ValueError, match="population_size 12 is not divisible by the 8 devices"):
        rules.make_rule("pso", mlp, TASK, optax.sgd(0.1), population_size=12, shard=True)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        rules.make_rule(
            "neuron_pso",
            mlp,
            TASK,
            optax.sgd(0.1),
            particles_per_neuron=3,
            update_order="gauss_seidel",
            shard=True,
        )
    with pytest.raises(ValueError, match="population_size must be >= 1"):
        rules.make_rule("pso", mlp, TASK, optax.sgd(0.1), population_size=0)


# ------------------------------------------------------------------------------ transforms


@pytest.mark.slow
@pytest.mark.parametrize("rule_fn", [pso, neuron_pso])
def test_jit_and_vmap_over_seeds_and_inertia(rule_fn):
    model = models.mlp((6,), 3, widths=(8,))
    variables, batch = _problem(model)

    def run(key, inertia):  # init and three steps; the float option is a traced value
        rule = rule_fn(model, TASK, None, {}, 8, inertia=inertia, init_scale=0.5)
        v, state = variables, rule.init(key, variables)
        for i in range(3):  # velocities start at 0: inertia acts from the third step on
            v, state, metrics = rule.step(jax.random.fold_in(key, i), v, state, batch)
        return state, metrics

    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    keys = jnp.stack([key_a, key_a, key_b])
    inertia = jnp.array([0.5, 0.729, 0.729])
    batched = jax.jit(jax.vmap(run))(keys, inertia)
    single = jax.jit(run)(keys[1], inertia[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-5), batched, single)
    positions = [
        np.concatenate([np.ravel(a[i]) for a in jax.tree.leaves(batched[0])]) for i in range(3)
    ]
    assert not np.allclose(positions[0], positions[1]), "inertia must matter"
    assert not np.allclose(positions[1], positions[2]), "seeds must give different runs"


@pytest.mark.slow
def test_pso_without_rescoring_is_the_same_run_on_a_full_batch_only():
    """``rescore_bests=False`` keeps each best's fitness from when it was found: on one fixed
    batch that is exactly the re-scored run at half the evaluations; on changing batches the
    two runs part (the option is not a no-op)."""
    model = models.mlp((6,), 3, widths=(8,))
    variables, (x, y) = _problem(model, batch=64)
    halves = [(x[:32], y[:32]), (x[32:], y[32:])]

    def run(rescore, batches):
        rule = pso(model, TASK, None, {}, 16, velocity_clamp=0.1, rescore_bests=rescore)
        v, state = variables, rule.init(jax.random.PRNGKey(1), variables)
        step = jax.jit(rule.step)
        for i in range(8):
            v, state, metrics = step(jax.random.PRNGKey(i), v, state, batches[i % len(batches)])
        return v, state, metrics

    (v1, s1, m1), (v0, s0, m0) = run(True, [(x, y)]), run(False, [(x, y)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), v1, v0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s1, s0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), m1, m0)
    assert float(s0.best_fitness) == pytest.approx(
        float(_full_loss(model, v0, v0["params"], (x, y)))
    )
    (w1, _, _), (w0, _, _) = run(True, halves), run(False, halves)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w0)))
