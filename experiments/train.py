"""Trains one learning rule on one model and dataset; the logic lives in ``altlearn``.

    python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
    python -m experiments.train --config=experiments/configs/default.py:data=digits \
        --config.optimizer.learning_rate=1e-3 --workdir=runs/digits

Running the same command on a workdir that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from altlearn import runner
from altlearn.data import MissingDataError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Config file, optionally with :variant.",
    lock_config=True,
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
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary, indent=2))
    print(f"Results are in {_WORKDIR.value}: summary.json, metrics.jsonl, curves.png, "
          "tensorboard/, checkpoints/.")


if __name__ == "__main__":
    app.run(main)
