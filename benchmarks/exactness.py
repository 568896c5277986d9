"""How exact a sweep's row is: each point x seed of a sweep (the driver's one vmapped program)
against the same point trained alone by the checkpointed runner (``experiments.train``).

    python -m benchmarks.exactness --devices=8 --workdir=docs/bench --name=exactness_8dev
    python -m benchmarks.exactness --devices=1 --workdir=docs/bench --name=exactness_1dev

On the digits MLP (experiments/configs/digits.py, ``--steps`` steps), for backprop and node
perturbation: 3 learning rates x 2 seeds, one member per device with 8 devices (more devices
than members: each holds at most one) or all on one. Reported per rule: how many runs are
bit-equal to the run alone, and the largest absolute difference of the final train, val and
test loss and test accuracy. ``--devices`` fakes that many CPU devices (set before JAX starts).
"""

from __future__ import annotations

import os
import sys


def _devices(argv: list[str]) -> int:
    return int(next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "1"))


if __name__ == "__main__":  # before JAX starts: the fake CPU devices
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_devices(sys.argv)}"
    )

import tempfile  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from altlearn import config as config_lib  # noqa: E402
from altlearn import driver, report, runner  # noqa: E402

FIGURES = ("train_loss", "val_loss", "test_loss", "test_accuracy")
RATES = (1e-3, 3e-3, 1e-2)


def measure(rule: str, steps: int, seeds: int) -> dict:
    config = config_lib.load_config_file("experiments/configs/digits.py")
    config_lib.switch(config, rule=rule)
    config.steps, config.eval_every = steps, max(1, steps // 2)
    points = [{"optimizer.learning_rate": r} for r in RATES]
    runs = driver.run(config, points, seeds=range(seeds))
    equal, worst = 0, {k: 0.0 for k in FIGURES}
    for member, (p, s) in enumerate(runs.members):
        alone = config.copy_and_resolve_references()
        alone.optimizer.learning_rate, alone.seed = RATES[p], s
        alone.data.split_seed = int(config.seed)  # the sweep pins the split to the config's seed
        with tempfile.TemporaryDirectory() as workdir:
            summary = runner.run(alone, workdir)
        diffs = {k: abs(float(runs.curves[k][member, -1]) - summary[k]) for k in FIGURES}
        equal += all(d == 0 for d in diffs.values())
        worst = {k: max(worst[k], diffs[k]) for k in FIGURES}
    return {"runs": len(runs.members), "bit_equal": equal, "max_abs_diff": worst}


def main(argv: list[str]) -> None:
    del argv
    provenance = report.Provenance()
    try:
        report.prepare_workdir(_WORKDIR.value)
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = {
        "devices": jax.device_count(),
        "steps": _STEPS.value,
        "rules": {r: measure(r, _STEPS.value, 2) for r in ("backprop", "node_perturbation")},
    }
    lines = [
        f"{result['devices']} device(s), digits MLP, {result['steps']} steps, 3 learning rates x "
        "2 seeds: a sweep's row against the point trained alone.",
        "",
        "| rule | bit-equal runs | largest difference (train / val / test loss, test acc) |",
        "|---|---|---|",
    ]
    for rule, r in result["rules"].items():
        diffs = " / ".join(f"{r['max_abs_diff'][k]:.2g}" for k in FIGURES)
        lines.append(f"| {rule} | {r['bit_equal']} of {r['runs']} | {diffs} |")
    report.write(_WORKDIR.value, _NAME.value, result, "\n".join(lines), provenance)
    print("\n".join(lines))


if __name__ == "__main__":
    flags.DEFINE_integer("devices", 1, "Fake CPU devices (read before JAX starts).")
    _STEPS = flags.DEFINE_integer("steps", 20, "Steps of every run.")
    _WORKDIR = flags.DEFINE_string("workdir", "runs/exactness", "Where the outputs go.")
    _NAME = flags.DEFINE_string("name", "exactness", "Output file name (NAME.json, .md).")
    app.run(main)
