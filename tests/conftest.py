"""Test set-up: CPU only, eight fake devices so sharding code runs everywhere."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# JAX's persistent compilation cache, shared by the test workers and the binaries the tests
# start (they inherit the environment): a run resumed, repeated or started again as a process
# compiles the same programs, and loading one is faster than compiling it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "altlearn-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# The tests' programs are tiny and run for a few steps: compiling them dominates, and XLA's
# optimisation passes are most of a compile (about 40% of the suite's time). The tests check
# behaviour and equalities between programs compiled alike; the binaries and benchmarks keep
# the optimised pipeline.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402

from altlearn.config import base_config, set_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The slow tests first: with the workers busy on them early, the suite ends on short
    tests, not on one worker finishing a long one while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


FIGURES = ("step", "train_loss", "val_loss", "test_loss", "test_accuracy")


def small_problem(widths: tuple[int, ...]):
    """(model, variables, data, batches): an MLP 6-widths-3 on 96 random samples, split 64
    train / 32 val, and four training batches of 16 (a rule's own tests step it by hand)."""
    import jax

    from altlearn import models

    model = models.mlp((6,), 3, widths=widths)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (96, 6))
    y = jax.random.randint(keys[1], (96,), 0, 3)
    variables = model.init(keys[2], x[:1])
    data = {"train": (x[:64], y[:64]), "val": (x[64:], y[64:])}
    batches = [(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]) for i in range(4)]
    return model, variables, data, batches


def set_dotted(config, overrides: dict) -> None:
    for key, value in overrides.items():
        set_key(config, key, value)


def tiny_config(rule: str = "backprop", steps: int = 20, **overrides):
    """A small problem every rule must handle: digits, MLP 64-32-10, batch 64."""
    config = base_config(rule=rule, model="mlp", data="digits")
    config.model.widths = (32,)
    config.batch_size = 64
    config.steps = steps
    config.eval_every = max(1, steps // 2)
    config.optimizer.learning_rate = 1e-2
    set_dotted(config, overrides)
    return config


@pytest.fixture
def optimized():
    """XLA's optimisations on, for a test whose run, not its compile, takes the time (long runs
    of a wide model); conftest turns them off for the rest."""
    import jax

    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def make_tiny_config():
    return tiny_config


def run_program(config, key: int = 0, eval_at=None, hparams=None, dataset=None):
    """The training program of ``config`` (``altlearn.train.make_train``), jitted, for seed
    ``key``: its curves as numpy arrays, one entry per evaluation."""
    import jax
    import numpy as np

    from altlearn.train import make_train

    train = make_train(config, eval_at, dataset)
    _, curves = jax.jit(train)(jax.random.PRNGKey(key), hparams)
    return {k: np.asarray(v) for k, v in curves.items()}


def per_step(config, key: int = 0, dataset=None):
    """Every step's metrics of the training program (evaluated after every step): ``loss``
    (the batch loss before the step) and the rule's own, [steps] each, and the curves."""
    curves = run_program(config, key, range(int(config.steps) + 1), dataset=dataset)
    steps = {"loss": curves["train_loss_running"][1:]}
    steps.update({k[5:]: v[1:] for k, v in curves.items() if k.startswith("rule/")})
    return steps, curves


def run_module(module: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root, as a user runs a binary."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_binary(workdir, *flags: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``experiments.train`` into ``workdir`` with ``flags``."""
    return run_module("experiments.train", f"--workdir={workdir}", *flags, timeout=timeout)


def figures(workdir) -> dict:
    """The final figures of a run's ``summary.json``."""
    summary = json.loads((Path(workdir) / "summary.json").read_text())
    return {k: summary[k] for k in FIGURES}


def flat(tree):
    """Every leaf of ``tree`` in one vector."""
    import jax
    import jax.numpy as jnp

    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def small_net(model, x, y):
    """(model, variables, (x, y), the true gradient of the mean batch loss) for an estimator's
    tests (classification)."""
    import jax

    from altlearn import losses

    task = losses.make_task("classification")
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    loss = lambda p: task.loss(model.apply({"params": p}, x), y).mean()
    return model, variables, (x, y), jax.jit(jax.grad(loss))(variables["params"])


def step_by_hand(rule, variables, batches, steps: int, key: int = 5, init_key: int = 1):
    """``steps`` jitted steps of ``rule`` on ``batches`` in turn (step t's key:
    fold_in(PRNGKey(key), t)); (variables, state, metrics) after each."""
    import jax

    state = rule.init(jax.random.PRNGKey(init_key), variables)
    step = jax.jit(rule.step)
    out = []
    for t in range(steps):
        variables, state, metrics = step(
            jax.random.fold_in(jax.random.PRNGKey(key), t),
            variables,
            state,
            batches[t % len(batches)],
        )
        out.append((variables, state, metrics))
    return out
