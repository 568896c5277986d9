"""Backprop + evolution phases (paper 004, docs/RULES.md) against backprop alone.

The variant picks the method, the dataset and the scale:
    --config=experiments/configs/hybrid.py                          (hybrid, digits, cpu)
    --config=experiments/configs/hybrid.py:method=bp,data=mnist1d
    --config=experiments/configs/hybrid.py:scale=paper              (VGG16, CIFAR-10)

methods: hybrid (elitist (1 + lambda) phases on all layers), reset (the same, the optimizer
state re-initialised when a phase is accepted), head (phases on the classifier head only),
no_selection (the same perturbations applied without selection), open_es (the phases run
evosax's Open_ES in the same space), bp (backprop alone), bp_matched (backprop alone
with extra steps that spend the forward passes the phases spent), bp_trainval (backprop alone
trained on the training AND validation samples: the labels the phases select on).

scale=cpu (default): the small CNN (3-wide convolutions of 16 and 32 channels, dense 64) on
digits (batch 64, 1500 steps) or mnist1d (batch 128, 3000 steps), or the MLP 30-64-64-2 on
breast_cancer (batch 32, 1000 steps), Adam 1e-3; a phase every 100
steps of 8 offspring x 2 generations, noise 0.01 x each layer's weight std, scored on 512
validation samples (data.validation_fraction 0.1). About 20 s (digits) / 60 s (mnist1d) per
run after compilation on 2 CPU cores.

scale=paper: the paper's setting for machines with the data and an accelerator: VGG16 (13 3x3
convolutions in the 64-128-256-512-512 layout, dense 512-512, batch norm-free) on CIFAR-10 read
from data/cifar-10-batches-py, batch 128, 50 epochs (19,550 steps at 45,000 training images),
SGD with momentum 0.9, learning rate 0.01 with a cosine decay; a phase every 391 steps (an
epoch) of 16 offspring x 2 generations on 5,000 validation images. Cost: 3 forward-pass
equivalents per step plus (1 + 32) x 5,000 / 128 = 1,289 batch forward passes per phase, about
a third more than backprop alone (the rule's cost, ``RuleSpec.cost``).

docs/RESULTS.md has the measured paired comparison (experiments/hybrid_study.py).
"""

from altlearn.config import base_config, parse_keyed_variant
from altlearn.rules import Sizes, resolve

METHODS = {
    # method: (rule, rule options)
    "hybrid": ("hybrid", {}),
    "reset": ("hybrid", {"on_accept": "reset"}),
    "head": ("hybrid", {"layers": ("head",)}),
    "no_selection": ("hybrid", {"select": False}),
    "open_es": ("hybrid", {"strategy": "Open_ES"}),
    "bp": ("backprop", {}),
    "bp_matched": ("backprop", {}),
    "bp_trainval": ("backprop", {}),
}
CPU = {
    # data: (batch, steps, model)
    "digits": (64, 1500, "cnn"),
    "mnist1d": (128, 3000, "cnn"),
    "breast_cancer": (32, 1000, "mlp"),
}
ES = {"es_every": 100, "es_generations": 2, "population_size": 8, "noise_scale": 0.01}
PAPER_ES = {"es_every": 391, "es_generations": 2, "population_size": 16, "val_size": 5000}


def parse(arg: str | None) -> dict[str, str]:
    v = parse_keyed_variant(arg, {"method": "hybrid", "data": "digits", "scale": "cpu"}, METHODS)
    if v["scale"] not in ("cpu", "paper"):
        raise ValueError(f"Unknown scale {v['scale']!r}; valid choices: cpu, paper.")
    if v["scale"] == "cpu" and v["data"] not in CPU:
        raise ValueError(f"scale=cpu runs data {', '.join(CPU)}; got {v['data']!r}.")
    return v


def hybrid_options(scale: str) -> dict:
    return {**ES, **(PAPER_ES if scale == "paper" else {})}


def get_config(arg: str | None = None):
    v = parse(arg)
    rule, options = METHODS[v["method"]]
    paper = v["scale"] == "paper"
    config = base_config(
        rule="hybrid" if rule == "hybrid" else "backprop",
        model="vgg" if paper else CPU[v["data"]][2],
        data="cifar10" if paper else v["data"],
    )
    config.data.validation_fraction = 0.1
    if paper:
        config.model.layout = "vgg16"
        config.batch_size = 128
        config.steps = 19_550
        config.optimizer.name = "momentum"
        config.optimizer.learning_rate = 1e-2
        config.optimizer.momentum = 0.9
        config.optimizer.schedule = "cosine"
        config.eval_every = 391
    else:
        if config.model.name == "cnn":
            config.model.channels = (16, 32)
            config.model.kernel_size = 3
            config.model.dense = (64,)
        else:
            config.model.widths = (64, 64)
        config.batch_size, config.steps, _ = CPU[v["data"]]
        config.optimizer.name = "adam"
        config.optimizer.learning_rate = 1e-3
        config.eval_every = 100
    es = hybrid_options(v["scale"])
    if rule == "hybrid":
        for key, value in {**es, **options}.items():
            config.rule[key] = value
    if v["method"] == "bp_matched":  # the phases' forward passes as extra backprop steps
        cost = resolve({"name": "hybrid", **es}).cost(None, Sizes(config.batch_size))
        extra = cost / 3.0 - 1.0
        config.steps = int(round(config.steps * (1.0 + extra)))
    if v["method"] == "bp_trainval":  # the validation labels the phases select on, trained on
        config.data.train_on_validation = True
    return config
