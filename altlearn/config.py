"""Experiment configs: defaults from the registries, validation, and sweepable hyperparameters.

A config is an ``ml_collections.ConfigDict`` with the keys

    seed, steps, batch_size, eval_every, eval_batch_size, loss, keep_checkpoints,
    rule.name (+ the rule's own options), model.name (+ the model's options),
    data.{name, data_dir, validation_fraction, standardize},
    optimizer.{name, learning_rate, momentum, weight_decay, schedule, warmup_steps}.

``base_config(rule, model, data)`` fills ``rule.*`` and ``model.*`` from the factories'
signatures, so every option of every rule and model is reachable from the command line.

Every float under ``rule`` and ``optimizer`` is a *sweepable hyperparameter*: it travels in
``TrainState.hparams`` as an array, so ``vmap`` over it trains a sweep in one compiled program.
Ints, strings, bools and tuples are structural and static.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from altlearn import data as data_lib
from altlearn import losses, models, optimizers, rules

HPARAM_SECTIONS = ("rule", "optimizer")
TOP_LEVEL_KEYS = {
    "seed",
    "steps",
    "batch_size",
    "eval_every",
    "eval_batch_size",
    "loss",
    "keep_checkpoints",
    "rule",
    "model",
    "data",
    "optimizer",
}
DATA_KEYS = {"name", "data_dir", "validation_fraction", "standardize"}
OPTIMIZER_KEYS = {"name", "learning_rate", "momentum", "weight_decay", "schedule", "warmup_steps"}


def _section(name: str, options: dict[str, Any]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, **options})


def base_config(
    rule: str = "backprop", model: str = "mlp", data: str = "mnist1d"
) -> ml_collections.ConfigDict:
    """The full default config for ``rule`` on ``model`` and ``data``."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 3000
    c.batch_size = 128
    c.eval_every = 500
    c.eval_batch_size = 1000
    c.loss = "auto"
    c.keep_checkpoints = 2
    c.rule = _section(rule, rules.options_of(rule))
    c.model = _section(model, models.model_options(model))
    c.data = ml_collections.ConfigDict(
        {"name": data, "data_dir": "", "validation_fraction": 0.1, "standardize": "auto"}
    )
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "adam",
            "learning_rate": 1e-3,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "schedule": "constant",
            "warmup_steps": 0,
        }
    )
    return c


def parse_variant(arg: str | None) -> dict[str, str]:
    """Parses a config-file argument like ``rule=backprop,model=cnn,data=digits``."""
    if not arg:
        return {}
    out = {}
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("rule", "model", "data"):
            raise ValueError(
                f"Bad config variant {item!r}: expected comma-separated rule=NAME, model=NAME, "
                "data=NAME (e.g. default.py:rule=backprop,model=cnn)."
            )
        out[key] = value
    return out


def parse_keyed_variant(
    arg: str | None, defaults: dict[str, str], methods: Any = None
) -> dict[str, str]:
    """Parses an experiment config's ``key=value,...`` variant over ``defaults``' keys.

    Unknown keys are refused naming the valid ones; with ``methods`` given, so is a ``method``
    value outside it (experiments/configs/np_family.py, population.py, closed_form.py).
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in out:
            raise ValueError(f"Bad variant {item!r}; keys: {', '.join(out)}.")
        out[key] = value
    if methods is not None and out.get("method") not in methods:
        raise ValueError(
            f"Unknown method {out.get('method')!r}; valid choices: {', '.join(methods)}."
        )
    return out


def _check_keys(where: str, present: set[str], valid: set[str], hint: str = "") -> None:
    unknown = sorted(present - valid)
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; valid keys: "
            f"{', '.join(sorted(valid))}.{hint}"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every name and key of ``config``; errors name the valid choices."""
    _check_keys("config", set(config.keys()), TOP_LEVEL_KEYS)
    rules.get_rule_spec(config.rule.name)
    hint = " (A config file made for another {0} carries its options: pick the {0} with the "
    hint += "config variant, e.g. --config=experiments/configs/default.py:{0}=NAME.)"
    _check_keys(
        "rule",
        set(config.rule.keys()),
        {"name", *rules.options_of(config.rule.name)},
        hint.format("rule"),
    )
    _check_keys(
        "model",
        set(config.model.keys()),
        {"name", *models.model_options(config.model.name)},
        hint.format("model"),
    )
    _check_keys("data", set(config.data.keys()), DATA_KEYS)
    _check_keys("optimizer", set(config.optimizer.keys()), OPTIMIZER_KEYS)
    if config.optimizer.name not in optimizers.OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {config.optimizer.name!r}; valid choices: "
            f"{', '.join(optimizers.OPTIMIZERS)}."
        )
    if config.optimizer.schedule not in optimizers.SCHEDULES:
        raise ValueError(
            f"Unknown schedule {config.optimizer.schedule!r}; valid choices: "
            f"{', '.join(optimizers.SCHEDULES)}."
        )
    if config.loss != "auto" and config.loss not in losses.LOSSES:
        raise ValueError(
            f"Unknown loss {config.loss!r}; valid choices: auto, {', '.join(losses.LOSSES)}."
        )
    name = config.data.name
    if name not in data_lib.DATASETS and not name.startswith("csv:"):
        raise ValueError(
            f"Unknown dataset {name!r}; valid choices: {', '.join(data_lib.dataset_names())}."
        )
    for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "keep_checkpoints"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {config[key]}.")
    if not config.optimizer.learning_rate > 0:
        raise ValueError(
            f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}."
        )


def _floats(node: Any, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in node.items():
        if isinstance(value, float):
            out[f"{prefix}.{key}"] = value
        elif hasattr(value, "items"):
            out.update(_floats(value, f"{prefix}.{key}"))
    return out


def hparams(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The sweepable hyperparameters: every float under ``rule`` and ``optimizer``, nested
    sections included (``rule.strategy_params.std_init``)."""
    out = {}
    for section in HPARAM_SECTIONS:
        out.update(_floats(config[section], section))
    return out


def _with(node: Any, prefix: str, hp: dict[str, Any]) -> dict:
    out = {}
    for key, value in node.items():
        name = f"{prefix}.{key}"
        out[key] = _with(value, name, hp) if hasattr(value, "items") else hp.get(name, value)
    return out


def section_with(config: ml_collections.ConfigDict, section: str, hp: dict[str, Any]) -> dict:
    """``config[section]`` as a dict (minus ``name``) with sweepable values taken from ``hp``;
    nested sections become plain dicts."""
    out = _with(config[section], section, hp)
    out.pop("name", None)
    return out
