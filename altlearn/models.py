"""Models: layered networks with an open forward pass, and any flax module.

A ``LayeredModel`` is a sequence of parametric layers (``Dense`` or ``Conv`` below). Layer l
maps its input z_{l-1} to the pre-activation a_l = layer_l(params_l, z_{l-1}) (+ optional node
noise eps_l); h_l = f(a_l), and the last layer has no f. Parameter-free maps between layers
(pooling, flattening) belong to the next layer's ``pre``. With ``decorrelation=True`` every dense
layer applies a square, non-trainable matrix R_l to its input, z = R_l h (node perturbation's
decorrelation), kept in the ``'decorrelation'`` collection next to ``'params'``.

``apply_layered`` returns each layer's input z and pre-activation a: node perturbation, per-neuron
training and closed-form solves need exactly these, and ``jax.jvp`` w.r.t. the node noise works.
The model owns the rest of its structure too: ``layer_names`` (the keys of each layer in the
variables; nothing else builds them), ``layer_input`` (the map from one layer's output to the
next layer's input: pooling or flattening, then decorrelation), ``activate``, ``layer_apply``
and ``forward_from`` (the output from one layer's pre-activation on, for rules that change one
layer and evaluate only what lies downstream).

Rules that need only a forward pass accept any flax module through ``FlaxModel`` (``resnet`` is
one). A rule that needs the layered interface refuses a ``FlaxModel`` with a clear error.

Every provided model builds its dense and convolutional layers from ``Dense`` and ``Conv``
below: flax's layers that, given a ``'feedback'`` collection holding a matrix B of a layer's
kernel shape, send the input's cotangent back through B in place of the kernel W (the weight's
cotangent stays the usual one). ``jax.grad`` of any such model, layered or not, then computes
the feedback-alignment family's updates (``altlearn.rules._feedback``); without the collection
the layers are flax's own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from altlearn import prng

Variables = dict[str, Any]  # flax variables: {'params': ..., optionally 'decorrelation': ...}

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "gelu", "sigmoid", "identity")


def make_activation(name: str, negative_slope: float = 0.2) -> Callable[[jax.Array], jax.Array]:
    """Activation by name; ``leaky_relu`` uses ``negative_slope`` (the NP reference uses 0.2)."""
    if name == "relu":
        return jax.nn.relu
    if name == "leaky_relu":
        return functools.partial(jax.nn.leaky_relu, negative_slope=negative_slope)
    if name == "tanh":
        return jnp.tanh
    if name == "gelu":
        return jax.nn.gelu
    if name == "sigmoid":
        return jax.nn.sigmoid
    if name == "identity":
        return lambda x: x
    raise ValueError(f"Unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}.")


def flatten(h: jax.Array) -> jax.Array:
    return h.reshape(h.shape[0], -1)


def max_pool(h: jax.Array, window: int = 2) -> jax.Array:
    """Max pooling over every spatial axis of [B, *spatial, C], 'SAME' padding."""
    dims = (window,) * (h.ndim - 2)
    return nn.max_pool(h, dims, strides=dims, padding="SAME")


def compose(*fns: Callable | None) -> Callable | None:
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None
    return lambda h: functools.reduce(lambda acc, f: f(acc), fns, h)


def feedback_product(op: Callable, x: jax.Array, kernel: jax.Array, feedback: jax.Array):
    """``op(x, kernel)`` (a product linear in x and in the kernel: dense or convolution) whose
    VJP sends x's cotangent back through ``feedback`` in place of ``kernel``.

    Forward: y = op(x, W). Backward, for the output cotangent g: the kernel's cotangent is
    op's own (z^T g for a dense layer), the input's is what op's would be with W replaced by B
    (g B^T for a dense layer, the transposed convolution with kernel B for a convolution), and
    B gets none: feedback is fixed within a step. With B = W this is op's exact VJP.
    """

    @jax.custom_vjp
    def product(x, kernel, feedback):
        return op(x, kernel)

    def forward(x, kernel, feedback):
        return op(x, kernel), (x, kernel, feedback)

    def backward(saved, g):
        x, kernel, feedback = saved
        _, kernel_vjp = jax.vjp(lambda k: op(x, k), kernel)
        _, input_vjp = jax.vjp(lambda x: op(x, feedback), x)
        return input_vjp(g)[0], kernel_vjp(g)[0], jnp.zeros_like(feedback)

    product.defvjp(forward, backward)
    return product(x, kernel, feedback)


def _feedback_call(module: nn.Module, x: jax.Array, plain: Callable) -> jax.Array:
    """``module(x)``, its input cotangent through ``'feedback'``'s kernel where one is given."""
    if not module.has_variable("feedback", "kernel"):
        return plain(x)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias")  # None for a layer without one
    bare = module.clone(parent=None)  # the same layer as a function of (x, kernel), no bias
    zero = {} if bias is None else {"bias": jnp.zeros(bias.shape, bias.dtype)}
    op = lambda x, k: bare.apply({"params": {"kernel": k, **zero}}, x)
    y = feedback_product(op, x, kernel, module.get_variable("feedback", "kernel"))
    return y if bias is None else y + bias


class Dense(nn.Dense):
    """``flax.linen.Dense``, with feedback (the module docstring) where a kernel B is given."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _feedback_call(self, x, super().__call__)


class Conv(nn.Conv):
    """``flax.linen.Conv``, with feedback (the module docstring) where a kernel B is given."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return _feedback_call(self, x, super().__call__)


def feedback_kernels(params: Any) -> dict[str, Any]:
    """The kernels of ``params`` in the nesting a ``'feedback'`` collection takes: every leaf
    named ``kernel``, at its path (biases and other leaves dropped)."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] == "kernel"})


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parametric layer: ``pre`` (parameter-free) -> ``module`` -> ``activation``."""

    module: nn.Module
    activation: Callable[[jax.Array], jax.Array] | None
    pre: Callable[[jax.Array], jax.Array] | None = None

    @property
    def kind(self) -> str:
        return type(self.module).__name__


class Trace(NamedTuple):
    """What a layered forward pass saw: layer inputs z_{l-1} and pre-activations a_l."""

    inputs: tuple[jax.Array, ...]
    preacts: tuple[jax.Array, ...]


class LayeredModel:
    """A sequence of ``Layer``s whose forward pass exposes its layer inputs and pre-activations."""

    layered = True

    def __init__(
        self,
        name: str,
        layers: Sequence[Layer],
        decorrelation: bool = False,
        intrinsic_noise: float = 0.0,
        activation: str | None = None,
        negative_slope: float | None = None,
        input_shape: Sequence[int] | None = None,
    ):
        self.name = name
        self.layers = tuple(layers)
        self.input_shape = None if input_shape is None else tuple(input_shape)  # per sample
        # The hidden activation's name (and leaky slope) where it is one for all layers: rules
        # that solve for a layer in closed form need to know the function, not just call it.
        self.activation = activation
        self.negative_slope = negative_slope
        self.decorrelation = decorrelation
        if intrinsic_noise < 0:
            raise ValueError(f"intrinsic_noise must be >= 0, got {intrinsic_noise}.")
        self.intrinsic_noise = intrinsic_noise
        if decorrelation:
            bad = sorted({layer.kind for layer in self.layers if layer.kind != "Dense"})
            if bad:
                raise ValueError(
                    f"Decorrelation supports Dense layers only; model {name!r} has {bad}. "
                    "Use an mlp, or set model.decorrelation=False."
                )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The key of each layer in ``variables['params']`` (and ``'decorrelation'``), in order.

        Only this class builds these names; rules and evaluation read them from here.
        """
        return tuple(f"layer_{i}" for i in range(self.num_layers))

    def named(self, values: Sequence[Any]) -> dict[str, Any]:
        """``values`` (one per layer, in order) keyed by layer name."""
        return dict(zip(self.layer_names, values))

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        """Initialises every layer on a sample batch ``x`` of shape [B, *input_shape]."""
        params, decor = {}, {}
        h = x
        keys = jax.random.split(key, self.num_layers)
        for i, (name, k) in enumerate(zip(self.layer_names, keys)):
            layer = self.layers[i]
            z = layer.pre(h) if layer.pre is not None else h
            params[name] = layer.module.init(k, z)["params"]
            if self.decorrelation:
                decor[name] = jnp.eye(z.shape[-1], dtype=z.dtype)
            h = self.activate(i, layer.module.apply({"params": params[name]}, z))
        variables = {"params": params}
        if self.decorrelation:
            variables["decorrelation"] = decor
        return variables

    def layer_input(self, i: int, variables: Variables, h: jax.Array) -> jax.Array:
        """z_i: the input of layer i made from the previous layer's output h_{i-1} (h_{-1} = x):
        the parameter-free map (flatten, pooling), then the decorrelation z = R_i h."""
        pre = self.layers[i].pre
        z = pre(h) if pre is not None else h
        decor = variables.get("decorrelation")
        if decor is not None:
            z = z @ decor[self.layer_names[i]].T  # z = R h for each sample
        return z

    def layer_apply(self, i: int, layer_params: Any, z: jax.Array, feedback: Any = None):
        """a_i = layer_i(params_i, z): the local map whose VJP gives a layer-local update
        (``feedback``: the layer's ``{'kernel': B}``, which carries z's cotangent instead)."""
        variables = {"params": layer_params}
        if feedback is not None:
            variables["feedback"] = feedback
        return self.layers[i].module.apply(variables, z)

    def activate(self, i: int, a: jax.Array) -> jax.Array:
        """h_i = f_i(a_i) (the identity for the output layer)."""
        f = self.layers[i].activation
        return f(a) if f is not None else a

    def apply_layered(
        self,
        variables: Variables,
        x: jax.Array,
        noise: Sequence[jax.Array | None] | None = None,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, Trace]:
        """Forward pass adding ``noise[l]`` (shape of a_l, or None) to each pre-activation.

        A model built with ``intrinsic_noise > 0`` is a *noisy system*: given a ``key``, every
        pre-activation also gets N(0, intrinsic_noise^2) noise that the caller never sees (as in
        analogue or biological hardware). Without a key the pass is noise-free (evaluation).

        Returns the output and the ``Trace`` of layer inputs z (after decorrelation) and
        pre-activations a (all noise included).
        """
        params = variables["params"]
        feedback = variables.get("feedback", {})
        keys = [None] * self.num_layers
        if key is not None and self.intrinsic_noise > 0:
            keys = list(prng.split(key, self.num_layers))
        inputs, preacts = [], []
        h = x
        for i, name in enumerate(self.layer_names):
            z = self.layer_input(i, variables, h)
            a = self.layer_apply(i, params[name], z, feedback.get(name))
            if noise is not None and noise[i] is not None:
                a = a + noise[i]
            if keys[i] is not None:
                a = a + self.intrinsic_noise * jax.random.normal(keys[i], a.shape, a.dtype)
            inputs.append(z)
            preacts.append(a)
            h = self.activate(i, a)
        return h, Trace(tuple(inputs), tuple(preacts))

    def forward_from(self, variables: Variables, layer: int, a: jax.Array) -> jax.Array:
        """The network output given layer ``layer``'s pre-activation ``a`` [B, ...]: the rest of
        ``apply_layered`` (noise-free), for rules that change one layer and evaluate only what
        lies downstream of it."""
        return self.preacts_from(variables, layer, a)[0]

    def preacts_from(
        self,
        variables: Variables,
        layer: int,
        a: jax.Array,
        noise: Sequence[jax.Array | None] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(output, pre-activations of layers ``layer``.. as ``apply_layered`` would give them)
        given layer ``layer``'s pre-activation ``a`` (taken as it is, noise included) and
        ``noise[l]`` added to each later layer's (entries before ``layer`` are ignored).

        On a noise-free system a pass whose first perturbation enters at layer l equals the
        clean pass up to a_l, so it can start there (node perturbation's noisy passes do): the
        layers before l are never recomputed. A noisy system draws fresh intrinsic noise in
        every layer of every pass, so there it is not the same pass (it has no ``key`` here)."""
        preacts = [a]
        for i in range(layer + 1, self.num_layers):
            z = self.layer_input(i, variables, self.activate(i - 1, preacts[-1]))
            a = self.layer_apply(i, variables["params"][self.layer_names[i]], z)
            if noise is not None and noise[i] is not None:
                a = a + noise[i]
            preacts.append(a)
        return self.activate(self.num_layers - 1, preacts[-1]), tuple(preacts)

    def apply(self, variables: Variables, x: jax.Array) -> jax.Array:
        return self.apply_layered(variables, x)[0]

    def preact_shapes(
        self, variables: Variables, x: jax.Array | None = None
    ) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Shapes of the pre-activations for input ``x`` (to draw node noise); without ``x``,
        for a batch of one sample of the model's ``input_shape``."""
        if x is None:
            if self.input_shape is None:
                raise ValueError(f"Model {self.name!r} was built without an input shape.")
            x = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        return jax.eval_shape(lambda v, x: self.apply_layered(v, x)[1].preacts, variables, x)


class FlaxModel:
    """Any flax module as a forward-only model (for rules that do not need the layers)."""

    layered = False

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        variables = self.module.init(key, x)
        return {
            "params": variables["params"],
            **{k: v for k, v in variables.items() if k != "params"},
        }

    def apply(self, variables: Variables, x: jax.Array) -> jax.Array:
        return self.module.apply(variables, x)


Model = LayeredModel | FlaxModel


def from_flax(module: nn.Module, name: str | None = None) -> FlaxModel:
    """Wraps a flax module ``module(x) -> outputs`` for forward-only rules."""
    return FlaxModel(name or type(module).__name__, module)


# --------------------------------------------------------------------------------------------
# Provided models. Each factory takes (input_shape, num_outputs, **options).
# --------------------------------------------------------------------------------------------


def _he(scale: float) -> Callable:
    """He-normal kernels (std sqrt(2 / fan_in), truncated), times ``scale``."""
    if not float(scale) > 0:
        raise ValueError(f"init_scale must be > 0, got {scale}.")
    return nn.initializers.variance_scaling(2.0 * float(scale) ** 2, "fan_in", "truncated_normal")


def _dense(features: int, scale: float = 1.0) -> Dense:
    return Dense(features, kernel_init=_he(scale))


def _conv(features: int, kernel_size: int, spatial_dims: int, scale: float = 1.0) -> Conv:
    return Conv(
        features,
        (kernel_size,) * spatial_dims,
        padding="SAME",
        kernel_init=_he(scale),
    )


def _spatial_dims(model: str, input_shape: Sequence[int]) -> int:
    if len(input_shape) not in (2, 3):
        raise ValueError(
            f"Model {model!r} needs a 1-D signal [L, C] or an image [H, W, C] input; this dataset "
            f"has input shape {tuple(input_shape)}. Use model.name='mlp' for tables."
        )
    return len(input_shape) - 1


def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    widths: Sequence[int] = (256, 256),
    activation: str = "relu",
    negative_slope: float = 0.2,
    decorrelation: bool = False,
    intrinsic_noise: float = 0.0,
    init_scale: float = 1.0,
) -> LayeredModel:
    """Multilayer perceptron: flatten -> [Dense -> f] * len(widths) -> Dense(num_outputs).

    Kernels are He-normal times ``init_scale`` (1: He; 0.1 or 10 make a poor initialisation).
    """
    f = make_activation(activation, negative_slope)
    sizes = [*widths, num_outputs]
    layers = [
        Layer(_dense(w, init_scale), f if i < len(widths) else None, flatten if i == 0 else None)
        for i, w in enumerate(sizes)
    ]
    return LayeredModel(
        "mlp",
        layers,
        decorrelation,
        intrinsic_noise,
        activation,
        float(negative_slope),
        input_shape,
    )


def _conv_stack(
    name: str,
    input_shape: Sequence[int],
    num_outputs: int,
    layout: Sequence[int | str],
    dense: Sequence[int],
    kernel_size: int,
    activation: str,
    negative_slope: float,
    decorrelation: bool,
    intrinsic_noise: float,
    init_scale: float = 1.0,
) -> LayeredModel:
    """Convolutions (ints) and max pools ('M'), then flatten and dense layers; kernels He-normal
    times ``init_scale``."""
    spatial = _spatial_dims(name, input_shape)
    f = make_activation(activation, negative_slope)
    layers: list[Layer] = []
    pending: Callable | None = None
    for item in layout:
        if item == "M":
            pending = compose(pending, max_pool)
        else:
            layers.append(Layer(_conv(int(item), kernel_size, spatial, init_scale), f, pending))
            pending = None
    pending = compose(pending, flatten)
    for i, w in enumerate([*dense, num_outputs]):
        layers.append(Layer(_dense(w, init_scale), f if i < len(dense) else None, pending))
        pending = None
    return LayeredModel(name, layers, decorrelation, intrinsic_noise, input_shape=input_shape)


def cnn(
    input_shape: Sequence[int],
    num_outputs: int,
    channels: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    dense: Sequence[int] = (128,),
    activation: str = "relu",
    negative_slope: float = 0.2,
    decorrelation: bool = False,
    intrinsic_noise: float = 0.0,
    init_scale: float = 1.0,
) -> LayeredModel:
    """Small CNN for 1-D signals (mnist1d) and images: [conv -> f -> pool] per channel count."""
    layout = [c for ch in channels for c in (ch, "M")]
    return _conv_stack(
        "cnn",
        input_shape,
        num_outputs,
        layout,
        dense,
        kernel_size,
        activation,
        negative_slope,
        decorrelation,
        intrinsic_noise,
        init_scale,
    )


VGG_LAYOUTS: dict[str, tuple[int | str, ...]] = {
    "small": (32, 32, "M", 64, 64, "M"),
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ),
}


def vgg(
    input_shape: Sequence[int],
    num_outputs: int,
    layout: str = "small",
    dense: Sequence[int] = (512, 512),
    activation: str = "relu",
    negative_slope: float = 0.2,
    decorrelation: bool = False,
    intrinsic_noise: float = 0.0,
    init_scale: float = 1.0,
) -> LayeredModel:
    """VGG-style network: 3x3 convolutions and max pools by ``layout`` (VGG_LAYOUTS), then dense.

    ``layout='vgg16'`` on 32x32x3 inputs is the VGG16 used for CIFAR-10 by paper 004.
    """
    if layout not in VGG_LAYOUTS:
        raise ValueError(f"Unknown vgg layout {layout!r}; valid choices: {', '.join(VGG_LAYOUTS)}.")
    return _conv_stack(
        "vgg",
        input_shape,
        num_outputs,
        VGG_LAYOUTS[layout],
        dense,
        3,
        activation,
        negative_slope,
        decorrelation,
        intrinsic_noise,
        init_scale,
    )


class ResNet(nn.Module):
    """A small pre-activation-free residual network for 1-D signals and images."""

    num_outputs: int
    spatial_dims: int
    stage_channels: Sequence[int] = (16, 32)
    blocks_per_stage: int = 1
    activation: Callable = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = (3,) * self.spatial_dims
        init = nn.initializers.he_normal()
        h = self.activation(Conv(self.stage_channels[0], k, padding="SAME", kernel_init=init)(x))
        for s, c in enumerate(self.stage_channels):
            for b in range(self.blocks_per_stage):
                stride = (
                    (2,) * self.spatial_dims if (s > 0 and b == 0) else (1,) * self.spatial_dims
                )
                r = Conv(c, k, strides=stride, padding="SAME", kernel_init=init)(h)
                r = Conv(c, k, padding="SAME", kernel_init=nn.initializers.zeros)(
                    self.activation(r)
                )
                if h.shape[-1] != c or stride[0] != 1:
                    h = Conv(c, (1,) * self.spatial_dims, strides=stride, kernel_init=init)(h)
                h = self.activation(h + r)
        h = jnp.mean(h, axis=tuple(range(1, 1 + self.spatial_dims)))
        return Dense(self.num_outputs, kernel_init=init)(h)


def resnet(
    input_shape: Sequence[int],
    num_outputs: int,
    stage_channels: Sequence[int] = (16, 32),
    blocks_per_stage: int = 1,
    activation: str = "relu",
    negative_slope: float = 0.2,
) -> FlaxModel:
    """Residual network: a 3x3 convolution, then ``len(stage_channels)`` stages of
    ``blocks_per_stage`` blocks, global average pooling and a dense output layer.

    Each block is x -> f(x + conv(f(conv(x)))) with the second conv zero-initialised, so every
    block starts as the identity (no batch normalisation); the first block of each later stage
    halves the resolution (a strided 1x1 convolution on the shortcut). Not layered (a block is
    not a sequence), so layer-wise rules refuse it; backprop, the population rules and the
    feedback-alignment family (``fa``, ``usf``, ``brsf``, ``frsf``, ``kp``) train it.
    ``stage_channels=(16, 32, 64), blocks_per_stage=3`` is ResNet-20 (He et al. 2016's CIFAR-10
    network: 1 + 3 x 3 x 2 convolutions + 1 dense layer; experiments/configs/feedback.py).
    """
    spatial = _spatial_dims("resnet", input_shape)
    module = ResNet(
        num_outputs,
        spatial,
        tuple(stage_channels),
        blocks_per_stage,
        make_activation(activation, negative_slope),
    )
    return FlaxModel("resnet", module)


MODELS: dict[str, Callable[..., Model]] = {"mlp": mlp, "cnn": cnn, "vgg": vgg, "resnet": resnet}


def model_options(name: str) -> dict[str, Any]:
    """The configurable options of model ``name`` with their defaults."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid choices: {', '.join(MODELS)}.")
    params = list(inspect.signature(MODELS[name]).parameters.values())[2:]
    return {p.name: p.default for p in params}


def make_model(name: str, input_shape: Sequence[int], num_outputs: int, **options: Any) -> Model:
    """Builds model ``name`` for inputs of ``input_shape``; unknown options are an error."""
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown} for model {name!r}; valid options: {', '.join(valid)}."
        )
    return MODELS[name](tuple(input_shape), num_outputs, **options)
