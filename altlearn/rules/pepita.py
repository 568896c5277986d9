"""PEPITA, "present the error to perturb the input to modulate activity" (Dellaferrera &
Kreiman 2022, "Error-driven input modulation: solving the credit assignment problem without a
backward pass", ICML).

Two forward passes and no backward pass. The first, on the input x, gives every layer's
activity h_l and the output error e (per sample: dL/da_L, for softmax cross-entropy the
softmax minus the one-hot target). The second runs on the input modulated by a fixed random
projection of that error,

    x_mod = x + F e,     F: [input size, K], fixed,

and gives activities h_l^mod (inputs z_l^mod). Each hidden layer learns from the difference of
its two activities, the output layer from the error (batch means; W <- W - lr * dW by the
optimizer):

    dW_l = (z_{l-1}^mod)^T (h_l - h_l^mod)      hidden layers
    dW_L = (z_{L-1}^mod)^T e                    the output layer

(for a convolution: its weight VJP with that cotangent, at the modulated input). F has entries
~ U(-s, s), s = feedback_scale * sqrt(6 / input size), drawn once and kept in the rule's state;
``feedback_scale`` sets how strongly the error perturbs the input. Needs a layered model (mlp,
cnn, vgg).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.base import (
    EstimateAux,
    LearningRule,
    RuleSpec,
    Sizes,
    Splits,
    check_positive,
    gradient_rule,
    layer_vjps,
)


def pepita(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    feedback_scale: Any = 0.05,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """Two forward passes, the second on x + F e; updates from the activity differences."""
    del data
    check_positive("feedback_scale", feedback_scale)
    names = model.layer_names
    last = len(names) - 1

    def init(key, variables):
        outputs = int(np.prod(model.preact_shapes(variables)[-1].shape[1:]))
        size = int(np.prod(model.input_shape))
        bound = feedback_scale * np.sqrt(6.0 / size)
        return bound * jax.random.uniform(key, (outputs, size), minval=-1.0, maxval=1.0)

    def estimate(key, variables, projection, batch):
        x, y = batch
        params = variables["params"]
        batch_size = x.shape[0]
        clean_key, modulated_key = jax.random.split(key)
        out, trace = model.apply_layered(variables, x, key=clean_key)
        per_sample = lambda o: jnp.sum(task.loss(o, y))  # its gradient: each sample's error
        loss, e = jax.value_and_grad(per_sample)(out)  # [B, K]
        loss = loss / batch_size
        x_mod = x + (e.reshape(batch_size, -1) @ projection).reshape(x.shape).astype(x.dtype)
        _, modulated = model.apply_layered(variables, x_mod, key=modulated_key)
        # hidden layers: the difference of the two passes' activities; the output: the error
        cotangents = [
            model.activate(i, trace.preacts[i]) - model.activate(i, modulated.preacts[i])
            for i in range(last)
        ] + [e]
        cotangents = [c / batch_size for c in cotangents]
        grads = layer_vjps(model, params, modulated.inputs, cotangents)
        return grads, EstimateAux(loss, model.named(trace.inputs)), projection

    return gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every, init=init)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """Two forward passes (2) and the weight products (1)."""
    del model, options, sizes
    return 3.0


SPEC = RuleSpec(
    pepita,
    summary="two forward passes, the second on the input plus a random projection of the error",
    source="Dellaferrera & Kreiman 2022",
    cost=cost,
    needs=("layered",),
    search=("feedback_scale=[0.02,0.1]",),
)
