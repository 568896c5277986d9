"""What comparison binaries share: how long a method trains under a budget, and one method's
seeds trained and recorded (``experiments/compare.py``, ``experiments/leaderboard.py``).

Three budgets (``BUDGETS``), every method measured against a reference method's spend:
  steps:   the same number of training steps;
  passes:  the same forward-pass equivalents, counted in SAMPLES (a step costs the rule's
           ``step_cost`` passes over its batch; backward and jvp passes count 2), so a method
           that takes the whole training set per step is charged for it;
  seconds: the same wall time on this machine, all seeds vmapped, compilation apart
           (``driver.step_seconds``; ``driver.interleaved_step_seconds`` to time several
           methods fairly against each other).
"""

from __future__ import annotations

import ml_collections

from altlearn import driver, tune
from altlearn.train import Experiment

EVALUATIONS = 20  # per run, when no eval_every is given: enough points for a curve

BUDGETS = {
    "steps": "equal steps",
    "passes": "equal forward passes",
    "seconds": "equal training time",
}


def check_budgets(budgets) -> None:
    bad = [b for b in budgets if b not in BUDGETS]
    if bad or not budgets:
        raise ValueError(f"--budgets={','.join(budgets)}: valid choices: {', '.join(BUDGETS)}.")


def sample_passes(config: ml_collections.ConfigDict) -> float:
    """Forward-pass equivalents of one step, in samples: the rule's cost times its batch."""
    experiment = Experiment(config)
    return experiment.step_cost * experiment.batch_size


def spend(
    config: ml_collections.ConfigDict, seeds: int, budget: str, seconds_per_step: float = 0.0
) -> float:
    """What ``config``'s run spends at its steps: sample forward passes or seconds (0 for
    steps). ``seconds_per_step``: a time measured already (else ``driver.step_seconds``)."""
    if budget == "passes":
        return float(config.steps) * sample_passes(config)
    if budget == "seconds":
        per_step = seconds_per_step or driver.step_seconds(config, range(seeds))
        return float(config.steps) * per_step
    return 0.0


def budget_steps(
    config: ml_collections.ConfigDict,
    seeds: int,
    budget: str,
    value: float,
    seconds_per_step: float = 0.0,
) -> int:
    """The steps in which ``config`` spends ``value`` of ``budget`` (at least 1)."""
    if budget == "passes":
        return max(1, int(round(value / sample_passes(config), 9)))
    if budget == "seconds":
        per_step = seconds_per_step or driver.step_seconds(config, range(seeds))
        return max(1, int(round(value / per_step, 9)))  # the reference's own steps exactly
    return int(config.steps)


def set_steps(config, seeds: int, steps=None, eval_every=None, passes=0, seconds=0.0) -> None:
    """How long ``config`` trains: ``steps`` (default the config's) or the steps a budget gives
    (``driver.budget_steps``: ``passes`` of the config's batch, or ``seconds``), evaluated every
    ``eval_every`` (default ``EVALUATIONS`` times)."""
    if passes or seconds:
        steps = driver.budget_steps(config, range(seeds), passes, seconds)
    config.steps = int(steps or config.steps)
    config.eval_every = int(eval_every or -(-config.steps // EVALUATIONS))


def run_method(
    config: ml_collections.ConfigDict,
    seeds: int,
    tuned: tune.Tuning | None = None,
    seconds_per_step: float = 0.0,
) -> dict:
    """Trains the seeds 0..``seeds``-1 through the driver (``tuned``: the tuning that chose its
    values) and records the curves, the final figures, the cost and the time per step (measured
    here unless ``seconds_per_step`` is given)."""
    runs = driver.run(config, seeds=range(seeds))
    curves = [
        {"step": step, **{k: v[:, i].tolist() for k, v in runs.curves.items() if k != "step"}}
        for i, step in enumerate(runs.steps)
    ]
    return {
        "curves": curves,
        "final": curves[-1],
        "steps": int(config.steps),
        "forward_passes": runs.experiment.step_cost,
        "batch_size": runs.experiment.batch_size,
        "time_per_step_s": seconds_per_step or driver.step_seconds(config, range(seeds)),
        "compile_time_s": runs.compile_s,
        "run_time_s": runs.run_s,
        "tuned": tuned.record() if tuned else None,
        "config": config.to_dict(),
    }
