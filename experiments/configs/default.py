"""Backprop on mnist1d with an MLP 40-512-512-10 (what ``scripts/run`` runs).

Command:
    python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default
Other rules, models and data with the variant (their options get their defaults):
    --config=experiments/configs/default.py:rule=backprop,model=cnn,data=digits
Expected: about 20 s on 2 CPU cores (3000 steps, batch 128); test accuracy about 0.66 (the
published MLP baseline on mnist1d is 0.68). Learning rate and width chosen by validation accuracy
(docs/RESULTS.md).
"""

from altlearn.config import base_config, parse_variant


def get_config(arg: str | None = None):
    variant = parse_variant(arg)
    config = base_config(**variant)
    config.steps = 3000
    config.batch_size = 128
    config.eval_every = 500
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 3e-3
    if config.model.name == "mlp":
        config.model.widths = (512, 512)
    return config
