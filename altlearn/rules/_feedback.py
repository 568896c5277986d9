"""What the feedback-alignment family shares: backprop's backward pass with each layer's kernel
W replaced, for the input's cotangent only, by a feedback matrix B of W's shape.

A rule of the family says how B is made at each step (``make``: fixed random, sign of W, sign
of W with random magnitudes, learned) and what it keeps between steps (``init``); the rest is
here. The step hands B to the model as the ``'feedback'`` collection, which every provided
model's ``Dense`` and ``Conv`` read (``altlearn.models.feedback_product``), and takes
``jax.grad`` of the batch loss. For a dense layer y = z W + b and output cotangent delta:

    dL/dW = z^T delta          (as backprop)
    delta sent down = delta B^T   (backprop: delta W^T)

and for a convolution the transposed convolution with kernel B. So one implementation covers
MLPs, CNNs, VGG and the residual network (any model built from those layers), and with B = W
the step is backprop's exactly (tested).

Each rule reports the angle between B_l and W_l (degrees, per kernel and averaged over all but
the first layer's, whose B carries nothing: no cotangent goes to the input), the figure the
feedback-alignment literature plots; 0 is backprop, 90 an unrelated B.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from altlearn.losses import Task
from altlearn.models import Model, feedback_kernels
from altlearn.rules.base import (
    EstimateAux,
    GradientRuleState,
    LearningRule,
    Sizes,
    Variables,
    batch_loss,
    gradient_rule,
)

# make(key, params, state) -> feedback, the {'kernel': B} tree of this step
MakeFeedback = Callable[[jax.Array, Any, Any], Any]


def fans(kernel: jax.Array) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense [in, out] or convolution [*window, in, out] kernel."""
    window = int(np.prod(kernel.shape[:-2])) if kernel.ndim > 2 else 1
    return window * kernel.shape[-2], window * kernel.shape[-1]


def he_std(kernel: jax.Array) -> float:
    """sqrt(2 / fan_in): the std of the provided models' He-normal kernels."""
    return float(np.sqrt(2.0 / fans(kernel)[0]))


def glorot_std(kernel: jax.Array) -> float:
    """sqrt(2 / (fan_in + fan_out)): the magnitude BioTorch gives sign-concordant feedback."""
    return float(np.sqrt(2.0 / sum(fans(kernel))))


def random_like(key: jax.Array, kernels: Any, std: Callable[[jax.Array], float]) -> Any:
    """A normal matrix of each kernel's shape and dtype, times ``std(kernel)``, one key each."""
    leaves, tree = jax.tree_util.tree_flatten(kernels)
    keys = jax.random.split(key, len(leaves))
    drawn = [std(w) * jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(tree, drawn)


def random_feedback(key: jax.Array, params: Any, scale: Any = 1.0) -> Any:
    """A fixed random B for every kernel: N(0, scale^2 * 2 / fan_in), the models' He scale
    (fa's feedback, and kp's at the start)."""
    return random_like(key, feedback_kernels(params), lambda w: scale * he_std(w))


def sign_concordant(magnitudes: Any, params: Any) -> Any:
    """|R| * sign(W) for every kernel W of ``params`` and its ``magnitudes`` R (brsf, frsf)."""
    signed = lambda r, w: jnp.abs(r) * jnp.sign(w)
    return jax.tree_util.tree_map(signed, magnitudes, feedback_kernels(params))


def _paths(tree: Any) -> dict[str, jax.Array]:
    flat = traverse_util.flatten_dict(tree)
    return {"/".join(str(p) for p in path[:-1]) or "kernel": v for path, v in flat.items()}


def angles(feedback: Any, params: Any) -> dict[str, jax.Array]:
    """``feedback_angle/<layer>``: the angle (degrees) between B and W of every kernel, and
    ``feedback_angle``: their mean over every kernel but the first (the input layer's B is
    never used)."""
    b, w = _paths(feedback), _paths(feedback_kernels(params))
    out = {}
    for name, bl in b.items():
        wl = w[name]
        cos = jnp.vdot(bl, wl) / (jnp.linalg.norm(bl) * jnp.linalg.norm(wl) + 1e-30)
        out[f"feedback_angle/{name}"] = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
    used = [out[f"feedback_angle/{name}"] for name in list(b)[1:]]
    if used:
        out["feedback_angle"] = jnp.mean(jnp.stack(used))
    return out


def feedback_rule(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    make: MakeFeedback,
    init: Callable[[jax.Array, Variables], Any] | None = None,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    weight_decay: Any = 0.0,
    after_update: Callable[[Any, Any], Any] | None = None,
) -> LearningRule:
    """The gradient rule of a feedback-alignment variant: ``make(key, params, state)`` gives
    this step's feedback tree ``{..: {'kernel': B}}`` (``feedback_kernels``' nesting) from the
    step's key, the parameters and the estimator state (``init(key, variables)``; None if the
    rule keeps none); the batch loss's ``jax.grad`` with that feedback is the estimate, which
    the optimizer applies (``gradient_rule``: decorrelation, decoupled ``weight_decay``,
    ``after_update``)."""

    def estimate(key, variables, state, batch):
        noise_key, feedback_key = jax.random.split(key)
        feedback = make(feedback_key, variables["params"], state)

        def loss_of(params):
            with_feedback = {**variables, "params": params, "feedback": feedback}
            return batch_loss(model, task, with_feedback, batch, noise_key)

        (loss, inputs), grads = jax.value_and_grad(loss_of, has_aux=True)(variables["params"])
        return grads, EstimateAux(loss, inputs), state

    rule = gradient_rule(
        estimate,
        optimizer,
        decorrelation_rate,
        decorrelation_every,
        init=init,
        weight_decay=weight_decay,
        after_update=after_update,
    )

    def report(variables: Variables, state: GradientRuleState, splits: Any) -> dict[str, Any]:
        """The angle between each B and W (a fixed key where B is redrawn every step)."""
        del splits
        key = jax.random.PRNGKey(0)
        return angles(make(key, variables["params"], state.estimator), variables["params"])

    return rule._replace(report=report)


def backprop_cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """One forward pass (1) and one backward pass through B instead of W (2): backprop's."""
    del model, options, sizes
    return 3.0
