"""Estimator constants: each gradient estimator is pinned to its formula, factors included.

With Adam a wrong scale learns just as well, so learning bounds cannot catch a missing factor;
these tests can. Weight perturbation and the forward gradient are checked for unbiasedness and
magnitude (the mean of many estimates against jax.grad). Every node-perturbation variant is
checked, for given noise, against an independent float64 NumPy computation of its formula
(docs/RULES.md section 1): its own forward pass, softmax cross-entropy and error signals, read
from the weights alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import flat, small_net

from altlearn import losses, models, rules
from altlearn.rules.base import rng_mode
from altlearn.rules.node_perturbation import draw_noise, estimate_from_noise

TASK = losses.make_task("classification")
SLOPE = 0.2  # leaky ReLU slope of the tiny nets (models.mlp's default)


# --------------------------------------------------------------------------------------------
# Weight perturbation and forward gradient: unbiased, with the right magnitude.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    """MLP 6-5-4-3 (74 parameters), batch 16, and the true gradient of the mean batch loss."""
    model = models.mlp((6,), 3, widths=(5, 4), activation="leaky_relu")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=16))
    return small_net(model, x, y)


# Both estimates are (g . u) u with u ~ N(0, I) over P = 74 parameters (plus O(sigma) terms for
# WP), so the mean of S of them is off g by about sqrt(P / S) ||g|| (0.06 ||g|| at S = 20000).
# Measured over seeds 0-19 at S = 20000: cosine >= 0.997 and norm ratio in [0.975, 1.025] for
# both rules; the wrong constants this guards against move the ratio by a factor (WP divided
# by sigma instead of sigma^2: 1e-3; FG scaled by 3: 3).
NUM_SAMPLES = 20_000


@pytest.mark.parametrize(
    "rule,options",
    [
        # sigma 1e-3: the O(sigma) curvature terms are negligible, and in float32 the loss
        # change (~1e-3 ||g||) is still far above the rounding of a loss near 1.
        ("weight_perturbation", {"sigma": 1e-3}),
        ("forward_gradient", {}),
        # +-1 noise: the same mean and covariance, so the same expectation
        ("weight_perturbation", {"sigma": 1e-3, "noise_distribution": "rademacher"}),
        ("forward_gradient", {"noise_distribution": "rademacher"}),
    ],
)
def test_estimate_is_unbiased_with_the_right_magnitude(net, rule, options):
    """The mean of NUM_SAMPLES estimates (the rule's own num_noise_samples average) against
    jax.grad, for three keys (one compilation)."""
    model, variables, batch, true = net
    r = rules.make_rule(rule, model, TASK, optax.sgd(0.1), num_noise_samples=NUM_SAMPLES, **options)
    state = r.init(jax.random.PRNGKey(4), variables)
    estimate = jax.jit(r.estimate)
    true = flat(true)
    for seed in range(3):
        mean = flat(estimate(jax.random.PRNGKey(seed), variables, state, batch)[0])
        cos = float(jnp.vdot(mean, true) / (jnp.linalg.norm(mean) * jnp.linalg.norm(true)))
        ratio = float(jnp.linalg.norm(mean) / jnp.linalg.norm(true))
        assert cos > 0.99, (seed, cos)
        assert 0.9 < ratio < 1.1, (seed, ratio)


# --------------------------------------------------------------------------------------------
# Node perturbation: every variant against a float64 NumPy reference, for given noise.
# --------------------------------------------------------------------------------------------

WIDTHS = (3, 4, 3, 2)  # input, hidden, hidden, output
BATCH = 3
NUM_NOISE = 2  # noise samples, to check their averaging too
# Finite differences are exact for given noise at any sigma, so a large one keeps float32's
# rounding of the loss and pre-activation differences (relative ~1e-7 / sigma) far below the
# tolerance; the jvp forms are linear in the noise and indifferent to its scale.
SIGMA = 0.3


def _leaky(a):
    return np.where(a > 0, a, SLOPE * a)


def _leaky_slope(a):
    return np.where(a > 0, 1.0, SLOPE)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cross_entropy(logits, y):
    return -np.log(_softmax(logits)[np.arange(len(y)), y])


class Reference:
    """Node perturbation in float64 NumPy from the weights: kernels W_l [in, out], biases b_l
    and decorrelation matrices R_l (None: none); z_l = R_l h_{l-1}, a_l = z_l W_l + b_l (+ eps_l),
    h_l = leaky(a_l), no activation on the output layer."""

    def __init__(self, weights, biases, decor, x, y):
        self.w, self.b, self.r, self.x, self.y = weights, biases, decor, x, y
        self.layers = len(weights)

    def forward(self, noise=None):
        """(per-sample losses, layer inputs z, pre-activations a) with ``noise[l]`` added to a_l."""
        h, zs, acts = self.x, [], []
        for i in range(self.layers):
            z = h if self.r is None else h @ self.r[i].T
            a = z @ self.w[i] + self.b[i]
            if noise is not None and noise[i] is not None:
                a = a + noise[i]
            zs.append(z)
            acts.append(a)
            h = _leaky(a) if i < self.layers - 1 else a
        return _cross_entropy(h, self.y), zs, acts

    def tangent(self, acts, noise):
        """Forward-mode derivative along node noise ``noise`` at the clean pass: (the
        per-sample loss's directional derivative, the tangent of every pre-activation)."""
        dh, das = np.zeros_like(self.x), []
        for i in range(self.layers):
            dz = dh if self.r is None else dh @ self.r[i].T
            da = dz @ self.w[i] + (0.0 if noise[i] is None else noise[i])
            das.append(da)
            dh = _leaky_slope(acts[i]) * da
        onehot = np.eye(acts[-1].shape[1])[self.y]
        return np.sum((_softmax(acts[-1]) - onehot) * das[-1], axis=1), das

    def grads(self, eps, variant, mode, sigma):
        """G_l = -(1/B) z_l^T e_l and -(1/B) sum_n e_l with e_l the error signal of ``variant``
        averaged over the noise samples eps[s][l]."""
        loss, zs, acts = self.forward()

        def perturbed(noise):  # (dl [B], da per layer)
            if mode == "finite_difference":
                loss_noisy, _, acts_noisy = self.forward(noise)
                return loss - loss_noisy, [an - ac for an, ac in zip(acts_noisy, acts)]
            dloss, das = self.tangent(acts, noise)
            return -dloss, das

        errors = [np.zeros_like(a) for a in acts]
        for sample in eps:
            if variant == "np":  # e_l = eps_l dl / sigma^2
                dl, _ = perturbed(sample)
                e = [n * dl[:, None] / sigma**2 for n in sample]
            elif variant == "anp":  # e_l = N dl da_l / S, S_n = sum_l ||da_ln||^2
                dl, da = perturbed(sample)
                total = sum(a.shape[1] for a in acts)  # every perturbed unit, output included
                s = sum(np.sum(d**2, axis=1) for d in da)
                e = [total * (dl / s)[:, None] * d for d in da]
            else:  # inp: pass l perturbs layer l only; e_l = n_l dl^(l) da_l / ||da_l||^2
                e = []
                for i in range(self.layers):
                    dl, da = perturbed([n if j == i else None for j, n in enumerate(sample)])
                    width = acts[i].shape[1]
                    e.append(width * (dl / np.sum(da[i] ** 2, axis=1))[:, None] * da[i])
            errors = [acc + el / len(eps) for acc, el in zip(errors, e)]
        batch = self.x.shape[0]
        return [(-(z.T @ e) / batch, -e.sum(axis=0) / batch) for z, e in zip(zs, errors)]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "decorrelated"])
def tiny(request):
    """MLP 3-4-3-2 (leaky ReLU), batch 3, the noise of NUM_NOISE samples, and the reference."""
    decorrelated = request.param
    model = models.mlp(
        (WIDTHS[0],),
        WIDTHS[-1],
        widths=WIDTHS[1:-1],
        negative_slope=SLOPE,
        activation="leaky_relu",
        decorrelation=decorrelated,
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, WIDTHS[0])), jnp.float32)
    y = jnp.array([0, 1, 1])
    # He-normal kernels, zero biases and R = I, each then moved by 0.3 N(0, 1): non-zero biases
    # and a non-identity R, so the reference checks where each enters.
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    variables = jax.tree.map(
        lambda a: jnp.asarray(a + 0.3 * rng.normal(size=a.shape), jnp.float32), variables
    )
    eps = [
        jnp.asarray(SIGMA * rng.normal(size=(NUM_NOISE, BATCH, w)), jnp.float32) for w in WIDTHS[1:]
    ]
    f64 = lambda a: np.asarray(a, np.float64)
    names = model.layer_names
    reference = Reference(
        [f64(variables["params"][n]["kernel"]) for n in names],
        [f64(variables["params"][n]["bias"]) for n in names],
        [f64(variables["decorrelation"][n]) for n in names] if decorrelated else None,
        f64(x),
        np.asarray(y),
    )
    return model, variables, (x, y), eps, reference


# (model, task, variables, batch, eps, keys_system, key_clean, variant, mode, sigma)
_estimate_from_noise = jax.jit(estimate_from_noise, static_argnums=(0, 1, 7, 8))


@pytest.mark.parametrize("mode", ["finite_difference", "jvp"])
@pytest.mark.parametrize("variant", ["np", "anp", "inp"])
def test_node_perturbation_matches_a_numpy_reference_for_given_noise(tiny, variant, mode):
    """np/anp/inp and (decorrelated model) dnp/danp/dinp, finite differences and jvp: JAX in
    float32, as users run it, against float64 NumPy. Measured, float32 is off by at most 2e-6 of
    each tensor's largest entry (large sigma, see SIGMA), and by up to 2e-4 of an entry much
    smaller than that (a sum that cancels), hence the tolerance: 1e-4 relative plus 1e-5 of the
    largest entry. A wrong factor, sign or averaging is off by O(1).
    """
    model, variables, batch, eps, reference = tiny
    keys = jax.random.split(jax.random.PRNGKey(0), NUM_NOISE)  # unread: no intrinsic noise
    grads, aux = _estimate_from_noise(
        model, TASK, variables, batch, eps, keys, jax.random.PRNGKey(0), variant, mode, SIGMA
    )
    expected = reference.grads(
        [[np.asarray(e[s], np.float64) for e in eps] for s in range(NUM_NOISE)],
        variant,
        mode,
        SIGMA,
    )
    for name, (kernel, bias) in zip(model.layer_names, expected):
        for got, want in ((grads[name]["kernel"], kernel), (grads[name]["bias"], bias)):
            atol = 1e-5 * np.max(np.abs(want))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol, err_msg=name)
    np.testing.assert_allclose(aux.loss, reference.forward()[0].mean(), rtol=1e-6)


def test_the_rule_is_its_noise_draw_and_the_estimate_from_that_noise(tiny):
    """rule.estimate(key) is estimate_from_noise on the noise draw_noise draws from the key:
    the noise the reference test gives is the noise the rule uses."""
    model, variables, batch, _, _ = tiny
    options = {"variant": "anp", "sigma": SIGMA, "num_noise_samples": NUM_NOISE}
    rule = rules.make_rule("node_perturbation", model, TASK, optax.sgd(0.1), **options)
    key = jax.random.PRNGKey(5)
    got = jax.jit(rule.estimate)(key, variables, rule.init(key, variables), batch)[0]
    _, trace = model.apply_layered(variables, batch[0])
    with rng_mode("auto"):  # the rule's default threefry mode
        key_clean, key_noise = jax.random.split(key)
        eps, keys = draw_noise(key_noise, trace.preacts, SIGMA, NUM_NOISE)
    want, _ = _estimate_from_noise(
        model, TASK, variables, batch, eps, keys, key_clean, "anp", "finite_difference", SIGMA
    )
    # Compiled apart, the two may round differently (~1e-6); other noise would be off by O(1).
    got, want = flat(got), flat(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("distribution", ["normal", "rademacher"])
def test_node_noise_has_covariance_sigma2_and_is_independent_per_sample_and_unit(distribution):
    """draw_noise: eps_l of mean 0 and variance sigma^2 (normal: with normal tails; rademacher:
    every entry exactly +-sigma), fresh for every noise sample, batch row, unit, layer and key
    (a noise shared by the batch or by the noise samples correlates fully; for rademacher, the
    32 signs unpacked from one random word are independent bits)."""
    shapes = (
        jax.ShapeDtypeStruct((50, 40), jnp.float32),
        jax.ShapeDtypeStruct((50, 8), jnp.float32),
    )
    draw = jax.jit(draw_noise, static_argnums=(1, 3, 4))
    eps, keys = draw(jax.random.PRNGKey(0), shapes, 0.01, 25, distribution)
    assert [e.shape for e in eps] == [(25, 50, 40), (25, 50, 8)]
    assert keys.shape[0] == 25
    eps = [np.asarray(e, np.float64) / 0.01 for e in eps]
    flat_eps = np.concatenate([np.ravel(e) for e in eps])  # 60000 draws
    assert abs(flat_eps.mean()) < 0.02 and abs(flat_eps.std() - 1) < 0.02
    if distribution == "normal":
        assert np.mean(np.abs(flat_eps) > 2) > 0.04  # normal tails (+-1 noise has none)
    else:
        np.testing.assert_allclose(np.abs(flat_eps), 1.0, rtol=1e-6)
    corr = lambda a, b: abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
    # Neighbours along each axis of layer 0 (~49000 pairs each: chance correlation ~0.005).
    big = eps[0]
    assert corr(big[:-1], big[1:]) < 0.03  # noise sample s vs s + 1
    assert corr(big[:, :-1], big[:, 1:]) < 0.03  # batch row n vs n + 1
    assert corr(big[..., :-1], big[..., 1:]) < 0.03  # unit i vs i + 1 (bits of one word)
    assert corr(big[..., :32], big[..., 32:40].repeat(4, axis=-1)) < 0.03  # word vs next word
    assert corr(big[..., :8], eps[1]) < 0.05  # layer 0 vs layer 1 (10000 pairs)
    again, _ = draw(jax.random.PRNGKey(1), shapes, 0.01, 25, distribution)
    assert corr(big, np.asarray(again[0]) / 0.01) < 0.03  # another key (step, seed): others


@pytest.mark.parametrize("partitionable", [False, True])
def test_the_written_out_threefry_is_jaxs_own_stream(partitionable):
    """altlearn.prng's random_bits, normal, split and fold_in equal JAX's, bit for bit (same
    stream, faster kernel), in both threefry modes, for raw and typed keys, odd and even sizes,
    under jit and vmap; another generator (rbg) falls back to JAX's own functions."""
    from altlearn import prng

    equal = np.testing.assert_array_equal
    with jax.threefry_partitionable(partitionable):
        for key in (jax.random.PRNGKey(3), jax.random.key(11)):
            data = jax.random.key_data
            for shape in ((7,), (5, 33)):  # odd, and even over two dimensions
                equal(prng.random_bits(key, shape), jax.random.bits(key, shape, jnp.uint32))
                equal(prng.normal(key, shape), jax.random.normal(key, shape, jnp.float32))
            for num in (1, 2):
                equal(data(prng.split(key, num)), data(jax.random.split(key, num)))
            for d in (5, 2**31 + 7):
                equal(data(prng.fold_in(key, d)), data(jax.random.fold_in(key, d)))
        keys = jax.random.split(jax.random.PRNGKey(5), 3)
        got = jax.jit(jax.vmap(lambda k: prng.random_bits(k, (9,))))(keys)
        equal(got, jax.vmap(lambda k: jax.random.bits(k, (9,)))(keys))
        got = jax.jit(jax.vmap(lambda k, i: prng.fold_in(prng.split(k)[1], i)))(keys, jnp.arange(3))
        equal(
            got,
            jax.vmap(lambda k, i: jax.random.fold_in(jax.random.split(k)[1], i))(
                keys, jnp.arange(3)
            ),
        )
    rbg = jax.random.key(2, impl="rbg")
    equal(prng.random_bits(rbg, (6,)), jax.random.bits(rbg, (6,)))
    equal(jax.random.key_data(prng.split(rbg, 3)), jax.random.key_data(jax.random.split(rbg, 3)))
    equal(prng.normal(key, (3,), jnp.float16), jax.random.normal(key, (3,), jnp.float16))


def test_an_unknown_noise_distribution_is_refused_naming_the_valid_ones(net):
    model = net[0]
    for rule in ("node_perturbation", "weight_perturbation", "forward_gradient"):
        with pytest.raises(ValueError, match="valid choices: normal, rademacher"):
            rules.make_rule(rule, model, TASK, optax.sgd(0.1), noise_distribution="uniform")
