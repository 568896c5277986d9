"""Forward gradient: the weight-space directional derivative along a random tangent.

Baydin, Pearlmutter, Syme, Wood, Torr, "Gradients without backpropagation" (arXiv 2202.08587,
2022). With v of zero mean and identity covariance over every parameter (the paper's
N(0, I) with ``noise_distribution='normal'``; by default +-1 per weight, ``'rademacher'``:
``altlearn.rules._noise``), the directional derivative of the mean batch loss
along v comes from one forward-mode pass (``jax.jvp``), and

    g = (dL/dtheta . v) v

is an unbiased estimate of dL/dtheta (E[v v^T] = I), handed to the optimizer as a gradient;
``num_noise_samples`` tangents are averaged. One jvp pass (about two forward passes) per tangent.
The tangents are drawn in the threefry mode of ``rng_partitionable``
(``altlearn.rules.base.rng_mode``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from altlearn import prng
from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules._noise import check_distribution, unit_noise
from altlearn.rules.base import (
    EstimateAux,
    LearningRule,
    RuleSpec,
    Sizes,
    Splits,
    batch_loss,
    check_count,
    gradient_rule,
    with_rng_mode,
)


def forward_gradient(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    num_noise_samples: int = 16,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    rng_partitionable: str = "auto",
    noise_distribution: str = "rademacher",
) -> LearningRule:
    """Forward gradient (Baydin et al. 2022): g = (dL/dtheta . v) v, E[v v^T] = I, by one jvp.

    Unbiased for the gradient of the batch loss; ``num_noise_samples`` tangents are averaged,
    16 by default: with one tangent the MLP 40-512-512-10 (Adam 3e-3, batch 128, 1000 steps)
    went from loss 3.15 to 4.18 on mnist1d (test accuracy 0.19), with 8 to 2.87 (0.24), with
    16 to 2.73 (0.25).
    ``decorrelation_rate``/``decorrelation_every`` act on decorrelated models only.
    ``noise_distribution``: ``rademacher`` (default: v = +-1 per weight, one random bit each)
    or ``normal`` (v ~ N(0, I), the paper's; ``altlearn.rules._noise``).
    """
    del data
    check_count("num_noise_samples", num_noise_samples)
    check_distribution(noise_distribution)

    def estimate(key, variables, state, batch):
        key_system, key_noise = prng.split(key)
        params = variables["params"]
        leaves, treedef = jax.tree.flatten(params)
        f = lambda p: batch_loss(model, task, {**variables, "params": p}, batch, key_system)

        def one_sample(k):
            keys = prng.split(k, len(leaves))
            v = [
                unit_noise(kk, p.shape, p.dtype, noise_distribution) for kk, p in zip(keys, leaves)
            ]
            v = jax.tree.unflatten(treedef, v)
            (loss, inputs), (directional, _) = jax.jvp(f, (params,), (v,))
            return directional, v, loss, inputs

        directional, v, loss, inputs = jax.vmap(one_sample, out_axes=(0, 0, None, None))(
            prng.split(key_noise, num_noise_samples)
        )
        # The mean of directional_k v_k as one contraction over the samples: on XLA:CPU the
        # broadcast product reduced over the sample axis was 7x slower (MLP 40-512-512-10, 8
        # tangents: a step in 357 vs 48 ms).
        mean = lambda t: jnp.tensordot(directional, t, axes=1) / num_noise_samples
        grads = jax.tree.map(mean, v)
        return grads, EstimateAux(loss, inputs), state

    rule = gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
    return with_rng_mode(rule, rng_partitionable)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """One jvp pass (2) per tangent."""
    del model, sizes
    return 2.0 * int(options["num_noise_samples"])


SPEC = RuleSpec(
    forward_gradient,
    summary="weight-space directional derivative along a random tangent (one jvp)",
    source="Baydin et al. 2022 (arXiv 2202.08587)",
    cost=cost,
)
