"""Weight perturbation: learning from the loss change that noise on the weights causes.

A relative of node perturbation (paper 003, Dalm et al., arXiv 2310.00965, discusses both; the
rule goes back to Jabri & Flower 1992). With eps of zero mean and covariance sigma^2 I over
every parameter (by default +-sigma per weight, ``noise_distribution='rademacher'``; ``'normal'``
draws N(0, sigma^2 I): ``altlearn.rules._noise``), shared by the whole batch, and
dL = L(theta) - L(theta + eps) the change of the mean batch loss,

    G = -dL eps / sigma^2,

an estimate of dL/dtheta (unbiased as sigma -> 0: E[eps eps^T] = sigma^2 I) handed to the
optimizer as a gradient; ``num_noise_samples`` perturbations sharing one clean pass are
averaged. Two forward passes per sample. The noise is drawn in the threefry mode of
``rng_partitionable`` (``altlearn.rules.base.rng_mode``).
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
    check_positive,
    gradient_rule,
    with_rng_mode,
)


def weight_perturbation(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    sigma: Any = 1e-3,
    num_noise_samples: int = 16,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    rng_partitionable: str = "auto",
    noise_distribution: str = "rademacher",
) -> LearningRule:
    """Weight perturbation: G = -(L(theta) - L(theta + eps)) eps / sigma^2, with E[eps eps^T] =
    sigma^2 I.

    The noise is shared by the whole batch (the weights are), so the batch-mean loss is used.
    ``num_noise_samples`` defaults to 16: with one perturbation the MLP 40-512-512-10 (Adam
    3e-3, batch 128, 1000 steps) went from loss 3.15 to 4.07 on mnist1d (test accuracy 0.20),
    with 8 to 3.00 (0.24), with 16 to 2.66 (0.25), with 64 to 1.98 (0.31).
    ``decorrelation_rate``/``decorrelation_every`` act on decorrelated models only.
    ``noise_distribution``: ``rademacher`` (default: eps = +-sigma per weight, one random bit
    each) or ``normal`` (``altlearn.rules._noise``).
    """
    del data
    check_positive("sigma", sigma)
    check_count("num_noise_samples", num_noise_samples)
    check_distribution(noise_distribution)

    def estimate(key, variables, state, batch):
        key_clean, key_noise = prng.split(key)
        loss_clean, inputs = batch_loss(model, task, variables, batch, key_clean)
        params = variables["params"]
        leaves, treedef = jax.tree.flatten(params)

        def one_sample(key_sample):
            key_eps, key_system = prng.split(key_sample)
            keys = prng.split(key_eps, len(leaves))
            eps = [
                sigma * unit_noise(k, p.shape, p.dtype, noise_distribution)
                for k, p in zip(keys, leaves)
            ]
            eps = jax.tree.unflatten(treedef, eps)
            noisy = {**variables, "params": jax.tree.map(jnp.add, params, eps)}
            dl = loss_clean - batch_loss(model, task, noisy, batch, key_system)[0]
            return dl, eps

        dl, eps = jax.vmap(one_sample)(prng.split(key_noise, num_noise_samples))
        # The mean of -dl_k eps_k / sigma^2 as one contraction over the samples: on XLA:CPU the
        # broadcast product reduced over the sample axis was 3.6x slower (MLP 40-512-512-10, 8
        # samples: a step in 74 vs 20 ms).
        mean = lambda e: jnp.tensordot(-dl / sigma**2, e, axes=1) / num_noise_samples
        grads = jax.tree.map(mean, eps)
        return grads, EstimateAux(loss_clean, inputs), state

    rule = gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
    return with_rng_mode(rule, rng_partitionable)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """The clean pass and one perturbed pass per noise sample."""
    del model, sizes
    return 1.0 + int(options["num_noise_samples"])


SPEC = RuleSpec(
    weight_perturbation,
    summary="noise on the weights, loss change between two forward passes",
    source="relative of paper 003",
    cost=cost,
    search=("sigma=[1e-3,1e-2]",),
)
