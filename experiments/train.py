"""Trains one learning rule on one model and dataset; the logic lives in ``altlearn``.

    python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
    python -m experiments.train --config=experiments/configs/default.py:data=digits \\
        --config.optimizer.learning_rate=1e-3 --workdir=runs/digits

The config variant (after ':') picks the rule, model and dataset whose options the config then
carries, e.g. ``:rule=backprop,model=cnn,data=digits``. Running the same command on a workdir
that holds a checkpoint resumes from it.

Switching the rule or model from the command line: ``--config.rule.name=NAME`` (likewise
``--config.model.name=NAME``) on any config file replaces the file's ``rule`` (``model``)
section with that rule's options at their registry defaults, before any other override applies;
``--config.rule.OPTION=VALUE`` overrides of the new rule's options then apply, in whatever order
the flags come:

    python -m experiments.train --config=experiments/configs/digits.py \\
        --config.rule.particles_per_neuron=4 --config.rule.name=neuron_pso --workdir=runs/npso

Nothing the file set under ``rule.`` (``model.``) survives a switch, not even an option the new
rule shares by name: the file chose those values for its own rule (population.py's swarm sizes,
np_family.py's noise scale), so pass again as overrides the ones you want. Everything else the
file set (data, optimizer, steps, batch size, and the model when only the rule changes) stays.
Naming the rule or model the file already has changes nothing. An option the chosen rule or
model lacks, an unknown name or a missing config file is a one-line error naming the valid ones.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging

from altlearn import config as config_lib
from altlearn import runner
from altlearn.data import MissingDataError

DEFAULT_CONFIG = "experiments/configs/default.py"

if __name__ == "__main__":
    # The config is built here, with the rule and model switched, before ml_collections reads
    # the overrides: their types come from the config it is given.
    try:
        _CONFIG, _ARGV = config_lib.define_config_flag(sys.argv, DEFAULT_CONFIG)
    except ValueError as e:
        sys.exit(f"error: {e}")
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
    app.run(main, argv=_ARGV)
