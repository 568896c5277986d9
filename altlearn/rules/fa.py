"""Feedback alignment (Lillicrap, Cownden, Tweed & Akerman 2016, "Random synaptic feedback
weights support error backpropagation for deep learning", Nature Communications 7:13276).

Backprop's backward pass with every layer's transposed kernel W^T replaced by a FIXED random
matrix B of the same shape (for a convolution: the transposed convolution with a random kernel
B). For a dense layer l with input z_{l-1}, pre-activation a_l and h_l = f(a_l):

    delta_L = dL/da_L
    delta_{l-1} = (delta_l B_l^T) * f'(a_{l-1})
    dW_l = z_{l-1}^T delta_l,   db_l = sum over the batch of delta_l

and any optax optimizer applies dW. The forward weights come to align with B (the angle between
W_l and B_l falls below 90 degrees), which is what lets the random feedback teach. B is drawn
once from N(0, feedback_scale^2 * 2 / fan_in) (the models' He scale), kept in the rule's state
(checkpointed, vmapped over seeds) and never changed. MLPs, CNNs, VGG and the residual network
(``altlearn.rules._feedback``); reports ``feedback_angle``.
"""

from __future__ import annotations

from typing import Any

import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules import _feedback
from altlearn.rules.base import LearningRule, RuleSpec, Splits, check_positive


def fa(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    feedback_scale: Any = 1.0,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """Fixed random feedback B ~ N(0, feedback_scale^2 * 2 / fan_in) of each kernel's shape."""
    del data
    check_positive("feedback_scale", feedback_scale)

    def init(key, variables):
        return _feedback.random_feedback(key, variables["params"], feedback_scale)

    return _feedback.feedback_rule(
        model,
        task,
        optimizer,
        lambda key, params, b: b,
        init,
        decorrelation_rate,
        decorrelation_every,
    )


SPEC = RuleSpec(
    fa,
    summary="backprop's error sent down through fixed random feedback matrices",
    source="Lillicrap et al. 2016",
    cost=_feedback.backprop_cost,
)
