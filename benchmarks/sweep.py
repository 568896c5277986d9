"""A learning-rate sweep as one program against the ways a user would otherwise run it.

    python -m benchmarks.sweep --points=16 --seeds=2 --out=docs/bench/sweep.json

The same runs (``--points`` learning rates, logspace(-4, -2), x ``--seeds`` seeds of
experiments/configs/digits.py at ``--steps`` steps) three ways, in one run of this binary:

* sweep: ``experiments.sweep``'s ``run_sweep``, every point and seed in one compiled program;
* separate processes: one ``python -m experiments.train`` process per run, one after another
  (what a user would otherwise do);
* one process: ``altlearn.runner.run`` per run, one after another, in this process.

Reported: wall time of each, and the number and total time of XLA compilations (JAX's
``/jax/core/compile/backend_compile_duration`` events; "programs": those over 0.1 s, the
training, initialisation and evaluation programs rather than small staging ops; for the
separate processes, those of one run measured in this process, times the runs; with a
persistent compilation cache configured, a program loaded from it counts too). The target on
CPU: the sweep at most 0.5x the separate processes' wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app

from altlearn import runner
from benchmarks.harness import command_line, machine_facts, write_json
from experiments import sweep
from experiments.configs import digits

ROOT = Path(__file__).resolve().parents[1]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_EVENT = "/jax/compilation_cache/compile_time_saved_sec"  # a program loaded, not compiled
BIG = 0.1  # seconds: a compilation longer than this is a program (init, training, evaluation)


class Compiles:
    """Records XLA compilations while active (a JAX monitoring listener)."""

    def __init__(self):
        self.durations: list[float] = []
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **kwargs: Any) -> None:
        # A program loaded from a persistent compilation cache (when one is configured) counts
        # as compiled, with the compile time it saved.
        if self.active and event in (COMPILE_EVENT, CACHE_EVENT):
            self.durations.append(duration)

    def measure(self, fn) -> dict[str, float]:
        """Wall time of ``fn()``, its compilations (all, and those over ``BIG`` seconds: the
        programs, not the small staging ops) and their total time."""
        self.durations, self.active = [], True
        t = time.perf_counter()
        try:
            fn()
        finally:
            self.active = False
        return {
            "wall_s": time.perf_counter() - t,
            "compiles": len(self.durations),
            "program_compiles": sum(d > BIG for d in self.durations),
            "compile_s": sum(self.durations),
        }


def measure(
    points: int, seeds: int, steps: int, separate: bool = True, base=None, sample: int = 0
) -> dict[str, Any]:
    """The three ways timed; ``base``: the config (default experiments/configs/digits.py; the
    separate processes always run that file). ``sample`` > 0: the two one-run-at-a-time ways
    run only that many of the runs (spread over the learning rates) and their wall time,
    compilations and compile time are scaled to all runs (``estimated_from`` says from how
    many): at hundreds of runs they would take hours."""
    rates = np.logspace(-4, -2, points)
    base = base or digits.get_config()
    base.steps, base.eval_every = steps, steps
    flag = f"optimizer.learning_rate=logspace(-4,-2,{points})"
    compiles = Compiles()
    out: dict[str, Any] = {"points": points, "seeds": seeds, "steps": steps, "runs": points * seeds}
    runs = [(i, s) for i in range(points) for s in range(seeds)]
    timed = runs
    if 0 < sample < len(runs):
        timed = [runs[j] for j in np.linspace(0, len(runs) - 1, sample).round().astype(int)]
    scale = len(runs) / len(timed)

    def scaled(result: dict[str, Any]) -> dict[str, Any]:
        if scale == 1:
            return result
        keys = ("wall_s", "compiles", "program_compiles", "compile_s")
        return {**{k: result[k] * scale for k in keys}, "estimated_from": len(timed)}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        out["sweep"] = compiles.measure(lambda: sweep.run_sweep(base, [flag], seeds, work / "s"))

        def one_process():
            for i, s in timed:
                config = base.copy_and_resolve_references()
                config.optimizer.learning_rate, config.seed = float(rates[i]), s
                runner.run(config, work / f"p{i}_{s}")

        out["one_process"] = scaled(compiles.measure(one_process))
        if separate:
            per_run = compiles.measure(
                lambda: runner.run(base.copy_and_resolve_references(), work / "single")
            )
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            t = time.perf_counter()
            for i, s in timed:
                cmd = [
                    sys.executable, "-m", "experiments.train",
                    "--config=experiments/configs/digits.py",
                    f"--config.steps={steps}", f"--config.eval_every={steps}",
                    f"--config.optimizer.learning_rate={float(rates[i])!r}", f"--config.seed={s}",
                    f"--workdir={work / f'x{i}_{s}'}",
                ]  # fmt: skip
                subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
            out["separate_processes"] = scaled(
                {  # each process compiles what one run does
                    "wall_s": time.perf_counter() - t,
                    **{
                        k: per_run[k] * len(timed)
                        for k in ("compiles", "program_compiles", "compile_s")
                    },
                }
            )
            out["sweep_vs_separate"] = out["sweep"]["wall_s"] / out["separate_processes"]["wall_s"]
    out["sweep_vs_one_process"] = out["sweep"]["wall_s"] / out["one_process"]["wall_s"]
    return out


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['runs']} runs ({result['points']} learning rates x {result['seeds']} seeds, "
        f"{result['steps']} steps each, digits MLP):",
        "",
        "| how | wall time | vs separate processes | program compilations (all) | compile time |",
        "|---|---|---|---|---|",
    ]
    base = result.get("separate_processes", {}).get("wall_s")
    for name in ("sweep", "one_process", "separate_processes"):
        if name in result:
            r = result[name]
            ratio = f"{r['wall_s'] / base:.2f}x" if base else "-"
            how = name.replace("_", " ")
            if "estimated_from" in r:
                how += f" (timed {r['estimated_from']} runs, scaled)"
            lines.append(
                f"| {how} | {r['wall_s']:.1f} s | {ratio} | "
                f"{r['program_compiles']:.0f} ({r['compiles']:.0f}) | {r['compile_s']:.1f} s |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    result = {
        "command": command_line("benchmarks.sweep"),
        "machine": machine_facts(),
        **measure(_POINTS.value, _SEEDS.value, _STEPS.value, _SEPARATE.value, sample=_SAMPLE.value),
    }
    out = write_json(result, _OUT.value)
    print(markdown_table(result))
    print(f"\nWrote {out}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _POINTS = flags.DEFINE_integer("points", 16, "Learning rates (logspace(-4, -2)).")
    _SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per learning rate.")
    _STEPS = flags.DEFINE_integer("steps", 200, "Steps per run.")
    _SEPARATE = flags.DEFINE_bool("separate", True, "Also time one process per run.")
    _SAMPLE = flags.DEFINE_integer(
        "sample", 0, "Time only this many runs of the one-at-a-time ways and scale (0: all)."
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/sweep.json", "JSON output path.")
    app.run(main)
