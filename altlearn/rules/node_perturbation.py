"""Node perturbation and its relatives (RULES.md section 1; paper 003: Dalm, van Gerven, Ahmad,
"Effective learning with node perturbation in multi-layer neural networks", arXiv 2310.00965).

Node perturbation (NP) learns from the change of the per-sample loss that noise on the
pre-activations causes. With noise eps_l ~ N(0, sigma^2 I) on every layer's pre-activation a_l
(output layer included) and the per-sample loss difference dl_n = l_n(clean) - l_n(noisy),
the error signal e_l of layer l is

    np:   e_l = eps_l * dl / sigma^2
    anp:  e_l = N * dl * da_l / S,  da_l = a_l(noisy) - a_l(clean), S = sum_l ||da_l||^2,
          N = number of perturbed units (activity-based: the noise itself is never read)
    inp:  L noisy passes, pass l perturbs only layer l:  e_l = n_l * dl^(l) * da_l / ||da_l||^2

``dl`` is a vector over the batch and is never batch-averaged before use. The weight update is
layer-local: G_l = -(1/B) sum_n J_l(z_clean)^T e_{l,n}, the VJP of p -> layer_l(p, z_clean) at
e (z^T e for a dense layer), so convolutions work alike. G estimates +dL/dtheta and goes to the
optimizer as an ordinary gradient.

``mode='finite_difference'`` runs the noisy forward passes (the biological two-pass form; works
for non-differentiable or noisy systems). ``mode='jvp'`` replaces the difference by the exact
directional derivative along the noise, dl_n = -<dl_n/da, eps_n>, and da by the tangent of the
pre-activations, both from one ``jax.jvp`` w.r.t. the node noise at zero.

``num_noise_samples`` noisy passes share one clean pass (vmapped) and their estimates are
averaged. On a model with decorrelation matrices these are DNP, DANP and DINP.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from altlearn.losses import Task
from altlearn.models import LayeredModel, Model
from altlearn.rules.base import (
    EstimateAux,
    LearningRule,
    RuleSpec,
    Splits,
    check_count,
    check_positive,
    gradient_rule,
    with_rng_mode,
)

VARIANTS = ("np", "anp", "inp")
MODES = ("finite_difference", "jvp")


def _per_sample(x: jax.Array, like: jax.Array) -> jax.Array:
    """Broadcasts a per-sample vector [B] against an activation [B, ...]."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def _sum_units(x: jax.Array) -> jax.Array:
    """Sum over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _layer_local_grads(model: LayeredModel, params, inputs, errors) -> dict[str, Any]:
    """G_l = -(1/B) sum_n J_l(z_clean)^T e_{l,n}: the VJP of each layer at its clean input."""
    grads = {}
    for i, (name, z, e) in enumerate(zip(model.layer_names, inputs, errors)):
        _, vjp = jax.vjp(lambda p, i=i, z=z: model.layer_apply(i, p, z), params[name])
        (grads[name],) = vjp(-e / z.shape[0])
    return grads


def node_perturbation(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    variant: str = "np",
    mode: str = "finite_difference",
    sigma: Any = 1e-3,
    num_noise_samples: int = 1,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    rng_partitionable: str = "auto",
) -> LearningRule:
    """Node perturbation (``variant`` np, anp or inp) in ``mode`` finite_difference or jvp.

    ``rng_partitionable``: the threefry mode of the noise (``base.rng_mode``; ``"auto"``: the
    classic mode on CPU, where it draws normals 3x faster).
    """
    del data
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid choices: {', '.join(MODES)}.")
    check_positive("sigma", sigma)
    check_count("num_noise_samples", num_noise_samples)

    def estimate(key, variables, state, batch):
        x, y = batch
        key_clean, key_noise = jax.random.split(key)

        def run(noise, key_system):
            out, trace = model.apply_layered(variables, x, noise, key=key_system)
            return task.loss(out, y), trace

        # CLEAN PASS: caches z_{l-1}, a_l and the per-sample losses.
        loss_clean, clean = run(None, key_clean)
        num_layers = len(clean.preacts)

        def perturbed(noise, key_system):
            """(dl [B], da per layer) for node noise ``noise`` (None entries: unperturbed)."""
            if mode == "finite_difference":
                loss_noisy, noisy = run(noise, key_system)
                da = [an - ac for an, ac in zip(noisy.preacts, clean.preacts)]
                return loss_clean - loss_noisy, da
            zeros = [jnp.zeros_like(a) for a in clean.preacts]
            tangent = [jnp.zeros_like(a) if n is None else n for n, a in zip(noise, clean.preacts)]
            # The primal point is the clean pass (same system noise), so the tangent is exact.
            f = lambda nz: (lambda r: (r[0], r[1].preacts))(run(nz, key_clean))
            _, (dloss, da) = jax.jvp(f, (zeros,), (tangent,))
            return -dloss, list(da)

        def errors_one_sample(key_sample):
            key_eps, key_system = jax.random.split(key_sample)
            keys = jax.random.split(key_eps, num_layers)
            eps = [
                sigma * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, clean.preacts)
            ]
            if variant == "np":
                dl, _ = perturbed(eps, key_system)
                return [e * _per_sample(dl / sigma**2, e) for e in eps]
            if variant == "anp":
                dl, da = perturbed(eps, key_system)
                total_units = sum(math.prod(a.shape[1:]) for a in clean.preacts)
                s = sum(_sum_units(jnp.square(d)) for d in da)
                return [d * _per_sample(total_units * dl / s, d) for d in da]
            # inp: pass l perturbs only layer l
            errors = []
            for i, k in enumerate(jax.random.split(key_system, num_layers)):
                noise = [eps[i] if j == i else None for j in range(num_layers)]
                dl, da = perturbed(noise, k)
                units = math.prod(da[i].shape[1:])
                scale = units * dl / _sum_units(jnp.square(da[i]))
                errors.append(da[i] * _per_sample(scale, da[i]))
            return errors

        samples = jax.vmap(errors_one_sample)(jax.random.split(key_noise, num_noise_samples))
        errors = [jnp.mean(e, axis=0) for e in samples]
        grads = _layer_local_grads(model, variables["params"], clean.inputs, errors)
        return grads, EstimateAux(jnp.mean(loss_clean), model.named(clean.inputs)), state

    rule = gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
    return with_rng_mode(rule, rng_partitionable)


def cost(model: Model, options: dict[str, Any]) -> float:
    """The clean pass and, per noise sample, one noisy pass (inp: one per layer); in jvp mode a
    noisy pass is a jvp pass (2). The layer-local weight products are not counted."""
    noisy = model.num_layers if options["variant"] == "inp" else 1
    per_pass = 2 if options["mode"] == "jvp" else 1
    return 1.0 + per_pass * int(options["num_noise_samples"]) * noisy


SPEC = RuleSpec(
    node_perturbation,
    needs_layered=True,
    summary="noise on every pre-activation, learning from the per-sample loss change "
    "(variants np, anp, inp; finite difference or jvp); DNP/DANP/DINP on a decorrelated model",
    source="paper 003 (Dalm et al., arXiv 2310.00965)",
    cost=cost,
)
