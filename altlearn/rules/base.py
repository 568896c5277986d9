"""The learning-rule contract.

A learning rule is a pair of pure functions built by a factory, in the manner of optax:

    rule = factory(model, task, optimizer, **options)
    state = rule.init(key, variables)
    variables, state, metrics = rule.step(key, variables, state, batch)

``variables`` is the model's flax variables dict: ``'params'`` (what is learned) and, where the
model has them, non-trainable collections such as ``'decorrelation'`` that a rule updates by its
own local rule. ``state`` is a pytree whose structure, shapes and dtypes never change between
steps (it is a ``lax.scan`` carry). ``metrics`` is a dict of scalars; ``'loss'`` (the batch loss
before the step) is always present.

Numeric options (learning rates, noise scales, coefficients) may be traced values, so a sweep can
``vmap`` over them; structural options (sizes, counts, names) are static Python values.

Gradient-like rules (backprop, node perturbation, forward gradient, ...) only write an
*estimator* ``estimate(key, variables, batch) -> (grads, aux)`` and get the rest from
``gradient_rule``: any optax optimizer applies the estimate, and decorrelation matrices are
updated by their local rule after each step. Their ``LearningRule.estimate`` is exposed so that
evaluation can compare the estimate with the true gradient.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Variables = dict[str, Any]
Batch = tuple[jax.Array, jax.Array]  # (inputs [B, ...], targets [B] or [B, K])
Metrics = dict[str, jax.Array]


class EstimateAux(NamedTuple):
    loss: jax.Array  # mean batch loss of the clean pass
    inputs: tuple[jax.Array, ...] | None  # clean layer inputs z (for decorrelation), if layered


Estimator = Callable[[jax.Array, Variables, Batch], tuple[Any, EstimateAux]]


class LearningRule(NamedTuple):
    init: Callable[[jax.Array, Variables], Any]
    step: Callable[[jax.Array, Variables, Any, Batch], tuple[Variables, Any, Metrics]]
    estimate: Estimator | None = None  # gradient-like rules: the estimate of dL/dparams


class RuleSpec(NamedTuple):
    """A registry entry: how to build a rule and what it needs."""

    factory: Callable[..., LearningRule]  # factory(model, task, optimizer, **options)
    needs_layered: bool  # needs a LayeredModel (layer inputs / pre-activations)
    uses_optimizer: bool  # hands an estimate to the configured optax optimizer
    summary: str  # one line for the README table
    source: str  # the paper (or 'baseline')
    prefers_x64: bool = False  # solves in float64 where the platform has it (configure_jax)


def rule_options(spec: RuleSpec) -> dict[str, Any]:
    """A rule's options with their defaults (keyword arguments after model, task, optimizer)."""
    params = list(inspect.signature(spec.factory).parameters.values())[3:]
    return {p.name: p.default for p in params}


def is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


RNG_PARTITIONABLE = ("auto", "on", "off", "jax")


def rng_mode(setting: str) -> contextlib.AbstractContextManager:
    """The threefry mode a rule draws its noise in (``rule.rng_partitionable``).

    JAX's partitionable threefry (``jax_threefry_partitionable``, on by default since JAX 0.5)
    lets each device draw only its own shard of a sharded random array, but on XLA:CPU it draws
    normals about 3x slower than the classic one (12.6 vs 4.2 ns each, measured; an Open_ES
    generation on CPU is mostly its P x num_params normals, a forward-gradient step draws one
    normal per parameter). ``"auto"``: classic on the CPU backend, JAX's setting elsewhere;
    ``"on"``/``"off"``: partitionable or classic everywhere; ``"jax"``: JAX's global setting.
    The mode is fixed at trace time, so it holds for everything the rule draws inside the
    compiled step. The two modes give different random streams (each reproducible); neither
    depends on how an array is sharded, so a sharded run equals the unsharded one in both.
    """
    if setting not in RNG_PARTITIONABLE:
        raise ValueError(
            f"Unknown rng_partitionable {setting!r}; valid choices: {', '.join(RNG_PARTITIONABLE)}."
        )
    if setting == "jax" or (setting == "auto" and jax.default_backend() != "cpu"):
        return contextlib.nullcontext()
    return jax.threefry_partitionable(setting == "on")


def with_rng_mode(rule: LearningRule, setting: str) -> LearningRule:
    """``rule`` with ``init``, ``step`` and ``estimate`` traced in ``rng_mode(setting)``: what
    a noise-drawing factory returns for its ``rng_partitionable`` option."""
    rng_mode(setting)  # validates the setting when the rule is built

    def scoped(fn: Callable | None) -> Callable | None:
        if fn is None:
            return None

        def wrapped(*args: Any) -> Any:
            with rng_mode(setting):
                return fn(*args)

        return wrapped

    return LearningRule(*(scoped(fn) for fn in rule))


def check_count(name: str, value: Any) -> None:
    """Raises unless the structural count ``value`` (samples, particles, members) is >= 1."""
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def check_positive(name: str, value: Any) -> None:
    """Rejects a non-positive concrete value; traced values (sweeps) are checked by the caller."""
    if is_concrete(value) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def batch_loss(model: Any, task: Any, variables: Variables, x: jax.Array, y: jax.Array, key=None):
    """(mean batch loss, clean layer inputs or None for a forward-only model).

    On a noisy system (``intrinsic_noise > 0``) the pass draws its intrinsic noise from ``key``.
    """
    if model.layered:
        out, trace = model.apply_layered(variables, x, key=key)
        return jnp.mean(task.loss(out, y)), trace.inputs
    return jnp.mean(task.loss(model.apply(variables, x), y)), None


class GradientRuleState(NamedTuple):
    opt_state: optax.OptState
    count: jax.Array  # int32 [], steps taken


def decorrelation_update(
    decor: dict[str, jax.Array], inputs: tuple[jax.Array, ...], rate: Any
) -> dict[str, jax.Array]:
    """R <- R - rate * C R with C = (1/B) Z^T Z, diagonal zeroed (RULES.md section 1).

    ``inputs[l]`` is the clean decorrelated input Z = H R^T of layer l, shape [B, D]. C R costs
    O(D^3) formed directly but O(B D^2) as Z^T (Z R) / B - diag(C) R; the cheaper form is
    picked from the shapes (docs/BENCHMARKS.md has the measured difference).
    """
    new = {}
    for i, z in enumerate(inputs):
        name = f"layer_{i}"
        r = decor[name]
        batch, width = z.shape
        if batch < width:
            diag = jnp.mean(jnp.square(z), axis=0)
            cr = z.T @ (z @ r) / batch - diag[:, None] * r
        else:
            c = (z.T @ z) / batch
            cr = (c * (1.0 - jnp.eye(width, dtype=c.dtype))) @ r
        new[name] = r - rate * cr
    return new


def gradient_rule(
    estimate: Estimator,
    optimizer: optax.GradientTransformation,
    decorrelation_rate: Any = 0.0,
    decorrelation_every: int = 1,
) -> LearningRule:
    """Builds a rule that applies ``estimate``'s gradient with ``optimizer``.

    If the variables hold decorrelation matrices they are updated by their local rule at
    ``decorrelation_rate``, outside the optimizer, after every ``decorrelation_every``-th step
    (1: every step; more amortises its cost, see docs/RESULTS.md).
    """
    check_count("decorrelation_every", decorrelation_every)

    def init(key: jax.Array, variables: Variables) -> GradientRuleState:
        del key
        return GradientRuleState(optimizer.init(variables["params"]), jnp.zeros((), jnp.int32))

    def step(key, variables, state, batch):
        grads, aux = estimate(key, variables, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, variables["params"])
        new = {**variables, "params": optax.apply_updates(variables["params"], updates)}
        if "decorrelation" in variables:
            update = lambda d: decorrelation_update(d, aux.inputs, decorrelation_rate)
            if decorrelation_every == 1:
                new["decorrelation"] = update(variables["decorrelation"])
            else:
                new["decorrelation"] = jax.lax.cond(
                    state.count % decorrelation_every == 0,
                    update,
                    lambda d: d,
                    variables["decorrelation"],
                )
        return new, GradientRuleState(opt_state, state.count + 1), {"loss": aux.loss}

    return LearningRule(init, step, estimate)
