"""Backpropagation: the baseline every other rule is compared with.

The estimate is the exact gradient of the mean batch loss, ``jax.grad``; any optax optimizer
applies it. On a model with decorrelation matrices this is DBP (backprop through decorrelated
layers, paper 003's baseline): the matrices R_l are updated by their own local rule after each
step (``altlearn.rules.base.decorrelation_update``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.base import (
    EstimateAux,
    LearningRule,
    RuleSpec,
    Sizes,
    Splits,
    batch_loss,
    gradient_rule,
)


def backprop(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    weight_decay: Any = 0.0,
) -> LearningRule:
    """Exact gradients by ``jax.grad``; ``decorrelation_rate`` acts on decorrelated models only;
    ``weight_decay`` lambda: theta <- (1 - lambda) theta + update at every step, apart from the
    optimizer (the regulariser Kolen-Pollack carries, for a backprop control with the same)."""
    del data

    def estimate(key, variables, state, batch):
        loss_of = lambda p: batch_loss(model, task, {**variables, "params": p}, batch, key)
        (loss, inputs), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
        return grads, EstimateAux(loss, inputs), state

    return gradient_rule(
        estimate, optimizer, decorrelation_rate, decorrelation_every, weight_decay=weight_decay
    )


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """One forward pass (1) and one backward pass (2)."""
    del model, options, sizes
    return 3.0


SPEC = RuleSpec(
    backprop,
    summary="exact gradient by jax.grad; DBP on a decorrelated model",
    source="baseline",
    cost=cost,
)
