"""Backprop on scikit-learn's digits (8x8 images, 10 classes) with an MLP 64-256-256-10.

Command:
    python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits
Expected: about 10 s on 2 CPU cores; test accuracy about 0.98.
"""

from altlearn.config import base_config, parse_variant


def get_config(arg: str | None = None):
    variant = {"data": "digits", **parse_variant(arg)}
    config = base_config(**variant)
    config.steps = 1000
    config.batch_size = 64
    config.eval_every = 250
    config.optimizer.learning_rate = 1e-3
    return config
