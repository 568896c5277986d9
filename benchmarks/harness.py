"""The one harness every benchmark binary uses.

How a benchmark measures, in every binary alike:

* **Compile apart.** Each measured function is jitted and compiled ahead of time
  (``.lower(...).compile()``, ``compile_ahead``); its compile time is reported on its own and
  never counted in a step time.
* **Interleaved rounds.** ``timed_rounds`` calls every measured function once per round, in a
  fixed order: one untimed warm-up round, then ``repeats`` timed rounds. Every call blocks on
  its results (``jax.block_until_ready``), so a call's time is its whole work; interleaving makes
  machine noise hit all of them alike. Training chunks (``Loop``) are fed the state the previous
  call returned, so every timed chunk continues one real run (state donated, as
  ``altlearn.runner`` runs a chunk).
* **One peak.** The machine's float32 (or float64) matmul peak is the FASTEST call of a jitted
  n x n matmul (``Matmul``) timed in the same rounds as the measured code (``matmul_peak``,
  2 n^3 flops per call). The fastest call is the one least disturbed by other processes; a
  median would understate the peak on a shared machine and overstate every fraction of it.
* **Machine and load.** ``machine_facts`` describes the machine; the rounds record how many
  cores *other* processes kept busy meanwhile (``other_load_cores``, from ``/proc/stat`` minus
  this process's CPU time; Linux only), the first thing to check before trusting a timing.

It also holds the hand-written reference loops the overhead benchmarks compare altlearn with:
a plain flax MLP trained by ``jax.value_and_grad`` and optax (``make_hand_loop``) and a raw
evosax Open_ES loop (``make_raw_es_loop``). Both start from altlearn's initial params and draw
their minibatches and keys exactly as ``Experiment.train_steps`` does, so they follow the same
run as altlearn's loop (tested step for step in tests/test_benchmarks.py) and the timings compare
the same work.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from altlearn import models, report
from altlearn.report import (  # the machine facts, shared with every binary's report
    command_line,  # noqa: F401
    cpu_seconds,
    machine_facts,  # noqa: F401
    other_load_cores,
)
from altlearn.rules.base import rng_mode
from altlearn.train import Experiment, TrainState

# ---------------------------------------------------------------------- compiling and timing


def compile_ahead(
    fn: Callable, *args: Any, donate_argnums: tuple[int, ...] = ()
) -> tuple[Any, float]:
    """``jax.jit(fn).lower(*args).compile()`` and the seconds it took."""
    t = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - t


class Loop:
    """A compiled ``fn(state) -> (state, outputs)`` (a chunk of ``steps_per_call`` training
    steps), called again and again on the state it returned; each call blocks.

    The state is donated (``donate=True``, as ``altlearn.runner`` runs a chunk): hand a Loop
    arrays no other Loop holds.
    """

    def __init__(self, fn: Callable, state: Any, steps_per_call: int, donate: bool = True):
        self.fn, self.compile_s = compile_ahead(fn, state, donate_argnums=(0,) if donate else ())
        self.state = state
        self.steps_per_call = steps_per_call
        self.outputs: Any = None

    def __call__(self) -> None:
        self.state, self.outputs = jax.block_until_ready(self.fn(self.state))


class Matmul:
    """A compiled n x n matmul of ``dtype`` on fixed operands: 2 n^3 flops per call."""

    def __init__(self, n: int = 2048, dtype: Any = jnp.float32):
        self.n, self.dtype = n, jnp.dtype(dtype)
        self.a = jax.random.normal(jax.random.PRNGKey(1), (n, n), self.dtype)
        self.b = jax.random.normal(jax.random.PRNGKey(2), (n, n), self.dtype)
        self.fn, _ = compile_ahead(jnp.matmul, self.a, self.b)

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3

    def __call__(self) -> jax.Array:
        return self.fn(self.a, self.b)


def matmul_peak(matmul: Matmul, times: Sequence[float]) -> dict[str, Any]:
    """THE machine's peak for ``matmul``'s dtype: GFLOP/s of the fastest of ``times``, the calls
    of ``matmul`` timed in the same rounds as the measured code. The median is recorded beside
    it, for reference only."""
    fastest = min(times)
    return {
        "n": matmul.n,
        "dtype": matmul.dtype.name,
        "definition": "fastest call of the matmuls timed in the same rounds",
        "times_s": list(times),
        "fastest_s": fastest,
        "gflops": matmul.flops / fastest / 1e9,
        "gflops_median": matmul.flops / statistics.median(times) / 1e9,
    }


class Rounds(NamedTuple):
    times: dict[str, list[float]]  # name -> seconds of each timed call (warm-up excluded)
    other_load_cores: float | None  # cores other processes kept busy in the timed rounds


def timed_rounds(
    calls: Mapping[str, Callable[[], Any]], repeats: int, warmup_rounds: int = 1
) -> Rounds:
    """``warmup_rounds`` untimed rounds, then ``repeats`` timed ones; a round calls every entry
    of ``calls`` once, in order, and each call blocks on what it returns."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(warmup_rounds):
        for call in calls.values():
            jax.block_until_ready(call())
    start, wall = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        for name, call in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t)
    return Rounds(times, other_load_cores(start, time.perf_counter() - wall))


def compiled_flops(compiled: Any) -> float | None:
    """The ``flops`` entry of ``compiled.cost_analysis()`` (a dict, or a list of dicts).

    XLA counts a ``while`` loop's body once whatever its trip count: take it from ONE compiled
    step, never divide a compiled chunk's count by its steps.
    """
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or analysis.get("flops", 0) <= 0:
        return None
    return float(analysis["flops"])


def memory_bytes(compiled: Any) -> dict[str, int] | None:
    """The byte counts of ``compiled.memory_analysis()`` (None where the backend has none)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    names = ("temp", "argument", "output", "alias", "generated_code")
    return {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in names}


# ---------------------------------------------------------------------- the machine


def busy_cores_line(result: dict[str, Any]) -> str | None:
    """'Other processes kept X of N cores busy ...' from a result's fields, if recorded."""
    load = result.get("other_processes_busy_cores")
    if load is None:
        return None
    cores = result.get("machine", {}).get("cpu_count", os.cpu_count())
    return f"Other processes kept {load:.2f} of {cores} cores busy during the timed rounds."


# ---------------------------------------------------------------------- output


def write_json(
    result: dict[str, Any], path: str | Path, text: str = "", provenance: Any = None
) -> Path:
    """``path`` (``result`` and the run's provenance: command, commit, versions, machine) and
    the markdown ``text`` beside it (same name, ``.md``), through ``altlearn.report.write``;
    ``provenance``: the ``report.Provenance`` started with the run (default: started now)."""
    path = Path(path)
    report.write(path.parent, path.stem, result, text, provenance or report.Provenance())
    return path


# ---------------------------------------------------------------------- hand-written loops


class HandMLP(nn.Module):
    """flatten -> [Dense -> activation] * len(widths) -> Dense(num_outputs), He-normal kernels."""

    widths: Sequence[int]
    num_outputs: int
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for w in self.widths:
            x = self.activation(nn.Dense(w, kernel_init=nn.initializers.he_normal())(x))
        return nn.Dense(self.num_outputs, kernel_init=nn.initializers.he_normal())(x)


def hand_module(experiment: Experiment) -> HandMLP:
    """The config's ``mlp`` as a plain flax module."""
    config = experiment.config
    return HandMLP(
        tuple(config.model.widths),
        experiment.dataset.num_outputs,
        models.make_activation(config.model.activation, config.model.negative_slope),
    )


def hand_params(experiment: Experiment, params: Any) -> dict[str, Any]:
    """altlearn's mlp params (``layer_i``) as ``HandMLP``'s (``Dense_i``), copied into buffers
    of their own (a donated altlearn state cannot delete them). Both trees ravel in the same
    order, so a flat vector means the same network in both."""
    copy = lambda a: jnp.array(a, copy=True)
    return {
        f"Dense_{i}": jax.tree.map(copy, params[name])
        for i, name in enumerate(experiment.model.layer_names)
    }


def check_hand_supported(config: ml_collections.ConfigDict) -> None:
    """The hand loop mirrors backprop on an MLP with cross-entropy and a constant-rate optimizer."""
    problems = []
    if config.rule.name != "backprop":
        problems.append(f"rule.name={config.rule.name!r} (needs 'backprop')")
    if config.model.name != "mlp":
        problems.append(f"model.name={config.model.name!r} (needs 'mlp')")
    elif config.model.decorrelation or config.model.intrinsic_noise:
        problems.append("a decorrelated or noisy mlp (needs neither)")
    if config.optimizer.name not in ("sgd", "adam"):
        problems.append(f"optimizer.name={config.optimizer.name!r} (needs 'adam' or 'sgd')")
    if config.optimizer.schedule != "constant":
        problems.append(f"optimizer.schedule={config.optimizer.schedule!r} (needs 'constant')")
    if config.loss not in ("auto", "cross_entropy"):
        problems.append(f"loss={config.loss!r} (needs 'auto' or 'cross_entropy')")
    if problems:
        raise ValueError(
            "The overhead benchmark compares backprop on an MLP with a hand-written loop; this "
            f"config has {'; '.join(problems)}."
        )


def _batch_indices(
    data_key: jax.Array, step: jax.Array, num_steps: int, num_train: int, batch: int
) -> jax.Array:
    """[num_steps, batch] training indices of steps step .. step + num_steps, as altlearn draws
    them: one permutation of the training split per epoch (``fold_in(data_key, epoch)``), cut
    into batches; each epoch a chunk touches is drawn once, up front."""
    spe = num_train // batch
    first_epoch, offset = jnp.divmod(step, spe)
    epochs = first_epoch + jnp.arange(num_steps // spe + 2)
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(data_key, e), num_train))(
        epochs
    )
    batches = perms[:, : spe * batch].reshape(-1, batch)
    return jax.lax.dynamic_slice_in_dim(batches, offset, num_steps)


class HandState(NamedTuple):
    step: jax.Array  # int32 []
    key: jax.Array  # the run key (altlearn's TrainState.key)
    params: Any
    opt_state: optax.OptState


def make_hand_loop(
    experiment: Experiment,
) -> tuple[Callable[[TrainState], HandState], Callable[[HandState, int], tuple[HandState, Any]]]:
    """``init(train_state)`` and ``train_chunk(state, num_steps) -> (state, losses [num_steps])``
    of a hand-written backprop loop: ``HandMLP``, ``optax.adam`` (or sgd) at the config's rate,
    mean ``softmax_cross_entropy_with_integer_labels``, ``jax.value_and_grad``, in a
    ``lax.scan`` over minibatches gathered from ``experiment.x_train`` and ``y_train``.

    ``init`` starts from altlearn's initial state (its params, step and run key); the batches
    come from ``split(key)[0]`` as in ``Experiment.train_steps``: the loop follows altlearn's run.
    """
    config = experiment.config
    check_hand_supported(config)
    if not experiment.task.is_classification:
        raise ValueError(f"Dataset {config.data.name!r} is not a classification dataset.")
    module = hand_module(experiment)
    lr = float(config.optimizer.learning_rate)
    optimizer = optax.adam(lr) if config.optimizer.name == "adam" else optax.sgd(lr)
    x_train, y_train = experiment.x_train, experiment.y_train
    batch, num_train = experiment.batch_size, experiment.num_train

    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def init(train_state: TrainState) -> HandState:
        params = hand_params(experiment, train_state.variables["params"])
        key = jnp.array(train_state.key, copy=True)
        return HandState(
            jnp.array(train_state.step, copy=True), key, params, optimizer.init(params)
        )

    def train_chunk(state: HandState, num_steps: int) -> tuple[HandState, jax.Array]:
        data_key = jax.random.split(state.key)[0]
        idx = _batch_indices(data_key, state.step, num_steps, num_train, batch)

        def body(carry: tuple[Any, Any], i: jax.Array):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, x_train[i], y_train[i])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (state.params, state.opt_state), idx)
        return HandState(state.step + num_steps, state.key, params, opt_state), losses

    return init, train_chunk


class RawESState(NamedTuple):
    step: jax.Array  # int32 []
    key: jax.Array  # the run key (altlearn's TrainState.key)
    es_state: Any


def make_raw_es_loop(
    experiment: Experiment, population_size: int, std: float, learning_rate: float
) -> tuple[
    Callable[[jax.Array, Any], RawESState],
    Callable[[RawESState, int], tuple[RawESState, jax.Array]],
]:
    """``init(key, params)`` and ``train_chunk(state, num_generations) -> (state, mean fitness
    [num_generations])`` of a raw evosax loop: ``Open_ES`` (std ``std``, ``optax.adam``) over
    ``HandMLP``'s params, ``ask`` -> ``vmap`` of the mean cross-entropy -> ``tell`` in a
    ``lax.scan``.

    It mirrors altlearn's ``evolution`` rule on ``experiment`` step for step: ``init`` takes the
    run's seed key and altlearn's initial params (the initial mean), and splits the key as
    ``Experiment.init`` and the rule's init do; generation t asks and tells with the two halves
    of ``fold_in(split(run_key)[1], t)``, on the batch of ``split(run_key)[0]``. Its draws use the
    config's ``rule.rng_partitionable`` mode where the rule uses it (so both do the same work).
    """
    from evosax.algorithms import Open_ES  # the rule's own dependency

    config = experiment.config
    module = hand_module(experiment)
    x_train, y_train = experiment.x_train, experiment.y_train
    batch, num_train = experiment.batch_size, experiment.num_train
    solution = jax.eval_shape(module.init, jax.random.PRNGKey(0), x_train[:1])["params"]
    es = Open_ES(
        population_size,
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), solution),
        optimizer=optax.adam(learning_rate),
        std_schedule=optax.constant_schedule(std),
    )
    mode = config.rule.rng_partitionable

    def fitness(member: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = module.apply({"params": member}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def init(key: jax.Array, params: Any) -> RawESState:
        _, key_rule, key_run = jax.random.split(key, 3)
        params = hand_params(experiment, params)
        with rng_mode(mode):
            key_es = jax.random.split(key_rule)[0]
            es_state = es.init(key_es, params, es.default_params)
        return RawESState(jnp.zeros((), jnp.int32), key_run, es_state)

    def train_chunk(state: RawESState, num_generations: int) -> tuple[RawESState, jax.Array]:
        data_key, generation_key = jax.random.split(state.key)
        idx = _batch_indices(data_key, state.step, num_generations, num_train, batch)

        def body(carry: tuple[jax.Array, Any], i: jax.Array):
            step, es_state = carry
            key = jax.random.fold_in(generation_key, step)
            with rng_mode(mode):
                key_ask, key_tell = jax.random.split(key)
                population, es_state = es.ask(key_ask, es_state, es.default_params)
                f = jax.vmap(fitness, in_axes=(0, None, None))(population, x_train[i], y_train[i])
                es_state, _ = es.tell(key_tell, population, f, es_state, es.default_params)
            return (step + 1, es_state), jnp.mean(f)

        (step, es_state), losses = jax.lax.scan(body, (state.step, state.es_state), idx)
        return RawESState(step, state.key, es_state), losses

    return init, train_chunk


class RawPSOState(NamedTuple):
    step: jax.Array  # int32 []
    key: jax.Array  # the run key (altlearn's TrainState.key)
    pso_state: Any


def make_raw_pso_loop(
    experiment: Experiment,
) -> tuple[
    Callable[[TrainState], RawPSOState],
    Callable[[RawPSOState, int], tuple[RawPSOState, jax.Array]],
]:
    """``init(train_state)`` and ``train_chunk(state, num_steps) -> (state, mean fitness
    [num_steps])`` of a raw evosax PSO loop: evosax's ``PSO`` over ``HandMLP``'s params with the
    config's inertia and coefficients, ``ask`` -> ``vmap`` of the mean cross-entropy -> ``tell``
    in a ``lax.scan``, on the minibatches altlearn's run draws.

    ``init`` takes altlearn's initial ``pso`` state: the swarm's initial positions become
    evosax's initial population (scored on the first batch, as evosax's ``init`` asks), so both
    start from the same particles. evosax's PSO is classic PSO: a best keeps the fitness it was
    found with (altlearn's ``rescore_bests=False``), no velocity clamp (``velocity_clamp=0``),
    one r1, r2 per particle (``shared_coefficients=True``). The random numbers come from other
    generators on the two sides, so the trajectories differ while the work per iteration (P
    forward passes and the swarm update) is the same.
    """
    from evosax.algorithms import PSO  # the evolution rule's dependency

    config = experiment.config
    module = hand_module(experiment)
    x_train, y_train = experiment.x_train, experiment.y_train
    batch, num_train = experiment.batch_size, experiment.num_train
    population_size = int(config.rule.population_size)
    solution = jax.eval_shape(module.init, jax.random.PRNGKey(0), x_train[:1])["params"]
    pso = PSO(population_size, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), solution))
    params = pso.default_params.replace(
        inertia_coeff=float(config.rule.inertia),
        cognitive_coeff=float(config.rule.cognitive),
        social_coeff=float(config.rule.social),
    )

    def fitness(member: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = module.apply({"params": member}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def init(train_state: TrainState) -> RawPSOState:
        population = jax.vmap(lambda p: hand_params(experiment, p))(train_state.rule_state.position)
        data_key = jax.random.split(train_state.key)[0]
        i = _batch_indices(data_key, train_state.step, 1, num_train, batch)[0]
        f = jax.vmap(fitness, in_axes=(0, None, None))(population, x_train[i], y_train[i])
        pso_key = jax.random.fold_in(train_state.key, 1)
        state = pso.init(pso_key, population, f, params)
        return RawPSOState(train_state.step, train_state.key, state)

    def train_chunk(state: RawPSOState, num_steps: int) -> tuple[RawPSOState, jax.Array]:
        data_key, step_key = jax.random.split(state.key)
        idx = _batch_indices(data_key, state.step, num_steps, num_train, batch)

        def body(carry: tuple[jax.Array, Any], i: jax.Array):
            step, pso_state = carry
            key_ask, key_tell = jax.random.split(jax.random.fold_in(step_key, step))
            population, pso_state = pso.ask(key_ask, pso_state, params)
            f = jax.vmap(fitness, in_axes=(0, None, None))(population, x_train[i], y_train[i])
            pso_state, _ = pso.tell(key_tell, population, f, pso_state, params)
            return (step + 1, pso_state), jnp.mean(f)

        (step, pso_state), losses = jax.lax.scan(body, (state.step, state.pso_state), idx)
        return RawPSOState(step, state.key, pso_state), losses

    return init, train_chunk
