"""Evolution strategies and population methods over the whole parameter pytree.

Any strategy of evosax (Lange, "evosax: JAX-based evolution strategies", GECCO 2023; 37 in
evosax 0.3.2, each citing its own paper in its module: OpenAI-ES, Salimans et al. 2017; SNES and
xNES, Wierstra et al. 2014; CMA-ES, Hansen 2016; PGPE, Sehnke et al. 2010; PSO, Kennedy &
Eberhart 1995; DE, Storn & Price 1997; GAs, ...) trains the network's ``params``. One step is one
generation on one batch (x, y):

    population, s = strategy.ask(key, s)                   # P members, each a params pytree
    f_i = mean_b loss(model(member_i, x_b), y_b)            # vmapped over members
    s = strategy.tell(key, population, f, s)

**Sign.** evosax *minimises* fitness, so the fitness is the batch loss itself (lower is better),
never an accuracy. A member whose loss is NaN or inf gets the worst finite fitness of its
generation plus one (1e30 if none is finite) before ``tell`` and is counted in
``metrics['nan_fitness']``; it can never become the reported params.

**Reported params** (what ``variables['params']`` holds after a step):

- distribution-based strategies (``init(key, mean)``: OpenAI-ES, SNES, CMA-ES, PGPE, ...): the
  search distribution's mean, initialised at the model's initial params. Stein-variational ones
  (SV_*; ``num_populations`` means, initialised at the initial params + ``init_scale`` * N(0, 1))
  report the mean whose sub-population had the lowest mean fitness in the generation.
- population-based strategies (``init(key, population, fitness)``: PSO, DE, GAs): they need an
  evaluated initial population, and ``init`` sees no batch. ``init`` samples the population
  params + ``init_scale`` * N(0, 1); the first step evaluates that population and hands it to
  the strategy's ``init`` instead of asking, later steps ask and tell. The reported params are
  elitist on the current batch: the generation's best member replaces them when its loss on
  the batch is below theirs on the same batch (a NaN-fitness member never does).

The two kinds have two step functions, chosen once when the rule is built. ``init_scale`` sets
how far the first members lie from the initial params: the std of a population-based initial
population (or of the SV means) and, unless ``strategy_params.std_init`` or a ``std_schedule``
sets it, the initial search std of a distribution-based strategy (evosax's own, 1.0 for
Open_ES, does not learn on the default model; the factory's docstring has the numbers).

Strategies whose constructor takes an ``optimizer`` (OpenAI-ES, SNES, xNES, PGPE, ARS, ...)
apply their search-gradient estimate with the *configured* optax optimizer, so
``optimizer.name``/``learning_rate``/``schedule`` act as for the gradient rules and the learning
rate is sweepable (evosax's own defaults, e.g. SGD with learning rate 1 for the NES family, are
``optimizer.name=sgd, learning_rate=1.0``). ``strategy_params`` overrides fields of the
strategy's default ``Params`` and, for strategies with a ``std_schedule`` constructor argument
(OpenAI-ES, ARS, GAs, ...), its ``std_init`` sets a constant noise scale; all its floats are
sweepable (traced) hyperparameters.

**Evaluation** goes through ``_population.evaluate_population``: one ``vmap`` over members; with
``memory_budget_mb > 0`` in sequential chunks of the largest population divisor whose forward
activations (``activation_bytes``) fit the budget (per device); with ``shard=True`` the member
axis is split over all devices (``population_sharding``; population size divisible by the device
count). Both give the same fitness as one unsharded ``vmap``.

Strategies with a num_dims x num_dims matrix (CMA_ES, SV_CMA_ES, MA_ES, xNES, iAMaLGaM_Full,
ASEBO, DiffusionEvolution without ``num_latent_dims``) are refused above ``max_cma_dims``
parameters in favour of diagonal or low-rank ones (Sep_CMA_ES, SNES, Open_ES, PGPE).

A strategy whose mean turns non-finite (seen: Sep_CMA_ES after its step size collapsed) has
broken down: the rule keeps the last finite state, so the reported params stay the last finite
mean, and flags it in ``metrics['strategy_nonfinite']``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms.distribution_based.sv.base import SV_ES
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm
from jax.flatten_util import ravel_pytree

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules._evosax import (
    build_strategy,
    check_strategy_options,
    constructor_args,
    is_float,
    param_fields,
    strategy_class,
    strong,
)
from altlearn.rules._population import (
    activation_bytes,
    chunk_size_for,
    evaluate_population,
    population_sharding,
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
    check_positive,
    params_loss,
    with_rng_mode,
)

UNFIT_FITNESS = 1e30  # stands in for NaN/inf fitness when no member of a generation is finite


class EvolutionState(NamedTuple):
    es_state: Any  # the evosax strategy state
    evaluated: jax.Array | None  # population-based only: bool [], initial population evaluated


def strategy_param_defaults(
    strategy: str,
    num_dims: int = 10,
    population_size: int = 16,
    strategy_kwargs: dict[str, Any] | None = None,
) -> dict[str, float]:
    """The float fields of ``strategy``'s default ``Params`` (and ``std_init``, the constant
    noise scale, for strategies with a ``std_schedule``), as Python floats.

    Some defaults depend on ``num_dims`` and ``population_size`` (CMA-ES learning rates, ...):
    put in a config only those a run should override or sweep.
    """
    kwargs = dict(strategy_kwargs or {})
    cls = strategy_class(strategy)
    args = constructor_args(cls)
    out = {}
    if param_fields(cls):
        if "num_populations" in args:
            kwargs.setdefault("num_populations", 1)
        check_strategy_options(strategy, kwargs, {})
        solution = jnp.zeros((num_dims,), jnp.float32)
        built = build_strategy(strategy, cls, population_size, solution, kwargs, num_dims)
        for f in dataclasses.fields(built.default_params):
            value = getattr(built.default_params, f.name)
            if is_float(value):
                out[f.name] = float(value)
    if "std_schedule" in args:
        out["std_init"] = float(args["std_schedule"].default(0))
    return out


def evolution(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    strategy: str = "Open_ES",
    population_size: int = 64,
    strategy_kwargs: dict | None = None,
    strategy_params: dict | None = None,
    init_scale: float = 0.01,
    shard: bool = False,
    memory_budget_mb: int = 0,
    max_cma_dims: int = 20000,
    rng_partitionable: str = "auto",
) -> LearningRule:
    """An evosax ``strategy`` over the params pytree; the fitness of a member is its batch loss.

    ``strategy_kwargs``: static constructor arguments (``use_antithetic_sampling``,
    ``num_diff``, ``num_populations`` for SV_*; from Python also callables such as
    RandomSearch's ``sampling_fn(key) -> params``). ``strategy_params``: overrides of the
    strategy's default ``Params`` fields (floats may be traced), plus ``std_init`` for
    strategies with a ``std_schedule``. ``init_scale``: how far the first members lie from
    the initial params: the std of a population-based strategy's initial population (or of
    the SV means) and, unless ``strategy_params.std_init`` (or a ``std_schedule``) sets it,
    the initial search std of a distribution-based strategy. evosax's own std (1.0 for
    Open_ES) does not learn: on the default MLP (hidden 512-512, Adam 3e-3, batch 128, 500
    steps) Open_ES with std 1.0 took circles from loss 0.78 to 3.67 (test accuracy 0.50),
    with std 0.1 to 0.70 (0.58), with std 0.01 to 0.20 (0.995; mnist1d 3.15 to 1.83, 0.29);
    hence 0.01. ``population_size`` is per sub-population for SV_*.
    ``optimizer`` is handed to strategies whose constructor takes one (None: evosax's default).
    ``rng_partitionable``: the threefry mode of every draw in ``init`` and ``step``
    (``base.rng_mode``; ``"auto"`` uses the classic, 3x faster, mode on CPU).
    ``memory_budget_mb``: evaluate the population in sequential chunks whose activations fit
    this many MiB per device (0: all members at once); same fitness up to rounding. On CPU
    it also pays in speed at large populations: 1.3x at P = 1024 and 1.2x at P = 4096 with 32
    MiB on the mnist1d MLP (docs/BENCHMARKS.md), where the unchunked activations no longer fit
    in cache.
    """
    del data
    kwargs = dict(strategy_kwargs or {})
    params_in = dict(strategy_params or {})
    cls, std_schedule = check_strategy_options(strategy, kwargs, params_in)
    population_size = int(population_size)
    check_count("population_size", population_size)
    check_positive("init_scale", init_scale)
    population_based = issubclass(cls, PopulationBasedAlgorithm)
    takes_std = std_schedule or "std_init" in param_fields(cls)
    if (
        takes_std
        and not population_based
        and not {"std_init", "std_schedule"} & {*params_in, *kwargs}
    ):
        params_in["std_init"] = init_scale  # the search starts init_scale wide (docstring)
    if "std_init" in params_in:
        check_positive("strategy_params.std_init", params_in["std_init"])
    if std_schedule and "std_init" in params_in:
        kwargs["std_schedule"] = optax.constant_schedule(params_in["std_init"])
    if optimizer is not None and "optimizer" in constructor_args(cls) and "optimizer" not in kwargs:
        kwargs["optimizer"] = optimizer
    field_overrides = {k: v for k, v in params_in.items() if k in param_fields(cls)}
    num_means = int(kwargs["num_populations"]) if issubclass(cls, SV_ES) else 0
    total = population_size * max(num_means, 1)  # members evaluated per generation
    sharding = population_sharding(total) if shard else None
    num_devices = 1 if sharding is None else sharding.mesh.size

    def build(params: Any) -> tuple[Any, Any]:
        """The strategy for a params pytree like ``params`` and its Params with overrides.

        evosax computes constants with jnp in constructors and ``default_params`` (and some
        cast them to Python numbers): evaluate them eagerly, on a concrete zero template.
        """
        with jax.ensure_compile_time_eval():
            template = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
            es = build_strategy(strategy, cls, population_size, template, kwargs, max_cma_dims)
            defaults = es.default_params
        return es, defaults.replace(**field_overrides)

    def around(key: jax.Array, params: Any, count: int) -> Any:
        """``count`` copies of ``params`` plus init_scale * N(0, 1) noise."""
        flat, unravel = ravel_pytree(params)
        noise = jax.random.normal(key, (count, flat.size), flat.dtype)
        return jax.vmap(unravel)(flat + init_scale * noise)

    def evaluate(variables: Variables, batch: Batch, population: Any):
        """(raw losses [total], fitness [total] with non-finite losses replaced, finite mask)."""
        fitness_fn = params_loss(model, task, variables, batch)
        chunk = total
        if memory_budget_mb > 0:
            member_bytes = activation_bytes(model.apply, variables, batch[0])
            per_device = chunk_size_for(total // num_devices, member_bytes, memory_budget_mb)
            chunk = per_device * num_devices
        raw = evaluate_population(fitness_fn, population, chunk, sharding)
        finite = jnp.isfinite(raw)
        worst = jnp.max(jnp.where(finite, raw, -jnp.inf))
        worst = jnp.where(jnp.any(finite), worst + 1.0, UNFIT_FITNESS)
        return raw, jnp.where(finite, raw, worst), finite

    def generation_metrics(loss: jax.Array, raw: jax.Array, finite: jax.Array) -> Metrics:
        count = jnp.sum(finite)
        mean = jnp.sum(jnp.where(finite, raw, 0.0)) / jnp.maximum(count, 1)
        var = jnp.sum(jnp.where(finite, jnp.square(raw - mean), 0.0)) / jnp.maximum(count, 1)
        return {
            "loss": loss,
            "fitness_best": jnp.min(jnp.where(finite, raw, jnp.inf)),
            "fitness_mean": jnp.where(count > 0, mean, jnp.nan),
            "fitness_std": jnp.where(count > 0, jnp.sqrt(var), jnp.nan),
            "nan_fitness": (total - count).astype(jnp.int32),
        }

    # DISTRIBUTION-BASED strategies: init(key, mean); the reported params are the mean.
    def init_distribution(key: jax.Array, variables: Variables) -> EvolutionState:
        params = variables["params"]
        es, es_params = build(params)
        key_init, key_means = jax.random.split(key)
        mean = around(key_means, params, num_means) if num_means else params
        return EvolutionState(strong(es.init(key_init, mean, es_params)), None)

    def step_distribution(
        key: jax.Array, variables: Variables, state: EvolutionState, batch: Batch
    ) -> tuple[Variables, EvolutionState, Metrics]:
        params = variables["params"]
        es, es_params = build(params)
        key_ask, key_tell = jax.random.split(key)
        loss = params_loss(model, task, variables, batch)(params)
        population, es_state = es.ask(key_ask, state.es_state, es_params)
        raw, fitness, finite = evaluate(variables, batch, population)
        if num_means:  # SV strategies ask [M * P] members but tell [M, P]
            population = jax.tree.map(
                lambda a: a.reshape(num_means, population_size, *a.shape[1:]), population
            )
        told, _ = es.tell(key_tell, population, fitness, es_state, es_params)
        # A strategy whose mean turns non-finite (seen: Sep_CMA_ES after its step size
        # collapsed) has broken down: keep the last finite state, so the reported params stay
        # the last finite mean, and flag it in ``metrics['strategy_nonfinite']``.
        healthy = jnp.all(jnp.isfinite(told.mean))
        es_state = jax.tree.map(lambda n, o: jnp.where(healthy, n, o), told, es_state)
        _, unravel = ravel_pytree(params)
        if num_means:
            by_mean = jnp.mean(fitness.reshape(num_means, population_size), axis=1)
            new_params = unravel(es_state.mean[jnp.argmin(by_mean)])
        else:
            new_params = unravel(es_state.mean)
        metrics = generation_metrics(loss, raw, finite)
        metrics["strategy_nonfinite"] = (~healthy).astype(jnp.int32)
        new_state = EvolutionState(strong(es_state), None)
        return {**variables, "params": new_params}, new_state, metrics

    # POPULATION-BASED strategies: init(key, population, fitness) needs an evaluated population,
    # which init cannot make (it sees no batch); the first step evaluates it and re-inits.
    def init_population(key: jax.Array, variables: Variables) -> EvolutionState:
        params = variables["params"]
        es, es_params = build(params)
        key_init, key_population = jax.random.split(key)
        population = around(key_population, params, population_size)
        fitness = jnp.full((population_size,), jnp.inf)  # a placeholder
        es_state = es.init(key_init, population, fitness, es_params)
        return EvolutionState(strong(es_state), jnp.zeros((), bool))

    def step_population(
        key: jax.Array, variables: Variables, state: EvolutionState, batch: Batch
    ) -> tuple[Variables, EvolutionState, Metrics]:
        params = variables["params"]
        es, es_params = build(params)
        key_ask, key_tell = jax.random.split(key)
        loss = params_loss(model, task, variables, batch)(params)
        population, es_state = jax.lax.cond(
            state.evaluated,
            lambda s: es.ask(key_ask, s, es_params),
            lambda s: (es.get_population(s), s),
            state.es_state,
        )
        raw, fitness, finite = evaluate(variables, batch, population)
        es_state = jax.lax.cond(
            state.evaluated,
            lambda s: es.tell(key_tell, population, fitness, s, es_params)[0],
            lambda s: es.init(key_tell, population, fitness, es_params),
            es_state,
        )
        # Elitist on the batch: the generation's best replaces the params only if it beats them.
        best = jnp.argmin(fitness)
        better = finite[best] & ~(raw[best] >= loss)  # accepts when ``loss`` is NaN
        new_params = jax.tree.map(
            lambda pop, p: jnp.where(better, pop[best], p), population, params
        )
        new_state = EvolutionState(strong(es_state), jnp.ones((), bool))
        return {**variables, "params": new_params}, new_state, generation_metrics(loss, raw, finite)

    if population_based:
        rule = LearningRule(init_population, step_population)
    else:
        rule = LearningRule(init_distribution, step_distribution)
    return with_rng_mode(rule, rng_partitionable)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """The incoming params' loss and one evaluation per member (every sub-population's, for
    the Stein-variational strategies)."""
    del model, sizes
    means = int((options["strategy_kwargs"] or {}).get("num_populations", 1))
    return 1.0 + int(options["population_size"]) * means


SPEC = RuleSpec(
    evolution,
    summary="any evosax strategy (Open_ES, SNES, Sep_CMA_ES, PGPE, PSO, DE, GAs, ...) over the "
    "whole params pytree; fitness = batch loss in one vmap (chunked, sharded)",
    source="evosax (Lange 2023)",
    cost=cost,
    # the strategies that follow a search gradient take the configured optimizer (docstring)
    uses_optimizer=lambda options: (
        "optimizer" in constructor_args(strategy_class(options["strategy"]))
        and "optimizer" not in (options["strategy_kwargs"] or {})
    ),
    search=("strategy_params.std_init=[0.01,0.05]",),
)
