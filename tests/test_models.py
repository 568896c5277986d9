"""Models: the layered forward pass against a hand computation, node noise, jvp, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altlearn import losses, models
from altlearn.rules import make_rule
from altlearn.rules.base import decorrelation_update


def _leaky(x, slope=0.2):
    return np.where(x > 0, x, slope * x)


@pytest.fixture
def mlp_and_vars():
    model = models.mlp((3, 2), 4, widths=(5, 7), activation="leaky_relu", negative_slope=0.2)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3, 2))
    variables = model.init(jax.random.PRNGKey(0), x)
    return model, variables, x


def test_mlp_trace_matches_hand_computation_with_noise(mlp_and_vars):
    model, variables, x = mlp_and_vars
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    noise = [0.1 * jax.random.normal(k, (6, w)) for k, w in zip(keys, (5, 7, 4))]
    out, trace = model.apply_layered(variables, x, noise=noise)

    p = jax.tree.map(np.asarray, variables["params"])
    h = np.asarray(x).reshape(6, -1)
    for i in range(3):
        np.testing.assert_allclose(trace.inputs[i], h, rtol=1e-5, atol=1e-6)
        name = model.layer_names[i]
        a = h @ p[name]["kernel"] + p[name]["bias"] + np.asarray(noise[i])
        np.testing.assert_allclose(trace.preacts[i], a, rtol=1e-5, atol=1e-6)
        h = _leaky(a) if i < 2 else a  # the output layer has no activation
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, x), model.apply_layered(variables, x)[0])


def test_decorrelation_matrix_is_applied_to_layer_inputs():
    model = models.mlp((3,), 2, widths=(4,), decorrelation=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert set(variables) == {"params", "decorrelation"}
    np.testing.assert_array_equal(variables["decorrelation"]["layer_0"], np.eye(3))
    r = jax.random.normal(jax.random.PRNGKey(3), (3, 3))
    variables["decorrelation"]["layer_0"] = r
    _, trace = model.apply_layered(variables, x)
    np.testing.assert_allclose(trace.inputs[0], np.asarray(x) @ np.asarray(r).T, rtol=1e-5)


@pytest.mark.parametrize("batch,width", [(16, 3), (4, 10)])  # C R formed, and Z^T (Z R)
def test_decorrelation_update_follows_the_local_rule(batch, width):
    z = jax.random.normal(jax.random.PRNGKey(0), (batch, width))
    r = jnp.eye(width) + 0.1
    new = decorrelation_update({"layer_0": r}, {"layer_0": z}, 0.5)["layer_0"]
    c = np.asarray(z).T @ np.asarray(z) / batch
    np.fill_diagonal(c, 0.0)
    np.testing.assert_allclose(new, np.asarray(r) - 0.5 * c @ np.asarray(r), rtol=1e-4, atol=1e-6)


def test_decorrelation_every_k_steps_updates_only_then():
    model = models.mlp((6,), 2, widths=(4,), decorrelation=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    y = jnp.zeros((8,), jnp.int32)
    variables = model.init(jax.random.PRNGKey(1), x)
    task = losses.make_task("classification")
    rule = make_rule("backprop", model, task, optax.sgd(0.0), decorrelation_every=3)
    state = rule.init(jax.random.PRNGKey(0), variables)
    step = jax.jit(rule.step)
    changed = []
    for i in range(6):
        new, state, _ = step(jax.random.PRNGKey(i), variables, state, (x, y))
        r_old, r_new = variables["decorrelation"]["layer_0"], new["decorrelation"]["layer_0"]
        changed.append(not np.allclose(r_old, r_new))
        variables = new
    assert changed == [True, False, False, True, False, False]


def test_jvp_wrt_node_noise_is_gradient_dot_noise(mlp_and_vars):
    model, variables, x = mlp_and_vars
    y = jnp.array([0, 1, 2, 3, 0, 1])
    shapes = model.preact_shapes(variables, x)
    zeros = [jnp.zeros(s.shape) for s in shapes]
    keys = jax.random.split(jax.random.PRNGKey(5), len(shapes))
    tangent = [jax.random.normal(k, s.shape) for k, s in zip(keys, shapes)]

    def loss(noise):
        return losses.cross_entropy(model.apply_layered(variables, x, noise)[0], y).sum()

    _, directional = jax.jvp(loss, (zeros,), (tangent,))
    grad = jax.grad(loss)(zeros)
    expected = sum(jnp.vdot(g, t) for g, t in zip(grad, tangent))
    np.testing.assert_allclose(directional, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "name,input_shape,options",
    [
        ("cnn", (40, 1), {}),
        ("cnn", (8, 8, 1), {}),
        ("vgg", (32, 32, 3), {}),
        ("vgg", (40, 1), {"layout": "vgg11"}),
        ("resnet", (40, 1), {}),
        ("resnet", (16, 16, 3), {"stage_channels": (8, 16, 32)}),
    ],
)
def test_conv_models_shapes(name, input_shape, options):
    model = models.make_model(name, input_shape, 10, **options)
    x = jnp.ones((2, *input_shape))
    out = jax.jit(lambda x: model.apply(model.init(jax.random.PRNGKey(0), x), x))(x)
    assert out.shape == (2, 10)


def test_cnn_trace_exposes_conv_preactivations():
    model = models.cnn((40, 1), 10, channels=(4, 8), dense=(16,))
    x = jnp.ones((2, 40, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    _, trace = model.apply_layered(variables, x)
    assert [a.shape for a in trace.preacts] == [(2, 40, 4), (2, 20, 8), (2, 16), (2, 10)]
    assert trace.inputs[2].shape == (2, 10 * 8)  # pooled twice, then flattened
    for i, (name, z, a) in enumerate(zip(model.layer_names, trace.inputs, trace.preacts)):
        np.testing.assert_allclose(model.layer_apply(i, variables["params"][name], z), a, rtol=1e-6)


def test_vgg16_layout_has_vgg16_size():
    model = models.vgg((32, 32, 3), 10, layout="vgg16")
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
    convs = sum(1 for layer in model.layers if layer.kind == "Conv")
    assert convs == 13
    num_params = sum(np.prod(p.shape) for p in jax.tree.leaves(variables))
    assert 14.9e6 < num_params < 15.3e6  # the CIFAR-10 VGG16: 13 convs + 512-512-10 head


def test_any_flax_module_works_with_forward_only_rules():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = models.from_flax(Tiny())
    assert not model.layered
    rule = make_rule("backprop", model, losses.make_task("classification"), optax.sgd(0.1))
    x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    variables = model.init(jax.random.PRNGKey(0), x)
    state = rule.init(jax.random.PRNGKey(0), variables)
    new, _, metrics = rule.step(jax.random.PRNGKey(1), variables, state, (x, y))
    assert np.isfinite(metrics["loss"])
    assert not np.allclose(
        new["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"]
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: models.make_model("transformer", (4,), 2), "valid choices: mlp, cnn, vgg, resnet"),
        (lambda: models.make_model("mlp", (4,), 2, depth=3), "valid options: widths"),
        (lambda: models.make_model("cnn", (4,), 2), "1-D signal"),
        (lambda: models.make_model("mlp", (4,), 2, activation="swish"), "relu, leaky_relu"),
        (lambda: models.make_model("vgg", (8, 8, 1), 2, layout="vgg99"), "vgg16"),
        (lambda: models.make_model("cnn", (8, 1), 2, decorrelation=True), "Dense layers only"),
    ],
)
def test_bad_model_requests_name_the_valid_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()
