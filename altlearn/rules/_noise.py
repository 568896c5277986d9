"""The perturbation noise of node perturbation, weight perturbation and the forward gradient.

Each of those estimators is unbiased for ANY zero-mean noise u with identity covariance
(E[u u^T] = I): node perturbation's e = eps dl / sigma^2 with eps = sigma u, weight
perturbation's -dL eps / sigma^2, the forward gradient's (grad . v) v. Two such distributions:

* ``normal``: u ~ N(0, I), the papers' choice (one normal per unit or weight: on CPU the draws
  are a large part of a small step).
* ``rademacher``: u = +-1 with probability 1/2 each, independently. Same mean and covariance,
  so the same expected update; the estimate's variance differs only through the fourth moment
  (E[u^4] = 1 against 3 for a normal, so the Rademacher estimate is the LESS noisy one, as in
  SPSA). It needs one random bit per entry: ``rademacher`` draws 32-bit words and unpacks
  each into 32 signs, so the generator runs 32x less than for normals. The default.

Both draw their random bits through ``random_bits``: the same bits as ``jax.random.bits`` (and
``normal`` the same numbers as ``jax.random.normal``), bit for bit, in either threefry mode, but
with the threefry hash's 20 rounds written out. JAX lowers the hash on CPU as a loop of 5
iterations (it compiles faster), and XLA:CPU runs each iteration as separate kernels over the
whole array; written out, the hash is one fused kernel: 2-4x faster draws at the sizes of a
training step, compile time unchanged (docs/BENCHMARKS.md, "The noise generators"). Other key
implementations (``rbg``, ``unsafe_rbg``) go through JAX's own draw.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DISTRIBUTIONS = ("normal", "rademacher")


def check_distribution(name: str) -> None:
    """Raises unless ``name`` is one of ``DISTRIBUTIONS``."""
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown noise_distribution {name!r}; valid choices: {', '.join(DISTRIBUTIONS)}."
        )


# Threefry-2x32's rotation constants, alternating every 4 rounds (Salmon et al. 2011).
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32 (20 rounds) of the counter pairs (x0, x1) under key (k1, k2), unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):  # 5 groups of 4 rounds, a key injection after each
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r)))
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
    """The uint32[2] data of a threefry key (typed or raw), or None for another generator."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if jax.config.jax_default_prng_impl != "threefry2x32" or key.shape != (2,):
        return None
    return key


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 bits of ``shape``, equal to ``jax.random.bits(key, shape, jnp.uint32)``.

    Classic threefry hashes the counter pairs (i, i + m) of the flat iota split in halves
    (m = ceil(n / 2), an odd count padded with a 0); the partitionable mode hashes (0, i) and
    XORs the two outputs. Same counters and hash as JAX, so the same stream.
    """
    data = _threefry_key_data(key)
    n = math.prod(shape)
    if data is None or n >= 2**31:
        return jax.random.bits(key, shape, jnp.uint32)
    k1, k2 = data[0], data[1]
    if jax.config.jax_threefry_partitionable:
        low = lax.iota(jnp.uint32, n)
        b1, b2 = _threefry2x32(k1, k2, jnp.zeros_like(low), low)
        return (b1 ^ b2).reshape(shape)
    m = -(-n // 2)
    counts = lax.iota(jnp.uint32, 2 * m)
    counts = jnp.where(counts < n, counts, jnp.uint32(0))  # the padding counter is 0
    h0, h1 = _threefry2x32(k1, k2, counts[:m], counts[m:])
    return jnp.concatenate([h0, h1])[:n].reshape(shape)


def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Standard normals equal to ``jax.random.normal(key, shape, dtype)`` (float32 from
    ``random_bits``; other dtypes from JAX): u uniform on (-1, 1) from 23 mantissa bits, then
    sqrt(2) erfinv(u)."""
    if jnp.dtype(dtype) != jnp.float32:
        return normal(key, shape, dtype)
    bits = random_bits(key, shape)
    one = jnp.uint32(0x3F800000)  # 1.0f: the bits below become a float in [1, 2)
    floats = lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
    u = lax.max(jnp.float32(low), floats * (jnp.float32(1.0) - low) + low)
    return jnp.float32(np.sqrt(2.0)) * lax.erf_inv(u)


def signs(words: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """+-1 entries of ``shape`` from uint32 ``words`` [>= ceil(n / 32)]: bit j of word i is
    entry 32 i + j (1 -> +1, 0 -> -1)."""
    n = math.prod(shape)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [words, 32]
    return (2 * bits.reshape(-1)[:n].reshape(shape).astype(dtype) - 1).astype(dtype)


def rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Independent +-1 entries of ``shape``, 32 from each random 32-bit word (``signs``)."""
    return signs(random_bits(key, (-(-math.prod(shape) // 32),)), shape, dtype)


def unit_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any, distribution: str) -> jax.Array:
    """Zero-mean noise of identity covariance, ``shape`` and ``dtype``, from ``distribution``."""
    if distribution == "rademacher":
        return rademacher(key, shape, dtype)
    return normal(key, shape, dtype)
