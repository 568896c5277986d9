"""Test set-up: CPU only, eight fake devices so sharding code runs everywhere."""

import os
import tempfile

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

import pytest  # noqa: E402

from altlearn.config import base_config, set_key  # noqa: E402


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
def make_tiny_config():
    return tiny_config
