"""Uniform sign-concordant feedback, uSF (Liao, Leibo & Poggio 2016, "How important is weight
symmetry in backpropagation?", AAAI; the name as in BioTorch, Sanfiz & Akrout 2021).

Backprop's backward pass with every kernel W, for the input's cotangent only, replaced by

    B = s * sign(W),   s = sqrt(2 / (fan_in + fan_out))

recomputed from the current W at every step: the feedback knows the sign of each forward weight
but not its magnitude (s, one number per layer, is BioTorch's choice; under Adam a per-layer
factor changes nothing). A network whose weights all have magnitude s learns exactly as by
backprop (tested). The update of W is backprop's outer product with the error so propagated
(``altlearn.rules._feedback``: dense and convolutional layers, any provided model). Reports
``feedback_angle``, the angle between B and W.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from altlearn.losses import Task
from altlearn.models import Model, feedback_kernels
from altlearn.rules import _feedback
from altlearn.rules.base import LearningRule, RuleSpec, Splits


def usf(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """B = sqrt(2 / (fan_in + fan_out)) * sign(W), from the current W at every step."""
    del data

    def make(key, params, state):
        del key, state
        signed = lambda w: _feedback.glorot_std(w) * jnp.sign(w)
        return jax.tree_util.tree_map(signed, feedback_kernels(params))

    return _feedback.feedback_rule(
        model, task, optimizer, make, None, decorrelation_rate, decorrelation_every
    )


SPEC = RuleSpec(
    usf,
    summary="backprop with feedback sign(W) of one magnitude per layer (uniform sign-concordant)",
    source="Liao et al. 2016",
    cost=_feedback.backprop_cost,
)
