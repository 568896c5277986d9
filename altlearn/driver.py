"""Points x seeds through the one training program (``altlearn.train.make_train``).

    runs = driver.run(config, points=[{"optimizer.learning_rate": 1e-3}, ...], seeds=range(5))
    runs.curves["test_accuracy"]          # [members, evaluations]; members point-major
    runs.final("test_accuracy")           # [points, seeds] at the last evaluation

A member is one (point, seed): the hyperparameter values of ``points[p]`` (sweepable floats,
``config.hparams``) and the run key of seed s, ``PRNGKey(s)`` (the key ``experiments.train
--config.seed=s`` uses), or ``keys[s]`` where given. Every member trains in one
``jax.jit`` program (the members vmapped on an accelerator, mapped one after another on a CPU:
``members_program``):

- **memory**: with ``memory_budget_mb`` the members run in sequential chunks of one compiled
  program whose XLA memory analysis fits the budget (``chunk_size``);
- **devices**: with several devices each chunk's member axis is sharded over them (a ``Mesh``
  over every process's devices), padded to a multiple of the device count;
- **processes**: under ``jax.distributed`` (``altlearn.distributed``) the devices of every
  process share the members and every process receives every result;
- **resume**: with ``save_dir`` each finished chunk is saved whole (``NAME_i.npz``, written
  by process 0) and a rerun loads it instead of training it again.

Before anything compiles every point is checked as ``experiments.train`` would check it with
those values in its config (``Experiment.check_point``). Timing: ``compile_s`` (lowering and
compiling, once per program) apart from ``run_s`` (the chunks' wall time, evaluations
included); ``step_seconds`` measures the steady-state time of the steps alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from altlearn import data as data_lib
from altlearn.train import Experiment, make_train


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """The run keys of ``seeds``: ``PRNGKey(s)``, as ``experiments.train --config.seed=s``."""
    return np.stack([np.asarray(jax.random.PRNGKey(int(s))) for s in seeds])


class Runs(NamedTuple):
    """What ``run`` returns."""

    curves: dict[str, np.ndarray]  # figure -> [members, evaluations]
    steps: list[int]  # the evaluation steps
    members: list[tuple[int, int]]  # (point index, seed index) of each member
    points: list[dict[str, float]]
    seeds: list[int]
    compile_s: float  # lowering + compiling the program (0 if every chunk was loaded)
    run_s: float  # wall time of the chunks trained here (evaluations included)
    chunk_size: int  # members per compiled call
    experiment: Experiment

    def final(self, name: str) -> np.ndarray:
        """The figure at the last evaluation, [points, seeds] (every member present)."""
        return self.at(name, -1)

    def at(self, name: str, index: int) -> np.ndarray:
        """The figure at evaluation ``index``, [points, seeds] (every member present)."""
        values = self.curves[name][:, index]
        if len(values) != len(self.points) * len(self.seeds):
            raise ValueError("Runs.at needs every member; this run trained a share of them.")
        return values.reshape(len(self.points), len(self.seeds))

    def best(self, name: str, by: str = "val_loss") -> tuple[np.ndarray, np.ndarray]:
        """The best-iterate choice: figure ``name`` at each member's evaluation where ``by`` is
        best (the lowest loss, the highest accuracy; the first such evaluation on ties), and
        that evaluation's step, both [points, seeds]. Every method of a comparison chosen this
        way has the same validation access as one that selects on validation while training."""
        scores = np.asarray(self.curves[by])
        if by.endswith("accuracy"):
            scores = -scores
        index = np.argmin(np.where(np.isnan(scores), np.inf, scores), axis=1)  # [members]
        values = np.take_along_axis(self.curves[name], index[:, None], axis=1)[:, 0]
        shape = (len(self.points), len(self.seeds))
        if len(values) != shape[0] * shape[1]:
            raise ValueError("Runs.best needs every member; this run trained a share of them.")
        return values.reshape(shape), np.asarray(self.steps)[index].reshape(shape)

    def member_curves(self, member: int) -> dict[str, list]:
        return {k: v[member].tolist() for k, v in self.curves.items()}


def default_members_per_batch() -> int:
    """How many members a program vmaps at a time by default: all of them (0) on an
    accelerator, one at a time (1) on a CPU (``members_program``)."""
    return 1 if jax.default_backend() == "cpu" else 0


def members_program(fn: Callable, members_per_batch: int, devices: int = 1) -> Callable:
    """``fn`` of one member's arguments made a function of every member's (each argument a
    pytree with a leading member axis [n, ...]; the results stacked alike), for ONE program.

    ``members_per_batch`` 0: the whole member axis vmapped (an accelerator runs the members
    side by side). k >= 1: ``lax.map`` over the members, k vmapped at a time (with several
    devices, each device maps over its own share of the axis). On XLA:CPU vmapping members
    cannot save arithmetic (every member has its own weights), the batched products compile
    slower than one run's plain ones, and a batch of members' weights and optimizer states falls
    out of the caches that one member's fits in (docs/BENCHMARKS.md, "Sweeps"); there the
    members run one after another inside the program, each step compiled as one run's is.
    """
    if members_per_batch <= 0:
        return jax.vmap(fn)

    # batch_size=1 would still vmap (over an axis of one): plain lax.map traces fn as it is.
    batch = None if members_per_batch == 1 else members_per_batch

    def one_device(*args):
        return jax.lax.map(lambda a: fn(*a), args, batch_size=batch)

    if devices == 1:
        return one_device

    def program(*args):  # [n, ...] -> [devices, n / devices, ...]: each device maps its share
        n = jax.tree.leaves(args)[0].shape[0]
        split = lambda a: a.reshape(devices, n // devices, *a.shape[1:])
        out = jax.vmap(one_device)(*jax.tree.map(split, args))
        return jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), out)

    return program


def chunk_size(program: Callable, keys, hparams, budget_mb: float, devices: int) -> int:
    """Members per chunk whose compiled program fits ``budget_mb`` (XLA's memory analysis of
    one- and two-member programs: a fixed part and a part per member); all if no budget."""
    total = keys.shape[0]
    padded = -(-total // devices) * devices  # a multiple of the device count
    if budget_mb <= 0:
        return padded

    def need(n):
        lowered = jax.jit(jax.vmap(program)).lower(keys[:n], jax.tree.map(lambda a: a[:n], hparams))
        m = lowered.compile().memory_analysis()
        return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

    one, budget = need(1), budget_mb * 2**20
    if one > budget:
        raise ValueError(
            f"--memory_budget_mb={budget_mb:g} is below one point's need, "
            f"{one / 2**20:.1f} MiB; raise it (or 0: no budget)."
        )
    two = need(2)
    per, fixed = max(two - one, 1), max(2 * one - two, 0)
    size = int((budget - fixed) // per)
    return min(max(devices, size // devices * devices), padded)


def global_arrays(args: Any, sharding: NamedSharding | None) -> Any:
    """Host arrays as arrays laid out by ``sharding`` over every process's devices (each process
    holds the whole host array and hands over its devices' slices)."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, args)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]), args
    )


def gathered(out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Every process's share of ``out`` on every process, as host arrays."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in out.items()}
    from jax.experimental import multihost_utils  # only under jax.distributed

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(out, tiled=True).items()}


def check_points(experiment: Experiment, points: Sequence[dict[str, float]]) -> None:
    """Every point checked as ``experiments.train`` checks its config (before compiling)."""
    for point in points:
        try:
            experiment.check_point(point)
        except ValueError as e:
            values = ", ".join(f"{k}={v:g}" for k, v in point.items())
            raise ValueError(f"point {values}: {e}") from None


def run(
    config: ml_collections.ConfigDict,
    points: Sequence[dict[str, float]] | None = None,
    seeds: Sequence[int] = (0,),
    *,
    keys: np.ndarray | None = None,
    eval_at: Sequence[int] | None = None,
    memory_budget_mb: float = 0.0,
    select: Callable[[int], bool] | None = None,
    save_dir: str | Path | None = None,
    name: str = "chunk",
    dataset: data_lib.Dataset | None = None,
    model: Any = None,
    observe: Callable | None = None,
    members_per_batch: int | None = None,
) -> Runs:
    """Trains every (point, seed) of ``config`` through one compiled, vmapped program.

    ``points``: hyperparameter values per point (None: the config's own, one point);
    ``seeds``: the seeds (``keys``: their run keys, [seeds, 2], if not ``PRNGKey(seed)``);
    ``eval_at``: the evaluation steps (default every ``config.eval_every``; 0 and the last step
    always); ``select(point_index)``: train only the points it accepts (a job's share);
    ``save_dir`` / ``name``: where finished chunks are saved and found again (module docstring);
    ``dataset`` / ``model``: arrays or a model of your own (``Experiment``); ``observe``: extra
    figures per evaluation (``make_train``); ``members_per_batch``: members vmapped at a time
    inside the program (``members_program``; None: ``default_members_per_batch()``).
    """
    points = [dict(p) for p in (points or [{}])]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("run: give at least one seed.")
    keys = seed_keys(seeds) if keys is None else np.asarray(keys)
    train = make_train(config, eval_at, dataset, observe, model)
    experiment = train.experiment
    check_points(experiment, points)
    names = sorted(points[0])
    if any(sorted(p) != names for p in points):
        raise ValueError("run: every point must set the same hyperparameters.")
    members = [
        (p, s) for p in range(len(points)) if select is None or select(p) for s in range(len(seeds))
    ]
    member_keys = np.stack([keys[s] for _, s in members]) if members else keys[:0]
    hparams = {k: np.asarray([points[p][k] for p, _ in members], np.float32) for k in names}
    curves_of = lambda key, hp: train(key, hp)[1]  # the final states stay on the device
    devices = jax.devices()
    size = chunk_size(curves_of, member_keys, hparams, memory_budget_mb, len(devices))
    sharding = None
    if len(devices) > 1:  # the member axis sharded over every device of every process
        sharding = NamedSharding(Mesh(np.array(devices), ("members",)), PartitionSpec("members"))
    if members_per_batch is None:
        members_per_batch = default_members_per_batch()
    program = jax.jit(
        members_program(curves_of, members_per_batch, len(devices)),
        in_shardings=sharding and (sharding, sharding),
    )
    compiled, compile_s, run_s = None, 0.0, 0.0
    outs = []
    writer = jax.process_index() == 0
    for ci, first in enumerate(range(0, len(members), size)):
        path = Path(save_dir) / f"{name}_{ci}.npz" if save_dir is not None else None
        index = np.arange(first, first + size) % len(members)  # the last chunk padded
        real = min(size, len(members) - first)
        if path is not None and path.exists():
            out = dict(np.load(path))
        else:
            args = global_arrays(
                (member_keys[index], {k: v[index] for k, v in hparams.items()}), sharding
            )
            if compiled is None:
                t = time.perf_counter()
                compiled = program.lower(*args).compile()
                compile_s = time.perf_counter() - t
            t = time.perf_counter()
            out = gathered(compiled(*args))
            run_s += time.perf_counter() - t
            out = {k: v[:real] for k, v in out.items()}
            if path is not None and writer:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.stem + ".tmp.npz")
                np.savez(tmp, **out)
                tmp.rename(path)  # a chunk is saved whole or not at all
        outs.append(out)
        logging.info("%s %s: %d/%d runs done", config.rule.name, name, first + real, len(members))
    curves = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}
    return Runs(
        curves, train.eval_steps, members, points, seeds, compile_s, run_s, size, experiment
    )


PROBE_SECONDS = 0.5


def step_timer(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int] = (0,),
    points: Sequence[dict[str, float]] | None = None,
    dataset: data_lib.Dataset | None = None,
    period: int = 1,
    model: Any = None,
) -> Callable[[], float]:
    """A probe of the steady-state wall seconds per training step of the members (points x
    seeds) in one program as ``run`` trains them, without evaluations or compilation: ONE
    compiled chunk of steps from step 0 (``period`` steps, at least 20: a rule's phase interval,
    so that phases count at their share), compiled and called once to warm up here; each call
    of the probe then calls it again on the state it returns until the calls add up to
    ``PROBE_SECONDS`` (a single short call of a fast step would time mostly the call) and
    returns seconds per step."""
    experiment = Experiment(config, dataset, model)
    points = [dict(p) for p in (points or [{}])]
    check_points(experiment, points)
    keys = np.stack([k for _ in points for k in seed_keys(seeds)])
    hparams = {
        k: np.asarray([p[k] for p in points for _ in seeds], np.float32) for k in sorted(points[0])
    }
    state = jax.jit(jax.vmap(experiment.init))(keys, hparams)
    length = -(-20 // period) * period
    steps = lambda s: experiment.train_steps(s, length)[0]
    chunk = jax.jit(members_program(steps, default_members_per_batch()), donate_argnums=0)
    chunk = chunk.lower(state).compile()
    state = [jax.block_until_ready(chunk(state))]

    def probe() -> float:
        calls, elapsed = 0, 0.0
        while elapsed < PROBE_SECONDS or calls < 2:
            t = time.perf_counter()
            state[0] = jax.block_until_ready(chunk(state[0]))
            elapsed += time.perf_counter() - t
            calls += 1
        return elapsed / (calls * length)

    return probe


def step_seconds(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int] = (0,),
    points: Sequence[dict[str, float]] | None = None,
    dataset: data_lib.Dataset | None = None,
    period: int = 1,
    model: Any = None,
) -> float:
    """Steady-state wall seconds per training step of the members (points x seeds) in one
    program as ``run`` trains them (one probe of ``step_timer``)."""
    return step_timer(config, seeds, points, dataset, period, model)()


def interleaved_step_seconds(
    configs: Sequence[ml_collections.ConfigDict], seeds: Sequence[int], rounds: int = 3
) -> list[float]:
    """``step_seconds`` of several configs timed fairly against each other: every config's
    chunk compiled first, then probed in turn, ``rounds`` times round-robin; the median of each
    config's probes. A drift of the machine's speed while they are timed (another load, a
    frequency change) then reaches every config alike instead of whichever was timed then."""
    probes = [step_timer(c, seeds) for c in configs]
    times = [[probe() for probe in probes] for _ in range(rounds)]
    return [float(np.median(column)) for column in zip(*times)]


def budget_steps(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    forward_passes: float = 0.0,
    seconds: float = 0.0,
) -> int:
    """Steps that spend a budget: ``forward_passes`` (the rule's cost per step counted, equal
    for every method) or ``seconds`` of this machine (``step_seconds`` of the seeds vmapped)."""
    if forward_passes:
        return max(1, int(forward_passes // Experiment(config).step_cost))
    return max(1, int(seconds / step_seconds(config, seeds)))
