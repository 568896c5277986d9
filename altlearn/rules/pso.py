"""Whole-network particle swarm optimisation: the baseline of paper 000 (D. Kumar, "Training
neural networks by training individual neurons", arXiv 2412.05667).

A particle is a full parameter pytree; ``population_size`` particles move by the constricted PSO
update with a velocity clamp (``altlearn.rules._swarm``), and the swarm best is the reported
``variables['params']``. Particles start at the initial params + ``init_scale`` * N(0, 1), with
particle 0 exactly the initial network, so the swarm never starts worse than it.

Minibatches (our decision, shared with ``neuron_pso`` so that the two compare fairly): the
personal and swarm bests are re-scored on each new batch before they are compared with the
particles. A best found on one lucky batch would otherwise never be displaced. It costs a second
population evaluation per step (2P + 1 forward passes). ``rescore_bests=False`` is classic PSO,
as pyswarms runs it: a best keeps the fitness it was found with (P + 1 passes); on a full batch
that is the same run at half the cost, since a best's loss on the one batch does not change; on
minibatches it stalls (digits, batch 64, 100 steps, seeds 0-3: train loss 1.75-2.48 against
0.62-0.79 re-scored; docs/BENCHMARKS.md).

Velocity clamp: on digits (MLP 64-32-10, batch 64) whole-network PSO barely moves in 300 steps
without one (train loss 3.7 -> 2.4); with ``velocity_clamp=0.1``, 100 steps reach train loss
0.6-0.8 over seeds 0-3. On the wider default model 0.03 (clamp and init scale) learns better
still, so it is the default (numbers in the factory's docstring). Every evaluation is
noise-free: on a model with ``intrinsic_noise`` the swarm sees the clean network.

The population is evaluated in one ``vmap`` (``altlearn.rules._population``), in chunks under
``memory_budget_mb`` and with the particle axis sharded over the devices with ``shard``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules._population import activation_bytes, evaluate_population, population_sharding
from altlearn.rules._swarm import (
    PARTICLES,
    Coefficients,
    Swarm,
    as_fitness,
    chunk_size,
    count_nan,
    init_swarm,
    random_like,
    uniform_fast,
    update_swarm,
)
from altlearn.rules.base import (
    Batch,
    LearningRule,
    Metrics,
    RuleSpec,
    Sizes,
    Splits,
    Variables,
    check_count,
    never,
    params_loss,
)


def pso(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    population_size: int = 64,
    inertia: Any = 0.729,
    cognitive: Any = 1.49445,
    social: Any = 1.49445,
    init_scale: Any = 0.03,
    velocity_clamp: Any = 0.03,
    shard: bool = False,
    memory_budget_mb: int = 0,
    rescore_bests: bool = True,
    shared_coefficients: bool = False,
) -> LearningRule:
    """Whole-network PSO: ``population_size`` particles, each a full parameter pytree.

    Each step scores the particles and the personal bests on the batch (one vmapped evaluation
    each, in chunks under ``memory_budget_mb``, sharded over the devices with ``shard``), and
    the global best, which is the reported ``variables['params']``; then applies the PSO update
    (``inertia`` w, ``cognitive`` c1, ``social`` c2, ``velocity_clamp`` v_max, 0 = off). The
    state is the ``Swarm`` with its bests' fitness; the global best
    lives in the variables. ``rescore_bests=False`` compares the particles with the fitness
    their bests were found with instead of re-scoring them (P forward passes per step instead
    of 2P + 1 evaluations; the same run on a full batch; module docstring).
    ``shared_coefficients=True`` draws r1, r2 once per particle and step, shared by all its
    coordinates (evosax's PSO does so), instead of once per coordinate (Clerc & Kennedy's
    update, the default): 2P random numbers a step instead of 2P x num_params.

    ``init_scale`` and ``velocity_clamp`` default to 0.03: on the default MLP (hidden
    512-512, batch 128, 300 steps) 0.1 for both reached train loss 2.94 from 3.15 on mnist1d
    (test accuracy 0.13), 1.15 from 3.04 on digits (0.67) and 0.43 from 0.78 on circles
    (0.80); 0.03 reached 2.25 (0.21), 0.21 (0.91) and 0.24 (0.975), and the same as 0.1 on
    the tiny digits MLP 64-32-10 (200 steps, 4 seeds: train loss 0.44-0.55 against
    0.39-0.55).

    Metrics: ``loss`` (incoming params on this batch), ``fitness_best`` (the new global best's
    fitness: on this batch, or with ``rescore_bests=False`` on the batch it was found on),
    ``fitness_mean`` (mean over the particles with finite fitness), ``nan_fitness`` (NaN losses
    among the particles and the re-scored personal bests).
    """
    del optimizer, data  # PSO moves the parameters itself
    check_count("population_size", population_size)
    sharding = population_sharding(population_size) if shard else None
    coef = Coefficients(inertia, cognitive, social, velocity_clamp)

    def constrain(swarm: Swarm) -> Swarm:
        """The particle axis of positions, velocities and bests sharded over the devices."""
        if sharding is None:
            return swarm
        put = lambda a: jax.lax.with_sharding_constraint(a, sharding)
        return swarm._replace(**{f: jax.tree.map(put, swarm._asdict()[f]) for f in PARTICLES})

    def init(key: jax.Array, variables: Variables) -> Swarm:
        params = variables["params"]
        noise = random_like(jax.random.normal, key, params, (population_size,))
        dtype = jnp.result_type(*jax.tree.leaves(params))  # the losses' (strong) dtype
        swarm = init_swarm(params, noise, init_scale)._replace(  # not found yet: +inf
            pbest_fitness=jnp.full((population_size,), jnp.inf, dtype),
            best_fitness=jnp.full((), jnp.inf, dtype),
        )
        return constrain(swarm)

    def step(
        key: jax.Array, variables: Variables, state: Swarm, batch: Batch
    ) -> tuple[Variables, Swarm, Metrics]:
        x, _ = batch
        loss_of = params_loss(model, task, variables, batch)
        chunk = chunk_size(
            population_size,
            lambda: activation_bytes(model.apply, variables, x),
            memory_budget_mb,
            sharding,
        )
        losses = evaluate_population(loss_of, state.position, chunk, sharding)  # [P]
        loss = loss_of(variables["params"])
        if rescore_bests:
            pbest_losses = evaluate_population(loss_of, state.pbest, chunk, sharding)  # [P]
            pbest_fitness, incumbent = as_fitness(pbest_losses), as_fitness(loss)
        else:  # the fitness the bests were found with; the initial params': this batch's
            pbest_losses = pbest_fitness = state.pbest_fitness
            found = jnp.isfinite(state.best_fitness)
            incumbent = jnp.where(found, state.best_fitness, as_fitness(loss))
        fitness = as_fitness(losses)
        best_in = variables["params"]
        if shared_coefficients:  # [2, P, 1, ...]: one r1, r2 per particle for every leaf
            u = uniform_fast(key, (2, population_size), fitness.dtype)
            r = jax.tree.map(lambda p: u.reshape(2, population_size, *(1,) * p.ndim), best_in)
        else:
            r = random_like(uniform_fast, key, best_in, (2, population_size))
        swarm, best, best_fitness = update_swarm(
            r, state, variables["params"], fitness, pbest_fitness, incumbent, coef
        )
        finite = jnp.isfinite(fitness)
        metrics = {
            "loss": loss,
            "fitness_best": best_fitness,
            "fitness_mean": jnp.sum(jnp.where(finite, fitness, 0.0)) / jnp.sum(finite),
            "nan_fitness": count_nan(losses, pbest_losses),
        }
        return {**variables, "params": best}, constrain(swarm), metrics

    return LearningRule(init, step)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """The incoming params' loss, the P particles and (re-scoring) the P personal bests."""
    del model, sizes
    population = int(options["population_size"])
    return 1.0 + (2 if options["rescore_bests"] else 1) * population


SPEC = RuleSpec(
    pso,
    summary="whole-network particle swarm (constriction coefficients, velocity clamp); bests "
    "re-scored on each batch; population vmapped, chunked, sharded",
    source="baseline of paper 000 (Kumar, arXiv 2412.05667); Clerc & Kennedy 2002",
    cost=cost,
    uses_optimizer=never,
    search=("inertia=[0.4,0.9]",),
)
