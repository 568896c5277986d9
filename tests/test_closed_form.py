"""closed_form (paper 002): the solves against numpy, planted-teacher
recovery, a non-increasing loss, float32 mode and the errors for what it does not support.

Every test runs in JAX's 64-bit mode through a context (never the global flag: other tests share
the worker process), as the binaries run the rule.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import per_step, run_binary, run_program, tiny_config

from altlearn import driver, losses, models, rules
from altlearn.data import Dataset
from altlearn.train import Experiment

cf = importlib.import_module("altlearn.rules.closed_form")


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _design(xb, s, v):
    """The explicit n*K x h(d+1) design matrix: row (i, k) = (V[:, k] * S[i]) kron x_bar[i]."""
    n, k = xb.shape[0], v.shape[1]
    return np.stack([np.kron(v[:, j] * s[i], xb[i]) for i in range(n) for j in range(k)])


def _problem(k, alpha, n=23, d=3, h=4, seed=0):
    rng = np.random.default_rng(seed)
    xb = np.hstack([rng.normal(size=(n, d)), np.ones((n, 1))])
    w = rng.normal(size=(h, d + 1))
    v, c, y = rng.normal(size=(h, k)), rng.normal(size=k), rng.normal(size=(n, k))
    s = np.where(xb @ w.T > 0, 1.0, alpha)
    return xb, w, v, c, y, s


@pytest.mark.parametrize("k", [1, 3])
def test_output_step_equals_numpy_lstsq(k):
    rng = np.random.default_rng(k)
    features, targets = rng.normal(size=(40, 6)), rng.normal(size=(40, k))
    got = cf.output_solve(jnp.asarray(features), jnp.asarray(targets), 1e-14)
    want = np.linalg.lstsq(np.hstack([features, np.ones((40, 1))]), targets, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [5, 23, 64])  # padded chunks, one chunk, one larger chunk
def test_hidden_normal_equations_equal_the_explicit_design(k, alpha, chunk):
    xb, _, v, c, y, s = _problem(k, alpha)
    a, b = cf.hidden_normal_equations(*map(jnp.asarray, (xb, s, y - c, v)), chunk)
    design = _design(xb, s, v)
    np.testing.assert_allclose(np.asarray(a), design.T @ design, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(b), design.T @ (y - c).ravel(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_hidden_step_equals_numpy_lstsq_on_the_explicit_design(k):
    xb, w, v, c, y, s = _problem(k, 0.0, n=40)
    a, b = cf.hidden_normal_equations(*map(jnp.asarray, (xb, s, y - c, v)), 16)
    got = cf.hidden_solve(a, b, jnp.asarray(w), 1e-14)
    want = np.linalg.lstsq(_design(xb, s, v), (y - c).ravel(), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=1e-6, atol=1e-8)


def _teacher(n=300, d=5, h=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 100, d)).astype(np.float32)
    w, b, v = rng.normal(size=(d, h)), 0.5 * rng.normal(size=h), rng.normal(size=(h, k))
    y = (np.maximum(x @ w + b, 0) @ v).astype(np.float32)
    return Dataset("teacher", "regression", k, x[:n], y[:n], x[:0], y[:0], x[n:], y[n:])


def _teacher_config(width, steps, activation="relu"):
    config = tiny_config("closed_form", steps, loss="squared_error", batch_size=10**6)
    config.model.widths = (width,)
    config.model.activation = activation
    config.data.standardize = "none"
    return config


@pytest.mark.slow
def test_a_planted_two_layer_teacher_is_recovered():
    """Teacher in-5-4-2 ReLU; student width 8: 60 alternations reach < 1e-6 of the target
    energy on every seed (measured: 1e-12 .. 3e-9 after 50)."""
    data = _teacher()
    config = _teacher_config(8, 60)
    runs = driver.run(config, seeds=range(3), eval_at=[59], dataset=data)
    energy = 0.5 * float(np.mean(np.sum(data.y_train.astype(np.float64) ** 2, axis=1)))
    final = runs.curves["rule/loss_after"][:, -1]  # the last alternation's
    assert np.all(final < 1e-6 * energy), final / energy
    assert np.all(runs.curves["test_loss"][:, -1] < 1e-3 * energy)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_the_loss_never_increases(activation):
    """Digits, width 16, 15 alternations: every step's loss is at most the previous one, the
    next step starts from the last step's accepted loss, and the full steps, backtracked
    steps and step lengths are reported."""
    config = tiny_config("closed_form", 15, loss="squared_error", batch_size=10**6)
    config.model.activation = activation
    config.model.widths = (16,)
    steps, curves = per_step(config)
    m = {k: np.asarray(v, np.float64) for k, v in steps.items()}
    assert np.all(m["loss_after"] <= m["loss_output_solved"])
    assert np.all(np.diff(m["loss_after"]) <= 0)
    np.testing.assert_allclose(m["loss"][1:], m["loss_after"][:-1], rtol=1e-6)
    assert m["loss_after"][-1] < 0.08 < m["loss"][0]
    t = m["step_length"]
    assert np.all((t == 0) | np.isin(t, 2.0 ** -np.arange(11)))
    np.testing.assert_array_equal(m["accepted"], t == 1)
    assert float(curves["test_accuracy"][-1]) > 0.9


def test_model_params_are_the_solved_layers():
    """The model's float32 params (what evaluation sees) give the reported loss."""
    config = tiny_config("closed_form", 3, loss="squared_error", batch_size=10**6)
    config.model.widths = (16,)
    experiment = Experiment(config)
    state, metrics = jax.jit(lambda s: experiment.train_steps(s, 3))(
        experiment.init(jax.random.PRNGKey(0))
    )
    out = experiment.model.apply(state.variables, experiment.x_train)
    loss = float(jnp.mean(experiment.task.loss(out, experiment.y_train)))
    np.testing.assert_allclose(loss, float(metrics["loss_after"][-1]), rtol=1e-4)
    assert state.rule_state.hidden.dtype == jnp.float64
    assert state.variables["params"]["layer_0"]["kernel"].dtype == jnp.float32


def test_params_changed_outside_the_rule_are_picked_up():
    """The rule's float64 master copy must not silently override params set from outside."""
    config = tiny_config("closed_form", 2, loss="squared_error", batch_size=10**6)
    experiment = Experiment(config)
    rule = experiment.build_rule(experiment.default_hparams)
    variables = experiment.model.init(jax.random.PRNGKey(0), experiment.x_train[:1])
    state = rule.init(jax.random.PRNGKey(1), variables)
    batch = (experiment.x_train, experiment.y_train)
    step = jax.jit(rule.step)
    variables, state, _ = step(jax.random.PRNGKey(2), variables, state, batch)
    zeroed = jax.tree.map(jnp.zeros_like, variables)
    _, _, metrics = step(jax.random.PRNGKey(3), zeroed, state, batch)
    # With all-zero params the prediction is 0: the loss before is half the mean one-hot norm.
    np.testing.assert_allclose(float(metrics["loss"]), 0.5, rtol=1e-6)


@pytest.mark.slow
def test_float32_mode_learns_without_64_bit():
    with jax.enable_x64(False):
        config = tiny_config("closed_form", 8, loss="squared_error", batch_size=10**6)
        config.rule.dtype = "float32"
        curves = run_program(config, eval_at=())
        assert curves["rule/loss_after"].dtype == np.float32
        assert float(curves["train_loss"][-1]) < 0.05
        assert float(curves["test_accuracy"][-1]) > 0.92


def test_float64_without_64_bit_mode_is_a_clear_error():
    with jax.enable_x64(False):
        config = tiny_config("closed_form", 2, loss="squared_error", **{"rule.dtype": "float64"})
        with pytest.raises(ValueError, match="jax_enable_x64"):
            Experiment(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "loss is 'cross_entropy'"),
        ({"loss": "squared_error", "model.widths": (16, 16)}, "2 hidden layers"),
        ({"loss": "squared_error", "model.activation": "tanh"}, "activation is 'tanh'"),
        ({"loss": "squared_error", "model.decorrelation": True}, "decorrelation"),
        ({"loss": "squared_error", "rule.dtype": "float16"}, "valid choices"),
        ({"loss": "squared_error", "rule.max_backtracks": -1}, "max_backtracks"),
    ],
)
def test_unsupported_setups_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        Experiment(tiny_config("closed_form", 2, **overrides))
    if "valid choices" not in message:
        assert "closed_form supports two-layer dense" in str(error.value) or "must be" in str(
            error.value
        )


def test_a_non_mlp_model_is_a_clear_error():
    model = models.make_model("cnn", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="model is 'cnn'"):
        rules.make_rule(
            "closed_form",
            model,
            losses.make_task("classification", "squared_error"),
            optax.identity(),
        )


def test_a_normal_matrix_over_the_memory_budget_names_its_size():
    config = tiny_config("closed_form", 2, loss="squared_error", **{"rule.memory_budget_mb": 1})
    experiment = Experiment(config)
    with pytest.raises(ValueError, match=r"2080 x 2080 \(33 MB in float64"):
        experiment.init(jax.random.PRNGKey(0))


@pytest.mark.slow
def test_chunked_accumulation_gives_the_same_step():
    """A budget small enough to force many sample chunks changes nothing but the order of sums."""
    results = []
    for chunk in (0, 100):
        config = tiny_config(
            "closed_form", 3, loss="squared_error", batch_size=10**6, **{"rule.chunk_size": chunk}
        )
        config.model.widths = (16,)
        results.append(per_step(config)[0]["loss_after"])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-9)


@pytest.mark.slow
def test_binary_runs_closed_form_in_float64_and_records_every_alternation(tmp_path):
    import json

    result = run_binary(
        tmp_path,
        "--config=experiments/configs/closed_form.py:method=closed_form,data=wine",
        "--config.steps=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for r in records[1:]:
        assert {"rule/accepted", "rule/step_length", "rule/loss_after", "rule/backtracks"} <= set(r)
    train = [r["train_loss"] for r in records[1:]]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(train, train[1:])), train
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jax_enable_x64"] is True and summary["rule"] == "closed_form"
    assert summary["test_accuracy"] > 0.85
