"""JAX's threefry random streams, bit for bit, each from one fused kernel on CPU.

JAX lowers its threefry-2x32 hash on CPU as a loop of 5 iterations (it compiles faster), and
XLA:CPU runs every iteration as separate kernels (and copies of the loop's state): a key split
in a training step is a loop of its own, and a draw of a few thousand numbers runs 2-4x slower
than the hash's arithmetic needs. Here the hash's 20 rounds are written out, so XLA fuses a draw
into one kernel, and the counters are JAX's own: ``random_bits``, ``normal``, ``split`` and
``fold_in`` give exactly what ``jax.random.bits``, ``jax.random.normal`` (float32), ``split``
and ``fold_in`` give for the same key, in either threefry mode (``jax_threefry_partitionable``,
read when traced; tests/test_estimators.py checks the equality). A key of another
implementation (``rbg``, ``unsafe_rbg``) or another dtype goes through JAX's own functions.
Measured in docs/BENCHMARKS.md ("The noise generators", "Many seeds in one program").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def key_data(key: jax.Array) -> jax.Array | None:
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
    data = key_data(key)
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
        return jax.random.normal(key, shape, dtype)
    bits = random_bits(key, shape)
    one = jnp.uint32(0x3F800000)  # 1.0f: the bits below become a float in [1, 2)
    floats = lax.bitcast_convert_type((bits >> jnp.uint32(9)) | one, jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0), dtype=np.float32)
    u = lax.max(jnp.float32(low), floats * (jnp.float32(1.0) - low) + low)
    return jnp.float32(np.sqrt(2.0)) * lax.erf_inv(u)


def _keys_like(key: jax.Array, data: jax.Array) -> jax.Array:
    """Raw key data [..., 2] as keys of ``key``'s kind (typed keys stay typed)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(data, impl="threefry2x32")
    return data


def split(key: jax.Array, num: int = 2) -> jax.Array:
    """``num`` keys [num, 2], equal to ``jax.random.split(key, num)``: the hash of the counter
    pairs (i, num + i) read as rows of two words (classic mode), or of (0, i) with its two
    outputs as the row (partitionable mode)."""
    data = key_data(key)
    if data is None:
        return jax.random.split(key, num)
    k1, k2 = data[0], data[1]
    if jax.config.jax_threefry_partitionable:
        low = lax.iota(jnp.uint32, num)
        b1, b2 = _threefry2x32(k1, k2, jnp.zeros_like(low), low)
        return _keys_like(key, jnp.stack([b1, b2], axis=-1))
    counts = lax.iota(jnp.uint32, 2 * num)
    h0, h1 = _threefry2x32(k1, k2, counts[:num], counts[num:])
    return _keys_like(key, jnp.concatenate([h0, h1]).reshape(num, 2))


def fold_in(key: jax.Array, data: Any) -> jax.Array:
    """A new key from ``key`` and a 32-bit integer, equal to ``jax.random.fold_in``: the hash
    of the counter pair (0, data)."""
    raw = key_data(key)
    if raw is None:
        return jax.random.fold_in(key, data)
    d = jnp.asarray(data, dtype=jnp.uint32).reshape(1)
    h0, h1 = _threefry2x32(raw[0], raw[1], jnp.zeros_like(d), d)
    return _keys_like(key, jnp.concatenate([h0, h1]))
