"""Test set-up: CPU only, eight fake devices so sharding code runs everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pytest  # noqa: E402

from altlearn.config import base_config  # noqa: E402


def set_dotted(config, overrides: dict) -> None:
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value


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
