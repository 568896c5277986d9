"""Persistent neurons: train again from the same start, pushed away from earlier solutions.

Paper 001 (Y. Min, "Persistent neurons", arXiv 2007.01419) trains a network to convergence,
then trains it again from the SAME initialisation while penalising the parameters for converging
to the solutions found before ("we utilize the end of trajectories"), and repeats; the penalty
acts as a deterministic error term on SGD. It has full (all parameters) and partial (some layers
or neurons) variants. Its claims: where popular initialisations end in bad local minima (a 2-D
toy surface; a 3-layer fully connected network on data with a "kink") it converges to better
solutions, and it helps LeNet-5 under good and poor initialisations.

The paper's full text (its exact penalty, lambda, number of iterations) was not available to
us. The penalties below are OUR decision, built on the closest published methods: deflation
(Farrell, Birkisson & Funke, SIAM J. Sci. Comput. 2015; for neural networks Gu, Wang & Yang,
arXiv 2007.03609), which multiplies the objective by prod_i (||x - x_i||^-p + alpha) so that known
solutions stop being minima, and metadynamics (Laio & Parrinello 2002), a sum of Gaussians
deposited at visited points. Persistent iteration k (k = 0 .. K-1, ``num_iterations`` K, each of
``iteration_steps`` steps) trains from the initial parameters theta_0 with a fresh optimizer
state on

    gaussian:   L_data(theta) + lambda * sum_{i<k} exp(-d_i^2 / (2 tau^2))       (metadynamics)
    inverse:    L_data(theta) + lambda * sum_{i<k} 1 / (d_i^p + eps)
    deflation:  L_data(theta) * prod_{i<k} (d_i^-p + alpha)^lambda                (Farrell et al.)

with d_i = d(P(theta), P(theta*_i)) the distance to the end point theta*_i of iteration i.
Deflation's exponent lambda is our addition: lambda = 1 is Farrell's operator and lambda = 0 the
plain loss, as for the additive forms. Iteration 0 is plain training.

- P selects the persistent parameters: all of them (``layers=()``), the named layers
  (``layers=('layer_2',)``), or neurons of one layer (``layers=('layer_1',), neurons=(0, 3)``:
  each neuron's incoming weights and bias). Unselected parameters train as usual: the penalty
  neither sees nor moves them.
- d, ``distance='parameter'``: the Euclidean distance with each layer's squared distance divided
  by its number of selected parameters, so that wide layers do not dominate.
  ``distance='function'``: the root mean squared difference of the network outputs on a fixed
  probe batch (the first ``probe_size`` training inputs); with a partial P the other network
  keeps the current values of the unselected parameters, so d measures what the selected ones
  change. Hidden units can be permuted without changing the function, so a far parameter vector
  can be the same solution: both distances are reported.
- The inner rule estimates the gradient g of L_data (any gradient-like rule, ``inner``: in a
  config the section ``rule.inner``, its name and options); the penalty's gradient is exact
  (``jax.grad``; through the probe batch for the function distance) and is added to the
  estimate. For deflation the estimate becomes
  g + L grad log M (L the batch loss, M the factor): the gradient of L M divided by M > 0, so the
  same descent directions and stationary points as L M, without M's scale, which grows without
  bound near a stored end point and would blow up a plain SGD step (our decision). Then the
  configured optimizer.
- ``anneal_fraction`` f > 0 ramps lambda linearly to 0 over the last fraction f of every
  iteration, so that a stored end point is a minimum of L_data alone.
- The end points live in a fixed-size buffer in the rule state (K parameter copies), so the whole
  K-iteration run is one ``lax.scan``: jit, vmap over seeds and lambda, chunks, checkpoints and a
  resume in the middle of an iteration work as for any rule. The restart and the final choice
  run only on their steps, also under vmap (``base.run_if``).
- Reported params: during iteration k the current iterate; from the end of the last iteration
  on, the end point with the lowest validation loss (the validation split, never the test
  split). Steps after the K-th iteration leave it.
- Reported at every evaluation (``rule/...`` in metrics.jsonl and summary.json), from the
  stored end points: each one's loss and accuracy on the train, val and test splits
  (``rule/test_loss/iteration_i``), the pairwise distances between them in parameter and in
  function space (``rule/distance/parameter/i-j``, ``rule/distance/function/i-j``, over all
  parameters, on the probe batch), their prediction disagreement on every split
  (``rule/test_disagreement/i-j``: the fraction of samples two end points label differently)
  and ``rule/best_iteration``, the end point the run reports. Per step: ``penalty``,
  ``nearest_end_point`` (the smallest d_i), ``iteration`` and ``strength`` (lambda after
  annealing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules.backprop import backprop
from altlearn.rules.base import (
    Batch,
    EvalSplit,
    LearningRule,
    NeedsEstimate,
    RuleSpec,
    Sizes,
    Splits,
    Variables,
    batch_loss,
    check_count,
    check_positive,
    factory_options,
    gradient_rule,
    is_concrete,
    map_chunks,
    run_if,
    split_figures,
)

PENALTIES = ("gaussian", "inverse", "deflation")
DISTANCES = ("parameter", "function")
TINY = 1e-12  # keeps d^-p and sqrt finite at d = 0


class EndPoints(NamedTuple):
    """The end points of the persistent iterations so far (slots >= ``count`` are unused)."""

    params: Any  # [K, ...] every leaf of params
    val_loss: jax.Array  # [K]
    count: jax.Array  # int32 [], end points stored


class Context(NamedTuple):
    """The penalised estimator's state: what it reads besides the batch."""

    inner: Any  # the inner rule's state
    ends: EndPoints
    strength: jax.Array  # lambda of this step (after annealing)
    metrics: dict[str, jax.Array]  # the penalty's figures of the last step


class PersistentState(NamedTuple):
    step: jax.Array  # int32 [], steps taken over all iterations
    train: Any  # the training rule's state (optimizer, Context); restarted every iteration
    initial: Variables  # theta_0: every iteration starts from these variables
    init_key: jax.Array  # the key of the rule's init (a restart re-initialises with it)


def _check_selection(model: Model, layers: tuple[str, ...], neurons: tuple[int, ...]) -> None:
    names = getattr(model, "layer_names", None)
    if layers and names is None:
        raise ValueError(
            f"persistent: layers={layers} needs a layered model (mlp, cnn, vgg) whose layers "
            f"have names; model {model.name!r} has none. Use layers=() (all parameters)."
        )
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(
            f"persistent: unknown layer(s) {unknown}; the model's layers: {', '.join(names)}."
        )
    if neurons:
        if len(layers) != 1:
            raise ValueError(
                f"persistent: neurons={neurons} select units of ONE layer; give exactly one "
                f"layer in layers (the model's layers: {', '.join(names)})."
            )
        width = int(model.layers[names.index(layers[0])].module.features)
        bad = [j for j in neurons if not 0 <= int(j) < width]
        if bad:
            raise ValueError(
                f"persistent: layer {layers[0]!r} has neurons 0..{width - 1}; got {bad}."
            )


def selection_mask(params: Any, layers: tuple[str, ...], neurons: tuple[int, ...]) -> Any:
    """1.0 where a parameter is persistent, 0.0 elsewhere; shaped like ``params``. A neuron is
    the last-axis slice of every leaf of its layer (``kernel[..., j]``, ``bias[j]``)."""

    def layer_mask(name: str, leaf: jax.Array) -> jax.Array:
        if layers and name not in layers:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if not neurons:
            return jnp.ones(leaf.shape, leaf.dtype)
        units = jnp.zeros(leaf.shape[-1], leaf.dtype).at[jnp.asarray(neurons)].set(1.0)
        return jnp.broadcast_to(units, leaf.shape)

    if not layers:
        return jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
    return {
        name: jax.tree.map(lambda a, n=name: layer_mask(n, a), sub) for name, sub in params.items()
    }


def persistent(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    inner: Any = backprop,
    num_iterations: int = 3,
    iteration_steps: int = 1000,
    penalty: str = "gaussian",
    distance: str = "parameter",
    strength: Any = 1.0,
    width: Any = 0.1,
    power: Any = 2.0,
    epsilon: Any = 1e-3,
    alpha: Any = 1.0,
    layers: tuple = (),
    neurons: tuple = (),
    anneal_fraction: Any = 0.0,
    probe_size: int = 128,
) -> LearningRule:
    """Persistent training (paper 001; the penalties of the module docstring).

    ``inner``: the gradient-like rule that estimates the data-loss gradient, as a factory
    (``backprop``, a ``functools.partial`` of a factory with options, or a resolved
    ``altlearn.rules.Rule``; in a config, the section ``rule.inner``). ``num_iterations`` K
    restarts of ``iteration_steps`` steps each (a run of K x iteration_steps steps).
    ``penalty`` phi (gaussian, inverse, deflation), ``distance`` d (parameter, function),
    ``strength`` lambda >= 0, ``width`` tau > 0 (gaussian), ``power`` p > 0 (inverse,
    deflation), ``epsilon`` > 0 (inverse), ``alpha`` > 0 (deflation), ``layers`` / ``neurons``
    the persistent parameters P, ``anneal_fraction`` in [0, 1], ``probe_size`` training inputs
    for the function distance. lambda, tau, p, epsilon, alpha and the anneal fraction are
    sweepable floats; the rest is structural.
    """
    if penalty not in PENALTIES:
        raise ValueError(f"Unknown penalty {penalty!r}; valid choices: {', '.join(PENALTIES)}.")
    if distance not in DISTANCES:
        raise ValueError(f"Unknown distance {distance!r}; valid choices: {', '.join(DISTANCES)}.")
    check_count("num_iterations", num_iterations)
    check_count("iteration_steps", iteration_steps)
    check_count("probe_size", probe_size)
    if is_concrete(strength) and not float(strength) >= 0:
        raise ValueError(f"strength (lambda) must be >= 0, got {strength}.")
    for name, value in (("width", width), ("power", power), ("epsilon", epsilon), ("alpha", alpha)):
        check_positive(name, value)
    if is_concrete(anneal_fraction) and not 0 <= float(anneal_fraction) <= 1:
        raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction}.")
    layers, neurons = tuple(layers), tuple(int(j) for j in neurons)
    _check_selection(model, layers, neurons)
    # The inner rule only estimates the data-loss gradient; this rule's optimizer applies the
    # penalised estimate (the identity keeps the inner rule from holding optimizer state).
    estimator = inner(model, task, optax.identity(), data)
    if estimator.estimate is None:
        name = getattr(inner, "name", getattr(inner, "__name__", repr(inner)))
        raise NeedsEstimate(f"persistent: inner rule {name!r} gives no gradient estimate")
    num_iterations, iteration_steps = int(num_iterations), int(iteration_steps)
    x_probe = data["train"][0][:probe_size]  # [probe, ...]
    val = data["val"]

    def distance_sq(params: Any, end: Any, mask: Any, variables: Variables) -> jax.Array:
        """d^2 between the persistent parts of ``params`` and of the end point ``end``."""
        return distance_sq_of(distance, params, end, mask, variables)

    def distance_sq_of(kind: str, params: Any, end: Any, mask: Any, variables: Variables):
        if kind == "parameter":  # sum over layers of squared distance / selected count
            total = jnp.zeros((), jnp.float32)
            for name in params:
                m = jax.tree.leaves(mask[name])
                diff = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, params[name], end[name]))
                count = sum(jnp.sum(mi) for mi in m)
                squares = sum(jnp.sum(mi * jnp.square(di)) for mi, di in zip(m, diff))
                total = total + jnp.where(count > 0, squares / jnp.maximum(count, 1.0), 0.0)
            return total
        # Function distance: the other network keeps the current unselected parameters, and
        # the penalty moves only the selected ones.
        fixed = jax.lax.stop_gradient(params)
        mix = lambda sel, rest: jax.tree.map(lambda s_, r, m: m * s_ + (1 - m) * r, sel, rest, mask)
        out = model.apply({**variables, "params": mix(params, fixed)}, x_probe)
        out_end = model.apply({**variables, "params": mix(end, fixed)}, x_probe)
        return jnp.mean(jnp.square(out - out_end))

    def distances(params: Any, ends: EndPoints, variables: Variables) -> jax.Array:
        """d_i to every end point slot [K] (slots not yet stored included; mask them)."""
        mask = selection_mask(params, layers, neurons)
        d_sq = jax.vmap(lambda end: distance_sq(params, end, mask, variables))(ends.params)
        return jnp.sqrt(d_sq + TINY)

    def penalty_value(params: Any, ends: EndPoints, variables: Variables, lam: jax.Array):
        """(additive penalty or log of the deflation factor, distances [K])."""
        d = distances(params, ends, variables)
        stored = jnp.arange(num_iterations) < ends.count
        if penalty == "gaussian":
            terms = jnp.exp(-jnp.square(d) / (2 * width**2))
        elif penalty == "inverse":
            terms = 1.0 / (d**power + epsilon)
        else:  # deflation: log prod_i (d_i^-p + alpha)^lambda
            terms = jnp.log(d ** (-power) + alpha)
        return lam * jnp.sum(jnp.where(stored, terms, 0.0)), jnp.where(stored, d, jnp.inf)

    # THE PENALISED ESTIMATE: the inner estimate of grad L_data plus the penalty's gradient.
    def estimate(key, variables, context: Context, batch):
        grads, aux, inner_state = estimator.estimate(key, variables, context.inner, batch)
        value_of = lambda p: penalty_value(p, context.ends, variables, context.strength)
        (value, d), grad = jax.value_and_grad(value_of, has_aux=True)(variables["params"])
        if penalty == "deflation":  # grad (L M) / M = g + L grad log M  (module docstring)
            grads = jax.tree.map(lambda g, gl: g + aux.loss * gl, grads, grad)
        else:
            grads = jax.tree.map(jnp.add, grads, grad)
        penalty_metrics = {"penalty": value, "nearest_end_point": jnp.min(d)}
        return grads, aux, context._replace(inner=inner_state, metrics=penalty_metrics)

    def empty_ends(params: Any) -> EndPoints:
        return EndPoints(
            jax.tree.map(lambda a: jnp.zeros((num_iterations, *a.shape), a.dtype), params),
            jnp.full((num_iterations,), jnp.inf, jnp.float32),
            jnp.zeros((), jnp.int32),
        )

    def init_context(key: jax.Array, variables: Variables) -> Context:
        # float32 whatever JAX's precision mode (a 64-bit run beside closed_form): the step
        # writes float32 figures back
        metrics = {
            "penalty": jnp.zeros((), jnp.float32),
            "nearest_end_point": jnp.full((), jnp.inf, jnp.float32),
        }
        return Context(
            estimator.init(key, variables),
            empty_ends(variables["params"]),
            jnp.zeros((), jnp.float32),
            metrics,
        )

    options = factory_options(inner)  # the inner rule's decorrelation settings
    train = gradient_rule(
        estimate,
        optimizer,
        options.get("decorrelation_rate", 0.0),
        int(options.get("decorrelation_every", 1)),
        init=init_context,
    )

    def store(ends: EndPoints, variables: Variables) -> EndPoints:
        """``ends`` with ``variables``' params and validation loss in the next free slot."""
        i = ends.count
        loss = batch_loss(model, task, variables, val)[0]
        return EndPoints(
            jax.tree.map(lambda b, p: b.at[i].set(p), ends.params, variables["params"]),
            ends.val_loss.at[i].set(jnp.where(jnp.isnan(loss), jnp.inf, loss)),
            i + 1,
        )

    def init(key: jax.Array, variables: Variables) -> PersistentState:
        return PersistentState(jnp.zeros((), jnp.int32), train.init(key, variables), variables, key)

    def step(key, variables, state: PersistentState, batch: Batch):
        t = state.step
        k, pos = jnp.divmod(t, iteration_steps)  # iteration and step within it

        # START OF ITERATION k >= 1: store the end point of iteration k - 1, then restart from
        # theta_0 with a fresh optimizer and inner state (the end points stay).
        def restart(args):
            _, train_state = args
            ends = store(train_state.estimator.ends, variables)
            fresh = train.init(state.init_key, state.initial)
            return state.initial, fresh._replace(estimator=fresh.estimator._replace(ends=ends))

        start = (pos == 0) & (k >= 1) & (k < num_iterations)
        variables, train_state = run_if(start, restart, (variables, state.train))

        # TRAIN on L_data plus the penalty; lambda annealed over the iteration's last fraction.
        left = (iteration_steps - pos) / (anneal_fraction * iteration_steps + TINY)
        lam = jnp.where(anneal_fraction > 0, strength * jnp.clip(left, 0.0, 1.0), strength)
        context = train_state.estimator._replace(strength=jnp.asarray(lam, jnp.float32))
        train_state = train_state._replace(estimator=context)
        trained, new_train, metrics = train.step(key, variables, train_state, batch)
        training = k < num_iterations  # after the last iteration the best iterate stays
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(training, n, o), new, old)
        variables, new_train = keep(trained, variables), keep(new_train, train_state)

        # END OF THE LAST ITERATION: store its end point, report the best by validation loss.
        def finish(args):
            variables, train_state = args
            ends = store(train_state.estimator.ends, variables)
            best = jax.tree.map(lambda b: b[jnp.argmin(ends.val_loss)], ends.params)
            estimator_state = train_state.estimator._replace(ends=ends)
            return {**variables, "params": best}, train_state._replace(estimator=estimator_state)

        last = t == num_iterations * iteration_steps - 1
        variables, new_train = run_if(last, finish, (variables, new_train))
        metrics = {
            **metrics,
            **new_train.estimator.metrics,
            "iteration": jnp.minimum(k, num_iterations - 1).astype(jnp.float32),
            "strength": lam,
        }
        return variables, PersistentState(t + 1, new_train, state.initial, state.init_key), metrics

    def report(variables: Variables, state: PersistentState, splits: dict[str, EvalSplit]):
        """Each stored end point's loss (and accuracy) on every split, the pairwise distances
        between end points (parameter and function), and their prediction disagreement on
        every split (classification): the fraction of samples two end points label apart."""
        ends = state.train.estimator.ends
        stored = jnp.arange(num_iterations) < ends.count
        known = lambda value, i: jnp.where(stored[i], value, jnp.nan)  # NaN: not yet stored
        done = ends.count == num_iterations
        out = {
            "end_points": ends.count.astype(jnp.float32),
            "best_iteration": jnp.where(done, jnp.argmin(ends.val_loss), jnp.nan),
        }
        for split, chunks in splits.items():
            for i in range(num_iterations):
                params = jax.tree.map(lambda b, i=i: b[i], ends.params)
                figures = split_figures(model, task, {**variables, "params": params}, chunks)
                for name, value in figures.items():
                    out[f"{split}_{name}/iteration_{i}"] = known(value, i)
            if task.is_classification and num_iterations > 1:
                labels = map_chunks(
                    lambda x: jax.vmap(
                        lambda p: jnp.argmax(model.apply({**variables, "params": p}, x), -1)
                    )(ends.params),
                    chunks,
                )  # [C, K, S]
                for i in range(num_iterations):
                    for j in range(i + 1, num_iterations):
                        apart = jnp.sum((labels[:, i] != labels[:, j]) * chunks.mask)
                        value = jnp.where(stored[j], apart / chunks.count, jnp.nan)
                        out[f"{split}_disagreement/{i}-{j}"] = value
        everything = selection_mask(variables["params"], (), ())
        for i in range(num_iterations):
            end_i = jax.tree.map(lambda b, i=i: b[i], ends.params)
            for j in range(i + 1, num_iterations):
                end_j = jax.tree.map(lambda b, j=j: b[j], ends.params)
                for kind in DISTANCES:
                    d_sq = distance_sq_of(kind, end_i, end_j, everything, variables)
                    out[f"distance/{kind}/{i}-{j}"] = known(jnp.sqrt(d_sq), j)
        return out

    return LearningRule(init, step, report=report)


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """The inner rule's step; for the function distance also a forward and a backward pass of
    the probe batch per stored end point (at most K - 1 of them), in training batches of
    ``sizes.batch`` (0: counted as batches of the same size)."""
    inner = options["inner"].cost(model, sizes)
    if options["distance"] != "function":
        return inner
    probe = int(options["probe_size"]) / sizes.batch if sizes.batch else 1.0
    return inner + 3.0 * probe * (int(options["num_iterations"]) - 1)


SPEC = RuleSpec(
    persistent,
    summary="K restarts from the same initial parameters, each pushed away from the earlier "
    "end points (gaussian, inverse or deflation penalty; parameter or function distance; full "
    "or partial); wraps any gradient-like rule; best iterate by validation loss",
    source="paper 001 (Min, arXiv 2007.01419); deflation (Farrell et al. 2015)",
    cost=cost,
    needs=("train", "val"),
    search=("strength=[1.0,10.0]",),
)
