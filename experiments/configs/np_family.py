"""The node perturbation family against backprop (paper 003; docs/RULES.md).

The variant picks the method, the dataset and the scale:
    --config=experiments/configs/np_family.py:method=danp,data=digits
    --config=experiments/configs/np_family.py:method=danp,data=cifar10,scale=paper

methods: bp, dbp (BP through decorrelated layers), np, anp, inp, dnp, danp, dinp (node
perturbation, finite-difference form; add mode=jvp for the directional-derivative form),
fg (forward gradient), wp (weight perturbation). every=K updates the decorrelation matrices
every K steps only (amortising their cost). noise=S makes the network a noisy system (intrinsic
node noise of std S that no rule can read); sigma=X overrides the injected node noise.
rng=on|off|auto|jax sets the threefry mode of the noise (rule.rng_partitionable; default auto:
the classic mode on CPU; rng=on reproduces tables measured before that default, 2026-11-23).
dist=normal|rademacher sets the noise's distribution (rule.noise_distribution; default the rules'
own, rademacher since 2026-12-06; dist=normal reproduces tables measured before that).

scale=cpu (default): MLP in-256-256-256-out, leaky ReLU 0.2, batch 128, 3000 steps, Adam 1e-3,
sigma 1e-2, eta_R 1e-3; digits or mnist1d. About 10-60 s per run on 2 CPU cores (inp and dinp
cost 1 + 4 forward passes per step). Expected test accuracy on digits: BP ~0.97, DANP within
about a point of it, NP below ANP below DANP (docs/RESULTS.md has the measured table).

scale=paper: the paper's settings for machines with the data and an accelerator: MLP
in-1024-1024-1024-out, batch 1000, 50 epochs, Adam 1e-4 (1e-3 for DBP), sigma 1e-3, eta_R 1e-3,
pixels / 255 with no standardisation (data=cifar10 or mnist, files in data/).
"""

from altlearn.config import base_config, parse_keyed_variant

METHODS = {
    "bp": ("backprop", {}, False),
    "dbp": ("backprop", {}, True),
    "np": ("node_perturbation", {"variant": "np"}, False),
    "anp": ("node_perturbation", {"variant": "anp"}, False),
    "inp": ("node_perturbation", {"variant": "inp"}, False),
    "dnp": ("node_perturbation", {"variant": "np"}, True),
    "danp": ("node_perturbation", {"variant": "anp"}, True),
    "dinp": ("node_perturbation", {"variant": "inp"}, True),
    "fg": ("forward_gradient", {}, False),
    "wp": ("weight_perturbation", {}, False),
}
TRAIN_SIZES = {"cifar10": 50000, "mnist": 60000, "fashion_mnist": 60000}


def parse(arg: str | None) -> dict[str, str]:
    out = {
        "method": "danp",
        "data": "digits",
        "scale": "cpu",
        "mode": "finite_difference",
        "every": "1",
        "noise": "0",
        "sigma": "",
        "rng": "",
        "dist": "",
    }
    out = parse_keyed_variant(arg, out, METHODS)
    if out["scale"] not in ("cpu", "paper"):
        raise ValueError(f"Unknown scale {out['scale']!r}; valid choices: cpu, paper.")
    return out


def get_config(arg: str | None = None):
    v = parse(arg)
    rule, options, decorrelated = METHODS[v["method"]]
    config = base_config(rule=rule, model="mlp", data=v["data"])
    config.model.activation = "leaky_relu"
    config.model.negative_slope = 0.2
    config.model.decorrelation = decorrelated
    for key, value in options.items():
        config.rule[key] = value
    if rule == "node_perturbation":
        config.rule.mode = v["mode"]
    if "num_noise_samples" in config.rule:
        # One noise sample per step, as paper 003 uses (the rules' defaults average 16, so that
        # they learn on any model with the default optimizer).
        config.rule.num_noise_samples = 1
    if v["scale"] == "cpu":
        config.model.widths = (256, 256, 256)
        config.batch_size = 128
        config.steps = 3000
        config.eval_every = 250
        config.optimizer.learning_rate = 1e-3
        sigma = 1e-2
    else:
        config.model.widths = (1024, 1024, 1024)
        config.batch_size = 1000
        config.steps = 50 * TRAIN_SIZES.get(v["data"], 50000) // 1000
        config.eval_every = 500
        config.data.standardize = "none"
        config.data.validation_fraction = 0.0
        config.optimizer.learning_rate = 1e-3 if v["method"] == "dbp" else 1e-4
        sigma = 1e-3
    if "sigma" in config.rule:
        config.rule.sigma = float(v["sigma"]) if v["sigma"] else sigma
    config.model.intrinsic_noise = float(v["noise"])
    config.rule.decorrelation_rate = 1e-3
    config.rule.decorrelation_every = int(v["every"])
    if v["rng"] and "rng_partitionable" in config.rule:  # the noise's threefry mode
        config.rule.rng_partitionable = v["rng"]
    if v["dist"] and "noise_distribution" in config.rule:  # backprop draws no noise
        config.rule.noise_distribution = v["dist"]
    return config
