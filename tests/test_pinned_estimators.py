"""Pinned behaviour of the perturbation estimators beyond the small-sigma regime of
tests/test_estimators.py: weight perturbation is exact in expectation at ANY sigma where the loss
is linear in the weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from altlearn import losses, models, rules

# A loss linear in the single weight w: the model is out = w x, the loss is out itself, so at
# x = 1 the mean batch loss is L(w) = w and its gradient is exactly 1.
LINEAR = losses.Task("regression", "linear", lambda out, y: jnp.sum(out - y, axis=-1))


def test_weight_perturbation_is_unbiased_at_a_large_sigma_on_a_linear_loss():
    """On L(w) = w each noisy pass gives -dl eps / sigma^2 = n^2 (eps = sigma n), whatever
    sigma: the mean of 4096 samples is E[n^2] = 1 (standard error 0.022), also at sigma = 10,
    where the loss change (~10) is far larger than sigma^2's reciprocal."""
    model = models.from_flax(nn.Dense(1, use_bias=False), "scalar")
    variables = {"params": {"kernel": jnp.full((1, 1), 0.5)}}
    batch = jnp.ones((4, 1)), jnp.zeros((4, 1))
    for sigma in (1e-2, 10.0):
        rule = rules.make_rule(
            "weight_perturbation",
            model,
            LINEAR,
            optax.sgd(0.1),
            sigma=sigma,
            num_noise_samples=4096,
        )
        state = rule.init(jax.random.PRNGKey(0), variables)
        grads, aux, _ = jax.jit(rule.estimate)(jax.random.PRNGKey(1), variables, state, batch)
        estimate = float(grads["kernel"][0, 0])
        assert 0.9 < estimate < 1.1, (sigma, estimate)
        assert float(aux.loss) == 0.5
