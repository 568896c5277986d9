"""Closed-form alternating layer solves (paper 002, docs/RULES.md) against SGD and Adam.

The variant picks the method, the dataset, the hidden width and the learning rate:
    --config=experiments/configs/closed_form.py:method=closed_form,data=diabetes
methods: closed_form (one step = one alternation, full batch, float64), gd and adam_full
(full-batch SGD / Adam), sgd and adam (minibatch 64). data: diabetes (regression),
breast_cancer, wine, digits, mnist1d (one-hot targets), or csv:<path>.

Every method trains the same network (in-width-out, ReLU; width 32 by default) from the same
initialisation on the same loss (square loss, one-hot for classes; features and regression
targets standardised). The baselines' learning rate comes from the variant (lr=...); the grids
experiments/closed_form_compare.py searches are in that script.

Expected: on digits closed_form reaches train loss ~0.02 in 10 alternations (~2 s on 2 CPU
cores), test accuracy ~0.96 (docs/RESULTS.md has the measured comparison).
"""

from altlearn.config import base_config, parse_keyed_variant

METHODS = {
    # name: (optimizer, full batch)
    "closed_form": (None, True),
    "gd": ("sgd", True),
    "adam_full": ("adam", True),
    "sgd": ("sgd", False),
    "adam": ("adam", False),
}
FULL_BATCH = 1_000_000  # above every bundled training set: one batch is the whole set
MINIBATCH = 64


def parse(arg: str | None) -> dict[str, str]:
    return parse_keyed_variant(
        arg, {"method": "closed_form", "data": "diabetes", "width": "32", "lr": "1e-2"}, METHODS
    )


def get_config(arg: str | None = None):
    v = parse(arg)
    optimizer, full_batch = METHODS[v["method"]]
    rule = "closed_form" if optimizer is None else "backprop"
    config = base_config(rule=rule, model="mlp", data=v["data"])
    config.model.widths = (int(v["width"]),)
    config.model.activation = "relu"
    config.loss = "squared_error"
    config.batch_size = FULL_BATCH if full_batch else MINIBATCH
    config.optimizer.name = optimizer or "sgd"  # unused by closed_form
    config.optimizer.learning_rate = float(v["lr"])
    config.optimizer.weight_decay = 0.0
    config.steps = 30 if optimizer is None else 2000
    config.eval_every = 1 if optimizer is None else 200  # closed_form: a record per alternation
    return config
