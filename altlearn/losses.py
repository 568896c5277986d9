"""Per-sample losses and evaluation metrics.

Losses are per-sample (shape ``[B]``): node perturbation needs the per-sample loss difference,
so nothing here averages over the batch. The batch loss is the mean of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

PerSampleLoss = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs [B, K], targets) -> [B]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels: ``-log softmax(logits)[y]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Half squared error summed over outputs; integer targets are one-hot encoded first.

    With integer labels this is the one-hot square loss used for classification by the
    closed-form rule (``closed_form``).
    """
    if jnp.issubdtype(targets.dtype, jnp.integer):
        targets = jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
    return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1)


LOSSES: dict[str, PerSampleLoss] = {
    "cross_entropy": cross_entropy,
    "squared_error": squared_error,
}


class Task(NamedTuple):
    """What is learned: the per-sample loss and whether accuracy is meaningful."""

    kind: str  # 'classification' or 'regression'
    loss_name: str
    loss: PerSampleLoss

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"


def make_task(kind: str, loss_name: str = "auto") -> Task:
    """Picks the loss for a task: cross-entropy for classification, squared error otherwise."""
    if loss_name == "auto":
        loss_name = "cross_entropy" if kind == "classification" else "squared_error"
    if loss_name not in LOSSES:
        raise ValueError(f"Unknown loss {loss_name!r}; valid choices: auto, {', '.join(LOSSES)}.")
    if kind == "regression" and loss_name == "cross_entropy":
        raise ValueError("cross_entropy needs a classification dataset; use squared_error.")
    return Task(kind, loss_name, LOSSES[loss_name])
