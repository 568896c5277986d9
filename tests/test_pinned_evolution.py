"""Pinned behaviour of the evolution rule's bookkeeping: a NaN member does not break the search,
a generation without a finite member reports no statistics, the breakdown flag is raised only on
a breakdown."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from altlearn import losses, models
from altlearn.rules.evolution import evolution

NAN_ABOVE_1 = losses.Task(  # 0.5 (w - 3)^2 at x = 1, y = 3, NaN where w > 1
    "regression",
    "nan_above_1",
    lambda out, t: jnp.where(out[:, 0] > 1, jnp.nan, 0.5 * jnp.sum((out - t) ** 2, -1)),
)
STEPS = 20


@functools.cache
def _program():
    """STEPS steps of ARS (16 members, std 0.5) on out = w x (x = 1, y = 3) from a given
    w, jitted once for every test."""
    model = models.from_flax(nn.Dense(1, use_bias=False), "scalar")
    batch = jnp.ones((4, 1)), jnp.full((4, 1), 3.0)
    options = {"population_size": 16, "strategy_params": {"std_init": 0.5}}
    rule = evolution(model, NAN_ABOVE_1, optax.adam(0.1), {}, "ARS", **options)

    @jax.jit
    def run(w):
        def body(carry, t):
            v, s = carry
            v, s, metrics = rule.step(jax.random.fold_in(jax.random.PRNGKey(1), t), v, s, batch)
            return (v, s), metrics

        variables = {"params": {"kernel": jnp.full((1, 1), w)}}
        state = rule.init(jax.random.PRNGKey(0), variables)
        (v, _), metrics = jax.lax.scan(body, (variables, state), jnp.arange(STEPS))
        return v["params"]["kernel"][0, 0], metrics

    return run


def _run(w):
    final, metrics = _program()(jnp.float32(w))
    return float(final), jax.tree.map(np.asarray, metrics)


def test_nan_members_get_a_finite_fitness_so_the_search_goes_on():
    """Members beyond w = 1 have a NaN loss; each is handed the worst finite fitness plus one,
    so a strategy that reads fitness values (ARS: differences of antithetic pairs, not ranks)
    stays finite (the breakdown flag is never raised) and its mean climbs from 0 towards the
    finite optimum w = 1."""
    w, metrics = _run(0.0)
    assert metrics["nan_fitness"].sum() > 0
    np.testing.assert_array_equal(metrics["strategy_nonfinite"], np.zeros(STEPS))
    assert 0.3 < w <= 1.0, w


def test_a_generation_without_a_finite_member_reports_no_statistics():
    """Every member NaN (the search starts at w = 5, std 0.5): the first generation's mean and
    std are NaN (no finite member to average), its best is +inf and all 16 are counted."""
    _, metrics = _run(5.0)
    first = {k: v[0] for k, v in metrics.items()}
    assert np.isnan(first["fitness_mean"]) and np.isnan(first["fitness_std"]), first
    assert np.isposinf(first["fitness_best"]) and first["nan_fitness"] == 16, first


def test_max_cma_dims_refuses_only_the_quadratic_strategies_and_only_above_it():
    """One parameter: CMA-ES (a num_dims x num_dims matrix) runs at max_cma_dims = 1; a
    diagonal strategy (Open_ES) is never refused, not even at 0."""
    model = models.from_flax(nn.Dense(1, use_bias=False), "scalar")
    variables = {"params": {"kernel": jnp.zeros((1, 1))}}
    build = lambda strategy, limit: evolution(
        model, NAN_ABOVE_1, optax.adam(0.1), {}, strategy, population_size=4, max_cma_dims=limit
    ).init(jax.random.PRNGKey(0), variables)
    build("CMA_ES", 1)
    build("Open_ES", 0)  # tests/test_evolution.py checks the refusal above the limit
