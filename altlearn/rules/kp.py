"""Kolen-Pollack learning of the feedback (Akrout, Wilson, Humphreys, Lillicrap & Tweed 2019,
"Deep learning without weight transport", NeurIPS; after Kolen & Pollack 1994).

Feedback alignment (``fa``) whose feedback matrices B LEARN: each B_l receives the same update
as its forward kernel W_l (the outer product z_{l-1}^T delta_l that W_l gets, as the optimizer
turns it into an update u_l), and both decay by the same factor:

    W_l <- (1 - lambda) W_l + u_l
    B_l <- (1 - lambda) B_l + u_l

so B_l - W_l <- (1 - lambda) (B_l - W_l): the feedback converges to the forward weights (the
angle between them falls towards 0) without any weight being copied. B starts as fa's (random,
the models' He scale) and lives in the rule's state (checkpointed, vmapped over seeds). The
decay lambda (``weight_decay``, decoupled from the optimizer, on every parameter) is part of the
method: compare kp with ``backprop`` at the same ``weight_decay`` to see what the feedback adds
beyond the regulariser. Dense and convolutional layers, any provided model
(``altlearn.rules._feedback``); reports ``feedback_angle``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from altlearn.losses import Task
from altlearn.models import Model, feedback_kernels
from altlearn.rules import _feedback
from altlearn.rules.base import LearningRule, RuleSpec, Splits, check_positive


def kp(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    weight_decay: Any = 1e-3,
    feedback_scale: Any = 1.0,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """B starts random (``feedback_scale`` x He) and follows W's updates; both decay by
    ``weight_decay`` lambda per step."""
    del data
    check_positive("feedback_scale", feedback_scale)

    def init(key, variables):
        return _feedback.random_feedback(key, variables["params"], feedback_scale)

    def after_update(feedback, updates):
        follow = lambda b, u: ((1.0 - weight_decay) * b + u).astype(b.dtype)
        return jax.tree_util.tree_map(follow, feedback, feedback_kernels(updates))

    return _feedback.feedback_rule(
        model,
        task,
        optimizer,
        lambda key, params, b: b,
        init,
        decorrelation_rate,
        decorrelation_every,
        weight_decay=weight_decay,
        after_update=after_update,
    )


SPEC = RuleSpec(
    kp,
    summary="feedback alignment whose feedback follows the weights' updates, both decayed",
    source="Akrout et al. 2019",
    cost=_feedback.backprop_cost,
    search=("weight_decay=[1e-3,1e-2]",),
)
