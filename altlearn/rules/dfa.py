"""Direct feedback alignment (Nøkland 2016, "Direct feedback alignment provides learning in
deep neural networks", NeurIPS).

Every hidden layer receives the OUTPUT error straight through its own fixed random matrix,
instead of layer by layer through the transposed weights. With e = dL/da_L the error at the
output (a_L the output pre-activation: the logits), hidden layer l (pre-activation a_l,
h_l = f(a_l), input z_{l-1}):

    delta_L = e
    delta_l = (e B_l) * f'(a_l)          B_l: [K, units of layer l], fixed
    dW_l = z_{l-1}^T delta_l             (for a convolution: its weight VJP with delta_l)

and any optax optimizer applies dW. No error passes between hidden layers, so every layer's
update can be computed as soon as the output error is known. B_l ~ N(0, feedback_scale^2 / K),
drawn once and kept in the rule's state; for a convolutional layer B_l maps the error to the
layer's whole feature map. Needs a layered model (mlp, cnn, vgg). With one hidden layer and
B_1 = W_out^T it is backprop exactly (tested).
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


def dfa(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    feedback_scale: Any = 1.0,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
) -> LearningRule:
    """The output error sent to every hidden layer through its own fixed B_l."""
    del data
    check_positive("feedback_scale", feedback_scale)
    names = model.layer_names

    def init(key, variables):
        shapes = model.preact_shapes(variables)
        outputs = int(np.prod(shapes[-1].shape[1:]))
        keys = jax.random.split(key, len(names))
        return {
            name: feedback_scale
            / float(np.sqrt(outputs))  # a Python float: B keeps its dtype in 64-bit mode too
            * jax.random.normal(k, (outputs, int(np.prod(s.shape[1:]))), s.dtype)
            for name, k, s in zip(names[:-1], keys, shapes)
        }

    def estimate(key, variables, feedback, batch):
        x, y = batch
        params = variables["params"]
        out, trace = model.apply_layered(variables, x, key=key)  # key: a noisy model's noise
        loss, e = jax.value_and_grad(lambda o: jnp.mean(task.loss(o, y)))(out)  # [B, K]
        e = e.reshape(e.shape[0], -1)
        deltas = []
        for i, name in enumerate(names[:-1]):  # straight from the output error, then f'(a_l)
            a = trace.preacts[i]
            _, f_vjp = jax.vjp(lambda a, i=i: model.activate(i, a), a)
            deltas.append(f_vjp((e @ feedback[name]).reshape(a.shape))[0])
        deltas.append(e.reshape(trace.preacts[-1].shape))  # the output layer: its own error
        grads = layer_vjps(model, params, trace.inputs, deltas)  # z^T delta for a dense layer
        return grads, EstimateAux(loss, model.named(trace.inputs)), feedback

    return gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every, init=init)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """One forward pass (1) and the weight products of a backward pass (1); the projections
    e B_l (outputs x units per layer, small beside the layers' products) are not counted."""
    del model, options, sizes
    return 2.0


SPEC = RuleSpec(
    dfa,
    summary="the output error sent straight to every hidden layer through fixed random matrices",
    source="Nøkland 2016",
    cost=cost,
    needs=("layered",),
)
