"""The feedback-alignment family and PEPITA, each against an independent float64 NumPy
computation on a 3-layer network (its own forward pass, softmax cross-entropy and error
signals, read from the weights and the feedback alone), and the identities that must hold
exactly: fa with B = W is backprop (on the MLP, the CNN and the residual network); usf on
weights of one magnitude per layer is backprop; dfa with one hidden layer and B = W_out^T is
backprop; brsf redraws its magnitudes every step, frsf never; kp's feedback converges to the
weights, fa's does not.

The layers are 6-5-4-3 so that a transposed matrix cannot even be applied, and a sign flip
or a wrong matrix changes every hidden layer's update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altlearn import losses, models
from altlearn.models import feedback_kernels
from altlearn.rules import _feedback, backprop, brsf, dfa, fa, frsf, kp, pepita, usf

TASK = losses.make_task("classification")
D, H1, H2, K, B = 6, 5, 4, 3, 16
NAMES = ("layer_0", "layer_1", "layer_2")


@pytest.fixture(scope="module")
def net():
    """MLP 6-5-4-3 with tanh, batch 16: (model, variables, batch, x and y in NumPy)."""
    model = models.mlp((D,), K, widths=(H1, H2), activation="tanh")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D))
    y = rng.integers(0, K, size=B)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    return model, variables, (jnp.asarray(x, jnp.float32), jnp.asarray(y)), x, y


def weights(variables):
    """[(W, b)] per layer, float64."""
    params = variables["params"]
    return [(np.float64(params[n]["kernel"]), np.float64(params[n]["bias"])) for n in NAMES]


def forward(layers, x):
    """Pre-activations and activities of the 3-layer tanh network: (a, h) per layer, h_3 = a_3."""
    a, h, out = [], [], x
    for i, (w, b) in enumerate(layers):
        a.append(out @ w + b)
        out = np.tanh(a[-1]) if i < 2 else a[-1]
        h.append(out)
    return a, h


def output_error(a3, y):
    """d(sum of per-sample cross-entropies)/d(logits): softmax minus one-hot, per sample."""
    p = np.exp(a3 - a3.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p - np.eye(K)[y]


def backward(layers, x, y, down):
    """The updates of the mean loss when the error is sent down layer l through ``down[l]`` (a
    matrix of W_l's shape used as delta_l down[l]^T): backprop for down[l] = W_l."""
    a, h = forward(layers, x)
    inputs = [x, h[0], h[1]]
    delta = output_error(a[2], y) / len(x)
    grads = [None, None, None]
    for i in (2, 1, 0):
        grads[i] = (inputs[i].T @ delta, delta.sum(0))
        if i:
            delta = (delta @ down[i].T) * (1 - np.tanh(a[i - 1]) ** 2)
    return grads


def estimate(rule, variables, batch, state=None, key=0):
    """The rule's gradient estimate, with its state (from init) or the estimator state given."""
    full = rule.init(jax.random.PRNGKey(1), variables)
    if state is not None:
        full = full._replace(estimator=state)
    grads, _, _ = jax.jit(rule.estimate)(jax.random.PRNGKey(key), variables, full, batch)
    return grads


def assert_updates(grads, expected, rtol=1e-4):
    for name, (w, b) in zip(NAMES, expected):
        np.testing.assert_allclose(grads[name]["kernel"], w, rtol=rtol, atol=1e-7)
        np.testing.assert_allclose(grads[name]["bias"], b, rtol=rtol, atol=1e-7)


def fixed(matrices):
    """A feedback state {layer: {'kernel': B}} from float64 matrices."""
    return {n: {"kernel": jnp.asarray(m, jnp.float32)} for n, m in zip(NAMES, matrices)}


def random_matrices(seed, layers):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=w.shape) for w, _ in layers]


def build(factory, model, **options):
    return factory(model, TASK, optax.sgd(1.0), {}, **options)


# ------------------------------------------------------------------ against NumPy references


def test_fa_sends_the_error_down_through_its_fixed_matrices(net):
    model, variables, batch, x, y = net
    layers = weights(variables)
    bs = random_matrices(1, layers)
    grads = estimate(build(fa.fa, model), variables, batch, fixed(bs))
    assert_updates(grads, backward(layers, x, y, bs))


def test_fa_draws_its_feedback_once_at_the_models_scale(net):
    model, variables, batch, *_ = net
    rule = build(fa.fa, model, feedback_scale=2.0)
    state = rule.init(jax.random.PRNGKey(3), variables)
    for name, (w, _) in zip(NAMES, weights(variables)):
        b = np.asarray(state.estimator[name]["kernel"])
        assert b.shape == w.shape
        assert 0.5 < np.std(b) / (2.0 * np.sqrt(2.0 / w.shape[0])) < 1.5  # twice He's std
    _, stepped, _ = jax.jit(rule.step)(jax.random.PRNGKey(4), variables, state, batch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stepped.estimator, state.estimator)


def test_usf_sends_the_error_down_through_the_signs_at_one_magnitude(net):
    model, variables, batch, x, y = net
    layers = weights(variables)
    signs = [np.sqrt(2.0 / sum(w.shape)) * np.sign(w) for w, _ in layers]
    grads = estimate(build(usf.usf, model), variables, batch)
    assert_updates(grads, backward(layers, x, y, signs))


def test_frsf_keeps_its_magnitudes_and_brsf_redraws_them(net):
    model, variables, batch, x, y = net
    layers = weights(variables)
    magnitudes = random_matrices(2, layers)
    rule = build(frsf.frsf, model)
    down = [np.abs(r) * np.sign(w) for r, (w, _) in zip(magnitudes, layers)]
    for key in (0, 1):  # the step's key does not change frsf's feedback
        assert_updates(
            estimate(rule, variables, batch, fixed(magnitudes), key), backward(layers, x, y, down)
        )
    redrawn = build(brsf.brsf, model)
    g0, g1 = (estimate(redrawn, variables, batch, key=k) for k in (0, 1))
    assert not np.allclose(g0["layer_0"]["kernel"], g1["layer_0"]["kernel"])
    np.testing.assert_array_equal(g0["layer_2"]["kernel"], g1["layer_2"]["kernel"])  # no B above


def test_brsf_averages_to_sign_feedback_of_the_mean_magnitude(net):
    """E|R| = s sqrt(2 / pi) with R ~ N(0, s^2), drawn independently per layer: the mean of
    brsf's updates over many steps' keys is the sign-feedback update with that magnitude (the
    update of layer 0 is bilinear in the two layers' independent feedback)."""
    model, variables, batch, x, y = net
    layers = weights(variables)
    rule = build(brsf.brsf, model)
    state = rule.init(jax.random.PRNGKey(1), variables)
    keys = jax.random.split(jax.random.PRNGKey(5), 20_000)
    one = lambda k: rule.estimate(k, variables, state, batch)[0]
    mean = jax.tree_util.tree_map(lambda g: np.mean(g, 0), jax.jit(jax.vmap(one))(keys))
    down = [np.sqrt(2.0 / np.pi) * np.sqrt(2.0 / sum(w.shape)) * np.sign(w) for w, _ in layers]
    expected = backward(layers, x, y, down)
    for name, (w, _) in zip(NAMES, expected):
        g = mean[name]["kernel"]
        cosine = np.sum(g * w) / np.linalg.norm(g) / np.linalg.norm(w)
        assert cosine > 0.999 and 0.97 < np.linalg.norm(g) / np.linalg.norm(w) < 1.03, name


def test_dfa_sends_the_output_error_to_every_hidden_layer(net):
    model, variables, batch, x, y = net
    layers = weights(variables)
    rng = np.random.default_rng(3)
    direct = [rng.normal(size=(K, H1)), rng.normal(size=(K, H2))]
    state = {
        "layer_0": jnp.asarray(direct[0], jnp.float32),
        "layer_1": jnp.asarray(direct[1], jnp.float32),
    }
    grads = estimate(build(dfa.dfa, model), variables, batch, state)
    a, h = forward(layers, x)
    e = output_error(a[2], y) / B
    d2 = (e @ direct[1]) * (1 - h[1] ** 2)
    d1 = (e @ direct[0]) * (1 - h[0] ** 2)
    expected = [(x.T @ d1, d1.sum(0)), (h[0].T @ d2, d2.sum(0)), (h[1].T @ e, e.sum(0))]
    assert_updates(grads, expected)


def test_pepita_learns_from_the_difference_of_two_forward_passes(net):
    model, variables, batch, x, y = net
    layers = weights(variables)
    projection = np.random.default_rng(4).normal(size=(K, D))
    grads = estimate(
        build(pepita.pepita, model), variables, batch, jnp.asarray(projection, jnp.float32)
    )
    a, h = forward(layers, x)
    e = output_error(a[2], y)  # per sample
    x_mod = x + e @ projection
    _, h_mod = forward(layers, x_mod)
    expected = [
        (x_mod.T @ (h[0] - h_mod[0]) / B, (h[0] - h_mod[0]).sum(0) / B),
        (h_mod[0].T @ (h[1] - h_mod[1]) / B, (h[1] - h_mod[1]).sum(0) / B),
        (h_mod[1].T @ e / B, e.sum(0) / B),
    ]
    assert_updates(grads, expected, rtol=1e-3)


def test_pepita_draws_its_projection_at_its_scale(net):
    model, variables, *_ = net
    rule = build(pepita.pepita, model, feedback_scale=0.5)
    f = np.asarray(rule.init(jax.random.PRNGKey(0), variables).estimator)
    bound = 0.5 * np.sqrt(6.0 / D)
    assert f.shape == (K, D) and np.abs(f).max() <= bound and np.abs(f).max() > 0.8 * bound


# ------------------------------------------------------------------ identities with backprop


def exact(model, variables, batch):
    return estimate(build(backprop.backprop, model), variables, batch)


def assert_same(a, b):
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7), a, b
    )


@pytest.mark.parametrize(
    "name,options",
    [
        ("mlp", {"widths": (5, 4)}),
        ("cnn", {"channels": (3, 4), "dense": (5,)}),
        ("resnet", {"stage_channels": (2, 3), "blocks_per_stage": 2}),
    ],
)
def test_fa_with_feedback_equal_to_the_weights_is_backprop(name, options):
    model = models.make_model(name, (8, 8, 1), 3, **options)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    batch = (x, jnp.asarray(rng.integers(0, 3, size=4)))
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    if name == "resnet":  # the zero-initialised convolutions: give every kernel weight
        params = jax.tree_util.tree_map(
            lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
            variables["params"],
        )
        variables = {**variables, "params": params}
    grads = estimate(build(fa.fa, model), variables, batch, feedback_kernels(variables["params"]))
    assert_same(grads, exact(model, variables, batch))
    # The output layer's feedback flipped: every cotangent below it flips, so every kernel's
    # update but the output layer's (the last kernel) changes sign.
    leaves, tree = jax.tree_util.tree_flatten(feedback_kernels(variables["params"]))
    flipped = jax.tree_util.tree_unflatten(tree, [*leaves[:-1], -leaves[-1]])
    wrong = estimate(build(fa.fa, model), variables, batch, flipped)
    right_kernels = jax.tree_util.tree_leaves(feedback_kernels(grads))
    wrong_kernels = jax.tree_util.tree_leaves(feedback_kernels(wrong))
    for right, flip in zip(right_kernels[:-1], wrong_kernels[:-1]):
        np.testing.assert_allclose(flip, -right, rtol=1e-5, atol=1e-7)
        assert np.abs(right).max() > 1e-6


def test_usf_on_weights_of_one_magnitude_per_layer_is_backprop(net):
    model, variables, batch, *_ = net
    signed = lambda w: np.sqrt(2.0 / sum(w.shape)) * jnp.sign(w)
    params = {n: {**p, "kernel": signed(p["kernel"])} for n, p in variables["params"].items()}
    variables = {**variables, "params": params}
    assert_same(estimate(build(usf.usf, model), variables, batch), exact(model, variables, batch))


def test_dfa_with_one_hidden_layer_and_the_output_weights_is_backprop(net):
    *_, batch, x, y = net
    model = models.mlp((D,), K, widths=(H1,), activation="tanh")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    state = {"layer_0": variables["params"]["layer_1"]["kernel"].T}
    grads = estimate(build(dfa.dfa, model), variables, batch, state)
    assert_same(grads, exact(model, variables, batch))


# ------------------------------------------------------------------ Kolen-Pollack and angles


def test_kp_feedback_follows_the_updates_and_the_gap_decays(net):
    """One step: B - W shrinks by exactly (1 - lambda), kernel by kernel."""
    model, variables, batch, *_ = net
    rule = build(kp.kp, model, weight_decay=0.1)
    state = rule.init(jax.random.PRNGKey(1), variables)
    new, state2, _ = jax.jit(rule.step)(jax.random.PRNGKey(2), variables, state, batch)
    gap = lambda v, s: jax.tree_util.tree_map(
        jnp.subtract, s.estimator, feedback_kernels(v["params"])
    )
    jax.tree_util.tree_map(
        lambda g1, g0: np.testing.assert_allclose(g1, 0.9 * g0, rtol=1e-4, atol=1e-6),
        gap(new, state2),
        gap(variables, state),
    )


def test_kp_aligns_its_feedback_and_fa_stays_far(net):
    """On the small problem, 300 Adam steps: kp's mean angle between B and W falls far below
    its start (about 90 degrees) and below fa's, which stays near its start."""
    model, variables, batch, *_ = net

    def angle_after(factory, **options):
        rule = factory(model, TASK, optax.adam(1e-2), {}, **options)
        state = rule.init(jax.random.PRNGKey(1), variables)

        def body(carry, key):
            v, s = carry
            v, s, _ = rule.step(key, v, s, batch)
            return (v, s), None

        (v, s), _ = jax.lax.scan(
            body, (variables, state), jax.random.split(jax.random.PRNGKey(0), 300)
        )
        before = rule.report(variables, state, {})["feedback_angle"]
        return float(before), float(rule.report(v, s, {})["feedback_angle"])

    kp_before, kp_after = angle_after(kp.kp, weight_decay=0.02)
    fa_before, fa_after = angle_after(fa.fa)
    assert kp_before > 70 and fa_before > 70
    assert kp_after < 30 and kp_after < fa_after - 30, (kp_after, fa_after)


def test_angles_are_zero_for_the_weights_and_ninety_for_orthogonal_feedback():
    w = {"a": {"kernel": jnp.eye(2)}, "b": {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]])}}
    params = {
        "a": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)},
        "b": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.zeros(2)},
    }
    out = _feedback.angles(w, params)
    np.testing.assert_allclose(out["feedback_angle/a"], 0.0, atol=1e-3)
    np.testing.assert_allclose(out["feedback_angle/b"], 90.0, atol=1e-3)
    assert float(out["feedback_angle"]) == pytest.approx(90.0, abs=1e-3)  # the first left out


def test_resnet20_has_its_depth():
    model = models.make_model(
        "resnet", (32, 32, 3), 10, stage_channels=(16, 32, 64), blocks_per_stage=3
    )
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    kernels = jax.tree_util.tree_leaves(feedback_kernels(variables["params"]))
    window = [k for k in kernels if k.ndim == 4 and k.shape[0] == 3]
    assert len(window) + 1 == 20  # 19 3x3 convolutions and the dense layer (1x1 shortcuts apart)
    assert sum(
        int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables)
    ) == pytest.approx(0.27e6, rel=0.05)


# ------------------------------------------------------------------ through the runner


@pytest.mark.parametrize("rule", ["kp"])
def test_feedback_state_is_checkpointed_and_a_resumed_run_is_bit_exact(tmp_path, rule):
    """kp's learned feedback: a run interrupted after its step-4 checkpoint and resumed ends
    exactly where the uninterrupted run does."""
    from conftest import figures, tiny_config

    from altlearn import runner

    config = tiny_config(rule, steps=8, eval_every=4)

    def stop_at_4(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    runner.run(config, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        runner.run(config, tmp_path / "cut", on_eval=stop_at_4)
    runner.run(config, tmp_path / "cut")
    assert figures(tmp_path / "cut") == figures(tmp_path / "whole")


# ------------------------------------------------------------------ the experiment config


@pytest.mark.parametrize("setting", ["mlp", "cnn", "resnet"])
def test_feedback_configs_are_valid_in_every_setting_and_at_paper_scale(setting):
    from altlearn import config as config_lib
    from experiments.configs import feedback

    for method in feedback.METHODS:
        if setting == "resnet" and method in feedback.LAYERED_ONLY:
            with pytest.raises(
                ValueError, match=r"layered model; .* \(valid methods for it: bp, bp_decay, fa"
            ):
                feedback.get_config(f"method={method},setting={setting}")
            continue
        config = feedback.get_config(f"method={method},setting={setting}")
        config_lib.validate(config)
        paper = feedback.get_config(f"method={method},setting={setting},scale=paper")
        config_lib.validate(paper)
    resnet = feedback.get_config("method=fa,setting=resnet,scale=paper")
    assert (resnet.data.name, tuple(resnet.model.stage_channels)) == ("cifar10", (16, 32, 64))
    assert feedback.get_config("method=bp_decay").rule.weight_decay > 0
    with pytest.raises(ValueError, match="valid choices: mlp, cnn, resnet"):
        feedback.get_config("setting=vit")


def test_bad_feedback_options_are_refused_before_anything_compiles(net):
    model, *_ = net
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        build(kp.kp, model, weight_decay=-0.1)
    with pytest.raises(ValueError, match="feedback_scale must be > 0, got 0"):
        build(fa.fa, model, feedback_scale=0)
