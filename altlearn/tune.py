"""One tuner for every binary: the grid of the keys a config has, on tuning seeds, chosen by a
validation figure.

    tuning = tune(config, ["optimizer.learning_rate=logspace(-4,-2,5)", "rule.sigma=[1e-3,1e-2]"])
    apply(config, tuning.chosen)

``size=N`` gives every method of a table the same number of grid points: a method without some
of the keys (backprop has no ``rule.sigma``) gets its first key's values refined between the
same ends (``refine``), so it is not tuned on fewer points than the others.

Every point of the grid (the ``--sweep`` forms of ``altlearn.sweep``) times every tuning seed
trains as one vmapped program (``altlearn.driver``); the point with the best mean FINAL figure
``by`` over the tuning seeds is chosen: the lowest ``val_loss`` (default), the highest
``val_accuracy``, or the lowest ``train_loss`` (for a claim about optimisation itself). A
non-finite figure (a diverged run) counts as the worst. Tuning seeds start at ``TUNE_SEEDS_FROM``
(1000), apart from the seeds a binary reports (0, 1, ...). Keys the config does not have as a
sweepable float (``rule.sigma`` for backprop, a swarm's ``optimizer.*``) are not tuned for it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from altlearn import config as config_lib
from altlearn import driver
from altlearn import sweep as sweep_lib
from altlearn.train import Experiment

TUNE_SEEDS_FROM = 1000  # tuning seeds 1000, 1001, ...: never the reported seeds 0, 1, ...
BY = {"val_loss": 1.0, "val_accuracy": -1.0, "train_loss": 1.0}  # sign: lower is better


class Tuning(NamedTuple):
    chosen: dict[str, float]  # the chosen point
    grid: list[dict[str, float]]  # every point
    scores: list[float]  # mean final ``by`` per point (over the tuning seeds)
    by: str
    seeds: list[int]  # the tuning seeds
    figures: dict[str, list[list[float]]]  # every final figure, [points][seeds]
    seconds: float

    def record(self) -> dict[str, Any]:
        return {**self._asdict(), f"mean_{self.by}": self.scores}


def check_by(by: str) -> None:
    if by not in BY:
        raise ValueError(f"--tune_by={by}: valid choices: {', '.join(BY)}.")


def tuning_seeds(count: int) -> list[int]:
    return list(range(TUNE_SEEDS_FROM, TUNE_SEEDS_FROM + count))


def applicable(config: ml_collections.ConfigDict, specs: Sequence[str]) -> list[str]:
    """The specs whose key ``config`` has as a sweepable float."""
    have = config_lib.hparams(config)
    return [s for s in specs if s.partition("=")[0].strip() in have]


def check_specs(configs: Sequence[ml_collections.ConfigDict], specs: Sequence[str]) -> None:
    """Refuses, before anything compiles, a spec whose key no config has as a sweepable float
    (naming those there are), malformed values, and a grid point a config's run would refuse
    (``Experiment.check_point``)."""
    for spec in specs:
        if not any(applicable(c, [spec]) for c in configs):
            known = sorted({k for c in configs for k in config_lib.hparams(c)})
            key = spec.partition("=")[0].strip()
            raise ValueError(
                f"--tune {spec}: {key!r} is no method's sweepable float; they are: "
                f"{', '.join(known)}."
            )
    for config in configs:
        mine = applicable(config, specs)
        if mine:
            axes = [sweep_lib.parse_axis(config, spec, int(config.seed), "--tune") for spec in mine]
            driver.check_points(Experiment(config), sweep_lib.points(axes)[1])


def grid_size(config: ml_collections.ConfigDict, specs: Sequence[str]) -> int:
    """The number of points of ``config``'s grid (the specs it has; 0 if none)."""
    mine = applicable(config, specs)
    axes = [sweep_lib.parse_axis(config, spec, int(config.seed), "--tune") for spec in mine]
    return len(sweep_lib.points(axes)[1]) if axes else 0


def refine(axes: list[sweep_lib.Axis], size: int) -> list[sweep_lib.Axis]:
    """``axes`` with the first one refined to ``size`` / (the others' points) values between the
    same ends (geometric if they are positive, else even), so a method that lacks some of the
    keys is tuned on as many points as one that has them all."""
    if not axes:
        return axes
    others = int(np.prod([len(a.values) for a in axes[1:]]))
    count = size // others
    first = axes[0]
    if count <= len(first.values):
        return axes
    low, high = min(first.values), max(first.values)
    if low > 0:
        values = np.geomspace(low, high, count)
    else:
        values = np.linspace(low, high, count)
    return [first._replace(values=tuple(float(v) for v in values)), *axes[1:]]


def ranked_scores(values: Any, by: str) -> np.ndarray:
    """Per point, the mean over seeds of ``values`` [points, seeds] signed so that lower is
    better (``BY``), a non-finite figure (a diverged run) counting as the worst: what ``tune``
    chooses by (the argmin)."""
    values = np.asarray(values, np.float64)
    return np.where(np.isfinite(values), BY[by] * values, np.inf).mean(axis=1)


def tune(
    config: ml_collections.ConfigDict,
    specs: Sequence[str],
    seeds: int | Sequence[int] = 1,
    by: str = "val_loss",
    size: int = 0,
    **run_options: Any,
) -> Tuning | None:
    """The point of the grid ``specs`` (the keys ``config`` has) with the best mean final
    ``by`` over the tuning ``seeds`` (a count: ``TUNE_SEEDS_FROM`` on; or the seeds). None if no
    key applies. ``size``: refine the grid to this many points if it has fewer (``refine``: the
    same grid size for every method of a table). ``run_options`` go to ``driver.run``
    (``memory_budget_mb``, ``dataset``...)."""
    check_by(by)
    mine = applicable(config, specs)
    if not mine:
        return None
    seeds = tuning_seeds(seeds) if isinstance(seeds, int) else [int(s) for s in seeds]
    axes = [sweep_lib.parse_axis(config, spec, int(config.seed), "--tune") for spec in mine]
    axes = refine(axes, size)
    grid = sweep_lib.points(axes)[1]
    t = time.perf_counter()
    runs = driver.run(config, grid, seeds, eval_at=(), **run_options)
    if by == "val_accuracy" and by not in runs.curves:
        raise ValueError("--tune_by=val_accuracy needs a classification dataset; use val_loss.")
    if by not in runs.curves:
        raise ValueError(f"--tune_by={by}: this run has no {by} (an empty validation split?).")
    scores = ranked_scores(runs.final(by), by)
    best = int(np.argmin(scores))
    figures = {k: runs.final(k).tolist() for k in runs.curves if k != "step"}
    return Tuning(
        grid[best],
        grid,
        (BY[by] * scores).tolist(),
        by,
        seeds,
        figures,
        time.perf_counter() - t,
    )


def apply(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets the chosen values in ``config``."""
    for key, value in values.items():
        config_lib.set_key(config, key, value)
