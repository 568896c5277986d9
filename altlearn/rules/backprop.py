"""Backpropagation: the baseline every other rule is compared with (RULES.md section 0).

The estimate is the exact gradient of the mean batch loss, ``jax.grad``; any optax optimizer
applies it. On a model with decorrelation matrices this is DBP (BP through decorrelated layers).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.base import EstimateAux, LearningRule, batch_loss, gradient_rule


def backprop(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """Exact gradients by ``jax.grad``; ``decorrelation_rate`` acts on decorrelated models only."""

    def estimate(key, variables, batch):
        x, y = batch
        loss_of = lambda p: batch_loss(model, task, {**variables, "params": p}, x, y, key)
        (loss, inputs), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
        return grads, EstimateAux(loss, inputs)

    return gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
