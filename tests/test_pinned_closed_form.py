"""Pinned behaviour of the closed-form solves' pieces: the hidden step's ridge pulls towards the
current weights, the square loss's scale, the accumulation chunk a memory budget allows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altlearn.rules import closed_form as cf


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_the_hidden_ridge_pulls_towards_the_current_weights():
    """argmin ||D w - r||^2 + lambda ||w - w_old||^2: a huge ridge returns w_old (not 0, not
    -w_old); a unit no sample activates (all-zero rows of D) keeps its weights at any ridge."""
    rng = np.random.default_rng(0)
    xb = np.hstack([rng.normal(size=(30, 2)), np.ones((30, 1))])
    s = np.ones((30, 2))
    s[:, 1] = 0.0  # unit 1: never active
    v, residual = rng.normal(size=(2, 1)), rng.normal(size=(30, 1))
    w_old = jnp.asarray(rng.normal(size=(2, 3)))

    @jax.jit
    def solve(ridges):
        a, b = cf.hidden_normal_equations(*map(jnp.asarray, (xb, s, residual, v)), 30)
        return [cf.hidden_solve(a, b, w_old, r) for r in ridges]

    pulled, solved = solve((1e12, 1e-8))
    np.testing.assert_allclose(pulled, w_old, rtol=1e-6)
    np.testing.assert_allclose(solved[1], w_old[1], rtol=1e-9)
    assert not np.allclose(solved[0], w_old[0])


def test_square_loss_is_half_the_mean_squared_norm():
    prediction, targets = jnp.array([[1.0, 2.0], [0.0, 0.0]]), jnp.array([[0.0, 0.0], [3.0, 0.0]])
    assert float(cf.square_loss(prediction, targets)) == 0.5 * (5.0 + 9.0) / 2


def test_the_sample_chunk_is_the_most_whose_slice_of_u_fits_the_budget():
    """chunk x h(d+1) x itemsize bytes of U per chunk within memory_budget_mb, at least one
    sample; a given chunk_size is used as it is."""
    assert cf.sample_chunk_size(4, 3, 8, 0, 1) == 2**20 // 96
    assert cf.sample_chunk_size(4, 3, 8, 0, 3) == 3 * 2**20 // 96
    assert cf.sample_chunk_size(2**12, 2**10, 8, 0, 1) == 1
    assert cf.sample_chunk_size(4, 3, 8, 7, 1) == 7


@pytest.mark.parametrize("max_backtracks", [3, 0])
def test_an_alternation_is_accepted_backtracked_or_rejected_and_reports_which(max_backtracks):
    """Six alternations on a small regression problem (the hidden step needs halving on some):
    a full step is accepted (step length 1, no backtrack), a halved one reports its length
    2^-backtracks, a rejected one length 0 after max_backtracks halvings and keeps the hidden
    layer; the loss never rises and the next alternation starts from it."""
    from conftest import step_by_hand

    from altlearn import losses, models, rules

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(40, 2)), jnp.float32)
    model = models.mlp((3,), 2, widths=(6,), activation="relu")
    task = losses.make_task("regression")
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    rule = rules.make_rule("closed_form", model, task, None, {}, max_backtracks=max_backtracks)
    runs = step_by_hand(rule, variables, [(x, y)], 6)
    hidden, lengths = rule.init(None, variables).hidden, []
    for t, (_, state, m) in enumerate(runs):
        m = {k: float(v) for k, v in m.items()}
        length, backtracks = m["step_length"], m["backtracks"]
        lengths.append(length)
        assert m["loss_after"] <= m["loss_output_solved"] <= m["loss"]
        assert m["accepted"] == (length == 1.0)
        if length > 0:
            assert length == 2.0**-backtracks
        else:
            assert backtracks == max_backtracks
            np.testing.assert_array_equal(state.hidden, hidden)
        if t + 1 < len(runs):
            np.testing.assert_allclose(runs[t + 1][2]["loss"], m["loss_after"], rtol=1e-6)
        hidden = state.hidden
        assert int(state.count) == t + 1
    assert 1.0 in lengths and (0.25 in lengths if max_backtracks else 0.0 in lengths), lengths
