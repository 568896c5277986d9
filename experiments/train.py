"""Trains one learning rule on one model and dataset; the logic lives in ``altlearn``.

    python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
    python -m experiments.train --config=experiments/configs/default.py:data=digits \\
        --config.optimizer.learning_rate=1e-3 --workdir=runs/digits

The config variant (after ':') picks the rule, model and dataset whose options the config then
carries, e.g. ``:rule=backprop,model=cnn,data=digits``. Running the same command on a workdir
that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import importlib.util
import json
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from altlearn import runner
from altlearn.data import MissingDataError

DEFAULT_CONFIG = "experiments/configs/default.py"


def load_config(argv: list[str]):
    """The config named by --config in ``argv`` (or the default), before overrides."""
    spec = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_altlearn_config", path)
    if module_spec is None:
        sys.exit(f"error: cannot read config file {path!r}.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def check_overrides(argv: list[str]) -> None:
    """Exits with a clear error if a --config.KEY override names a key the config lacks.

    Runs before the config flag is defined: ml_collections applies overrides while defining it
    and would fail there with a bare traceback.
    """
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    try:
        config = load_config(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for key in overrides:
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(["config", *parts[:depth]])
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                sys.exit(
                    f"error: unknown config key {key!r} (from --config.{key}); valid keys of "
                    f"{where}: {valid}. A rule's or model's own options exist once it is picked "
                    "with the config variant, e.g. "
                    f"--config={DEFAULT_CONFIG}:rule=NAME,model=NAME."
                )
            node = node[part]


if __name__ == "__main__":
    check_overrides(sys.argv)

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, optionally with :variant.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where every output of the run goes.")
flags.mark_flag_as_required("workdir")


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO lines out of the progress log (warnings still show)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        summary = runner.run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, MissingDataError, runner.DivergenceError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary, indent=2))
    print(
        f"Results are in {_WORKDIR.value}: summary.json, metrics.jsonl, curves.png, "
        "tensorboard/, checkpoints/."
    )


if __name__ == "__main__":
    app.run(main)
