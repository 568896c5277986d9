"""A learning-rate sweep as one program against the loops a competent user would write instead.

    python -m benchmarks.sweep --points=16 --seeds=2 --out=docs/bench/sweep.json

The same runs (``--points`` learning rates, logspace(-4, -2), x ``--seeds`` seeds of
experiments/configs/digits.py at ``--steps`` steps, evaluated at the start and the end) three
ways, in one run of this binary:

* sweep: the engine (``altlearn.driver.run``, what ``experiments.sweep`` runs): every point and
  seed in ONE compiled program, its members mapped one after another on a CPU
  (``driver.members_program``) and, for contrast, all vmapped (``members_per_batch=0``, what
  an accelerator runs);
* loop: ``make_train(config)`` jitted ONCE (learning rate and seed are traced arrays, so no run
  recompiles), then a Python loop over the runs calling it;
* processes: one ``python -m experiments.train`` process per run, one after another, with JAX's
  persistent compilation cache on (a fresh directory: the first process compiles, the others
  load its programs), as a user with a job script would run them.

Reported for each: compile time apart from the steady state (the training itself), the number of
XLA compilations (JAX's ``backend_compile_duration`` events; "programs": those over 0.1 s; a
program loaded from the persistent cache counts, with the time it saved) and the wall time.
``--sample=K`` times only K runs of the loop and the processes and scales them to all runs (at
hundreds of runs the processes would take hours). On XLA:CPU every member still has its own
weight matrices, so a sweep cannot make the arithmetic cheaper than the loop: what it buys is
one compile, one process, one set of outputs and resume.
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

from altlearn import driver, report
from altlearn.train import make_train
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
        """Wall time of ``fn()`` (and what it returns), its compilations (all, and those over
        ``BIG`` seconds: the programs, not the small staging ops) and their total time."""
        self.durations, self.active = [], True
        t = time.perf_counter()
        try:
            out = fn() or {}
        finally:
            self.active = False
        return {
            "wall_s": time.perf_counter() - t,
            "compiles": len(self.durations),
            "program_compiles": sum(d > BIG for d in self.durations),
            "compile_events_s": sum(self.durations),
            **out,
        }


def measure(
    points: int,
    seeds: int,
    steps: int,
    separate: bool = True,
    base=None,
    sample: int = 0,
    vmapped: bool = True,
) -> dict[str, Any]:
    """The three ways timed; ``base``: the config (default experiments/configs/digits.py; the
    processes always run that file). ``sample`` > 0: the loop and the processes run only that
    many of the runs (spread over the learning rates) and are scaled to all runs
    (``estimated_from`` says from how many). ``vmapped``: where the engine maps its members one
    after another (the CPU default), also time it with the whole member axis vmapped."""
    rates = np.logspace(-4, -2, points)
    base = base or digits.get_config()
    base.steps, base.eval_every = steps, steps
    compiles = Compiles()
    out: dict[str, Any] = {"points": points, "seeds": seeds, "steps": steps, "runs": points * seeds}
    runs = [(i, s) for i in range(points) for s in range(seeds)]
    timed = runs
    if 0 < sample < len(runs):
        timed = [runs[j] for j in np.linspace(0, len(runs) - 1, sample).round().astype(int)]
    scale = len(runs) / len(timed)

    def scaled(result: dict[str, Any]) -> dict[str, Any]:
        """A one-run-at-a-time way's figures for all runs (compile once, steady state scaled)."""
        if scale == 1:
            return result
        compile_s = result.get("compile_s", 0.0)  # paid once, whatever the number of runs
        return {
            **result,
            "wall_s": compile_s + (result["wall_s"] - compile_s) * scale,
            "steady_s": result["steady_s"] * scale,
            "estimated_from": len(timed),
        }

    def sweep(members_per_batch: int | None = None) -> dict[str, float]:
        result = driver.run(
            base,
            [{"optimizer.learning_rate": float(r)} for r in rates],
            range(seeds),
            members_per_batch=members_per_batch,
        )
        return {"compile_s": result.compile_s, "steady_s": result.run_s}

    def loop() -> dict[str, float]:
        train = make_train(base, eval_at=())
        keys = driver.seed_keys(range(seeds))
        hparams = lambda i: {"optimizer.learning_rate": np.float32(rates[i])}
        t = time.perf_counter()
        compiled = jax.jit(train).lower(keys[0], hparams(0)).compile()
        compile_s = time.perf_counter() - t
        before = len(compiles.durations)
        t = time.perf_counter()
        for i, s in timed:
            jax.block_until_ready(compiled(keys[s], hparams(i))[1])
        steady_s = time.perf_counter() - t
        # Compilations while the runs ran (none: the program compiled once serves them all)
        return {"compile_s": compile_s, "steady_s": steady_s,
                "compiles_during_runs": len(compiles.durations) - before}  # fmt: skip

    start, t = report.cpu_seconds(), time.perf_counter()
    out["members_per_batch"] = driver.default_members_per_batch()
    out["sweep"] = compiles.measure(sweep)
    out["loop"] = scaled(compiles.measure(loop))
    if vmapped and out["members_per_batch"] != 0:  # the whole member axis vmapped, for contrast
        out["sweep_vmapped"] = compiles.measure(lambda: sweep(0))
    # Both timed under the same conditions, one after the other; what else ran meanwhile:
    out["other_processes_busy_cores"] = report.other_load_cores(start, time.perf_counter() - t)
    if separate:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            env["JAX_COMPILATION_CACHE_DIR"] = str(work / "cache")
            env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
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
            out["processes"] = scaled({"wall_s": time.perf_counter() - t, "steady_s": np.nan})
    out["sweep_vs_loop_steady"] = out["sweep"]["steady_s"] / out["loop"]["steady_s"]
    out["sweep_vs_loop_compile"] = out["sweep"]["compile_s"] / out["loop"]["compile_s"]
    out["sweep_vs_loop_wall"] = out["sweep"]["wall_s"] / out["loop"]["wall_s"]
    if separate:
        out["sweep_vs_processes_wall"] = out["sweep"]["wall_s"] / out["processes"]["wall_s"]
    return out


def markdown_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['runs']} runs ({result['points']} learning rates x {result['seeds']} seeds, "
        f"{result['steps']} steps each, digits MLP):",
        "",
        "| how | compile | steady state | wall time | vs the loop (wall) | program compilations |",
        "|---|---|---|---|---|---|",
    ]
    base = result["loop"]["wall_s"]
    default = "vmapped" if result.get("members_per_batch", 0) == 0 else "mapped one by one"
    for name, how in (
        ("sweep", f"one program, members {default} (the engine's default)"),
        ("sweep_vmapped", "one program, all members vmapped (`members_per_batch=0`)"),
        ("loop", "`make_train` jitted once, a Python loop over the runs"),
        ("processes", "one `experiments.train` process per run, compilation cache on"),
    ):
        if name not in result:
            continue
        r = result[name]
        if "estimated_from" in r:
            how += f" (timed {r['estimated_from']} runs, scaled)"
        compile_s = f"{r['compile_s']:.1f} s" if "compile_s" in r else "-"
        steady = f"{r['steady_s']:.1f} s" if np.isfinite(r["steady_s"]) else "-"
        compiled = f"{r['program_compiles']:.0f}" if "program_compiles" in r else "-"
        lines.append(
            f"| {how} | {compile_s} | {steady} | {r['wall_s']:.1f} s | "
            f"{r['wall_s'] / base:.2f}x | {compiled} |"
        )
    lines += [
        "",
        f"Sweep against the loop: steady state {result['sweep_vs_loop_steady']:.2f}x, compile "
        f"{result['sweep_vs_loop_compile']:.2f}x.",
    ]
    if "sweep_vmapped" in result:
        v, loop = result["sweep_vmapped"], result["loop"]
        lines.append(
            f"All members vmapped against the loop: steady state "
            f"{v['steady_s'] / loop['steady_s']:.2f}x, compile "
            f"{v['compile_s'] / loop['compile_s']:.2f}x."
        )
    busy = result.get("other_processes_busy_cores")
    if busy is not None:
        lines.append(
            f"Other processes kept {busy:.2f} cores busy while the sweep and the loop ran."
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    provenance = report.Provenance("benchmarks.sweep")
    result = measure(
        _POINTS.value, _SEEDS.value, _STEPS.value, _SEPARATE.value, sample=_SAMPLE.value
    )
    out = Path(_OUT.value)
    text = markdown_table(result)
    report.write(out.parent, out.stem, result, text, provenance)  # OUT and OUT's .md
    print(text)
    print(f"\nWrote {out} and {out.with_suffix('.md')}.")


if __name__ == "__main__":
    # Flags are defined only when run as a binary: importing the module defines none.
    from absl import flags

    _POINTS = flags.DEFINE_integer("points", 16, "Learning rates (logspace(-4, -2)).")
    _SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per learning rate.")
    _STEPS = flags.DEFINE_integer("steps", 200, "Steps per run.")
    _SEPARATE = flags.DEFINE_bool("separate", True, "Also time one process per run.")
    _SAMPLE = flags.DEFINE_integer(
        "sample", 0, "Time only this many runs of the loop and the processes and scale (0: all)."
    )
    _OUT = flags.DEFINE_string("out", "docs/bench/sweep.json", "JSON output path.")
    app.run(main)
