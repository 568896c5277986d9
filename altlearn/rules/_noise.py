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

Both draw through ``altlearn.prng``: JAX's own threefry bits and normals, bit for bit, from one
fused kernel on CPU (docs/BENCHMARKS.md, "The noise generators").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from altlearn.prng import normal, random_bits

DISTRIBUTIONS = ("normal", "rademacher")


def check_distribution(name: str) -> None:
    """Raises unless ``name`` is one of ``DISTRIBUTIONS``."""
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown noise_distribution {name!r}; valid choices: {', '.join(DISTRIBUTIONS)}."
        )


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
