"""The leaderboard's settings: every registered rule on one model, data and schedule
(``experiments/leaderboard.py``; the table is docs/LEADERBOARD.md).

    --config=experiments/configs/leaderboard.py:method=fa,setting=mlp_digits

method: a registered rule by name (its defaults, except where a setting must change an option
so the rule does what it is for: below), or ``backprop_decay``, backprop with decoupled weight
decay, the control beside kp (whose feedback learns with the same decay).

settings (every rule in a setting trains the same network from the same initialisation on the
same batches, with Adam; sized so that the whole leaderboard takes about 90 minutes on 2 cores):
  mlp_digits:  scikit-learn digits, MLP 64-128-128-10, ReLU, batch 64, 300 steps.
  mlp_mnist1d: MNIST-1D, MLP 40-128-128-10, ReLU, batch 128, 300 steps.
  cnn_digits:  digits, a LeNet-style CNN (5-wide convolutions of 6 and 16 channels, each pooled;
               dense 120-84), ReLU, batch 64, 300 steps.
  regression:  Friedman #1 (10 features, 1 target), a two-layer ReLU network 10-32-1, square
               loss, batch 64, 300 steps: the one setting closed_form can train (it solves a
               two-layer ReLU network under the square loss), where it takes the whole training
               set per step, as it is designed.

``ABSENT`` names a rule left out of a setting it could train, with the measured reason.

Options a setting changes, and why:
  persistent: iteration_steps = steps / num_iterations, so that its restarts and penalty happen
    within the run (at its default 1000-step iterations a 300-step run is plain backprop).
  hybrid: es_every = steps / 6, so that six evolution phases happen.
  evolution: strategy_params.std_init set (to the first value the leaderboard tunes it over), so
    the key exists to be tuned.
  closed_form: batch_size above the training set (full batch).
"""

from altlearn.config import base_config, parse_keyed_variant
from altlearn.rules import RULES

STEPS = 300
SETTINGS = {
    # name: (data, model, widths or None, batch size)
    "mlp_digits": ("digits", "mlp", (128, 128), 64),
    "mlp_mnist1d": ("mnist1d", "mlp", (128, 128), 128),
    "cnn_digits": ("digits", "cnn", None, 64),
    "regression": ("friedman1", "mlp", (32,), 64),
}
ABSENT = {
    ("neuron_pso", "cnn_digits"): (
        "one step runs a 16-particle swarm for every unit and channel, 7,553 forward passes "
        "(2,500x backprop's); measured 2.3 s a step for 10 seeds vmapped on 2 cores, its 22 runs "
        "of 300 steps (tuning and reported seeds) would take 25 minutes, longer than every other "
        "rule of this setting together. It is in the three MLP settings."
    ),
}
CONTROLS = {"backprop_decay": ("backprop", {"weight_decay": 1e-3})}  # kp's default decay
METHODS = (*RULES, *CONTROLS)
FULL_BATCH = 1_000_000  # above every bundled training set
LEARNING_RATE = 1e-3  # the default before tuning


def parse(arg: str | None) -> dict[str, str]:
    v = parse_keyed_variant(arg, {"method": "backprop", "setting": "mlp_digits"}, METHODS)
    if v["setting"] not in SETTINGS:
        raise ValueError(f"Unknown setting {v['setting']!r}; valid choices: {', '.join(SETTINGS)}.")
    return v


def get_config(arg: str | None = None):
    v = parse(arg)
    rule, options = CONTROLS.get(v["method"], (v["method"], {}))
    data, model, widths, batch = SETTINGS[v["setting"]]
    config = base_config(rule=rule, model=model, data=data)
    for key, value in options.items():
        config.rule[key] = value
    config.model.activation = "relu"
    if widths is not None:
        config.model.widths = widths
    else:
        config.model.channels = (6, 16)
        config.model.kernel_size = 5
        config.model.dense = (120, 84)
    if v["setting"] == "regression":
        config.loss = "squared_error"
    config.batch_size = FULL_BATCH if rule == "closed_form" else batch
    config.steps = STEPS
    config.eval_every = STEPS // 10
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = LEARNING_RATE
    if rule == "persistent":
        config.rule.iteration_steps = STEPS // config.rule.num_iterations
    if rule == "hybrid":
        config.rule.es_every = STEPS // 6
    for spec in RULES[rule].search:  # a searched option the rule leaves unset (None) by default
        key, _, values = spec.partition("=")
        *path, leaf = key.strip().split(".")
        node = config.rule
        for part in path:
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if leaf not in node:
            node[leaf] = first_value(values)
    return config


def first_value(values: str) -> float:
    """The first value of a grid spec's list (``[0.01,0.05]``)."""
    return float(values.strip().strip("[]").split(",")[0])
