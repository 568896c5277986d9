"""Runs an experiment into a workdir: chunks of ``eval_every`` compiled steps, then evaluation,
logging, checkpointing and a NaN check between chunks.

Outputs in ``workdir``: ``config.json`` (resolved config), ``metrics.jsonl`` (one JSON object per
evaluation, with the rule's own metrics averaged over the chunk as ``rule/<name>``),
``summary.json`` (final figures), ``tensorboard/`` (event files), ``curves.png``
and ``checkpoints/`` (orbax). Running again on a workdir that holds a checkpoint resumes from the
latest one and ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from altlearn import plotting
from altlearn.data import Dataset
from altlearn.train import Experiment, TrainState, configure_jax

RESUMABLE_KEYS = ("steps", "eval_every", "keep_checkpoints")  # may change on resume


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
    Non-finite values (e.g. a fitness mean when every member was NaN) are left out."""
    out = {}
    for name, values in step_metrics.items():
        if name == "loss":
            continue
        value = float(np.mean(np.asarray(values, np.float64)))
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
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    configure_jax(config)  # 64-bit mode for rules that solve in float64 (closed_form)
    experiment = Experiment(config, dataset)  # validates the config and loads the data first
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
    state = jax.jit(experiment.init)(jax.random.PRNGKey(config.seed))
    start_step = manager.latest_step()
    if start_step is not None:
        state = manager.restore(start_step, args=ocp.args.StandardRestore(state))
        logging.info("Resumed from the checkpoint at step %d in %s.", start_step, workdir)
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
    compile_time = 0.0
    compiled: dict[int, Any] = {}

    def compiled_chunk(num_steps: int):
        nonlocal compile_time
        if num_steps not in compiled:
            t = time.perf_counter()
            fn = jax.jit(lambda s: experiment.train_steps(s, num_steps), donate_argnums=0)
            compiled[num_steps] = fn.lower(state).compile()
            compile_time += time.perf_counter() - t
        return compiled[num_steps]

    t = time.perf_counter()
    evaluate = jax.jit(experiment.evaluate).lower(state).compile()
    compile_time += time.perf_counter() - t

    def log_eval(s: TrainState, extra: dict[str, float]) -> dict[str, float]:
        record = {"step": int(s.step), **_floats(evaluate(s)), **extra}
        bad = [k for k, v in record.items() if not math.isfinite(v) and not k.startswith("rule/")]
        if bad:
            raise DivergenceError(
                f"Evaluation at step {record['step']} gave non-finite {', '.join(bad)}; the last "
                f"good checkpoint (step {manager.latest_step()}) is kept in {workdir}/checkpoints."
            )
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, record["step"])
        writer.flush()
        records.append(record)
        return record

    if start_step == 0:
        log_eval(state, {})

    # TRAIN, chunk by chunk
    steps = int(config.steps)
    eval_every = int(config.eval_every)
    train_time, trained = 0.0, 0
    try:
        while int(state.step) < steps:
            step = int(state.step)
            num = min(eval_every - step % eval_every, steps - step)
            chunk = compiled_chunk(num)
            t = time.perf_counter()
            state, step_metrics = chunk(state)
            losses = np.asarray(step_metrics["loss"])  # blocks until the chunk is done
            train_time += time.perf_counter() - t
            trained += num
            if not np.all(np.isfinite(losses)):
                first = step + int(np.argmin(np.isfinite(losses)))
                raise DivergenceError(
                    f"The loss became {losses[first - step]} at step {first} (rule "
                    f"{config.rule.name!r}); stopped. The last good checkpoint (step "
                    f"{manager.latest_step()}) is kept in {workdir}/checkpoints."
                )
            rate = trained / max(train_time, 1e-9)
            record = log_eval(
                state,
                {
                    "train_loss_running": float(losses.mean()),
                    "steps_per_s": rate,
                    **_rule_metrics(step_metrics),
                },
            )
            manager.save(record["step"], args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
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
        **{k: v for k, v in final.items() if k not in ("steps_per_s", "train_loss_running")},
        "rule": config.rule.name,
        "model": config.model.name,
        "data": config.data.name,
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(state.variables["params"]))),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "compile_time_s": compile_time,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "steps_per_s": trained / train_time if train_time > 0 else None,
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plotting.plot_curves(
        records,
        workdir / "curves.png",
        title=f"{config.rule.name} / {config.model.name} / {config.data.name}",
    )
    return summary
