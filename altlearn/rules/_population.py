"""Population evaluation shared by the population rules (evolution strategies, PSO, per-neuron
swarms): one vmapped computation, evaluated in sequential chunks under a memory budget, with
the population axis sharded over a device mesh.

    fitness = evaluate_population(fitness_fn, population, chunk_size=..., sharding=...)

``fitness_fn(member) -> scalar`` is written for ONE member (rlax style) and vmapped here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

POPULATION_AXIS = "population"


def population_sharding(population_size: int) -> NamedSharding | None:
    """A sharding of the leading (population) axis over all devices; None on one device.

    Raises if ``population_size`` is not a multiple of the device count.
    """
    devices = jax.devices()
    if len(devices) == 1:
        return None
    if population_size % len(devices):
        raise ValueError(
            f"population_size {population_size} is not divisible by the {len(devices)} devices "
            f"it is sharded over; use a multiple of {len(devices)} or set rule.shard=False."
        )
    mesh = Mesh(np.array(devices), (POPULATION_AXIS,))
    return NamedSharding(mesh, PartitionSpec(POPULATION_AXIS))


def chunk_size_for(population_size: int, bytes_per_member: int, memory_budget_mb: float) -> int:
    """The largest divisor of ``population_size`` whose members fit in the budget together.

    ``memory_budget_mb <= 0`` means no budget: the whole population in one vmap.
    """
    if memory_budget_mb <= 0:
        return population_size
    fit = max(1, int(memory_budget_mb * 2**20 // max(bytes_per_member, 1)))
    return max(d for d in range(1, population_size + 1) if population_size % d == 0 and d <= fit)


def activation_bytes(apply_fn: Callable, variables: Any, x: jax.Array) -> int:
    """Bytes of every intermediate array of one forward pass on batch ``x`` (an upper bound on
    what one population member holds at once)."""
    jaxpr = jax.make_jaxpr(apply_fn)(variables, x)
    total = 0
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape"):
                total += int(np.prod(aval.shape)) * aval.dtype.itemsize
    return total


def evaluate_population(
    fitness_fn: Callable[[Any], jax.Array],
    population: Any,
    chunk_size: int | None = None,
    sharding: NamedSharding | None = None,
) -> jax.Array:
    """Fitness [P] of every member of ``population`` (a pytree with leading axis P).

    Members are evaluated ``chunk_size`` at a time (``lax.map`` over chunks of a ``vmap``) and,
    with ``sharding``, each chunk's member axis is split over the devices.
    """
    size = jax.tree.leaves(population)[0].shape[0]
    chunk_size = size if chunk_size is None else chunk_size
    if size % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} does not divide population size {size}.")

    def constrain(tree):
        if sharding is None:
            return tree
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)

    evaluate = lambda members: constrain(jax.vmap(fitness_fn)(constrain(members)))
    if chunk_size == size:
        return evaluate(population)
    chunks = jax.tree.map(
        lambda a: a.reshape(size // chunk_size, chunk_size, *a.shape[1:]), population
    )
    return jnp.reshape(jax.lax.map(evaluate, chunks), (size,))
