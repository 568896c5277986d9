"""Runs an experiment into a workdir: chunks of ``eval_every`` compiled steps, then evaluation,
logging, checkpointing and a NaN check between chunks.

Outputs in ``workdir``: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object per
evaluation, with the rule's own metrics averaged over the chunk as ``rule/<name>``),
``summary.json`` (final figures, and the run's provenance: command, commit, versions, machine,
``altlearn.report``), ``tensorboard/`` (event files), ``curves.png``
and ``checkpoints/`` (orbax: the initial state, then one per evaluation; the last
``keep_checkpoints``). Running again on a workdir that holds a checkpoint resumes from the latest
readable one and ends with the same numbers as an uninterrupted run; an unreadable newer one
(damaged files) is moved to ``checkpoints.unreadable/``, never deleted.

A rule with occasional expensive phases (``LearningRule.phase_step``: hybrid's evolution phases)
has each phase step run as a compiled chunk of its own (one more compiled program; the numbers
are those of unsplit chunks), so its wall time is measured: every evaluation record after a
phase has ``phase_step_time_s`` (the mean wall time of the interval's phase steps),
``phases_timed`` and ``phase_time_s`` (that less the mean time of an ordinary step so far: the
phase alone); ``summary.json`` has the run's means.

The state keeps one device layout from chunk to chunk: a rule that shards its population over
the devices (``rule.shard``) returns the state spread over the device mesh although ``init``
made it on one device, so the first chunk's compile decides the layout, the state is moved to it,
and every chunk, the evaluation and the checkpoints use that layout.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from altlearn import plotting, report
from altlearn.data import Dataset
from altlearn.train import Experiment, TrainState, configure_jax

RESUMABLE_KEYS = ("steps", "eval_every", "keep_checkpoints")  # may change on resume
# Timings of the last evaluation interval, left out of the summary (which has the run's own).
_PER_INTERVAL = (
    "steps_per_s",
    "train_loss_running",
    "phase_step_time_s",
    "phase_time_s",
    "phases_timed",
)


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, at most ``limit`` characters (storage errors run to
    pages of context)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kept_checkpoint(manager: ocp.CheckpointManager, workdir: Path) -> str:
    step = manager.latest_step()
    if step is None:
        return "No checkpoint was written before it."
    return f"The last good checkpoint (step {step}) is kept in {workdir}/checkpoints."


class _AbandonedReads:
    """While checkpoints are tried: a failed orbax restore closes its event loop with the reads
    of the other arrays still in flight, and each of them reports, milliseconds later, that it
    cannot call back (``RuntimeError: Event loop is closed``, printed as an ignored exception
    with a traceback). This swallows those reports (anything else goes on to the previous
    ``sys.unraisablehook``), and ``settle`` waits after a failure until they stop coming."""

    def __enter__(self) -> _AbandonedReads:
        self.previous = sys.unraisablehook
        self.last = time.monotonic()
        sys.unraisablehook = self._hook
        return self

    def _hook(self, unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            self.last = time.monotonic()
        else:
            self.previous(unraisable)

    def settle(self, quiet_s: float = 0.1, limit_s: float = 2.0) -> None:
        start = self.last = time.monotonic()
        while time.monotonic() - self.last < quiet_s and time.monotonic() - start < limit_s:
            time.sleep(0.01)

    def __exit__(self, *exc_info: Any) -> None:
        sys.unraisablehook = self.previous


def _restore_newest_readable(
    manager: ocp.CheckpointManager, template: TrainState, workdir: Path
) -> TrainState | None:
    """The state of the newest checkpoint that restores (None if there is none).

    A newer checkpoint that fails to restore (damaged or missing data files) is skipped with one
    log line and, once an older one restored, moved to ``checkpoints.unreadable/<step>`` so the
    run can write that step again. If none restores, a ValueError says so and moves nothing.
    """
    unreadable: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        with _AbandonedReads() as reads:
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(template))
            except Exception as e:  # the storage layers raise many kinds; all mean "unreadable"
                unreadable.append((step, _one_line(e)))
                reads.settle()
                continue
        for bad, reason in unreadable:
            aside = workdir / "checkpoints.unreadable" / str(bad)
            if aside.exists():
                aside = aside.with_name(f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(workdir / "checkpoints" / str(bad)), str(aside))
            logging.warning(
                "Skipped the checkpoint at step %d: unreadable (%s); moved it to %s.",
                bad,
                reason,
                aside,
            )
        if unreadable:
            manager.reload()
        logging.info("Resumed from the checkpoint at step %d in %s.", step, workdir)
        return state
    if unreadable:
        reasons = "; ".join(f"step {step}: {reason}" for step, reason in unreadable)
        raise ValueError(
            f"No checkpoint in {workdir}/checkpoints can be read ({reasons}). The files are "
            "left as they are; use a new --workdir, or delete the old one to start over."
        )
    return None


def _same_layout(tree: Any, shardings: Any) -> bool:
    """Whether every array of ``tree`` is laid out as the matching leaf of ``shardings``."""
    return all(
        a.sharding.is_equivalent_to(s, a.ndim)
        for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def _to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def _check_same_run(path: Path, config: ml_collections.ConfigDict) -> None:
    old = json.loads(path.read_text())
    new = _to_json(config)
    for key in RESUMABLE_KEYS:
        old.pop(key, None)
        new.pop(key, None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"Workdir {path.parent} holds a run with a different config (differs in: "
            f"{', '.join(diff)}). Use a new --workdir, or delete the old one to start over."
        )


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _floats(tree: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in tree.items()}


def _rule_metrics(step_metrics: dict[str, Any]) -> dict[str, float]:
    """The rule's own per-step metrics as ``rule/<name>``: their mean over the chunk (with
    eval_every=1, each step's value, e.g. closed_form's accepted / step_length per alternation).
    A metric a rule reports on some steps only (NaN on the others, e.g. hybrid's evolution
    phases) is the mean over the steps that have it. Non-finite values (e.g. a fitness mean when
    every member was NaN) are left out."""
    out = {}
    for name, values in step_metrics.items():
        if name == "loss":
            continue
        values = np.asarray(values, np.float64)
        value = float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else np.nan
        if math.isfinite(value):
            out[f"rule/{name}"] = value
    return out


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Trains ``config`` into ``workdir`` (resuming if it holds a checkpoint); returns the summary.

    ``on_eval(record)`` is called after every evaluation (after the checkpoint is written).
    ``dataset`` replaces the one ``config.data`` names (for arrays of your own).
    """
    t_start = time.perf_counter()
    provenance = report.Provenance()
    workdir = report.prepare_workdir(Path(workdir).absolute())
    configure_jax(config)  # 64-bit mode for rules that solve in float64 (closed_form)
    experiment = Experiment(config, dataset)  # validates the config and loads the data first
    batch_size_requested = int(config.batch_size)
    if experiment.batch_size < batch_size_requested:
        logging.warning(
            "batch_size %d is larger than the training split (%d samples); every step uses the "
            "whole split (batch_size %d).",
            batch_size_requested,
            experiment.num_train,
            experiment.batch_size,
        )
    config_path = workdir / "config.json"
    if config_path.exists():
        _check_same_run(config_path, config)
    config_path.write_text(json.dumps(_to_json(config), indent=2) + "\n")

    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(config.keep_checkpoints),
            create=True,
            enable_async_checkpointing=False,
        ),
    )
    init_state = jax.jit(experiment.init)(jax.random.PRNGKey(config.seed))
    try:
        state = _restore_newest_readable(manager, init_state, workdir) or init_state
    except ValueError:
        manager.close()
        raise
    start_step = int(state.step)

    metrics_path = workdir / "metrics.jsonl"
    records = []
    if start_step > 0 and metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        records = [r for r in records if r["step"] <= start_step]
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    from tensorboardX import SummaryWriter  # imported late: it is slow to import

    writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)

    # COMPILE (ahead of time, so compile time is reported apart from run time)
    steps = int(config.steps)
    eval_every = int(config.eval_every)
    compile_time = 0.0
    compiled: dict[int, Any] = {}
    layout = None  # the state's shardings, pinned once a chunk would return it otherwise

    def compile_chunk(num_steps: int, like: TrainState):
        def chunk(s: TrainState):
            s, step_metrics = experiment.train_steps(s, num_steps)
            if layout is not None:
                s = jax.lax.with_sharding_constraint(s, layout)
            return s, step_metrics

        return jax.jit(chunk, donate_argnums=0).lower(like).compile()

    def compiled_chunk(num_steps: int):
        """The chunk of ``num_steps`` steps, taking and returning the state in its layout."""
        nonlocal compile_time, layout
        if num_steps not in compiled:
            t = time.perf_counter()
            executable = compile_chunk(num_steps, state)
            if not _same_layout(state, executable.output_shardings[0]):
                layout = jax.tree.map(lambda a: a.sharding, state)
                executable = compile_chunk(num_steps, state)
            compiled[num_steps] = executable
            compile_time += time.perf_counter() - t
        return compiled[num_steps]

    phase_steps = experiment.phase_steps

    def is_phase(step: int) -> bool:
        """Whether the step after count ``step`` runs the rule's phase (timed on its own)."""
        return phase_steps is not None and phase_steps(step + 1)

    def chunk_length(step: int) -> int:
        """Steps to the next evaluation; a phase step is a chunk of its own (module docstring)."""
        num = min(eval_every - step % eval_every, steps - step)
        if phase_steps is None:
            return num
        if is_phase(step):
            return 1
        return next((n for n in range(1, num) if is_phase(step + n)), num)

    if start_step < steps:
        # The first chunk decides the state's layout (module docstring). It is compiled for the
        # state as ``init`` returns it, left for the compiler to place; a restored state is
        # committed to one device, which a program spanning the devices refuses.
        t = time.perf_counter()
        num = chunk_length(start_step)
        executable = compile_chunk(num, init_state)
        returned = executable.output_shardings[0]
        if not _same_layout(state, returned):
            layout = returned
            state = jax.device_put(state, layout)
            executable = compile_chunk(num, state)
        compiled[num] = executable
        compile_time += time.perf_counter() - t
    del init_state
    t = time.perf_counter()
    evaluate = jax.jit(experiment.evaluate).lower(state).compile()
    compile_time += time.perf_counter() - t

    def log_eval(s: TrainState, extra: dict[str, float]) -> dict[str, float]:
        record = {"step": int(s.step), **_floats(evaluate(s)), **extra}
        bad = [k for k, v in record.items() if not math.isfinite(v) and not k.startswith("rule/")]
        # A rule's own figures may be undefined for now (a slot not yet filled): left out.
        record = {k: v for k, v in record.items() if math.isfinite(v)}
        if bad:
            raise DivergenceError(
                f"Evaluation at step {record['step']} gave non-finite {', '.join(bad)}. "
                + _kept_checkpoint(manager, workdir)
            )
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, record["step"])
        writer.flush()
        records.append(record)
        return record

    def save(s: TrainState) -> None:
        manager.save(int(s.step), args=ocp.args.StandardSave(s))
        manager.wait_until_finished()

    # TRAIN, chunk by chunk; evaluate, log and save at every evaluation step
    train_time, trained = 0.0, 0
    interval: dict[str, list] = {}  # the current evaluation interval's step metrics, by name
    ordinary = [0.0, 0]  # wall time and count of the steps without a phase, whole run
    phase_times: list[float] = []  # this interval's phase steps' wall times
    all_phase_times: list[float] = []  # the run's (this process's)

    def phase_record() -> dict[str, float]:
        """The interval's phase steps' mean wall time, and that less an ordinary step's."""
        if not phase_times:
            return {}
        step_time = float(np.mean(phase_times))
        record = {"phase_step_time_s": step_time, "phases_timed": float(len(phase_times))}
        if ordinary[1]:
            record["phase_time_s"] = step_time - ordinary[0] / ordinary[1]
        return record

    try:
        if start_step == 0:
            log_eval(state, {})
            if 0 not in manager.all_steps():
                save(state)  # so that a run diverging in its first chunk keeps one
        while int(state.step) < steps:
            step = int(state.step)
            num = chunk_length(step)
            chunk = compiled_chunk(num)
            t = time.perf_counter()
            state, step_metrics = chunk(state)
            losses = np.asarray(step_metrics["loss"])  # blocks until the chunk is done
            elapsed = time.perf_counter() - t
            train_time += elapsed
            trained += num
            if num == 1 and is_phase(step):
                phase_times.append(elapsed)
                all_phase_times.append(elapsed)
            else:
                ordinary[0] += elapsed
                ordinary[1] += num
            if not np.all(np.isfinite(losses)):
                first = step + int(np.argmin(np.isfinite(losses)))
                raise DivergenceError(
                    f"The loss became {losses[first - step]} at step {first} (rule "
                    f"{config.rule.name!r}); stopped. " + _kept_checkpoint(manager, workdir)
                )
            for name, values in step_metrics.items():
                interval.setdefault(name, []).append(np.asarray(values))
            if step + num < steps and (step + num) % eval_every:
                continue  # a phase split the interval: evaluate at its end
            step_metrics = {k: np.concatenate(v) for k, v in interval.items()}
            rate = trained / max(train_time, 1e-9)
            record = log_eval(
                state,
                {
                    "train_loss_running": float(step_metrics["loss"].mean()),
                    "steps_per_s": rate,
                    **phase_record(),
                    **_rule_metrics(step_metrics),
                },
            )
            interval.clear()
            phase_times.clear()
            save(state)
            logging.info(
                "step %d/%d  loss %.4f  %s  %.0f steps/s  ETA %s",
                record["step"],
                steps,
                record["train_loss_running"],
                "  ".join(
                    f"{k} {record[k]:.4f}" for k in ("val_loss", "val_accuracy") if k in record
                ),
                rate,
                _format_eta((steps - record["step"]) / rate),
            )
            if on_eval is not None:
                on_eval(record)
    finally:
        writer.close()
        manager.close()

    final = records[-1]
    summary = {
        **{k: v for k, v in final.items() if k not in _PER_INTERVAL},
        "rule": config.rule.name,
        "model": config.model.name,
        "data": config.data.name,
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.variables["params"]))),
        "batch_size": experiment.batch_size,
        "batch_size_requested": batch_size_requested,
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "compile_time_s": compile_time,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "steps_per_s": trained / train_time if train_time > 0 else None,
        "provenance": provenance.record(),
    }
    if all_phase_times:
        summary["phase_step_time_s"] = float(np.mean(all_phase_times))
        if ordinary[1]:
            summary["phase_time_s"] = summary["phase_step_time_s"] - ordinary[0] / ordinary[1]
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plotting.plot_curves(
        records,
        workdir / "curves.png",
        title=f"{config.rule.name} / {config.model.name} / {config.data.name}",
    )
    return summary
