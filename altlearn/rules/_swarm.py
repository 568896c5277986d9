"""The particle swarm machinery shared by ``pso`` and ``neuron_pso``.

Both rules move particles by the PSO update with the constriction coefficients of Clerc &
Kennedy 2002 ("The particle swarm: explosion, stability, and convergence in a multidimensional
complex space", IEEE Trans. Evol. Comput. 6(1)), w = 0.729, c1 = c2 = 1.49445:

    v <- w v + c1 r1 (pbest - x) + c2 r2 (gbest - x),   r1, r2 ~ U(0, 1) per coordinate
    v <- clip(v, -v_max, v_max)                          (velocity_clamp v_max > 0; 0 = off)
    x <- x + v

A best takes a candidate only if it is strictly better; NaN fitness counts as +inf, so it never
becomes a best. The update is written here rather than taken from evosax: evosax's PSO has no
velocity clamp and no particle init scale, and the per-neuron rule needs one swarm's update as a
function of given fitness values, vmapped over neurons (or scanned, for Gauss-Seidel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from altlearn.rules._population import chunk_size_for

PARTICLES = ("position", "velocity", "pbest")  # the Swarm fields with a particle axis


class Swarm(NamedTuple):
    """A swarm of P particles: pytrees whose leaves have a leading particle axis [P, ...]."""

    position: Any
    velocity: Any
    pbest: Any  # personal bests
    # The bests' fitness when they were found: kept by ``pso`` (read only with
    # ``rescore_bests=False``, written in both modes so the two runs' states compare); None
    # for ``neuron_pso``, which always re-scores.
    pbest_fitness: Any = None  # [P]
    best_fitness: Any = None  # [], the swarm best's


class Coefficients(NamedTuple):
    """The (possibly traced) numbers of the velocity update."""

    inertia: Any
    cognitive: Any
    social: Any
    velocity_clamp: Any


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection on uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_fast(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """U[0, 1) numbers (24-bit resolution) for the velocity update's r1, r2.

    Counter-based: element i is fmix32(fmix32(s0 + i * 0x9E3779B9) ^ s1) (SplitMix32's
    generator, with a second keyed round), where s0, s1 are drawn from ``key`` by threefry.
    A step needs 2 x (particles x parameters) of them. On XLA:CPU threefry costs 6.3 ns per
    number and this 0.3 ns (34k numbers per step in a scan); threefry was over half of a pso
    step on small networks (186 of 330 us, MLP 30-8-2, 64 particles). Same key, same
    numbers, under jit and vmap alike.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    count = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32)
    h = _fmix32(_fmix32(count * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])
    return ((h >> 8).astype(dtype) * 2.0**-24).reshape(shape)


def random_like(sample: Callable, key: jax.Array, like: Any, lead: tuple[int, ...]) -> Any:
    """A pytree shaped like ``like`` with ``lead`` axes in front of every leaf, from ONE call
    ``sample(key, [size], dtype)`` drawing a flat vector. Each random op costs compile time,
    and on XLA:CPU a multi-dimensional threefry draw compiles about 5x slower than a flat one
    of the same size, so a whole step's random numbers come from one flat draw."""
    leaves, treedef = jax.tree.flatten(like)
    sizes = [a.size for a in leaves]
    count = int(np.prod(lead))
    flat = sample(key, (count * sum(sizes),), leaves[0].dtype).reshape(*lead, sum(sizes))
    parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=-1)
    return treedef.unflatten([p.reshape(*lead, *a.shape) for p, a in zip(parts, leaves)])


def init_swarm(center: Any, noise: Any, init_scale: Any) -> Swarm:
    """Positions center + init_scale * noise (noise ~ N(0, 1), leaves [P, ...]) with particle
    0 = ``center`` exactly, so the swarm never starts worse than the initial network;
    velocities 0; personal bests = positions."""
    position = jax.tree.map(lambda c, e: c[None] + init_scale * e.at[0].set(0.0), center, noise)
    return Swarm(position, jax.tree.map(jnp.zeros_like, position), position)


def as_fitness(loss: jax.Array) -> jax.Array:
    """NaN -> +inf: a NaN loss compares as worse than anything."""
    return jnp.where(jnp.isnan(loss), jnp.inf, loss)


def update_swarm(
    r: Any,
    swarm: Swarm,
    best: Any,
    fitness: jax.Array,
    pbest_fitness: jax.Array,
    best_fitness: jax.Array,
    coef: Coefficients,
) -> tuple[Swarm, Any, jax.Array]:
    """One PSO step of one swarm, from fitness values on the current batch.

    ``r`` holds the uniform numbers r1, r2 (leaves [2, P, ...]); ``fitness`` [P] scores the
    positions, ``pbest_fitness`` [P] the re-scored personal bests and
    ``best_fitness`` [] the re-scored swarm best ``best`` (a pytree without the particle axis);
    all with NaN already mapped to +inf. Personal bests, then the swarm best, take a candidate
    only if it is strictly better; then every particle moves. Returns the new swarm, the new
    swarm best and its fitness.
    """
    improved = fitness < pbest_fitness  # [P]
    select = lambda new, old: jnp.where(improved.reshape(-1, *(1,) * (new.ndim - 1)), new, old)
    pbest = jax.tree.map(select, swarm.position, swarm.pbest)
    pbest_fitness = jnp.where(improved, fitness, pbest_fitness)
    i = jnp.argmin(pbest_fitness)
    better = pbest_fitness[i] < best_fitness
    best = jax.tree.map(lambda p, b: jnp.where(better, p[i], b), pbest, best)
    best_fitness = jnp.where(better, pbest_fitness[i], best_fitness)

    clamp = coef.velocity_clamp

    def velocity(v, x, p, g, r):
        r1, r2 = r
        v = coef.inertia * v + coef.cognitive * r1 * (p - x) + coef.social * r2 * (g[None] - x)
        if isinstance(clamp, (int, float)) and clamp == 0:  # off, known when tracing
            return v
        return jnp.where(clamp > 0, jnp.clip(v, -clamp, clamp), v)

    v = jax.tree.map(velocity, swarm.velocity, swarm.position, pbest, best, r)
    x = jax.tree.map(jnp.add, swarm.position, v)
    new = Swarm(x, v, pbest)
    if swarm.pbest_fitness is not None:  # the swarm keeps its bests' fitness
        new = new._replace(pbest_fitness=pbest_fitness, best_fitness=best_fitness)
    return new, best, best_fitness


def count_nan(*losses: jax.Array) -> jax.Array:
    return sum(jnp.sum(jnp.isnan(f)) for f in losses).astype(jnp.int32)


def chunk_size(size: int, bytes_per_member: Any, memory_budget_mb: float, sharding) -> int:
    """Members per vmapped chunk under ``memory_budget_mb`` (per device); with a sharding the
    chunk is a whole multiple of the device count. ``bytes_per_member`` is a thunk (traced only
    when there is a budget)."""
    if memory_budget_mb <= 0:
        return size
    devices = 1 if sharding is None else sharding.mesh.size
    return devices * chunk_size_for(size // devices, bytes_per_member(), memory_budget_mb)
