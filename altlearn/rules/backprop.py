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
from altlearn.rules.base import EstimateAux, LearningRule, gradient_rule


def backprop(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """Exact gradients by ``jax.grad``; ``decorrelation_rate`` acts on decorrelated models only."""

    def batch_loss(params, variables, x, y, key):
        variables = {**variables, "params": params}
        if model.layered:  # on a noisy system (intrinsic_noise > 0) the pass is noisy too
            out, trace = model.apply_layered(variables, x, key=key)
            return task.loss(out, y).mean(), trace.inputs
        return task.loss(model.apply(variables, x), y).mean(), None

    def estimate(key, variables, batch):
        x, y = batch
        (loss, inputs), grads = jax.value_and_grad(batch_loss, has_aux=True)(
            variables["params"], variables, x, y, key
        )
        return grads, EstimateAux(loss, inputs)

    return gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
