"""Experiment configs: defaults from the registries, validation, and sweepable hyperparameters.

A config is an ``ml_collections.ConfigDict`` with the keys

    seed, steps, batch_size, eval_every, eval_batch_size, loss, keep_checkpoints,
    rule.name (+ the rule's own options), model.name (+ the model's options),
    data.{name, data_dir, validation_fraction, standardize, split_seed, train_on_validation},
    optimizer.{name, learning_rate, momentum, weight_decay, schedule, warmup_steps, cycles}.

``base_config(rule, model, data)`` fills ``rule.*`` and ``model.*`` from the factories'
signatures, so every option of every rule and model is reachable from the command line.
``switch(config, rule=..., model=...)`` rebuilds those sections for another rule or model, and
``define_config_flag`` gives a binary its ``--config`` flag: a config file whose
``--config.rule.name`` / ``--config.model.name`` overrides switch the section before the other
overrides apply (see experiments/train.py).

Every float under ``rule`` and ``optimizer`` is a *sweepable hyperparameter*: it travels in
``TrainState.hparams`` as an array, so ``vmap`` over it trains a sweep in one compiled program.
Ints, strings, bools and tuples are structural and static.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

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
DATA_KEYS = {
    "name",
    "data_dir",
    "validation_fraction",
    "standardize",
    "split_seed",
    "train_on_validation",
}
OPTIMIZER_KEYS = {
    "name",
    "learning_rate",
    "momentum",
    "weight_decay",
    "schedule",
    "warmup_steps",
    "cycles",
}


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
        {
            "name": data,
            "data_dir": "",
            "validation_fraction": 0.1,
            "standardize": "auto",
            "split_seed": -1,  # the validation split's seed; -1: the run's seed
            # True: train on the validation samples too (a control with the same labels as a
            # method that selects on them); the validation figures are then on seen data.
            "train_on_validation": False,
        }
    )
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "adam",
            "learning_rate": 1e-3,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "schedule": "constant",
            "warmup_steps": 0,
            "cycles": 1,
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
    rules.resolve(config.rule)  # the options of a rule the rule takes (rule.inner), checked
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


def ignored_sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The config sections the rule does not read: ``('optimizer',)`` for a rule that moves the
    parameters itself (``RuleSpec.uses_optimizer``), else none."""
    return () if rules.resolve(config.rule).uses_optimizer else ("optimizer",)


def hparams(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The sweepable hyperparameters: every float under ``rule`` and ``optimizer``, nested
    sections included (``rule.strategy_params.std_init``); not the optimizer's for a rule that
    does not use it (``ignored_sections``)."""
    out = {}
    ignored = ignored_sections(config)
    for section in HPARAM_SECTIONS:
        if section not in ignored:
            out.update(_floats(config[section], section))
    return out


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets the dotted ``key`` (``rule.strategy_params.std_init``) of ``config`` to ``value``."""
    *path, leaf = key.split(".")
    node = config
    for part in path:
        node = node[part]
    node[leaf] = value


def has_key(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether the dotted ``key`` is a key of ``config``."""
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def apply_sets(configs: list[ml_collections.ConfigDict], sets: list[str]) -> None:
    """``KEY=VALUE`` items (a binary's ``--set``) applied to every config that has KEY (the
    value read as a Python literal, else as a name), then every config validated; a KEY no
    config has is an error."""
    for item in sets:
        key, sep, text = item.partition("=")
        having = [c for c in configs if has_key(c, key.strip())]
        if not sep or not having:
            raise ValueError(f"--set {item}: give KEY=VALUE with a key the configs have.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare name
        for config in having:
            set_key(config, key.strip(), value)
    for config in configs:
        validate(config)


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


# The command line: config files, rule and model switches, and the --config flag.

SWITCHABLE = ("rule", "model")


def switch(
    config: ml_collections.ConfigDict, rule: str | None = None, model: str | None = None
) -> ml_collections.ConfigDict:
    """``config`` (changed in place) with its rule and/or model section rebuilt for another name:
    the name and that rule's (model's) options at their registry defaults.

    Options the config set for the old rule or model are dropped, not carried over, even where
    the new one has an option of the same name (a value chosen for one rule need not suit
    another). A name equal to the current one changes nothing: the section keeps what the config
    set. Unknown names are an error naming the valid ones.
    """
    if rule is not None and rule != config.rule.name:
        config.rule = _section(rule, rules.options_of(rule))
    if model is not None and model != config.model.name:
        config.model = _section(model, models.model_options(model))
    return config


def switch_inner(config: ml_collections.ConfigDict, names: dict[str, str | None]) -> None:
    """For a rule that takes another rule as an option (``rules.rule_valued_options``, e.g.
    persistent's ``inner``): ``names`` maps such an option to a rule name, whose section then
    replaces the option's at its defaults (as ``switch`` does for the rule itself)."""
    for key in rules.rule_valued_options(config.rule.name):
        name = names.get(key)
        if name is not None and name != config.rule[key].name:
            config.rule[key] = _section(name, rules.options_of(name))


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Calls ``get_config(variant)`` of the config file ``spec`` (``PATH`` or ``PATH:VARIANT``).

    A missing file is a ``ValueError`` naming the config files that exist beside it.
    """
    path, _, variant = spec.partition(":")
    return load_config_module(path).get_config(variant or None)


def load_config_module(path: str):
    """The config file at ``path`` as a module; a missing one is a ``ValueError`` naming the
    config files in its directory."""
    file = Path(path)
    if not file.is_file():
        folder = file.parent
        if folder.is_dir():
            found = sorted(p.name for p in folder.glob("*.py") if not p.name.startswith("_"))
            where = f"config files in {folder}: {', '.join(found) or '(none)'}"
        else:
            where = f"no directory {str(folder)!r}"
        raise ValueError(f"config file {path!r} not found; {where}.")
    module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot read config file {path!r} (expected a .py file).")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config(variant).")
    return module


def _flag_value(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    """The last value of ``--name=V`` / ``--name V`` in ``argv``, and ``argv`` without them."""
    value, rest, i = None, [], 0
    pattern = re.compile(rf"--?{re.escape(name)}(=(.*))?")
    while i < len(argv):
        match = pattern.fullmatch(argv[i]) if i else None  # argv[0] is the program
        if match and match[1] is not None:
            value = match[2]
        elif match and i + 1 < len(argv):
            value = argv[i + 1]
            i += 1
        else:
            rest.append(argv[i])
        i += 1
    return value, rest


def _check_override_keys(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """A ``--config.KEY`` override naming a key the config lacks is a ``ValueError`` naming the
    valid keys (ml_collections would fail on it with a bare traceback)."""
    for arg in argv[1:]:
        match = re.match(r"--?(no)?config\.([^=]+)", arg)
        if not match:
            continue
        key = match[2]
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(["config", *parts[:depth]])
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(none)"
                hint = ""
                if depth == 1 and parts[0] in SWITCHABLE:
                    kind = parts[0]
                    hint = (
                        f" (the options of {kind} {node.name!r}; pick another {kind} with "
                        f"--config.{kind}.name=NAME)"
                    )
                raise ValueError(
                    f"unknown config key {key!r} (from --config.{key}); valid keys of {where}: "
                    f"{valid}{hint}."
                )
            node = node[part]


def config_from_argv(argv: list[str], default: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The config a binary's command line names, before ml_collections applies its overrides,
    and the command line without ``--config=FILE``.

    Reads ``--config=PATH[:VARIANT]`` (or ``default``), switches the rule and model sections
    to the last ``--config.rule.name`` / ``--config.model.name`` given (``switch``), and checks
    that every ``--config.KEY`` override names a key of the result. Errors are ValueErrors
    that name the valid choices.
    """
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
    spec, argv = _flag_value(argv, "config")
    config = load_config_file(spec or default)
    names = {kind: _flag_value(argv, f"config.{kind}.name")[0] for kind in SWITCHABLE}
    switch(config, **names)
    inner = rules.rule_valued_options(config.rule.name)
    switch_inner(config, {k: _flag_value(argv, f"config.rule.{k}.name")[0] for k in inner})
    _check_override_keys(config, argv)
    return config, argv


def define_config_flag(
    argv: list[str],
    default: str,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> tuple[flags.FlagHolder, list[str]]:
    """Defines a binary's ``--config`` flag from its command line ``argv``.

    The config comes from ``config_from_argv``; ``--config.KEY=VALUE`` overrides then apply to
    it as ml_collections' config flags do. Returns the flag and the command line to parse
    (``app.run(main, argv=...)``): ``argv`` without ``--config=FILE``. Raises ``ValueError``
    for a missing config file, a bad variant, an unknown rule or model, or an unknown key.
    """
    config, argv = config_from_argv(argv, default)
    holder = config_flags.DEFINE_config_dict(
        "config",
        config,
        f"Config file, optionally with :variant (default {default}); then --config.KEY=VALUE "
        "overrides. --config.rule.name / --config.model.name switch the rule or model, its "
        "options at their defaults.",
        flag_values=flag_values,
        lock_config=True,
        sys_argv=argv,
    )
    return holder, argv
