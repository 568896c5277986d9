"""Node perturbation family (paper 003): estimators against jax.grad, the layer-local
update, decorrelation, every variant learning, and noisy systems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat, run_program, small_net, tiny_config

from altlearn import data, losses, models, rules
from altlearn.rules.node_perturbation import _layer_local_grads
from altlearn.train import Experiment

TASK = losses.make_task("classification")


def _cos(a, b):
    a, b = flat(a), flat(b)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@pytest.fixture(scope="module")
def net():
    model = models.mlp((10,), 3, widths=(16, 12), activation="leaky_relu")
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 10))
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 3)
    return small_net(model, x, y)


def _estimates(model, variables, batch, num, **options):
    options.setdefault("num_noise_samples", 1)  # one sample per estimate, ``num`` estimates
    rule = rules.make_rule("node_perturbation", model, TASK, optax.sgd(0.1), **options)
    keys = jax.random.split(jax.random.PRNGKey(3), num)
    state = rule.init(jax.random.PRNGKey(4), variables)
    return jax.jit(jax.vmap(lambda k: rule.estimate(k, variables, state, batch)[0]))(keys)


@pytest.mark.parametrize("variant", ["np", "inp"])
def test_jvp_estimate_is_unbiased(net, variant):
    model, variables, batch, true = net
    est = _estimates(model, variables, batch, 3000, variant=variant, mode="jvp", sigma=1e-3)
    mean = jax.tree.map(lambda a: a.mean(0), est)
    assert _cos(mean, true) > 0.99
    # The magnitude is right too. Batch-averaging dl before use (the classic bug) would shrink
    # the expected estimate by the batch size (32 here) while leaving its direction unchanged.
    ratio = float(jnp.linalg.norm(flat(mean)) / jnp.linalg.norm(flat(true)))
    assert 0.9 < ratio < 1.1, ratio


def test_per_sample_loss_difference_is_not_batch_averaged(net):
    """With a single sample's loss changed, only that sample's error signal may change."""
    model, variables, (x, y), _ = net
    rule = rules.make_rule("node_perturbation", model, TASK, optax.sgd(0.1), mode="jvp")
    # Flip the label of sample 0 only: e_n for n != 0 depends on dl_n alone, so the update
    # from samples 1.. must be identical. Drop sample 0's input to isolate the others.
    key = jax.random.PRNGKey(7)
    y2 = y.at[0].set((y[0] + 1) % 3)
    x0 = x.at[0].set(0.0)
    state = rule.init(key, variables)
    g1 = rule.estimate(key, variables, state, (x0, y))[0]
    g2 = rule.estimate(key, variables, state, (x0, y2))[0]
    # First-layer weights see only inputs; sample 0 has z = 0 there, so its e contributes nothing.
    first = model.layer_names[0]
    np.testing.assert_allclose(g1[first]["kernel"], g2[first]["kernel"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("variant", ["np", "anp", "inp"])
def test_finite_difference_agrees_with_jvp_per_sample(net, variant):
    model, variables, batch, _ = net
    fd = _estimates(model, variables, batch, 4, variant=variant, sigma=1e-3)
    jvp = _estimates(model, variables, batch, 4, variant=variant, mode="jvp", sigma=1e-3)
    for i in range(4):
        one = lambda t, i=i: jax.tree.map(lambda a: a[i], t)
        assert _cos(one(fd), one(jvp)) > 0.99


def test_layer_local_update_is_z_transpose_e_for_a_dense_layer():
    model = models.mlp((5,), 3, widths=(4,))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
    variables = model.init(jax.random.PRNGKey(1), x)
    _, trace = model.apply_layered(variables, x)
    errors = [
        jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, a in enumerate(trace.preacts)
    ]
    grads = _layer_local_grads(model, variables["params"], trace.inputs, errors)
    for name, z, e in zip(model.layer_names, trace.inputs, errors):
        np.testing.assert_allclose(grads[name]["kernel"], -(z.T @ e) / 6, rtol=1e-5)
        np.testing.assert_allclose(grads[name]["bias"], -e.sum(0) / 6, rtol=1e-5)


def test_layer_local_update_with_backprop_errors_is_the_gradient_on_a_conv_net():
    """Fed the true per-sample errors e = -B dL/da, the local VJPs give exactly jax.grad."""
    model = models.cnn((12, 2), 3, channels=(4,), dense=(5,))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 12, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    variables = model.init(jax.random.PRNGKey(1), x)
    _, trace = model.apply_layered(variables, x)
    zeros = [jnp.zeros_like(a) for a in trace.preacts]
    loss = lambda noise: TASK.loss(model.apply_layered(variables, x, noise)[0], y).mean()
    errors = [-6 * g for g in jax.grad(loss)(zeros)]
    local = _layer_local_grads(model, variables["params"], trace.inputs, errors)
    true = jax.grad(lambda p: TASK.loss(model.apply({"params": p}, x), y).mean())(
        variables["params"]
    )
    for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(true)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _correlated_dataset():
    rng = np.random.default_rng(0)
    n, d = 600, 8
    common = rng.normal(size=(n, 1))
    x = (common + 0.3 * rng.normal(size=(n, d))).astype(np.float32)  # pairwise corr ~0.9
    y = (x[:, 0] - x[:, 1] > 0).astype(np.int32)
    x = (x - x.mean(0)) / x.std(0)
    empty = np.zeros((0, d), np.float32)
    return data.Dataset(
        "correlated", "classification", 2, x[:500], y[:500], empty, y[:0], x[500:], y[500:]
    )


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["node_perturbation", "backprop"])
def test_decorrelation_cuts_input_correlation_tenfold(rule):
    overrides = {"rule.decorrelation_rate": 5e-2}
    if rule == "node_perturbation":
        overrides["rule.num_noise_samples"] = 1
    config = tiny_config(rule, steps=300, **overrides)
    config.model.decorrelation = True
    experiment = Experiment(config, _correlated_dataset())
    state = experiment.init(jax.random.PRNGKey(0))
    before = float(jax.jit(experiment.evaluate)(state)["input_correlation/layer_0"])
    state, _ = jax.jit(experiment.train_steps, static_argnums=1)(state, 300)
    after = float(jax.jit(experiment.evaluate)(state)["input_correlation/layer_0"])
    assert before > 0.8
    assert after < before / 10, (before, after)


VARIANT_CASES = {
    "np": {"rule.variant": "np"},
    "np-jvp": {"rule.variant": "np", "rule.mode": "jvp"},
    "anp": {"rule.variant": "anp"},
    "inp": {"rule.variant": "inp"},
    "dnp": {"rule.variant": "np", "model.decorrelation": True},
    "danp": {"rule.variant": "anp", "model.decorrelation": True},
    "dinp": {"rule.variant": "inp", "model.decorrelation": True, "rule.num_noise_samples": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_every_variant_learns(case):
    """Digits, MLP 64-32-10, 300 steps of 64: train loss from ~3 to below 0.7, test acc > 0.8."""
    config = tiny_config(
        "node_perturbation",
        steps=300,
        **{
            "rule.sigma": 1e-2,
            "rule.num_noise_samples": 1,
            "optimizer.learning_rate": 3e-3,
            **VARIANT_CASES[case],
        },
    )
    metrics = run_program(config, 0, eval_at=())
    assert float(metrics["train_loss"][-1]) < 0.7
    assert float(metrics["test_accuracy"][-1]) > 0.8


@pytest.mark.slow
def test_activity_based_np_learns_in_a_noisy_system_where_np_fails():
    """Intrinsic node noise (std 0.05, unreadable by the rule) swamps NP's loss difference;
    ANP uses the observed activity change and learns, even with almost no injected noise."""

    def run(variant, sigma):
        config = tiny_config(
            "node_perturbation",
            steps=300,
            **{
                "rule.variant": variant,
                "rule.sigma": sigma,
                "rule.num_noise_samples": 1,
                "optimizer.learning_rate": 3e-3,
            },
        )
        config.model.intrinsic_noise = 0.05
        metrics = run_program(config, 0, eval_at=())
        return float(metrics["test_accuracy"][-1])

    assert run("anp", 1e-6) > 0.8
    assert run("np", 1e-2) < 0.5


@pytest.mark.parametrize(
    "options,match",
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": -1e-3}, "sigma must be > 0"),
        ({"variant": "xnp"}, "valid choices: np, anp, inp"),
        ({"mode": "spsa"}, "valid choices: finite_difference, jvp"),
        ({"num_noise_samples": 0}, "num_noise_samples must be >= 1"),
        ({"rng_partitionable": "fast"}, "valid choices: auto, on, off, jax"),
    ],
)
def test_bad_options_are_clear_errors(net, options, match):
    model = net[0]
    with pytest.raises(ValueError, match=match):
        rules.make_rule("node_perturbation", model, TASK, optax.sgd(0.1), **options)


def test_node_perturbation_refuses_a_forward_only_model():
    model = models.make_model("resnet", (8, 1), 2)
    with pytest.raises(ValueError, match="needs a layered model"):
        rules.make_rule("node_perturbation", model, TASK, optax.sgd(0.1))


@pytest.mark.parametrize("rule", ["node_perturbation", "weight_perturbation", "forward_gradient"])
def test_noise_is_drawn_in_the_configured_threefry_mode(net, rule):
    """``rng_partitionable``: "auto" is the classic threefry on CPU (bit-identical estimates to
    "off"); "on" draws another noise stream; both stay unbiased-shaped estimates."""
    model, variables, batch, true = net
    key = jax.random.PRNGKey(5)
    est = {}
    for mode in ("auto", "off", "on"):
        r = rules.make_rule(
            rule, model, TASK, optax.sgd(0.1), rng_partitionable=mode, num_noise_samples=1
        )
        state = r.init(key, variables)
        est[mode] = flat(jax.jit(r.estimate)(key, variables, state, batch)[0])
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(est["auto"], est["off"])
    assert not np.allclose(est["on"], est["off"])
    for mode in ("off", "on"):  # one sample of each still points along the gradient
        assert float(jnp.vdot(est[mode], flat(true))) > 0
