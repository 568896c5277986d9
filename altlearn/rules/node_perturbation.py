"""Node perturbation: learning from the loss change that noise on the pre-activations causes.

Paper 003: Dalm, van Gerven, Ahmad, "Effective learning with node perturbation in multi-layer
neural networks", arXiv 2310.00965. Its claim: decorrelating the layer inputs and using the
directional derivative give node perturbation much better convergence and accuracy than plain
NP, approaching backprop. What follows is the paper's method as its authors' public code runs
it; where that left a choice open, the decision is ours and says so.

Noise eps_l of zero mean and covariance sigma^2 I, shaped like the pre-activation a_l,
independent per sample and unit and fresh every step, is added to EVERY layer's pre-activation,
the output layer's included. The paper draws it from N(0, sigma^2 I); our default draws each
entry as +-sigma with probability 1/2 (``noise_distribution='rademacher'``): the estimators
below need only the mean and covariance, and one random bit per entry is far cheaper than a
normal (``altlearn.rules._noise``; ``'normal'`` gives the paper's noise). A clean pass keeps
each layer's input z_{l-1}, its pre-activation a_l and the per-sample losses l_n; a noisy pass
with the same parameters gives the per-sample loss difference dl_n = l_n(clean) - l_n(noisy).
The error signal e_l of layer l is

    np:   e_l = eps_l * dl / sigma^2                                   (one noisy pass)
    anp:  e_l = N * dl * da_l / S,  da_l = a_l(noisy) - a_l(clean),  S_n = sum_l ||da_{l,n}||^2,
          N = number of perturbed units, output layer included  (activity-based: the noise
          itself is never read, so it works when the noise is unknown, e.g. a noisy system)
    inp:  L noisy passes, pass l perturbs only layer l (eps drawn once per step):
          e_l = n_l * dl^(l) * da_l / ||da_l||^2,  n_l = width of layer l

``dl`` is a vector over the batch and is never averaged over the batch before use (averaging
it is the classic bug: it shrinks the estimate by the batch size). The weight update is
layer-local, G_l = -(1/B) sum_n J_l(z_clean)^T e_{l,n}: the VJP of p -> layer_l(p, z_clean) at
e, i.e. -(1/B) z^T e and -(1/B) sum_n e for a dense layer, so convolutions work alike. With
dl = clean - noisy, G estimates +dL/dtheta and goes to the optimizer as an ordinary gradient.

``mode='finite_difference'`` runs the noisy forward passes (the biological two-pass form; it
also works for non-differentiable or noisy systems). ``mode='jvp'`` replaces the difference by
the exact directional derivative along the noise, dl_n = -<dl_n/da, eps_n>, and da by the
tangent of the pre-activations, both from one ``jax.jvp`` w.r.t. the node noise at zero (one
pass with tangents instead of two passes). ``num_noise_samples`` noisy passes share one clean
pass (vmapped) and their estimates are averaged (our option; the paper uses one).

Decorrelation (DNP, DANP, DINP; DBP is backprop through the same layers): on a model built with
``decorrelation=True`` every dense layer applies a non-trainable square matrix R_l (initially
I) to its input, z = R_l h, and after each step R_l <- R_l - eta_R C R_l with
C = (1/B) Z^T Z, diagonal set to zero (uncentred), Z the clean decorrelated inputs
(``decorrelation_rate`` eta_R; ``decorrelation_every`` K > 1 updates only every K-th step, our
option to amortise its cost). R is updated outside the optimizer by this local rule.

The paper's settings (CIFAR-10): MLP 3072-1024x3-10 with leaky ReLU of slope 0.2 (the
reference's; JAX's default is 0.01, so configs pass it), He-normal init, softmax cross-entropy,
batch 1000, 50 epochs, Adam 1e-4 (1e-3 for DBP), sigma 1e-3, eta_R 1e-3
(``experiments/configs/np_family.py:scale=paper``). Our defaults: sigma 1e-3, eta_R 1e-3, one
noise sample, finite differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from altlearn import prng
from altlearn.losses import Task
from altlearn.models import LayeredModel, Model
from altlearn.rules._noise import check_distribution, unit_noise
from altlearn.rules.base import (
    EstimateAux,
    LearningRule,
    RuleSpec,
    Sizes,
    Splits,
    check_count,
    check_positive,
    gradient_rule,
    layer_vjps,
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
    return layer_vjps(model, params, inputs, [-e / z.shape[0] for z, e in zip(inputs, errors)])


def draw_noise(
    key: jax.Array,
    preacts: Sequence[Any],
    sigma: Any,
    num_noise_samples: int,
    distribution: str = "rademacher",
) -> tuple[list[jax.Array], jax.Array]:
    """The node noise of ``num_noise_samples`` noisy passes and the key of each pass.

    ``preacts``: one array (or ``jax.ShapeDtypeStruct``) per layer, shaped like its
    pre-activation [B, ...]. Returns (eps, keys_system): eps[l] of covariance sigma^2 I and shape
    [num_noise_samples, B, ...], independent per sample, unit and noisy pass, and one key per
    noisy pass for a noisy system's intrinsic noise (``estimate_from_noise``).
    """
    num_layers = len(preacts)

    def one_sample(key_sample):
        key_eps, key_system = prng.split(key_sample)
        keys = prng.split(key_eps, num_layers)
        eps = [sigma * unit_noise(k, a.shape, a.dtype, distribution) for k, a in zip(keys, preacts)]
        return eps, key_system

    return jax.vmap(one_sample)(prng.split(key, num_noise_samples))


def estimate_from_noise(
    model: LayeredModel,
    task: Task,
    variables: Any,
    batch: Any,
    eps: Sequence[jax.Array],
    keys_system: jax.Array,
    key_clean: jax.Array,
    variant: str = "np",
    mode: str = "finite_difference",
    sigma: Any = 1e-3,
) -> tuple[dict[str, Any], EstimateAux]:
    """The node-perturbation estimate (grads, aux) for given node noise: ``eps[l]`` of shape
    [S, B, ...] is the noise on layer l's pre-activation in each of S noisy passes (``sigma``
    its scale, which np divides by), ``keys_system`` [S] and ``key_clean`` the keys of the
    noisy and clean passes (read only by a noisy system). The S estimates are averaged."""
    x, y = batch

    def run(noise, key_system):
        out, trace = model.apply_layered(variables, x, noise, key=key_system)
        return task.loss(out, y), trace

    # CLEAN PASS: caches z_{l-1}, a_l and the per-sample losses.
    loss_clean, clean = run(None, key_clean)
    num_layers = len(clean.preacts)
    # On a noise-free system a perturbed pass equals the clean one up to the first perturbed
    # pre-activation, so it starts there (``preacts_from``): np and anp skip the first layer's
    # product, inp's pass l skips l layers. A noisy system redraws its intrinsic noise in every
    # layer of every pass, so it runs whole passes.
    whole_passes = model.intrinsic_noise > 0

    def from_first(noise):
        """(per-sample loss, pre-activations from the first perturbed layer on) of the pass
        that adds ``noise`` (None entries: unperturbed) to the clean pass's pre-activations."""
        first = next(i for i, n in enumerate(noise) if n is not None)
        out, preacts = model.preacts_from(
            variables, first, clean.preacts[first] + noise[first], noise
        )
        return task.loss(out, y), (None,) * first + preacts

    def perturbed(noise, key_system):
        """(dl [B], da per layer) for node noise ``noise`` (None entries: unperturbed; da is
        None before the first perturbed layer where the pass starts late)."""
        if mode == "finite_difference":
            if whole_passes:
                loss_noisy, noisy = run(noise, key_system)
                preacts = noisy.preacts
            else:
                loss_noisy, preacts = from_first(noise)
            da = [None if an is None else an - ac for an, ac in zip(preacts, clean.preacts)]
            return loss_clean - loss_noisy, da
        if whole_passes:
            zeros = [jnp.zeros_like(a) for a in clean.preacts]
            tangent = [jnp.zeros_like(a) if n is None else n for n, a in zip(noise, clean.preacts)]
            # The primal point is the clean pass (same system noise), so the tangent is exact.
            f = lambda nz: (lambda r: (r[0], r[1].preacts))(run(nz, key_clean))
            _, (dloss, da) = jax.jvp(f, (zeros,), (tangent,))
            return -dloss, list(da)
        # The tangent of the pass from the first perturbed layer, at the clean pass.
        live = [n is not None for n in noise]
        zeros = [jnp.zeros_like(a) if on else None for a, on in zip(clean.preacts, live)]
        _, (dloss, da) = jax.jvp(from_first, (zeros,), (list(noise),))
        return -dloss, list(da)

    def errors_one_sample(eps, key_system):
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
        for i, k in enumerate(prng.split(key_system, num_layers)):
            noise = [eps[i] if j == i else None for j in range(num_layers)]
            dl, da = perturbed(noise, k)
            units = math.prod(da[i].shape[1:])
            scale = units * dl / _sum_units(jnp.square(da[i]))
            errors.append(da[i] * _per_sample(scale, da[i]))
        return errors

    samples = jax.vmap(errors_one_sample)(list(eps), keys_system)
    errors = [jnp.mean(e, axis=0) for e in samples]
    grads = _layer_local_grads(model, variables["params"], clean.inputs, errors)
    return grads, EstimateAux(jnp.mean(loss_clean), model.named(clean.inputs))


def node_perturbation(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    variant: str = "np",
    mode: str = "finite_difference",
    sigma: Any = 1e-3,
    num_noise_samples: int = 16,
    decorrelation_rate: Any = 1e-3,
    decorrelation_every: int = 1,
    rng_partitionable: str = "auto",
    noise_distribution: str = "rademacher",
) -> LearningRule:
    """Node perturbation (module docstring).

    ``variant``: np, anp or inp. ``mode``: finite_difference (noisy forward passes) or jvp
    (directional derivatives). ``sigma``: std of the node noise (> 0). ``num_noise_samples``:
    noisy passes per step sharing one clean pass, their estimates averaged. ``decorrelation_rate``
    eta_R and ``decorrelation_every`` K: the decorrelation matrices' local rule (decorrelated
    models only). ``rng_partitionable``: the threefry mode of the noise (``base.rng_mode``;
    ``"auto"``: the classic mode on CPU, where it draws normals 3x faster).
    ``noise_distribution``: ``rademacher`` (default: eps = +-sigma per unit and sample, one
    random bit each) or ``normal`` (eps ~ N(0, sigma^2 I), the paper's; ``altlearn.rules._noise``
    has the measurements behind the default).

    ``num_noise_samples`` defaults to 16 (the paper uses one; its configs,
    ``experiments/configs/np_family.py``, set 1): with one sample the estimate of a wide
    network is too noisy for the default optimizer. On the default model (MLP 512-512, Adam
    3e-3, batch 128, 1000 steps, seed 0) one sample raised the training loss on moons, circles,
    iris, breast_cancer and mnist1d (mnist1d 3.15 -> 10.9, circles 0.78 -> 13.2); 16 samples
    took every bundled classification set down (mnist1d 3.15 -> 2.40, test accuracy 0.46;
    circles 0.78 -> 0.18; moons 0.80 -> 0.03; digits 3.04 -> 0.025, 0.96; iris, wine and
    breast_cancer below 0.002) at about 15 ms a step on 2 CPU cores.
    """
    del data
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid choices: {', '.join(VARIANTS)}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid choices: {', '.join(MODES)}.")
    check_positive("sigma", sigma)
    check_count("num_noise_samples", num_noise_samples)
    check_distribution(noise_distribution)

    def estimate(key, variables, state, batch):
        key_clean, key_noise = prng.split(key)
        shapes = model.preact_shapes(variables, batch[0])
        eps, keys_system = draw_noise(
            key_noise, shapes, sigma, num_noise_samples, noise_distribution
        )
        grads, aux = estimate_from_noise(
            model, task, variables, batch, eps, keys_system, key_clean, variant, mode, sigma
        )
        return grads, aux, state

    rule = gradient_rule(estimate, optimizer, decorrelation_rate, decorrelation_every)
    return with_rng_mode(rule, rng_partitionable)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """The clean pass and, per noise sample, one noisy pass (inp: one per layer); in jvp mode a
    noisy pass is a jvp pass (2). The layer-local weight products are not counted."""
    del sizes
    noisy = model.num_layers if options["variant"] == "inp" else 1
    per_pass = 2 if options["mode"] == "jvp" else 1
    return 1.0 + per_pass * int(options["num_noise_samples"]) * noisy


SPEC = RuleSpec(
    node_perturbation,
    summary="noise on every pre-activation, learning from the per-sample loss change "
    "(variants np, anp, inp; finite difference or jvp); DNP/DANP/DINP on a decorrelated model",
    source="paper 003 (Dalm et al., arXiv 2310.00965)",
    cost=cost,
    needs=("layered",),
    search=("sigma=[1e-3,1e-2]",),
)
