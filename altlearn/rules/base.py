"""The learning-rule contract.

A learning rule is a pair of pure functions built by a factory, in the manner of optax:

    rule = factory(model, task, optimizer, data, **options)
    state = rule.init(key, variables)
    variables, state, metrics = rule.step(key, variables, state, batch)

``variables`` is the model's flax variables dict: ``'params'`` (what is learned) and, where the
model has them, non-trainable collections such as ``'decorrelation'`` that a rule updates by its
own local rule. ``state`` is a pytree whose structure, shapes and dtypes never change between
steps (it is a ``lax.scan`` carry). ``metrics`` is a dict of scalars; ``'loss'`` (the batch loss
before the step) is always present.

``data`` holds the whole data splits a rule declares in its ``RuleSpec.needs`` (``'train'``,
``'val'``) as device arrays ``(x, y)``: a rule that scores on the validation split or measures
on a fixed probe batch gets them here, inside the compiled step, without reaching into the
training loop. The test split is never offered. Rules that declare none get an empty mapping.

Numeric options (learning rates, noise scales, coefficients) may be traced values, so a sweep can
``vmap`` over them; structural options (sizes, counts, names) are static Python values.

Gradient-like rules (backprop, node perturbation, forward gradient, ...) only write an
*estimator* ``estimate(key, variables, state, batch) -> (grads, aux, state)`` and get the rest
from ``gradient_rule``: any optax optimizer applies the estimate, and decorrelation matrices are
updated by their local rule after each step. An estimator that keeps state of its own (fixed
random feedback matrices, say) passes ``init(key, variables)`` to ``gradient_rule``; a stateless
one returns the state it was given (None). ``LearningRule.estimate`` exposes the estimate so that
evaluation can compare it with the true gradient, and wrappers can add to it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Variables = dict[str, Any]
Batch = tuple[jax.Array, jax.Array]  # (inputs [B, ...], targets [B] or [B, K])
Metrics = dict[str, jax.Array]
Splits = Mapping[str, Batch]  # whole data splits by name ('train', 'val'), on the device
SPLITS = ("train", "val")  # what a RuleSpec may declare


class EstimateAux(NamedTuple):
    loss: jax.Array  # mean batch loss of the clean pass
    inputs: dict[str, jax.Array] | None  # clean layer inputs z by layer name, if layered


# estimate(key, variables, estimator_state, batch) -> (grads, EstimateAux, estimator_state)
Estimator = Callable[[jax.Array, Variables, Any, Batch], tuple[Any, EstimateAux, Any]]


class LearningRule(NamedTuple):
    init: Callable[[jax.Array, Variables], Any]
    step: Callable[[jax.Array, Variables, Any, Batch], tuple[Variables, Any, Metrics]]
    # Gradient-like rules: estimate(key, variables, state, batch) -> (grads, aux, state), the
    # estimate of dL/dparams from the rule's state, and that state with the estimator's part
    # advanced (the optimizer's untouched).
    estimate: Callable[[jax.Array, Variables, Any, Batch], tuple[Any, EstimateAux, Any]] | None = (
        None
    )
    # Optional: report(variables, state, splits) -> {name: scalar}, figures of the rule's own
    # state on the evaluation splits ({'train', 'val', 'test'}: EvalSplit), added to every
    # evaluation record. Evaluation only: it cannot change the state, so the test split it sees
    # never feeds back into training.
    report: Callable[[Variables, Any, dict[str, EvalSplit]], Metrics] | None = None
    # Optional: phase_step(t) -> bool, whether the step that brings the step count to t
    # (counted from 1) runs the rule's occasional expensive phase (hybrid's evolution phase):
    # the runner runs each such step as a compiled chunk of its own and reports its wall time.
    phase_step: Callable[[int], bool] | None = None


def never(options: dict[str, Any]) -> bool:
    del options
    return False


def always(options: dict[str, Any]) -> bool:
    del options
    return True


class Sizes(NamedTuple):
    """What a step's cost is counted against: samples per training batch and per data split
    (0 where the caller does not know the data)."""

    batch: int
    train: int = 0
    val: int = 0


NEEDS = ("layered", *SPLITS)  # what a RuleSpec may declare in ``needs``


class NeedsEstimate(ValueError):
    """Raised by a combinator whose inner rule gives no gradient estimate; the registry adds
    the rules that do (``altlearn.rules.Rule``)."""


class RuleSpec(NamedTuple):
    """A registry entry: how to build a rule, what it needs and what a step costs. Each field is
    read by the generic machinery (binaries, the training program, docs, conformance tests).

    ``factory(model, task, optimizer, data, **options)`` builds the ``LearningRule``; its keyword
    arguments are the rule's options and their defaults (floats are sweepable). An option whose
    default is another rule's factory takes a rule (a combinator's inner rule).
    ``summary`` and ``source``: the README row (one line; the paper, or 'baseline').
    ``cost(model, options, sizes)``: the work of one step in forward-pass equivalents over the
    step's batch (a backward or jvp pass counts 2), from the model, the rule's options (every
    option, defaults filled in) and ``Sizes`` (batch and split sizes, for a rule that also
    evaluates other data); equal-compute comparisons and tables read it.
    ``needs``: ``"layered"`` for a rule that reads layer inputs and pre-activations (a
    ``LayeredModel``), and the data splits the factory receives whole (``"train"``, ``"val"``).
    ``uses_optimizer(options)``: whether the rule applies the configured optax optimizer (a
    swarm moves the parameters itself); where it does not, the ``optimizer.*`` keys are no
    hyperparameters of it (not swept, not tuned). A conformance test checks it against what the
    rule does.
    ``wants_x64(options)``: whether the rule solves in float64 where the platform has it (the
    binaries then turn JAX's 64-bit mode on before anything is built,
    ``altlearn.train.configure_jax``).
    ``search``: the rule's main option(s) and the two ends a leaderboard tunes them between, in
    the ``--tune`` form with keys relative to the rule (``"sigma=[1e-3,1e-2]"``); empty for a
    rule whose only hyperparameter is the optimizer's learning rate (``experiments/
    leaderboard.py`` gives every rule the same number of grid points).
    """

    factory: Callable[..., LearningRule]
    summary: str
    source: str
    cost: Callable[[Any, dict[str, Any], Sizes], float]
    needs: tuple[str, ...] = ()
    uses_optimizer: Callable[[dict[str, Any]], bool] = always
    wants_x64: Callable[[dict[str, Any]], bool] = never
    search: tuple[str, ...] = ()


def factory_options(factory: Callable[..., LearningRule]) -> dict[str, Any]:
    """The options a rule factory value builds with: a resolved ``Rule``'s ``options``, else the
    factory's keyword defaults (after model, task, optimizer and data) updated by a
    ``functools.partial``'s keywords."""
    options = getattr(factory, "options", None)
    if options is not None:
        return dict(options)
    keywords = dict(getattr(factory, "keywords", None) or {})
    target = getattr(factory, "func", factory)
    params = list(inspect.signature(target).parameters.values())[4:]
    return {**{p.name: p.default for p in params}, **keywords}


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

    return rule._replace(
        init=scoped(rule.init), step=scoped(rule.step), estimate=scoped(rule.estimate)
    )


def check_count(name: str, value: Any) -> None:
    """Raises unless the structural count ``value`` (samples, particles, members) is >= 1."""
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def check_nonnegative(name: str, value: Any) -> None:
    """Rejects a negative concrete value; traced values (sweeps) are checked by the caller."""
    if is_concrete(value) and not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")


def check_positive(name: str, value: Any) -> None:
    """Rejects a non-positive concrete value; traced values (sweeps) are checked by the caller."""
    if is_concrete(value) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")


def run_if(pred: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """``fn(operand)`` if ``pred`` else ``operand`` (``fn`` keeps the pytree's structure).

    For an occasional expensive branch (an evolution phase every k steps, a restart): under
    ``vmap`` with a batched predicate ``lax.cond`` turns into a ``select`` that computes the
    branch at EVERY step. Here the branch is a ``while_loop`` of 0 or 1 iterations, which under
    ``vmap`` runs while any member needs it: when all members share the predicate (a step
    count, as in a vmapped sweep), the branch runs only on the steps that take it.
    """

    def body(carry):
        i, x = carry
        return i + 1, fn(x)

    limit = jnp.asarray(pred).astype(jnp.int32)
    return jax.lax.while_loop(lambda c: c[0] < limit, body, (jnp.zeros((), jnp.int32), operand))[1]


def batch_loss(model: Any, task: Any, variables: Variables, batch: Batch, key=None):
    """(mean batch loss, clean layer inputs by layer name, or None for a forward-only model).

    On a noisy system (``intrinsic_noise > 0``) the pass draws its intrinsic noise from ``key``;
    without a key it is noise-free.
    """
    x, y = batch
    if model.layered:
        out, trace = model.apply_layered(variables, x, key=key)
        return jnp.mean(task.loss(out, y)), model.named(trace.inputs)
    return jnp.mean(task.loss(model.apply(variables, x), y)), None


def layer_vjps(model: Any, params: Any, inputs: Any, cotangents: Any) -> dict[str, Any]:
    """``{layer name: J_l(z_l)^T c_l}``: each layer's parameter VJP at its input z_l with the
    cotangent c_l of its pre-activation (z^T c for a dense layer): the layer-local update of
    every rule that computes its own error signals (node perturbation, dfa, pepita)."""
    grads = {}
    for i, (name, z, c) in enumerate(zip(model.layer_names, inputs, cotangents)):
        _, vjp = jax.vjp(lambda p, i=i, z=z: model.layer_apply(i, p, z), params[name])
        (grads[name],) = vjp(c)
    return grads


def params_loss(model: Any, task: Any, variables: Variables, batch: Batch) -> Callable:
    """``params -> mean batch loss`` of the model with those params (and ``variables``' other
    collections) on ``batch``, noise-free: the fitness of a population member, the function
    whose ``jax.grad`` is the true gradient."""
    return lambda params: batch_loss(model, task, {**variables, "params": params}, batch)[0]


class EvalSplit(NamedTuple):
    """A whole data split cut into equal chunks for evaluation (the last one padded)."""

    x: jax.Array  # [C, S, ...]
    y: jax.Array  # [C, S] or [C, S, K]
    mask: jax.Array  # [C, S], 1.0 for a real sample, 0.0 for padding
    count: int  # real samples (static)


def map_chunks(fn: Callable[[jax.Array], Any], split: EvalSplit) -> Any:
    """``fn(x_chunk)`` for every chunk of ``split``, stacked [C, ...] (one chunk in memory at a
    time)."""
    return jax.lax.map(fn, split.x)


def split_figures(model: Any, task: Any, variables: Variables, split: EvalSplit):
    """Mean loss (and accuracy, for classification) of ``variables`` over a whole split."""

    def chunk(args):
        x, y, mask = args
        out = model.apply(variables, x)
        per = {"loss": task.loss(out, y)}
        if task.is_classification:
            per["accuracy"] = (jnp.argmax(out, -1) == y).astype(jnp.float32)
        return {k: jnp.sum(v * mask) for k, v in per.items()}

    sums = jax.lax.map(chunk, (split.x, split.y, split.mask))
    return {k: jnp.sum(v) / split.count for k, v in sums.items()}


class GradientRuleState(NamedTuple):
    opt_state: optax.OptState
    count: jax.Array  # int32 [], steps taken
    estimator: Any = None  # the estimator's own state (None for a stateless estimator)


def decorrelation_update(
    decor: dict[str, jax.Array], inputs: dict[str, jax.Array], rate: Any
) -> dict[str, jax.Array]:
    """R <- R - rate * C R with C = (1/B) Z^T Z, diagonal zeroed (docs/RULES.md).

    ``inputs[name]`` is the clean decorrelated input Z = H R^T of that layer, shape [B, D]. C R
    costs O(D^3) formed directly but O(B D^2) as Z^T (Z R) / B - diag(C) R; the cheaper form is
    picked from the shapes (docs/BENCHMARKS.md has the measured difference).
    """
    new = {}
    for name, r in decor.items():
        z = inputs[name]
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
    init: Callable[[jax.Array, Variables], Any] | None = None,
    weight_decay: Any = 0.0,
    after_update: Callable[[Any, Any], Any] | None = None,
) -> LearningRule:
    """Builds a rule that applies ``estimate``'s gradient with ``optimizer``.

    ``estimate(key, variables, state, batch) -> (grads, EstimateAux, state)``; ``init(key,
    variables)`` is the estimator's initial state (None: the estimator keeps none and gets None).
    If the variables hold decorrelation matrices they are updated by their local rule at
    ``decorrelation_rate``, outside the optimizer, after every ``decorrelation_every``-th step
    (1: every step; more amortises its cost, see docs/RESULTS.md).

    ``weight_decay`` lambda shrinks every parameter by a factor (1 - lambda) at each step, apart
    from the optimizer (decoupled: theta <- (1 - lambda) theta + update, whatever the
    optimizer). ``after_update(estimator_state, updates)`` (optional) advances the estimator's
    state from the optimizer's updates of the step (Kolen-Pollack's feedback follows them).
    """
    check_count("decorrelation_every", decorrelation_every)
    check_nonnegative("weight_decay", weight_decay)

    def rule_init(key: jax.Array, variables: Variables) -> GradientRuleState:
        estimator = None if init is None else init(key, variables)
        count = jnp.zeros((), jnp.int32)
        return GradientRuleState(optimizer.init(variables["params"]), count, estimator)

    def rule_estimate(key, variables, state, batch):
        grads, aux, estimator = estimate(key, variables, state.estimator, batch)
        return grads, aux, state._replace(estimator=estimator)

    def step(key, variables, state, batch):
        grads, aux, state = rule_estimate(key, variables, state, batch)
        params = variables["params"]
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        if is_concrete(weight_decay) and float(weight_decay) == 0.0:
            new_params = optax.apply_updates(params, updates)
        else:  # decoupled: (1 - lambda) theta + update
            decay = lambda p, u: ((1.0 - weight_decay) * p + u).astype(p.dtype)
            new_params = jax.tree_util.tree_map(decay, params, updates)
        new = {**variables, "params": new_params}
        if after_update is not None:
            state = state._replace(estimator=after_update(state.estimator, updates))
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
        state = state._replace(opt_state=opt_state, count=state.count + 1)
        return new, state, {"loss": aux.loss}

    return LearningRule(rule_init, step, rule_estimate)
