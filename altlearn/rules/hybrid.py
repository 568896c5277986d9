"""Backprop with evolution phases: a hybrid of gradient descent and evolution strategies.

Paper 004 (Lopes & Fazendeiro, arXiv 2005.04153) trains a CNN (VGG16 on CIFAR-10) by backprop
and uses evolution strategies in addition, to escape local minima and fine-tune the weights; it
reports +0.61% test accuracy on average over backprop alone. Its exact strategy, noise scale
and schedule were not available to us: the procedure below is OUR decision, informed by ESGD
(Cui et al., NeurIPS 2018, arXiv 1810.06773: SGD and evolution steps alternate, an elitist
selection never lets the best fitness degrade) and Guided ES (Maheswaranathan et al. 2018,
arXiv 1806.10230: a surrogate gradient shapes the search distribution).

Every step is a backprop step with the configured optax optimizer. After every ``es_every``-th
step (and after step ``final_phase_step`` if it is > 0, e.g. the run's last) an EVOLUTION PHASE
of ``es_generations`` generations searches around the current parameters theta_p in a
reparameterised space z, per selected layer l:

    theta(z) = theta_p + s * std(W_l) * z          (s: ``noise_scale``; W_l the layer's kernel)

so the noise is relative to each layer's weight scale. The fitness of z is the mean loss on
the validation split (the first ``val_size`` samples of the split carved from the training
data, fixed for the run; never the test split); lower is better.

- ``strategy='elitist'`` (default), a (1 + lambda) ES: each generation draws lambda
  (``population_size``) offspring z_best + eps, eps ~ N(0, I), and the best of them replaces the
  parent when its validation loss is lower. The parent survives otherwise, so a phase never
  returns a worse validation loss than it started from.
- Any evosax strategy by name searches the same z space from z = 0 with search std 1 (so
  ``noise_scale`` sets the step in parameter space; ``strategy_params.std_init`` overrides it).
  The parent stays protected: the phase keeps the best z seen, starting at z = 0 with the
  parent's fitness, and evosax's own record of the best (which HillClimbing samples around and
  which starts at +inf) is seeded with the parent's fitness. With ``guide=True`` GuidedES gets
  the backprop gradient of the step's batch, in z coordinates, as its guide.
- ``layers``: the layers the phase may change (``()``: all; names such as ``layer_4``, shell
  patterns such as ``layer_*``, or ``head`` for the last layer); the others are left untouched.
- ``select=False`` is a control, not a method: each generation's first offspring replaces the
  parent whatever its validation loss (the same perturbations, no selection).
- When a phase's result replaces theta_p, the optimizer state is kept (``on_accept='keep'``,
  the default) or re-initialised (``'reset'``). Keep was chosen by validation loss: with Adam
  on the small CNN, reset ended at a higher validation loss on digits (0.030 against 0.019) and
  mnist1d (0.517 against 0.484), 5 seeds each (docs/RESULTS.md).
- Offspring are evaluated in one ``vmap`` (``_population.evaluate_population``): in sequential
  chunks under ``memory_budget_mb`` and, with ``shard=True``, with the offspring axis split
  over the devices. An elitist offspring is regenerated from its key rather than stored, so a
  phase holds one chunk of offspring at a time.
- A phase runs only on the steps that take it, also under ``vmap`` over seeds and
  hyperparameters (``base.run_if``).

Metrics: per step ``phase`` (1 on a phase step), and on phase steps only (NaN on the others;
the runner averages them over the phase steps of a chunk) ``accepted``, ``val_loss_before``,
``val_loss_after``, ``val_loss_change`` (after - before, <= 0 for the elitist strategy) and
``phase_cost`` (forward passes of validation samples, in training batches). At every
evaluation (``rule/...``): ``phases``, ``accepted_phases`` and ``acceptance_rate`` so far. The
phase's wall time cannot be measured inside the compiled step: the training runner runs each
phase step as a chunk of its own and records ``phase_step_time_s`` and ``phase_time_s``
(``LearningRule.phase_step``, ``altlearn.runner``).
"""

from __future__ import annotations

import fnmatch
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from evosax.algorithms.population_based.base import PopulationBasedAlgorithm
from evosax.core.fitness_shaping import identity_fitness_shaping_fn as identity_shaping
from jax.flatten_util import ravel_pytree

from altlearn.losses import Task
from altlearn.models import Model
from altlearn.rules._evosax import (
    build_strategy,
    check_strategy_options,
    param_fields,
    strategy_class,
    strong,
)
from altlearn.rules._population import (
    activation_bytes,
    chunk_size_for,
    evaluate_population,
    population_sharding,
)
from altlearn.rules.backprop import backprop
from altlearn.rules.base import (
    Batch,
    LearningRule,
    RuleSpec,
    Sizes,
    Splits,
    Variables,
    batch_loss,
    check_count,
    check_positive,
    run_if,
)

ELITIST = "elitist"
ON_ACCEPT = ("keep", "reset")


class HybridState(NamedTuple):
    step: jax.Array  # int32 [], steps taken
    train: Any  # backprop's state (optimizer state)
    phases: jax.Array  # int32 [], evolution phases run
    accepted: jax.Array  # int32 [], phases whose result replaced the parameters


class Phase(NamedTuple):
    """What an evolution phase carries and returns."""

    variables: Variables
    train: Any
    accepted: jax.Array  # bool []
    before: jax.Array  # validation loss of the parent
    after: jax.Array  # validation loss of the phase's result


def select_layers(names: list[str], layers: tuple[str, ...]) -> list[str]:
    """The parameter groups (top-level params keys, in order) that ``layers`` selects: all for
    ``()``; else every name matching one of the patterns (``head``: the last group)."""
    if not layers:
        return list(names)
    chosen = []
    for pattern in layers:
        matches = [names[-1]] if pattern == "head" else fnmatch.filter(names, pattern)
        if not matches:
            raise ValueError(
                f"hybrid: layers pattern {pattern!r} matches no layer; the model's layers: "
                f"{', '.join(names)} (or 'head' for the last)."
            )
        chosen += [m for m in matches if m not in chosen]
    return [n for n in names if n in chosen]


def hybrid(
    model: Model,
    task: Task,
    optimizer: optax.GradientTransformation,
    data: Splits,
    es_every: int = 100,
    es_generations: int = 1,
    population_size: int = 8,
    noise_scale: Any = 0.01,
    strategy: str = ELITIST,
    strategy_kwargs: dict | None = None,
    strategy_params: dict | None = None,
    guide: bool = False,
    layers: tuple = (),
    on_accept: str = "keep",
    val_size: int = 512,
    final_phase_step: int = 0,
    select: bool = True,
    shard: bool = False,
    memory_budget_mb: int = 0,
) -> LearningRule:
    """Backprop with an evolution phase every ``es_every`` steps (module docstring).

    ``es_generations`` generations of ``population_size`` (lambda) offspring per phase;
    ``noise_scale`` s > 0 (sweepable): the offspring noise relative to each layer's weight std;
    ``strategy``: ``'elitist'`` ((1 + lambda)) or an evosax strategy by name, with
    ``strategy_kwargs`` (constructor) and ``strategy_params`` (its Params fields; std_init);
    ``guide``: GuidedES takes the backprop gradient; ``layers``: what a phase may change;
    ``on_accept``: keep or reset the optimizer state when a phase replaces the parameters;
    ``val_size``: validation samples scored (0: the whole split); ``final_phase_step`` > 0:
    one more phase after that step; ``select=False`` (a control, elitist only): every
    generation's first offspring replaces the parent whatever its loss, the same perturbations
    without selection; ``shard`` / ``memory_budget_mb``: how offspring are evaluated.
    """
    check_count("es_every", es_every)
    check_count("es_generations", es_generations)
    check_count("population_size", population_size)
    check_positive("noise_scale", noise_scale)
    if on_accept not in ON_ACCEPT:
        raise ValueError(f"Unknown on_accept {on_accept!r}; valid choices: {', '.join(ON_ACCEPT)}.")
    if int(val_size) < 0 or int(final_phase_step) < 0:
        raise ValueError("val_size and final_phase_step must be >= 0.")
    es_every, generations, lam = int(es_every), int(es_generations), int(population_size)
    kwargs = dict(strategy_kwargs or {})
    params_in = dict(strategy_params or {})
    if strategy == ELITIST:
        if kwargs or params_in:
            raise ValueError(
                "hybrid: strategy_kwargs and strategy_params belong to an evosax strategy; the "
                "elitist (1 + lambda) strategy has none (its options: population_size, "
                "es_generations, noise_scale)."
            )
        cls, population_based = None, False
    else:
        try:
            cls, std_schedule = check_strategy_options(strategy, kwargs, params_in)
        except ValueError as e:
            if "Unknown evosax strategy" in str(e):
                raise ValueError(f"{e} Or {ELITIST!r}, the default.") from None
            raise
        population_based = issubclass(cls, PopulationBasedAlgorithm)
        takes_std = std_schedule or "std_init" in param_fields(cls)
        given = {"std_init", "std_schedule"} & {*params_in, *kwargs}
        if takes_std and not population_based and not given:
            params_in["std_init"] = 1.0  # z is already scaled by s * std(W_l)
        if std_schedule and "std_init" in params_in:
            kwargs["std_schedule"] = optax.constant_schedule(params_in["std_init"])
    if not select and strategy != ELITIST:
        raise ValueError("hybrid: select=False (the no-selection control) is for 'elitist' only.")
    if guide and strategy != "GuidedES":
        raise ValueError(f"hybrid: guide=True needs strategy='GuidedES', got {strategy!r}.")
    if "val" not in data:
        raise ValueError("hybrid needs the val split (data.validation_fraction > 0).")
    x_val, y_val = data["val"]
    count = int(x_val.shape[0]) if int(val_size) == 0 else min(int(val_size), int(x_val.shape[0]))
    if count < 1:
        raise ValueError("hybrid: the validation split is empty; set data.validation_fraction > 0.")
    val = (x_val[:count], y_val[:count])
    train_rule = backprop(model, task, optimizer, {})
    layer_names = list(getattr(model, "layer_names", None) or [])
    if layer_names:
        select_layers(layer_names, tuple(layers))  # a pattern that matches nothing: now
    sharding = population_sharding(lam) if shard else None
    num_devices = 1 if sharding is None else sharding.mesh.size
    field_overrides = {k: v for k, v in params_in.items() if cls and k in param_fields(cls)}
    options = {
        "population_size": lam,
        "es_generations": generations,
        "strategy": strategy,
        "val_size": count,
        "guide": guide,
    }

    def chosen(params: Any) -> list[str]:
        return select_layers(layer_names or list(params), tuple(layers))

    def chunk_for(variables: Variables) -> int:
        if memory_budget_mb <= 0:
            return lam
        member_bytes = activation_bytes(model.apply, variables, val[0])
        return chunk_size_for(lam // num_devices, member_bytes, memory_budget_mb) * num_devices

    def space(variables: Variables):
        """(z -> variables, flat scale [D]) for the selected layers around the parent."""
        params = variables["params"]
        selected = {name: params[name] for name in chosen(params)}
        flat, unravel = ravel_pytree(selected)

        def layer_std(group: Any) -> jax.Array:
            kernel = group.get("kernel") if isinstance(group, dict) else None
            leaves = [kernel] if kernel is not None else jax.tree.leaves(group)
            return jnp.std(jnp.concatenate([jnp.ravel(a) for a in leaves]))

        scales = {
            name: jax.tree.map(lambda a, g=group: jnp.full(a.shape, layer_std(g), a.dtype), group)
            for name, group in selected.items()
        }
        scale = noise_scale * ravel_pytree(scales)[0]  # [D]

        def at(z: jax.Array) -> Variables:
            return {**variables, "params": {**params, **unravel(flat + scale * z)}}

        return at, scale

    def val_loss(variables: Variables) -> jax.Array:
        loss = batch_loss(model, task, variables, val)[0]
        return jnp.where(jnp.isfinite(loss), loss, jnp.inf)  # a NaN never wins

    def elitist(key, at, dims: int, parent: jax.Array, chunk: int):
        """(best z [D], its validation loss) after the generations."""

        def generation(carry, key_g):
            best_z, best_f = carry
            keys = jax.random.split(key_g, lam)
            offspring = lambda k: best_z + jax.random.normal(k, (dims,), best_z.dtype)
            f = evaluate_population(lambda k: val_loss(at(offspring(k))), keys, chunk, sharding)
            i = jnp.argmin(f) if select else 0
            better = f[i] < best_f if select else jnp.ones((), bool)
            return (
                jnp.where(better, offspring(keys[i]), best_z),
                jnp.where(better, f[i], best_f),
            ), None

        init = (jnp.zeros((dims,), jnp.float32), parent)
        return jax.lax.scan(generation, init, jax.random.split(key, generations))[0]

    def evosax_search(key, at, dims: int, parent: jax.Array, chunk: int, guide_z):
        """(best z [D], its validation loss) with an evosax strategy from z = 0."""
        with jax.ensure_compile_time_eval():
            es = build_strategy(strategy, cls, lam, jnp.zeros((dims,)), kwargs, 1 << 62)
            es_params = es.default_params.replace(**field_overrides)
        fitness = lambda pop: evaluate_population(lambda z: val_loss(at(z)), pop, chunk, sharding)
        key_init, key_pop, key_run = jax.random.split(key, 3)
        best = (jnp.zeros((dims,), jnp.float32), parent)

        def keep_best(best, pop, f):
            i = jnp.argmin(f)
            better = f[i] < best[1]
            return jnp.where(better, pop[i], best[0]), jnp.where(better, f[i], best[1])

        if population_based:  # an evaluated initial population around the parent
            pop0 = jax.random.normal(key_pop, (lam, dims))
            f0 = fitness(pop0)
            state = es.init(key_init, pop0, f0, es_params)
            best = keep_best(best, pop0, f0)
        else:
            state = es.init(key_init, jnp.zeros((dims,)), es_params)
        state = strong(state)
        if hasattr(state, "best_fitness"):  # protect the parent
            state = state.replace(best_solution=best[0], best_fitness=best[1])
        # HillClimbing (and the like) sample around their best SHAPED solution: seed it with the
        # parent too, where the shaping is the identity (the shaped fitness is the loss), or a
        # generation of offspring all worse than the parent would move the search to them.
        if hasattr(state, "best_fitness_shaped") and es.fitness_shaping_fn is identity_shaping:
            state = state.replace(best_solution_shaped=best[0], best_fitness_shaped=best[1])

        def generation(carry, key_g):
            state, best = carry
            key_ask, key_tell = jax.random.split(key_g)
            if guide:
                state = state.replace(grad=guide_z)
            pop, state = es.ask(key_ask, state, es_params)
            f = fitness(pop)
            told = es.tell(key_tell, pop, f, state, es_params)[0]
            return (strong(told), keep_best(best, pop, f)), None

        keys = jax.random.split(key_run, generations)
        return jax.lax.scan(generation, (state, best), keys)[0][1]

    def phase(key: jax.Array, batch: Batch, p: Phase) -> Phase:
        at, scale = space(p.variables)
        dims = scale.shape[0]
        parent = val_loss(p.variables)
        chunk = chunk_for(p.variables)
        if strategy == ELITIST:
            best_z, best_f = elitist(key, at, dims, parent, chunk)
        else:
            guide_z = None
            if guide:  # d loss / d z at z = 0: the batch gradient of the selected layers
                loss_of = lambda z: batch_loss(model, task, at(z), batch)[0]
                guide_z = jax.grad(loss_of)(jnp.zeros((dims,), jnp.float32))
            best_z, best_f = evosax_search(key, at, dims, parent, chunk, guide_z)
        accepted = best_f < parent if select else jnp.ones((), bool)
        result = at(jnp.where(accepted, best_z, 0.0))
        variables = jax.tree.map(lambda n, o: jnp.where(accepted, n, o), result, p.variables)
        train = p.train
        if on_accept == "reset":
            fresh = train_rule.init(key, variables)._replace(count=p.train.count)
            train = jax.tree.map(lambda n, o: jnp.where(accepted, n, o), fresh, p.train)
        after = jnp.minimum(best_f, parent) if select else best_f
        return Phase(variables, train, accepted, parent, after)

    def init(key: jax.Array, variables: Variables) -> HybridState:
        zero = jnp.zeros((), jnp.int32)
        return HybridState(zero, train_rule.init(key, variables), zero, zero)

    def step(key, variables, state: HybridState, batch: Batch):
        key_bp, key_es = jax.random.split(key)
        variables, train, metrics = train_rule.step(key_bp, variables, state.train, batch)
        t = state.step + 1
        due = is_phase_step(es_every, final_phase_step, t)
        nan = jnp.full((), jnp.nan, jnp.float32)
        skipped = Phase(variables, train, jnp.zeros((), bool), nan, nan)
        done = run_if(due, lambda p: phase(key_es, batch, p), skipped)
        phases = state.phases + due.astype(jnp.int32)
        accepted = state.accepted + done.accepted.astype(jnp.int32)
        on_phase = lambda value: jnp.where(due, jnp.asarray(value, jnp.float32), nan)
        metrics = {
            **metrics,
            "phase": due.astype(jnp.float32),
            "accepted": on_phase(done.accepted),
            "val_loss_before": on_phase(done.before),
            "val_loss_after": on_phase(done.after),
            "val_loss_change": on_phase(done.after - done.before),
            "phase_cost": on_phase(phase_cost(options, batch[0].shape[0])),
        }
        new_state = HybridState(t, done.train, phases, accepted)
        return done.variables, new_state, metrics

    def report(variables: Variables, state: HybridState, splits: Any) -> dict[str, jax.Array]:
        """The phases so far, how many were accepted, and their rate."""
        del variables, splits
        return {
            "phases": state.phases.astype(jnp.float32),
            "accepted_phases": state.accepted.astype(jnp.float32),
            "acceptance_rate": state.accepted / jnp.maximum(state.phases, 1),
        }

    final = int(final_phase_step)
    phase_step = lambda t: bool(is_phase_step(es_every, final, int(t)))
    return LearningRule(init, step, report=report, phase_step=phase_step)


def phase_cost(
    options: dict[str, Any], batch_size: int | None = None, val_samples: int | None = None
) -> float:
    """Forward passes one evolution phase spends, in training batches (of ``batch_size``; None:
    in validation batches): the parent's validation loss and lambda offspring per generation
    (one more evaluated population for a population-based strategy), plus a backward pass for
    GuidedES's guide. ``val_samples``: the samples scored (default ``val_size``; the whole split,
    ``val_size=0``, needs it)."""
    lam, generations = int(options["population_size"]), int(options["es_generations"])
    populations = generations
    strategy = options["strategy"]
    if strategy != ELITIST:
        if issubclass(strategy_class(strategy), PopulationBasedAlgorithm):
            populations += 1
    samples = int(options["val_size"]) if val_samples is None else int(val_samples)
    if samples == 0:
        raise ValueError(
            "val_size=0 scores the whole validation split: its cost needs the split's size."
        )
    per = samples / batch_size if batch_size else 1.0
    return (1 + lam * populations) * per + (3.0 if options["guide"] else 0.0)


def is_phase_step(es_every: int, final_phase_step: int, t: Any) -> Any:
    """Whether step ``t`` (counted from 1; an int or a traced count) ends with a phase."""
    return (t % es_every == 0) | ((final_phase_step > 0) & (t == final_phase_step))


def cost(model: Model, options: dict[str, Any], sizes: Sizes) -> float:
    """A backprop step (3) plus one evolution phase's forward passes every ``es_every`` steps
    (``phase_cost``), counting the validation samples a phase scores: ``val_size`` at most the
    split's size where ``sizes.val`` gives it, else the nominal ``val_size``."""
    del model
    val_samples = None
    if sizes.val > 0:
        asked = int(options["val_size"])
        val_samples = sizes.val if asked == 0 else min(asked, sizes.val)
    batch = sizes.batch or None
    return 3.0 + phase_cost(options, batch, val_samples) / int(options["es_every"])


SPEC = RuleSpec(
    hybrid,
    summary="backprop with an evolution phase every es_every steps: (1 + lambda) elitist ES "
    "(or any evosax strategy) in per-layer relative noise, scored on the validation split; "
    "all or chosen layers",
    source="paper 004 (Lopes & Fazendeiro, arXiv 2005.04153); ESGD (Cui et al. 2018)",
    cost=cost,
    needs=("val",),
    search=("noise_scale=[0.01,0.05]",),
)
