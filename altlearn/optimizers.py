"""Optax optimizers by name, with learning-rate schedules.

Every numeric argument may be a traced value, so a sweep can ``vmap`` over the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": lambda lr, momentum, weight_decay: optax.sgd(lr),
    "momentum": lambda lr, momentum, weight_decay: optax.sgd(lr, momentum=momentum),
    "nesterov": lambda lr, momentum, weight_decay: optax.sgd(lr, momentum=momentum, nesterov=True),
    "adam": lambda lr, momentum, weight_decay: optax.adam(lr),
    "adamw": lambda lr, momentum, weight_decay: optax.adamw(lr, weight_decay=weight_decay),
}
SCHEDULES = ("constant", "cosine", "warmup_cosine", "cosine_restarts")


def make_schedule(
    learning_rate: Any, schedule: str, total_steps: int, warmup_steps: int, cycles: int = 1
):
    """Returns the learning rate (a number) or an optax schedule.

    ``cosine_restarts`` is SGDR (Loshchilov & Hutter, arXiv 1608.03983) with ``cycles`` equal
    cycles: the rate decays from ``learning_rate`` to 0 by a cosine within each cycle and jumps
    back at the start of the next (warm restarts; the optimizer state is kept).
    """
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    if schedule == "cosine_restarts":
        if int(cycles) < 1:
            raise ValueError(f"optimizer.cycles must be >= 1, got {cycles}.")
        length = max(total_steps // int(cycles), 1)
        decay = optax.cosine_decay_schedule(learning_rate, length)
        boundaries = [length * i for i in range(1, int(cycles))]
        return optax.join_schedules([decay] * int(cycles), boundaries)
    if schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(total_steps, warmup_steps + 1)
        )
    raise ValueError(f"Unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}.")


def make_optimizer(
    name: str,
    learning_rate: Any,
    *,
    momentum: Any = 0.9,
    weight_decay: Any = 1e-4,
    schedule: str = "constant",
    total_steps: int = 1,
    warmup_steps: int = 0,
    cycles: int = 1,
) -> optax.GradientTransformation:
    """Builds the optax optimizer ``name`` (one of OPTIMIZERS) with an optional schedule."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}.")
    lr = make_schedule(learning_rate, schedule, total_steps, warmup_steps, cycles)
    return OPTIMIZERS[name](lr, momentum, weight_decay)
