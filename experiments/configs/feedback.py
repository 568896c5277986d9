"""The feedback-alignment family and PEPITA against backprop (docs/RULES.md).

The variant picks the method, the setting, the dataset and the scale:
    --config=experiments/configs/feedback.py:method=kp,setting=cnn,data=digits
    --config=experiments/configs/feedback.py:method=fa,setting=resnet,scale=paper

methods: bp (backprop), bp_decay (backprop with kp's decoupled weight decay: the control that
shows what kp's feedback adds beyond its regulariser), fa, dfa, usf, brsf, frsf, kp, pepita
(each the registered rule of that name, with its defaults). dfa and pepita need a layered
model (mlp, cnn), so they refuse setting=resnet.

scale=cpu (default), for 2 CPU cores:
  mlp: MLP in-256-256-out, ReLU, batch 128, Adam 1e-3, 2000 steps; data=digits, mnist1d, or a
    regression set (diabetes, friedman1: square loss).
  cnn: a LeNet-style CNN (5-wide convolutions of 6 and 16 channels, each pooled; dense 120-84),
    ReLU, batch 64, Adam 1e-3, 2000 steps; data=digits or mnist1d.
  resnet: ResNet-20's depth at a quarter of its width (4/8/16 channels, 3 blocks per stage),
    batch 64, Adam 1e-3, 1000 steps; data=digits (the wiring at CPU cost, not a result).

scale=paper, for a machine with the data files (data/) and an accelerator:
  cnn: the LeNet-style CNN on data=mnist (28x28), batch 128, Adam 1e-3, 20 epochs (9,375
    steps). A training step is about 0.47 GFLOP (3x XLA's count of the forward
    pass, 0.16 GFLOP at batch 128), 4.4 TFLOP a run: minutes on a GPU.
  resnet: ResNet-20 (16/32/64 channels, 3 blocks per stage; He et al. 2016's CIFAR-10 network
    without batch normalisation) on data=cifar10, batch 128, Adam 1e-3, 50 epochs (19,531
    steps). A training step is about 29 GFLOP (3x the forward pass's 9.6 GFLOP at
    batch 128), 560 TFLOP a run: about 3 hours per seed at the 50 GFLOP/s two CPU cores
    reach on convolutions, minutes on a GPU.
  mlp: the MLP in-1024-1024-1024-out on data=cifar10 or mnist, batch 128, Adam 1e-4, 50 epochs.
"""

from altlearn.config import base_config, parse_keyed_variant

METHODS = {
    "bp": ("backprop", {}),
    "bp_decay": ("backprop", {"weight_decay": 1e-3}),  # kp's default decay
    "fa": ("fa", {}),
    "dfa": ("dfa", {}),
    "usf": ("usf", {}),
    "brsf": ("brsf", {}),
    "frsf": ("frsf", {}),
    "kp": ("kp", {}),
    "pepita": ("pepita", {}),
}
LAYERED_ONLY = ("dfa", "pepita")
SETTINGS = ("mlp", "cnn", "resnet")
PAPER_DATA = {"mlp": "cifar10", "cnn": "mnist", "resnet": "cifar10"}
EPOCHS = {"mlp": 50, "cnn": 20, "resnet": 50}
TRAIN_SIZES = {"cifar10": 50000, "mnist": 60000}


def parse(arg: str | None) -> dict[str, str]:
    defaults = {"method": "fa", "setting": "mlp", "data": "", "scale": "cpu"}
    v = parse_keyed_variant(arg, defaults, METHODS)
    if v["setting"] not in SETTINGS:
        raise ValueError(f"Unknown setting {v['setting']!r}; valid choices: {', '.join(SETTINGS)}.")
    if v["scale"] not in ("cpu", "paper"):
        raise ValueError(f"Unknown scale {v['scale']!r}; valid choices: cpu, paper.")
    if v["setting"] == "resnet" and v["method"] in LAYERED_ONLY:
        raise ValueError(
            f"Method {v['method']!r} needs a layered model; setting resnet is not one "
            f"(valid methods for it: {', '.join(m for m in METHODS if m not in LAYERED_ONLY)})."
        )
    if not v["data"]:
        v["data"] = PAPER_DATA[v["setting"]] if v["scale"] == "paper" else "digits"
    return v


def get_config(arg: str | None = None):
    v = parse(arg)
    rule, options = METHODS[v["method"]]
    model = v["setting"]
    config = base_config(rule=rule, model=model, data=v["data"])
    for key, value in options.items():
        config.rule[key] = value
    config.optimizer.learning_rate = 1e-3
    if model == "mlp":
        config.model.widths = (256, 256)
    elif model == "cnn":
        config.model.channels = (6, 16)
        config.model.kernel_size = 5
        config.model.dense = (120, 84)
    else:
        config.model.blocks_per_stage = 3
        config.model.stage_channels = (4, 8, 16) if v["scale"] == "cpu" else (16, 32, 64)
    if v["scale"] == "cpu":
        config.batch_size = 64 if model != "mlp" else 128
        config.steps = 1000 if model == "resnet" else 2000
        config.eval_every = 200
    else:
        config.batch_size = 128
        if model == "mlp":
            config.model.widths = (1024, 1024, 1024)
            config.optimizer.learning_rate = 1e-4
        epochs, size = EPOCHS[model], TRAIN_SIZES.get(v["data"], 50000)
        config.steps = epochs * size // config.batch_size
        config.eval_every = size // config.batch_size  # once an epoch
    return config
